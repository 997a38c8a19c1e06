"""Kill anywhere, resume to the same bits.

Every training command runs once uninterrupted, and again killed at chosen points (SIGKILL between
iterations or inside the write of a checkpoint file, SIGINT as Ctrl-C), then `--resume`d. The
final `model.safetensors` must be byte-identical to the uninterrupted run's; after a kill the
visible files of the run folder are complete (they load), and after the resume no temp file of an
interrupted write is left. Each run is a real process (tests/crashrun.py); independent cases run
two at a time.
"""
import json
import os
import queue
import select
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fewstep.checkpoint import CARD_NAME, STATE_NAME, WEIGHTS_NAME, load_train_state, read_card
from fewstep.errors import FewstepError

RUNNER = Path(__file__).with_name("crashrun.py")
LOOP = ["--batch", "32", "--ckpt-every", "2", "--no-progress", "--log-every", "1", "--seed", "0"]
COMMANDS = {
    "train": ["train", "--data", "gmm8", "--channels", "32", "--iters", "6"],
    "sfd": ["distill", "sfd", "--teacher", "gmm8-teacher", "--nfe", "2", "--iters", "6"],
    "sfd-v": ["distill", "sfd", "--teacher", "gmm8-teacher", "--nfe", "2,3", "--iters", "6"],
    "sfd-stage2": ["distill", "sfd", "--stage2", "--teacher", "{first}", "--iters", "6"],
    "sfddm": ["distill", "sfddm", "--teacher", "gmm8-teacher", "--data", "gmm8", "--steps", "4", "--iters", "6"],
    "progressive": ["distill", "progressive", "--teacher", "gmm8-teacher", "--data", "gmm8", "--start-steps", "16",
                    "--steps", "4", "--iters", "3"],
}
# (kill point, which occurrence, signal): the 3rd iteration is after the checkpoint of the 2nd;
# the 2nd write of a file is the checkpoint after iteration 4 (in progressive distillation: a fold's end)
EVERYWHERE = [("iteration", 3, "kill"), ("state", 2, "kill"), ("weights", 2, "kill"), ("card", 2, "kill"),
              ("iteration", 2, "int")]
# two interrupts at once inside an iteration (a stop request, then a stop at once): nothing of that iteration
# is saved. SFD at NFE 2 takes two optimizer steps an iteration: the 5th is iteration 3's first, after the
# checkpoint of iteration 2; the 1st is iteration 1's, before any checkpoint (the run then starts again)
TWICE = [("optimizer", 5, "int2"), ("optimizer", 1, "term2"), ("iteration", 3, "term2")]
# every kill point on SFD (the checkpoint writes are the loop's, shared by every command); two on the others
CASES = [(cmd, *point) for cmd in COMMANDS for point in (EVERYWHERE + TWICE if cmd == "sfd" else EVERYWHERE[:2])]


class Runner:
    """A `crashrun.py --serve` process: each run is a fork of it, so torch and fewstep are imported once, not
    once a run (42 runs: about 30 s of the suite)."""

    def __init__(self):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "FEWSTEP_NO_NETWORK": "1"}
        self.proc = subprocess.Popen([sys.executable, str(RUNNER), "--serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)

    def run(self, spec: dict, argv: list, logs: Path) -> subprocess.CompletedProcess:
        job = {"spec": spec, "argv": argv, "stdout": str(logs.with_suffix(".out")),
               "stderr": str(logs.with_suffix(".err"))}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], 300)
        assert ready, f"run {argv} did not end in 300 s"
        code = json.loads(self.proc.stdout.readline())["returncode"]
        read = Path.read_text
        return subprocess.CompletedProcess(argv, code, read(Path(job["stdout"])), read(Path(job["stderr"])))


RUNNERS: queue.Queue = queue.Queue()  # idle servers; as many are started as runs go on at once


def run(spec: dict, argv: list[str], out: Path) -> subprocess.CompletedProcess:
    try:
        runner = RUNNERS.get_nowait()
    except queue.Empty:
        runner = Runner()
    try:
        logs = Path(tempfile.mkdtemp(prefix="crashrun-")) / "run"
        return runner.run(spec, [str(a) for a in [*argv, "--out", out, *LOOP]], logs)
    finally:
        RUNNERS.put(runner)


def command(name: str, first: Path) -> list[str]:
    return [a.replace("{first}", str(first)) for a in COMMANDS[name]]


def final_weights(out: Path) -> bytes:
    return (out / WEIGHTS_NAME).read_bytes()


def check_visible_files_are_complete(out: Path):
    """Whatever a kill left in view is a whole file: every folder's card parses, weights load, state loads."""
    for folder in [out, *sorted(p for p in out.glob("fold-*") if p.is_dir())]:
        if (folder / CARD_NAME).exists():
            read_card(folder)
        if (folder / WEIGHTS_NAME).exists():
            load_file(str(folder / WEIGHTS_NAME))
        if (folder / STATE_NAME).exists():
            load_train_state(folder)
        for name in ("config.json",):
            if (folder / name).exists():
                json.loads((folder / name).read_text())


@pytest.fixture(scope="module")
def crash_runs(tmp_path_factory):
    """Every case's (kill result, resume result, folder) and each command's uninterrupted weights."""
    root = tmp_path_factory.mktemp("crash")
    first = root / "first-stage"  # the 1-NFE stage's teacher: an SFD model at NFE 3 with AFS
    r = run({"at": "none"}, ["distill", "sfd", "--teacher", "gmm8-teacher", "--nfe", "3", "--iters", "2"], first)
    assert r.returncode == 0, r.stderr

    def reference(name):
        r = run({"at": "none"}, command(name, first), root / f"ref-{name}")
        assert r.returncode == 0, r.stderr
        return name, final_weights(root / f"ref-{name}")

    def case(c):
        name, at, n, sig = c
        out = root / f"{name}-{at}-{n}-{sig}"
        killed = run({"at": at, "n": n, "signal": sig}, command(name, first), out)
        visible_ok, saved = None, None
        try:
            check_visible_files_are_complete(out)
            saved = load_train_state(out)["step"] if (out / STATE_NAME).exists() else 0
        except Exception as e:  # reported by the test, with the case's name
            visible_ok = repr(e)
        resumed = run({"at": "none"}, [*command(name, first), "--resume"], out)
        return c, killed, visible_ok, saved, resumed, out

    with ThreadPoolExecutor(2) as pool:
        refs = dict(pool.map(reference, COMMANDS))
        results = {r[0]: r[1:] for r in pool.map(case, CASES)}
    return refs, results


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_killed_and_resumed_run_equals_the_uninterrupted_one(crash_runs, case):
    refs, results = crash_runs
    killed, visible_ok, saved, resumed, out = results[case]
    name, at, n, sig = case
    expected = -9 if sig == "kill" else 130  # Ctrl-C, SIGTERM: exit 130; SIGKILL: no chance to do anything
    assert killed.returncode == expected, (killed.returncode, killed.stderr[-2000:])
    if sig != "kill":
        assert "--resume" in killed.stdout + killed.stderr and "Traceback" not in killed.stderr
    if at == "optimizer":  # stopped at once inside an iteration: nothing of it on disk
        assert "nothing of it was saved" in killed.stderr
        assert saved == (2 if n == 5 else 0)  # the checkpoint of iteration 2, or none
    assert visible_ok is None, visible_ok
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Traceback" not in resumed.stderr
    assert final_weights(out) == refs[name], f"{name}: resumed weights differ from the uninterrupted run"
    assert not list(out.rglob(".*.tmp")), "a temp file of an interrupted write was left behind"
    card = read_card(out)
    assert card["training"]["finished"] is True
    logs = list(out.glob("metrics.jsonl")) + list(out.glob("fold-*/metrics.jsonl"))
    assert logs
    for log in logs:
        steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
        assert steps == sorted(set(steps)), f"{log}: iterations repeated or out of order: {steps}"


def test_resume_before_the_first_checkpoint_starts_again_and_equals_the_uninterrupted_run(crash_runs, tmp_path):
    """A run killed before its first checkpoint left only its config.json: --resume starts it again from
    iteration 0 (with a note), to the uninterrupted run's bytes; other settings are still refused."""
    refs, _ = crash_runs
    argv = COMMANDS["train"]
    killed = run({"at": "iteration", "n": 1, "signal": "kill"}, argv, tmp_path / "run")
    assert killed.returncode == -9 and not (tmp_path / "run" / STATE_NAME).exists()
    # no model yet: a command given the folder says how to continue its run
    with pytest.raises(FewstepError, match=r"no fewstep.json inside\); it holds a run stopped before its first model "
                                           r"was saved: continue it with `fewstep train .* --resume`$"):
        read_card(tmp_path / "run")
    other = run({"at": "none"}, [*argv, "--lr", "1e-3", "--resume"], tmp_path / "run")
    assert other.returncode == 2 and "lr: now 0.001, was 0.0002" in other.stderr and "Traceback" not in other.stderr
    resumed = run({"at": "none"}, [*argv, "--resume"], tmp_path / "run")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "stopped before its first checkpoint" in resumed.stderr
    assert final_weights(tmp_path / "run") == refs["train"]
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))


def test_a_fresh_start_over_a_run_killed_before_its_first_checkpoint_keeps_none_of_its_logs(crash_runs, tmp_path):
    """Started again without --resume (as the bench starts a row with no saved state), a folder a killed run left
    keeps none of that run's log lines (nor snapshot entries, the same code): each iteration is logged once,
    and the run is the uninterrupted one."""
    refs, _ = crash_runs
    argv = COMMANDS["train"]
    killed = run({"at": "iteration", "n": 2, "signal": "kill"}, argv, tmp_path / "run")
    assert killed.returncode == -9 and not (tmp_path / "run" / STATE_NAME).exists()
    assert (tmp_path / "run" / "metrics.jsonl").read_text()
    again = run({"at": "none"}, argv, tmp_path / "run")
    assert again.returncode == 0, again.stderr[-2000:]
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)), f"iterations repeated: {steps}"
    assert final_weights(tmp_path / "run") == refs["train"]


def test_resume_of_a_folder_killed_before_its_config_starts_again(crash_runs, tmp_path):
    """A run killed between making its folder and writing config.json leaves only the lock file: --resume
    starts it from iteration 0, as it does a folder holding only config.json, to the uninterrupted bytes."""
    refs, _ = crash_runs
    out = tmp_path / "run"
    out.mkdir()
    (out / ".fewstep.lock").write_text("12345")
    resumed = run({"at": "none"}, [*COMMANDS["train"], "--resume"], out)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "stopped before it began; it starts at iteration 0" in resumed.stderr
    assert final_weights(out) == refs["train"]


def test_ctrl_c_in_the_last_iteration_finishes_the_run_and_stops_the_caller(crash_runs, tmp_path):
    """Ctrl-C inside the last iteration: the run is saved as finished (the uninterrupted bytes) and the
    command still stops with 130, so a bench or a script around it stops too."""
    refs, _ = crash_runs
    last = int(COMMANDS["train"][COMMANDS["train"].index("--iters") + 1])  # one optimizer step an iteration
    stopped = run({"at": "optimizer", "n": last, "signal": "int"}, COMMANDS["train"], tmp_path / "run")
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    assert "the run is finished" in stopped.stderr and "Traceback" not in stopped.stderr
    assert read_card(tmp_path / "run")["training"]["finished"] is True
    assert final_weights(tmp_path / "run") == refs["train"]


def test_two_runs_on_one_folder_the_second_is_refused(crash_runs, tmp_path):
    """A run holds its folder's lock for its life: a second process on the same --out is refused at once,
    without touching anything, and the first finishes as if alone."""
    refs, _ = crash_runs
    argv, out = COMMANDS["sfd"], tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FEWSTEP_NO_NETWORK": "1"}
    hold = tmp_path / "hold"  # the first run waits after its first iteration until the others were refused
    hold.write_text("")
    first = subprocess.Popen([sys.executable, str(RUNNER), json.dumps({"at": "none", "hold": str(hold)}), *argv,
                              "--out", str(out), *LOOP], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.time() + 120
        while not (out / "config.json").exists():  # the first run holds the lock by then
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.05)
        second = run({"at": "none"}, argv, out)
        assert second.returncode == 2 and "in use by another fewstep process" in second.stderr
        assert f"pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
        resumed = run({"at": "none"}, [*argv, "--resume"], out)  # resuming it from elsewhere too
        assert resumed.returncode == 2 and "in use by another fewstep process" in resumed.stderr
        assert first.poll() is None  # both were refused while the first still ran
    finally:
        hold.unlink()
        stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-2000:]
    assert final_weights(out) == refs["sfd"]


def test_a_folder_holding_a_model_is_never_written_over(tmp_path):
    """--out naming a folder with a model but no training state (a finished model, a copied or imported
    one) is refused with and without --resume, and nothing in it changes."""
    import shutil
    from fewstep.models import builtin_models
    out = tmp_path / "model"
    shutil.copytree(builtin_models()["gmm8-teacher"], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for extra, message in (([], "already holds a model"), (["--resume"], "holds a model but no training state")):
        r = run({"at": "none"}, [*COMMANDS["sfd"], *extra], out)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".fewstep.lock"} == before


def _torchrun(spec: dict, argv: list[str], out: Path, port: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FEWSTEP_NO_NETWORK": "1"}
    if os.path.exists("/sys/class/net/lo"):  # keep gloo on loopback whatever the hostname resolves to
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           str(RUNNER), json.dumps(spec), *argv, "--out", str(out), *LOOP, "--device", "cpu"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_torchrun_killed_and_resumed_equals_uninterrupted_and_one_process(tmp_path):
    """Two processes (gloo): killed between iterations and resumed, the weights are byte-identical to
    an uninterrupted 2-process run; against one process with the same global batch they agree to
    float tolerance (the all-reduce sums gradients in another order)."""
    import socket

    import torch

    def port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    argv = COMMANDS["sfd"]
    ref = _torchrun({"at": "none"}, argv, tmp_path / "ref", port())
    assert ref.returncode == 0, ref.stderr[-3000:]
    killed = _torchrun({"at": "iteration", "n": 3, "signal": "kill"}, argv, tmp_path / "run", port())
    assert killed.returncode != 0
    resumed = _torchrun({"at": "none"}, [*argv, "--resume"], tmp_path / "run", port())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert final_weights(tmp_path / "run") == final_weights(tmp_path / "ref")
    assert not list((tmp_path / "run").rglob(".*.tmp"))
    one = run({"at": "none"}, argv, tmp_path / "one")
    assert one.returncode == 0, one.stderr[-2000:]
    a, b = load_file(str(tmp_path / "one" / WEIGHTS_NAME)), load_file(str(tmp_path / "ref" / WEIGHTS_NAME))
    assert read_card(tmp_path / "ref")["training"]["processes"] == 2
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=0), k
