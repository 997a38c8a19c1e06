"""The shared training loop: exact resume, data parallelism, NaN guard, Ctrl-C, lr schedules."""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from fewstep.data import load_dataset
from fewstep.denoiser import Denoiser
from fewstep.errors import FewstepError
from fewstep.nets import MLP
from fewstep.schedule import Schedule
from fewstep.teacher.method import TeacherTraining
from fewstep.train import TrainConfig, Trainer

INFO = {"name": "gmm8", "kind": "toy", "shape": [2]}


@pytest.fixture(scope="module")
def gmm8():
    return load_dataset("gmm8").x


def make_method(cls=TeacherTraining):
    torch.manual_seed(0)  # identical initial weights in every run
    return cls(Denoiser(MLP(dim=2, hidden=32, depth=2, dropout=0.0), Schedule.vp("linear", 64), "eps"), INFO)


def config(steps=20, **kw):
    base = dict(steps=steps, batch=64, lr=2e-3, seed=3, log_every=5, n_preview=0, device="cpu", progress=False)
    base.update(kw)
    return TrainConfig(**base)


def state(out_dir):
    return torch.load(out_dir / "train_state.pt", weights_only=True)


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("ema", [None, 0.9])
def test_resume_is_exact(gmm8, tmp_path, ema):
    Trainer(make_method(), config(20, ema=ema), tmp_path / "a", data=gmm8).run()
    Trainer(make_method(), config(10, ema=ema), tmp_path / "b", data=gmm8).run()
    assert state(tmp_path / "b")["step"] == 10
    # a fresh process would rebuild the method from scratch: the weights come from the saved state
    Trainer(make_method(), config(20, ema=ema), tmp_path / "b", data=gmm8, resume=True).run()
    a, b = state(tmp_path / "a"), state(tmp_path / "b")
    assert b["step"] == 20
    assert_same_weights(a["model"], b["model"])
    if ema is not None:
        assert_same_weights(a["ema"], b["ema"])
        assert not torch.equal(a["ema"]["net.out.weight"], a["model"]["net.out.weight"])
    from safetensors.torch import load_file
    assert_same_weights(load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors"))
    # and the run really trained: weights moved away from the (zero) initial output layer
    assert a["model"]["net.out.weight"].abs().sum() > 0


def test_adam_is_fused_on_cpu_and_a_run_saved_unfused_resumes_unfused_exactly(gmm8, tmp_path, monkeypatch):
    t = Trainer(make_method(), config(4), tmp_path / "fused", data=gmm8)
    assert t.optimizer.param_groups[0]["fused"] is True
    # a run from before fused Adam: its saved optimizer state says unfused, and a resume keeps that, so the
    # resumed run equals an unfused uninterrupted one bit for bit (fused Adam rounds differently)
    monkeypatch.setattr(Trainer, "__init__", _unfused(Trainer.__init__))
    Trainer(make_method(), config(20), tmp_path / "a", data=gmm8).run()
    Trainer(make_method(), config(10), tmp_path / "b", data=gmm8).run()
    monkeypatch.undo()
    resumed = Trainer(make_method(), config(20), tmp_path / "b", data=gmm8, resume=True)
    assert resumed.optimizer.param_groups[0]["fused"] is None
    resumed.run()
    assert_same_weights(state(tmp_path / "a")["model"], state(tmp_path / "b")["model"])
    Trainer(make_method(), config(20), tmp_path / "c", data=gmm8).run()
    assert not torch.equal(state(tmp_path / "a")["model"]["net.out.weight"], state(tmp_path / "c")["model"]["net.out.weight"])


def _unfused(init):
    def wrapped(self, *args, **kw):
        init(self, *args, **kw)
        for group in self.optimizer.param_groups:
            group["fused"] = None
    return wrapped


def test_run_directory_contents(gmm8, tmp_path):
    out = Trainer(make_method(), config(6, log_every=2), tmp_path / "r", data=gmm8,
                  run_info={"command": "fewstep train --data gmm8"}).run()
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "fewstep.json", "train_state.pt", "metrics.jsonl", "config.json"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [2, 4, 6] and all("loss" in r for r in recs)
    card = json.loads((out / "fewstep.json").read_text())
    assert card["training"]["iterations"] == 6 and card["training"]["finished"] is True
    assert card["training"]["command"] == "fewstep train --data gmm8"
    assert json.loads((out / "config.json").read_text())["train"]["steps"] == 6


def test_refuses_to_overwrite_a_run_without_resume(gmm8, tmp_path):
    Trainer(make_method(), config(3), tmp_path, data=gmm8).run()
    with pytest.raises(FewstepError, match="resume=True"):
        Trainer(make_method(), config(3), tmp_path, data=gmm8)
    with pytest.raises(FewstepError, match="nothing to resume"):
        Trainer(make_method(), config(3), tmp_path / "empty", data=gmm8, resume=True)
    with pytest.raises(FewstepError, match="batch"):
        Trainer(make_method(), config(6, batch=32), tmp_path, data=gmm8, resume=True)


def test_needs_data(tmp_path):
    with pytest.raises(FewstepError, match="needs training data"):
        Trainer(make_method(), config(3), tmp_path)


def test_config_validation():
    for bad in (dict(steps=0), dict(batch=0), dict(lr=0.0), dict(lr_schedule="linear"), dict(ema=1.0), dict(amp="fp8")):
        with pytest.raises(FewstepError):
            config(**bad).validate()


class NaNAt(TeacherTraining):
    def train_step(self, ctx, batch, gen):
        if ctx.t.step == 3:
            ctx.step(self.den.raw(batch, torch.tensor(1.0)).sum() * float("nan"))
        return super().train_step(ctx, batch, gen)


def test_nan_loss_raises_naming_the_iteration(gmm8, tmp_path):
    with pytest.raises(FewstepError, match="iteration 3"):
        Trainer(make_method(NaNAt), config(10), tmp_path, data=gmm8).run()
    assert not (tmp_path / "train_state.pt").exists()  # nothing half-written was kept


class InterruptBeforeStep(TeacherTraining):
    def train_step(self, ctx, batch, gen):
        if ctx.t.step == 7:
            raise KeyboardInterrupt
        return super().train_step(ctx, batch, gen)


class SignalAfterStep(TeacherTraining):
    """Ctrl-C arriving after the optimizer step but before the loop counted the iteration."""

    def train_step(self, ctx, batch, gen):
        logs = super().train_step(ctx, batch, gen)
        if ctx.t.step == 7:
            os.kill(os.getpid(), signal.SIGINT)
        return logs


@pytest.mark.parametrize("cls,saved_at", [(InterruptBeforeStep, None), (SignalAfterStep, 8)])
def test_interrupt_saves_state_and_resume_continues_exactly(gmm8, tmp_path, capsys, cls, saved_at):
    """A stop request (the first Ctrl-C or SIGTERM) saves after the iteration it lands in; an interrupt
    raised inside an iteration (a second one: stop at once) saves nothing of that half-updated iteration,
    and --resume continues from the last checkpoint (here none: from iteration 0). Either way the resumed
    run ends with the uninterrupted run's weights."""
    Trainer(make_method(), config(15, ema=0.9), tmp_path / "a", data=gmm8).run()
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job
    with pytest.raises(SystemExit) as e:
        Trainer(make_method(cls), config(15, ema=0.9), tmp_path / "b", data=gmm8).run()
    assert e.value.code == 130
    captured = capsys.readouterr()
    if saved_at is None:
        assert "stopped at once inside iteration 8; nothing of it was saved" in captured.err
        assert not (tmp_path / "b" / "train_state.pt").exists() and not (tmp_path / "b" / "fewstep.json").exists()
    else:
        assert f"interrupted at iteration {saved_at}" in captured.out
        assert state(tmp_path / "b")["step"] == saved_at
        card = json.loads((tmp_path / "b" / "fewstep.json").read_text())
        assert card["training"]["finished"] is False
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
    Trainer(make_method(), config(15, ema=0.9), tmp_path / "b", data=gmm8, resume=True).run()
    a, b = state(tmp_path / "a"), state(tmp_path / "b")
    assert_same_weights(a["model"], b["model"])
    assert_same_weights(a["ema"], b["ema"])


class CrashAt11(TeacherTraining):
    """A process dying inside iteration 11 (an error no handler sees, as when the machine goes)."""

    def train_step(self, ctx, batch, gen):
        if ctx.t.step == 10:
            raise RuntimeError("the machine went")
        return super().train_step(ctx, batch, gen)


def test_time_based_checkpoint_bounds_what_a_dead_run_loses(gmm8, tmp_path):
    """With no iteration cadence, ckpt_minutes alone checkpoints once that much training time passed since the
    last save (here any: every iteration), so the dead run keeps its 10 iterations and resumes to the
    uninterrupted run's weights; with it off the same death leaves nothing to resume."""
    for minutes, kept in ((0.0, None), (1e-9, 10)):
        out = tmp_path / f"m{minutes}"
        with pytest.raises(RuntimeError, match="the machine went"):
            Trainer(make_method(CrashAt11), config(15, ckpt_minutes=minutes), out, data=gmm8).run()
        assert (state(out)["step"] if (out / "train_state.pt").exists() else None) == kept
    Trainer(make_method(), config(15, ckpt_minutes=1e-9), out, data=gmm8, resume=True).run()
    Trainer(make_method(), config(15), tmp_path / "whole", data=gmm8).run()
    assert_same_weights(state(out)["model"], state(tmp_path / "whole")["model"])


def test_stopped_time_counts_a_late_tick_only_after_sigcont():
    """A tick later than the gap is time held, counted only once SIGCONT arrived (else it was a computation
    keeping the thread from its tick), less one interval; each take starts afresh."""
    from fewstep.loop_signals import StoppedTime
    now = [0.0]
    held = StoppedTime(interval=0.5, gap=2.0, clock=lambda: now[0])
    for t in (0.0, 0.5, 1.0, 9.0):  # 8 s between the last two ticks
        now[0] = t
        held.tick()
    assert held.take() == 0.0  # no SIGCONT: not a stop
    for t in (9.5, 20.0):
        now[0] = t
        held.tick()
    held._continued(signal.SIGCONT, None)
    now[0] = 20.5
    assert held.take() == pytest.approx(10.0) and held.take() == 0.0


class StopsItself(TeacherTraining):
    """The process is stopped (as by Ctrl-Z) inside iteration 4 and continued 4 s later by another process."""

    def train_step(self, ctx, batch, gen):
        if ctx.t.step == 3:
            waker = subprocess.Popen(["sh", "-c", f"sleep 4; kill -CONT {os.getpid()}"])
            os.kill(os.getpid(), signal.SIGSTOP)
            waker.wait()  # continued: reap it
        return super().train_step(ctx, batch, gen)


def test_time_the_process_was_stopped_is_not_training_time(gmm8, tmp_path):
    Trainer(make_method(StopsItself), config(8), tmp_path, data=gmm8).run()
    card = json.loads((tmp_path / "fewstep.json").read_text())
    assert card["training"]["wall_time_s"] < 2.5  # 8 tiny iterations, without the 4 s stopped
    assert signal.getsignal(signal.SIGCONT) is signal.SIG_DFL  # the handler is put back


class RecordLR(TeacherTraining):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.lrs = []

    def train_step(self, ctx, batch, gen):
        self.lrs.append(ctx.t.optimizer.param_groups[0]["lr"])
        return super().train_step(ctx, batch, gen)


def test_step_lr_schedule_divides_by_10_at_half(gmm8, tmp_path):
    m = make_method(RecordLR)
    Trainer(m, config(10, lr=1e-3, lr_schedule="step"), tmp_path, data=gmm8).run()
    assert m.lrs == pytest.approx([1e-3] * 5 + [1e-4] * 5, rel=1e-12)


def test_cosine_and_warmup_lr():
    t = Trainer(make_method(), config(100, lr=1.0, lr_schedule="cosine", warmup=10), "/nonexistent-unused",
                data=torch.zeros(4, 2))
    assert t.lr_at(0) == pytest.approx(0.1)  # warm-up: (0+1)/10 of the cosine value ≈ 1
    assert t.lr_at(50) == pytest.approx(0.5)
    assert t.lr_at(99) < 0.01


DDP_WORKER = textwrap.dedent("""
    import sys, torch
    from fewstep.data import load_dataset
    from fewstep.denoiser import Denoiser
    from fewstep.nets import MLP
    from fewstep.schedule import Schedule
    from fewstep.teacher.method import TeacherTraining
    from fewstep.train import TrainConfig, Trainer

    def run(out):
        torch.manual_seed(0)
        den = Denoiser(MLP(dim=2, hidden=32, depth=2, dropout=0.0), Schedule.vp("linear", 64), "eps")
        cfg = TrainConfig(steps=12, batch=64, lr=2e-3, seed=5, n_preview=0, device="cpu", progress=False,
                          log_every=4)
        Trainer(TeacherTraining(den, {"name": "gmm8", "shape": [2]}), cfg, out,
                data=load_dataset("gmm8").x).run()

    if __name__ == "__main__":
        run(sys.argv[1])
""")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_gloo_matches_one_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    import runpy
    runpy.run_path(str(script))["run"](tmp_path / "single")

    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "OMP_NUM_THREADS": "1"}
    if os.path.exists("/sys/class/net/lo"):  # keep gloo on loopback whatever the hostname resolves to
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "ddp")],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    try:
        outs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), outs
    one, two = state(tmp_path / "single"), state(tmp_path / "ddp")
    assert two["step"] == one["step"] == 12
    for k in one["model"]:
        assert torch.allclose(one["model"][k], two["model"][k], atol=1e-5, rtol=0), k
    assert json.loads((tmp_path / "ddp" / "fewstep.json").read_text())["training"]["processes"] == 2


def test_tensorboard_log_has_the_jsonl_scalars_and_preview_grids(gmm8, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    Trainer(make_method(), config(6, log="tensorboard", log_every=2, sample_every=3, n_preview=16),
            tmp_path, data=gmm8).run()
    board = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    board.Reload()
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    loss = {e.step: e.value for e in board.Scalars("loss")}
    assert loss.keys() == {r["step"] for r in logged} == {2, 4, 6}
    for r in logged:
        assert loss[r["step"]] == pytest.approx(r["loss"], rel=1e-6)
    assert {"lr", "grad_norm"} <= set(board.Tags()["scalars"])
    assert [e.step for e in board.Images("samples")] == [3, 6]  # mid-run preview and the final one


def test_tensorboard_without_the_extra_is_a_clear_error(gmm8, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as when not installed
    with pytest.raises(FewstepError, match=r"pip install 'fewstep\[tensorboard\]'"):
        Trainer(make_method(), config(2, log="tensorboard"), tmp_path / "run", data=gmm8)
    assert not (tmp_path / "run").exists()


def test_a_long_run_says_its_cost_before_spending_it(gmm8, tmp_path, monkeypatch, capsys):
    """After its first iterations a run projected past a minute names its iterations and wall time once; a
    short one says nothing."""
    from fewstep.timing import CostNote
    Trainer(make_method(), config(8), tmp_path / "short", data=gmm8).run()
    assert "iterations, about" not in capsys.readouterr().err
    monkeypatch.setattr(CostNote, "QUIET_BELOW_S", 0.0)
    monkeypatch.setattr(CostNote, "MIN_SECONDS", 0.0)
    Trainer(make_method(), config(8), tmp_path / "long", data=gmm8).run()
    err = [line for line in capsys.readouterr().err.splitlines() if "iterations, about" in line]
    assert len(err) == 1 and "teacher: 8 iterations, about" in err[0] and "the first 3 took" in err[0]


def test_the_cost_note_projects_from_iterations_that_computed_their_teacher_outputs(capsys):
    """A resumed run first redoes iterations the interrupted run had cached, at a fraction of the pace of those
    that compute: the projection waits for computed ones and uses their pace; where every iteration reads the
    cache for long enough, it projects from those and says so."""
    from fewstep.timing import CostNote
    now = [0.0]

    def run(pattern, steps=1000):
        note = CostNote("sfd", 0, steps, announce=True, clock=lambda: now[0])
        for k, cached in enumerate(pattern, 1):
            now[0] += 0.3 if cached else 0.7
            note.after_iteration(k, cached=cached)
        return [line for line in capsys.readouterr().err.splitlines() if "iterations, about" in line]

    # 7 cached iterations (2.1 s) then computed ones: 3 computed make 2.1 s, and the rest go at 0.7 s
    err = run([True] * 7 + [False] * 10)
    assert len(err) == 1 and "about 12 min" in err[0], err  # 4.2 s + 990 × 0.7 s = 697 s
    assert "3 that computed their teacher outputs took 2.1 s; 7 read theirs from the cache, 2.1 s" in err[0]
    err = run([False] * 10)  # no cache: as before
    assert len(err) == 1 and "about 12 min" in err[0] and "(the first 3 took 2.1 s)" in err[0]
    err = run([True] * 50)  # 15 s of cache hits: not yet
    assert err == []
    err = run([True] * 120)  # 36 s, all cached: projected from those, said so
    assert len(err) == 1 and "about 5 min" in err[0] and "their teacher outputs read from the cache" in err[0]


def test_resuming_a_finished_run_changes_nothing(gmm8, tmp_path, capsys):
    """--resume of a finished run (same iterations) leaves its files as they were: the card keeps the command
    that made it."""
    Trainer(make_method(), config(4), tmp_path, data=gmm8, run_info={"command": "first"}).run()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    Trainer(make_method(), config(4), tmp_path, data=gmm8, resume=True, run_info={"command": "second"}).run()
    assert "finished run of 4 iterations" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_bf16_mixed_precision_runs_on_a_cpu_and_fp16_is_refused_there(gmm8, tmp_path):
    """amp="bf16" on a CPU computes in bf16 (it once ran fp32 without a word) and resumes exactly; fp16 needs CUDA's
    loss scaling and is refused before anything is written."""
    run = Trainer(make_method(), config(10, amp="bf16", log_every=1), tmp_path / "bf16", data=gmm8)
    with run.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    run.run()
    Trainer(make_method(), config(10, log_every=1), tmp_path / "fp32", data=gmm8).run()
    # the same batches, computed in bf16 (the zero-initialised output layer makes the first loss equal)
    losses = [[json.loads(line)["loss"] for line in open(tmp_path / d / "metrics.jsonl")] for d in ("bf16", "fp32")]
    assert all(a != b and abs(a - b) < 0.05 * b for a, b in zip(losses[0][2:], losses[1][2:]))
    Trainer(make_method(), config(5, amp="bf16", log_every=1), tmp_path / "resumed", data=gmm8).run()
    Trainer(make_method(), config(10, amp="bf16", log_every=1), tmp_path / "resumed", data=gmm8, resume=True).run()
    assert_same_weights(state(tmp_path / "bf16")["model"], state(tmp_path / "resumed")["model"])
    with pytest.raises(FewstepError, match=r"amp='fp16': mixed precision runs bf16 or fp16 on CUDA and bf16 on a "
                                           r"CPU, not fp16 on cpu"):
        Trainer(make_method(), config(1, amp="fp16"), tmp_path / "fp16", data=gmm8)
    assert not (tmp_path / "fp16").exists() or not any((tmp_path / "fp16").iterdir())
