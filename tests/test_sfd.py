"""SFD: invariants, exact-Gaussian teacher trajectories, and short distillation runs on gmm8."""
import math
import os
import signal

import pytest
import torch

from fewstep.checkpoint import load_checkpoint
from fewstep.data import sample_toy
from fewstep.denoiser import Denoiser
from fewstep.sfd.config import SFDConfig, student_nfe, timestamps_for_nfe
from fewstep.sfd.method import SFD
from fewstep.sfd.trajectory import TeacherTrajectory, sfd_grids
from fewstep.errors import FewstepError
from fewstep.distances import sliced_wasserstein
from fewstep.sampling import resolve_sampler, sample
from fewstep.schedule import Schedule, check_nested, make_grid, nested_grids
from fewstep.solvers import afs_direction, solve
from fewstep.train import StepContext, TrainConfig, Trainer


def one_iteration_losses(method, tmp_path, batch=32, seed=0):
    tr = Trainer(method, TrainConfig(steps=1, batch=batch, lr=1e-3, progress=False), tmp_path)
    logs = method.train_step(StepContext(tr), None, torch.Generator().manual_seed(seed))
    return [v for k, v in sorted(logs.items()) if k.startswith("loss_step")]


def test_teacher_copy_with_euler_teacher_has_zero_loss(tiny_gmm8_teacher, tmp_path):
    """M = 0 and an Euler teacher (no AFS, as SFD's teacher never uses it): the teacher's trajectory
    is exactly the copy's own, so every step's loss is zero."""
    teacher = load_checkpoint(tiny_gmm8_teacher)
    method = SFD(teacher, SFDConfig(nfe=[3], afs=False, m=0, teacher_solver="euler"))
    losses = one_iteration_losses(method, tmp_path)
    assert len(losses) == 3
    assert all(v == 0.0 for v in losses), losses
    # with AFS the student's free first step departs from the teacher's network step
    method = SFD(teacher, SFDConfig(nfe=[3], afs=True, m=0, teacher_solver="euler"))
    assert one_iteration_losses(method, tmp_path / "afs")[0] > 0


def test_refined_teacher_gives_nonzero_loss(tiny_gmm8_teacher, tmp_path):
    """The invariant above is not vacuous: a stronger teacher trajectory differs from Euler."""
    teacher = load_checkpoint(tiny_gmm8_teacher)
    method = SFD(teacher, SFDConfig(nfe=[3], afs=False, m=3, teacher_solver="dpmpp3m"))
    assert max(one_iteration_losses(method, tmp_path)) > 1e-3


def test_afs_and_nfe_accounting():
    assert timestamps_for_nfe(2, afs=True) == 4 and timestamps_for_nfe(2, afs=False) == 3
    for nfe in (1, 2, 5):
        for afs in (True, False):
            assert student_nfe(timestamps_for_nfe(nfe, afs), afs) == nfe
    x = torch.randn(5, 2)
    torch.testing.assert_close(afs_direction(x, 80.0), x / math.sqrt(1 + 80.0**2))
    # with AFS one Euler step of the grid costs no network call
    grid = make_grid("polynomial", timestamps_for_nfe(2, True), 0.006, 80.0)
    calls = []
    r = solve("euler", lambda x, s: calls.append(1) or x * 0, x * 80, grid, afs=True)
    assert r.nfe == 2 and len(calls) == 2


@pytest.mark.parametrize("kind", ["polynomial", "logsnr", "uniform", "discrete"])
@pytest.mark.parametrize("m", [0, 1, 3])
def test_every_student_timestamp_is_a_teacher_timestamp(kind, m):
    sched = Schedule.vp("linear", 1024)
    s, t = nested_grids(kind, 5, m, sched.sigma_min, sched.sigma_max, schedule=sched)
    assert len(t) == 4 * (m + 1) + 1
    assert check_nested(s, t) == [i * (m + 1) for i in range(5)]
    assert torch.equal(s, t[:: m + 1])


def test_custom_grid_that_breaks_nesting_is_refused():
    s = torch.tensor([80.0, 10.0, 1.0])
    t = torch.tensor([80.0, 20.0, 5.0, 1.0])
    with pytest.raises(FewstepError, match="sigma=10 is not a teacher timestamp"):
        check_nested(s, t)


class GaussianNet(torch.nn.Module):
    """An EDM 'network' whose denoiser is the exact one for x0 ~ N(MU, S²I)."""
    MU, S, SD = 0.3, 0.4, 0.5

    def forward(self, x_in, t, step=None, class_labels=None, return_features=False):
        sigma = torch.exp(4 * t.double())[:, None]
        x = x_in.double() * (sigma**2 + self.SD**2).sqrt()
        d = (self.S**2 * x + sigma**2 * self.MU) / (self.S**2 + sigma**2)
        c_skip = self.SD**2 / (sigma**2 + self.SD**2)
        c_out = sigma * self.SD / (sigma**2 + self.SD**2).sqrt()
        return ((d - c_skip * x) / c_out).to(x_in.dtype)


def test_dpmpp3m_teacher_trajectory_converges_to_exact_ode_as_m_grows():
    den = Denoiser(GaussianNet(), Schedule.edm(0.002, 80.0), "edm")
    cfg_nfe = 3
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(256, 2, generator=g, dtype=torch.float64)
    errors = []
    for m in (1, 3, 7, 15):
        cfg = SFDConfig(nfe=[cfg_nfe], m=m)
        s_grid, t_grid = sfd_grids(den, cfg, cfg_nfe)
        x_T = eps * float(s_grid[0])
        states, _ = TeacherTrajectory(den, "dpmpp3m")(x_T, t_grid, check_nested(s_grid, t_grid))
        mu, s = GaussianNet.MU, GaussianNet.S
        exact = [mu + (x_T - mu) * torch.sqrt((s**2 + sg**2) / (s**2 + s_grid[0] ** 2)) for sg in s_grid]
        errors.append(max(float((a - b).abs().max()) for a, b in zip(states, exact)))
    assert all(e1 < e0 for e0, e1 in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-3 and errors[-1] < errors[0] / 20, errors


def _swd(x, n_seed=1):
    return sliced_wasserstein(x, sample_toy("gmm8", 4000, seed=n_seed))


def test_short_sfd_run_beats_euler_and_approaches_teacher(tiny_gmm8_teacher, tmp_path):
    teacher = load_checkpoint(tiny_gmm8_teacher)
    cfg = SFDConfig(nfe=[2])
    method = SFD(teacher, cfg)
    s_grid, t_grid = method.grids[2]
    eps = torch.randn(1000, 2, generator=torch.Generator().manual_seed(123))
    ends, _ = TeacherTrajectory(teacher.denoiser, "dpmpp3m")(eps * float(s_grid[0]), t_grid, [len(t_grid) - 1])

    @torch.no_grad()
    def distance_to_teacher(den):
        x = solve("euler", den, eps * float(s_grid[0]), s_grid, afs=True).x
        return float((x - ends[0]).norm(dim=1).mean()), x

    before, _ = distance_to_teacher(method.student)
    Trainer(method, TrainConfig(steps=300, batch=128, lr=1e-3, lr_schedule="step", progress=False), tmp_path).run()
    student = load_checkpoint(tmp_path)
    after, x_student = distance_to_teacher(student.denoiser)
    assert after < 0.85 * before, (before, after)

    x_euler = solve("euler", teacher.denoiser, eps * float(s_grid[0]), make_grid(
        "polynomial", 3, s_grid[-1].item(), s_grid[0].item())).x  # Euler at NFE 2, no distillation
    assert _swd(x_student) < _swd(x_euler), (_swd(x_student), _swd(x_euler))
    assert student.card["method"]["name"] == "sfd" and student.card["sampler"]["nfe"] == 2
    assert student.card["teacher"] is None or "sha256" in student.card["teacher"]
    # the card alone is enough to sample, with 2 network calls
    x, info = sample(student, 16, seed=0, progress=False, return_info=True)
    assert info["nfe"] == 2 and info["afs"] and x.shape == (16, 2)


def test_sfd_v_samples_at_each_trained_nfe_and_refuses_others(tiny_gmm8_teacher, tmp_path):
    teacher = load_checkpoint(tiny_gmm8_teacher)
    method = SFD(teacher, SFDConfig(nfe=[2, 3, 4]))
    assert method.student.has_step_condition and method.name == "sfd-v"
    Trainer(method, TrainConfig(steps=12, batch=32, lr=1e-3, progress=False), tmp_path).run()
    model = load_checkpoint(tmp_path)
    for nfe in (2, 3, 4):
        x, info = sample(model, 8, seed=0, nfe=nfe, progress=False, return_info=True)
        assert info["nfe"] == nfe and torch.isfinite(x).all()
    with pytest.raises(FewstepError, match="trained for NFE \\[2, 3, 4\\]"):
        resolve_sampler(model, nfe=5)


def test_sfd_v_step_conditions(tiny_gmm8_teacher):
    """The zero kind starts as the teacher exactly; the authors' kind (xavier init) starts off it, differently
    for each N, as theirs does."""
    teacher = load_checkpoint(tiny_gmm8_teacher)
    x = torch.randn(4, 2)
    s = torch.tensor(3.0)
    zero = SFD(teacher, SFDConfig(nfe=[2, 3], step_condition="zero"))
    torch.testing.assert_close(zero.student(x, s, step=5), teacher.denoiser(x, s))
    authors = SFD(teacher, SFDConfig(nfe=[2, 3]))
    assert authors.student.net.step_condition_kind == "authors"
    a4, a5, t = authors.student(x, s, step=4), authors.student(x, s, step=5), teacher.denoiser(x, s)
    assert (a5 - t).abs().max() > 1e-4 and (a5 - a4).abs().max() > 1e-4


def test_resume_equals_uninterrupted_run(tiny_gmm8_teacher, tmp_path):
    teacher = load_checkpoint(tiny_gmm8_teacher)

    class InterruptedSFD(SFD):
        def train_step(self, ctx, batch, gen):
            if ctx.t.step == 4:
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of the run: it stops after iteration 5
            return super().train_step(ctx, batch, gen)

    def run(out, method_cls=SFD, resume=False):
        method = method_cls(teacher, SFDConfig(nfe=[2, 3]))
        cfg = TrainConfig(steps=8, batch=16, lr=1e-3, lr_schedule="step", progress=False, n_preview=0)
        Trainer(method, cfg, out, resume=resume).run()
        return load_checkpoint(out).denoiser.net.state_dict()

    full = run(tmp_path / "full")
    with pytest.raises(SystemExit):
        run(tmp_path / "split", InterruptedSFD)
    assert load_checkpoint(tmp_path / "split").card["training"]["iterations"] == 5
    resumed = run(tmp_path / "split", resume=True)
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


def test_stage2_builds_a_one_nfe_student(tiny_gmm8_teacher, tmp_path):
    teacher = load_checkpoint(tiny_gmm8_teacher)
    first = SFD(teacher, SFDConfig(nfe=[3, 5]))
    Trainer(first, TrainConfig(steps=4, batch=16, lr=1e-4, progress=False), tmp_path / "v").run()
    first_ckpt = load_checkpoint(tmp_path / "v")
    stage2 = SFD(first_ckpt, SFDConfig(stage2=True))
    s_grid, t_grid = stage2.grids[1]
    assert len(s_grid) == 3 and torch.equal(s_grid, t_grid[::3])  # NFE 5 + AFS: 7 timestamps
    losses = one_iteration_losses(stage2, tmp_path / "s2")  # the AFS step and the one network step
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    Trainer(SFD(first_ckpt, SFDConfig(stage2=True)), TrainConfig(steps=3, batch=16, lr=1e-4, progress=False),
            tmp_path / "one").run()
    one = load_checkpoint(tmp_path / "one")
    x, info = sample(one, 8, seed=0, progress=False, return_info=True)
    assert info["nfe"] == 1 and one.card["method"]["name"] == "sfd-stage2"
    # a first-stage grid with an odd interval count cannot host the 3-timestamp student
    odd = SFD(teacher, SFDConfig(nfe=[2]))
    Trainer(odd, TrainConfig(steps=1, batch=8, lr=1e-4, progress=False), tmp_path / "odd").run()
    with pytest.raises(FewstepError, match="even count"):
        SFD(load_checkpoint(tmp_path / "odd"), SFDConfig(stage2=True))


def test_bad_options_are_refused(tiny_gmm8_teacher):
    teacher = load_checkpoint(tiny_gmm8_teacher)
    with pytest.raises(FewstepError, match="nfe="):
        SFD(teacher, SFDConfig(nfe=[0]))
    with pytest.raises(FewstepError, match="teacher_solver="):
        SFD(teacher, SFDConfig(teacher_solver="rk4"))
    with pytest.raises(FewstepError, match="stage2=True needs a first-stage"):
        SFD(teacher, SFDConfig(stage2=True))


def _weights(path):
    return load_checkpoint(path).denoiser.net.state_dict()


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_trajectory_cache_is_exact_and_shared_by_sfd_v(tiny_digits_teacher, tmp_path):
    """SFD runs at NFE 2 and 3 fill the cache; SFD-v over {2, 3} with the same seed and batch then reads
    every trajectory from it, and ends bit-identical to an SFD-v run that computed them itself. A rerun
    with another learning rate hits too. The channels-last UNet teacher is the one the loop runs."""
    teacher = load_checkpoint(tiny_digits_teacher)
    cache = tmp_path / "cache"

    def run(name, nfe, lr=1e-4, use_cache=True):
        method = SFD(teacher, SFDConfig(nfe=nfe), trajectory_cache=cache if use_cache else None)
        cfg = TrainConfig(steps=3, batch=8, lr=lr, progress=False, n_preview=0, log_every=3)
        Trainer(method, cfg, tmp_path / name).run()
        return method

    for n in (2, 3):
        m = run(f"sfd{n}", [n])
        assert (m.cache.hits, m.cache.misses) == (0, 3)
    v = run("sfdv", [2, 3])
    assert (v.cache.hits, v.cache.misses) == (3, 0)
    assert load_checkpoint(tmp_path / "sfdv").card["method"]["trajectory_cache"]["hits"] == 3
    # an iteration that read its trajectories replays no teacher call in its floor
    assert v.floor_calls()["teacher"] == []
    run("sfdv-computed", [2, 3], use_cache=False)
    _assert_same_weights(_weights(tmp_path / "sfdv"), _weights(tmp_path / "sfdv-computed"))
    again = run("sfd2-other-lr", [2], lr=3e-4)
    assert (again.cache.hits, again.cache.misses) == (3, 0)


def test_trajectory_cache_misses_on_any_other_input(tiny_gmm8_teacher, tmp_path):
    """Another teacher weight, another noise or another grid is another key; an unreadable entry is
    recomputed, never trusted."""
    teacher = load_checkpoint(tiny_gmm8_teacher)
    method = SFD(teacher, SFDConfig(nfe=[2]), trajectory_cache=tmp_path)
    s_grid, t_grid = method.grids[2]
    positions = method.positions[2]
    x = torch.randn(6, 2) * float(s_grid[0])
    first, nfe, cached = method.traj.states(x, t_grid, positions, None)
    assert not cached
    again, _, cached = method.traj.states(x, t_grid, positions, None)
    assert cached and all(torch.equal(a, b) for a, b in zip(first, again))
    assert not method.traj.states(x + 1e-6, t_grid, positions, None)[2]
    assert not method.traj.states(x, t_grid * 1.001, positions, None)[2]
    method.traj.final_orders = "short"  # another rule for the teacher's last steps: another key
    assert not method.traj.states(x, t_grid, positions, None)[2]
    method.traj.final_orders = "always"
    other = SFD(load_checkpoint(tiny_gmm8_teacher), SFDConfig(nfe=[2]), trajectory_cache=tmp_path)
    with torch.no_grad():
        next(other.traj.den.parameters()).view(-1)[0] += 1e-3
    assert not other.traj.states(x, t_grid, positions, None)[2]
    for entry in tmp_path.glob("*/*.safetensors"):
        entry.write_bytes(b"not a tensor file")
    states, _, cached = method.traj.states(x, t_grid, positions, None)
    assert not cached and all(torch.equal(a, b) for a, b in zip(first, states))
    assert method.traj.states(x, t_grid, positions, None)[2]  # rewritten by the recomputation


def _losses(run_dir):
    import json
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_bf16_teacher_is_kept_only_within_its_tolerance(tiny_gmm8_teacher, tmp_path):
    """--teacher-precision bf16 measures the first batch's trajectories against fp32: within the tolerance
    the teacher runs in bf16 for the whole run (a resume keeps it); over it the run is the fp32 run, bit
    for bit."""
    teacher = load_checkpoint(tiny_gmm8_teacher)
    cfg = TrainConfig(steps=3, batch=16, lr=1e-3, progress=False, n_preview=0, log_every=1)

    def run(name, **kw):
        method = SFD(teacher, SFDConfig(nfe=[2], **kw))
        Trainer(method, cfg, tmp_path / name).run()
        return method

    run("fp32")
    strict = run("strict", teacher_precision="bf16", teacher_precision_tol=1e-9)
    assert strict.precision_check["kept"] == "fp32" and strict.traj.precision == "fp32"
    assert strict.precision_check["deviation"] > 0  # bf16 does round differently
    _assert_same_weights(_weights(tmp_path / "fp32"), _weights(tmp_path / "strict"))
    loose = run("loose", teacher_precision="bf16", teacher_precision_tol=0.5)
    check = load_checkpoint(tmp_path / "loose").card["method"]["teacher_precision_check"]
    assert check["kept"] == "bf16" and 0 < check["deviation"] <= 0.5 and loose.traj.precision == "bf16"
    # the loss sees the bf16 targets (the L1 gradient, a sign, may not)
    assert _losses(tmp_path / "loose") != _losses(tmp_path / "fp32") == _losses(tmp_path / "strict")
    # the teacher's calls (and the floor's replay of them) run in the precision the run kept
    with loose.traj.autocast("cpu"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with strict.traj.autocast("cpu"):
        assert not torch.is_autocast_enabled("cpu")
    resumed = SFD(teacher, SFDConfig(nfe=[2], teacher_precision="bf16", teacher_precision_tol=0.5))
    resumed.load_state_dict(loose.state_dict())
    assert resumed.traj.precision == "bf16" and resumed.precision_check == loose.precision_check
    with pytest.raises(FewstepError, match="teacher_precision="):
        SFD(teacher, SFDConfig(teacher_precision="fp16"))


def test_teacher_final_orders_follow_the_authors(tiny_gmm8_teacher):
    """At NFE 3 the teacher's refined grid has 16 steps: the authors' DPM-Solver++(3M) lowers its last two
    steps there, diffusers' rule does not, so only the last target differs; at NFE 2 (12 steps) both agree."""
    teacher = load_checkpoint(tiny_gmm8_teacher)
    x = torch.randn(32, 2)
    for nfe, last_differs in ((2, False), (3, True)):
        a, b = (SFD(teacher, SFDConfig(nfe=[nfe], teacher_final_orders=rule)) for rule in ("always", "short"))
        s_grid, t_grid = a.grids[nfe]
        ya, _ = a.traj(x * float(s_grid[0]), t_grid, a.positions[nfe])
        yb, _ = b.traj(x * float(s_grid[0]), t_grid, b.positions[nfe])
        assert all(torch.equal(u, v) for u, v in zip(ya[:-1], yb[:-1]))
        assert (not torch.equal(ya[-1], yb[-1])) == last_differs


def test_cli_defaults_are_the_authors_recipe_but_the_clip(tiny_gmm8_teacher, tmp_path):
    """No --lr, --grad-clip or --trajectories: Adam 5e-5 (5e-4 for the 1-NFE stage), SFD-v on four times one
    SFD run's trajectories, the 1-NFE stage on ten times, as the authors train; gradients clipped at norm 1 for
    SFD and SFD-v (fewstep's measured default), none for the 1-NFE stage (the authors'); --grad-clip 0: none."""
    import json
    from fewstep.cli import main
    from fewstep.sfd.recipe import recipe

    assert recipe([2], False) == {"trajectories": 200_000, "lr": 5e-5, "grad_clip": 1.0}
    assert recipe([2, 3], False)["trajectories"] == 800_000 and recipe([2, 3], False)["grad_clip"] == 1.0
    assert recipe([1], True) == {"trajectories": 2_000_000, "lr": 5e-4, "grad_clip": None}
    main(["distill", "sfd", "--teacher", str(tiny_gmm8_teacher), "--nfe", "1,3", "--iters", "2", "--batch", "8",
          "--out", str(tmp_path / "v"), "--no-progress"])
    train = json.loads((tmp_path / "v" / "config.json").read_text())["train"]
    assert train["lr"] == 5e-5 and train["grad_clip"] == 1.0 and train["lr_schedule"] == "step"
    card = load_checkpoint(tmp_path / "v").card["method"]
    main(["distill", "sfd", "--teacher", str(tiny_gmm8_teacher), "--iters", "1", "--batch", "8", "--grad-clip", "0",
          "--out", str(tmp_path / "authors"), "--no-progress"])
    assert not json.loads((tmp_path / "authors" / "config.json").read_text())["train"]["grad_clip"]
    assert card["step_condition"] == "authors" and card["teacher_final_orders"] == "always"
    main(["distill", "sfd", "--stage2", "--teacher", str(tmp_path / "v"), "--iters", "1", "--batch", "8",
          "--out", str(tmp_path / "one"), "--no-progress"])
    train = json.loads((tmp_path / "one" / "config.json").read_text())["train"]
    assert train["lr"] == 5e-4 and train["grad_clip"] is None
    assert load_checkpoint(tmp_path / "one").sampler["step"] == 3  # its own N, as the authors train it
