"""Progressive distillation: grids, the two-step target, one fold on an exact Gaussian, the fold runner."""
import json
import os
import signal

import pytest
import torch
from torch import nn

from fewstep.checkpoint import load_checkpoint, save_checkpoint
from fewstep.cli import main
from fewstep.denoiser import Denoiser
from fewstep.progressive.fold import HEADS, ProgressiveFold, ddim_step, fold_plan, halve_grid, head_output, head_weight, teacher_grid, truncated_snr, two_step_target
from fewstep.progressive.method import progressive_distill
from fewstep.errors import FewstepError
from fewstep.nets import MLP
from fewstep.schedule import Schedule, index_subsequence
from fewstep.train import TrainConfig, Trainer

MU = torch.tensor([0.5, -0.25], dtype=torch.float64)
S = 0.4  # x0 ~ N(MU, S² I)


def exact_denoiser(x, sigma):
    s2 = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1))) ** 2
    return (S**2 * x + s2 * MU.to(x.dtype)) / (S**2 + s2)


def quick(steps, batch=64, lr=1e-3, **kw):
    return TrainConfig(steps=steps, batch=batch, lr=lr, progress=False, n_preview=0, log_every=10, **kw)


# ---- grids ---------------------------------------------------------------------------------------------

def test_fold_plan_and_its_errors():
    assert fold_plan(1024, 8) == [512, 256, 128, 64, 32, 16, 8]
    assert fold_plan(256, 64) == [128, 64]
    assert fold_plan(2, 1) == [1]
    for start, target, msg in [(96, 8, "power of two"), (1024, 3, "power of two"), (8, 8, "must exceed"),
                               (4, 16, "must exceed"), (8, 0, "at least 1")]:
        with pytest.raises(FewstepError, match=msg):
            fold_plan(start, target)


def test_teacher_grids_halve_into_trailing_subsequences():
    sch = Schedule.vp("linear", 1024)
    den = Denoiser(MLP(2, hidden=8, depth=1), sch, "eps")
    full = teacher_grid(den, 1024)
    assert torch.equal(full[:-1], sch.sigmas.flip(0)) and full[-1] == 0
    g = teacher_grid(den, 256)
    for steps in (128, 64, 32, 16, 8):
        g = halve_grid(g)
        phi = index_subsequence(1024, steps, "trailing")
        assert torch.equal(g[:-1], sch.sigmas[phi].flip(0)), steps  # every fold stays on the teacher's table
        assert len(g) == steps + 1 and g[-1] == 0
    with pytest.raises(FewstepError, match="only T=1024"):
        teacher_grid(den, 2048)
    with pytest.raises(FewstepError, match="even number"):
        halve_grid(torch.tensor([3.0, 2.0, 1.0, 0.0], dtype=torch.float64))


def test_two_step_target_lands_on_the_two_steps_and_snr_weight():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, generator=g, dtype=torch.float64) * 5 + MU
    for s, s_mid, s_next in [(5.0, 2.0, 0.7), (0.7, 0.3, 0.0), (80.0, 20.0, 3.0)]:
        sig, mid, nxt = (torch.full((64,), v, dtype=torch.float64) for v in (s, s_mid, s_next))
        x_mid = ddim_step(exact_denoiser(x, sig), x, mid / sig)
        x_two = ddim_step(exact_denoiser(x_mid, mid), x_mid, nxt / mid)
        x0_tilde = two_step_target(exact_denoiser, x, sig, mid, nxt)
        x_one = ddim_step(x0_tilde, x, nxt / sig)
        assert torch.allclose(x_one, x_two, atol=1e-10, rtol=1e-10), (s, s_mid, s_next)
        # and it differs from the teacher's own one-step x0 (otherwise there would be nothing to learn)
        assert not torch.allclose(x0_tilde, exact_denoiser(x, sig), atol=1e-3)
    assert torch.allclose(truncated_snr(torch.tensor([0.1, 1.0, 3.0])),
                          torch.tensor([100.0, 1.0, 1.0], dtype=torch.float64))


# ---- one fold on a linear teacher --------------------------------------------------------------------------

class AffineTable(nn.Module):
    """x0 = a[t]·x_in + b[t] per table step: the exact denoiser of Gaussian data is of this form."""

    def __init__(self, T: int, dim: int = 2):
        super().__init__()
        self.a = nn.Parameter(torch.zeros(T, 1))
        self.b = nn.Parameter(torch.zeros(T, dim))
        self.config = {"type": "affine", "dim": dim}

    def forward(self, x, t, step=None, class_labels=None, return_features=False):
        i = torch.as_tensor(t).round().long().reshape(-1)
        out = self.a[i] * x + self.b[i]
        return (out, x) if return_features else out


def exact_affine_teacher(T=32):
    sch = Schedule.vp("linear", T)
    net = AffineTable(T)
    sig = sch.sigmas
    with torch.no_grad():  # x_in = x / sqrt(1 + σ²) ⇒ a = S²·sqrt(1 + σ²)/(S² + σ²), b = σ²·μ/(S² + σ²)
        net.a.copy_((S**2 * (1 + sig**2).sqrt() / (S**2 + sig**2))[:, None].float())
        net.b.copy_((sig[:, None] ** 2 * MU[None] / (S**2 + sig[:, None] ** 2)).float())
    den = Denoiser(net, sch, "x0").eval()
    for p in den.parameters():
        p.requires_grad_(False)
    return den


def test_one_fold_learns_the_teachers_two_steps_in_one(tmp_path):
    teacher = exact_affine_teacher()
    x = torch.randn(16, 2, dtype=torch.float64) * 2
    sigma = teacher.schedule.sigmas[[3, 17, 30]].repeat(6)[:16]
    assert torch.allclose(teacher(x.float(), sigma).double(), exact_denoiser(x, sigma), atol=1e-5)

    grid = teacher_grid(teacher, 8)
    g = torch.Generator().manual_seed(0)
    data = MU.float() + S * torch.randn(8192, 2, generator=g)
    fold = ProgressiveFold(teacher, grid, {"name": "gauss", "kind": "toy", "shape": [2]})
    assert fold.student_steps == 4 and torch.equal(fold.student_grid, grid[::2])

    def one_vs_two(student):
        errs, scales = [], []
        for j in range(4):
            s, mid, nxt = grid[2 * j], grid[2 * j + 1], grid[2 * j + 2]
            z = (MU.float() + S * torch.randn(512, 2, generator=g)) + float(s) * torch.randn(512, 2, generator=g)
            sv = torch.full((512,), float(s), dtype=torch.float64)
            with torch.no_grad():
                x_mid = ddim_step(teacher(z, sv), z, torch.full((512,), float(mid / s), dtype=torch.float64))
                x_two = ddim_step(teacher(x_mid, mid), x_mid, torch.full((512,), float(nxt / mid), dtype=torch.float64))
                x_one = ddim_step(student(z, sv), z, torch.full((512,), float(nxt / s), dtype=torch.float64))
            errs.append(float((x_one - x_two).abs().max()))
            scales.append(float((x_two - z).abs().max()))
        return errs, scales

    before, scales = one_vs_two(fold.student)
    assert max(b / sc for b, sc in zip(before, scales)) > 0.02  # the copied teacher cannot do it yet
    Trainer(fold, quick(400, batch=256, lr=2e-2, lr_schedule="cosine", grad_clip=None), tmp_path / "f",
            data=data).run()
    after, _ = one_vs_two(fold.student.eval())
    for j, (b, a, sc) in enumerate(zip(before, after, scales)):
        assert a < 2e-3 * max(sc, 1.0), (j, before, after, scales)
        assert a < b / 10, (j, before, after)
    # only the student's own grid points were trained; the teacher stayed as it was
    assert torch.equal(teacher.net.a, exact_affine_teacher().net.a)


# ---- the fold runner ------------------------------------------------------------------------------------------

def tiny_teacher(tmp_path, T=32):
    torch.manual_seed(0)
    net = MLP(2, hidden=16, depth=1)
    nn.init.normal_(net.out.weight, std=0.3)
    den = Denoiser(net, Schedule.vp("linear", T), "eps")
    return save_checkpoint(tmp_path / "teacher", den, {
        "method": {"name": "teacher"}, "teacher": None, "data": {"name": "gmm8", "kind": "toy", "shape": [2]},
        "sampler": {"name": "dpmpp2m", "nfe": 8, "grid": "logsnr", "rho": 7.0, "final_zero": True, "clip": None}})


def _weights(path):
    return load_checkpoint(path).denoiser.net.state_dict()


def test_progressive_runs_every_fold_and_resumes_an_interrupted_one(tmp_path, monkeypatch):
    from fewstep.data import load_dataset
    teacher = tiny_teacher(tmp_path)
    data = load_dataset("gmm8", n_toy=2048).x
    info = {"name": "gmm8", "kind": "toy", "shape": [2], "n": len(data)}
    cfg = quick(6, batch=32)
    logs = []
    a = progressive_distill(teacher, data, 8, 2, tmp_path / "a", cfg, info, log=logs.append)
    assert logs == ["fold 1/2: 8 → 4 steps", "fold 2/2: 4 → 2 steps"]
    card = json.loads((a / "fewstep.json").read_text())
    m = card["method"]
    assert [f["student_steps"] for f in m["folds"]] == [4, 2]
    walls = [json.loads((a / f"fold-{k}" / "fewstep.json").read_text())["training"]["wall_time_s"] for k in (4, 2)]
    assert m["total_wall_time_s"] == pytest.approx(sum(walls), abs=0.02) and m["total_iterations"] == 12
    assert card["training"]["iterations"] == 12 and card["teacher"]["sha256"]
    sch = load_checkpoint(teacher).denoiser.schedule
    assert card["sampler"] == {"name": "ddim", "nfe": 2, "clip": None,
                               "sigmas": [float(sch.sigmas[31]), float(sch.sigmas[15]), 0.0]}
    fold2 = json.loads((a / "fold-2" / "fewstep.json").read_text())
    assert fold2["teacher"]["path"].endswith("fold-4") and fold2["method"]["teacher_steps"] == 4
    assert all(torch.equal(v, _weights(a / "fold-2")[k]) for k, v in _weights(a).items())
    # the students actually moved away from their teachers
    assert not all(torch.equal(v, _weights(teacher)[k]) for k, v in _weights(a / "fold-4").items())
    with pytest.raises(FewstepError, match="resume=True"):
        progressive_distill(teacher, data, 8, 2, tmp_path / "a", cfg, info, log=logs.append)

    # interrupt fold 2 at its 3rd iteration, then resume: same weights as the uninterrupted run
    original = ProgressiveFold.train_step
    calls = {"n": 0}

    def interrupting(self, ctx, batch, gen):
        if self.student_steps == 2:
            calls["n"] += 1
            if calls["n"] == 3:
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: fold 2 stops after this iteration
        return original(self, ctx, batch, gen)

    monkeypatch.setattr(ProgressiveFold, "train_step", interrupting)
    with pytest.raises(SystemExit):
        progressive_distill(teacher, data, 8, 2, tmp_path / "b", cfg, info, log=lambda s: None)
    monkeypatch.setattr(ProgressiveFold, "train_step", original)
    assert not (tmp_path / "b" / "fewstep.json").exists()
    logs = []
    progressive_distill(teacher, data, 8, 2, tmp_path / "b", cfg, info, resume=True, log=logs.append)
    assert "already done" in logs[0] and "resuming" in logs[1]
    wa, wb = _weights(a), _weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_cli_progressive(tmp_path, capsys):
    teacher = tiny_teacher(tmp_path)
    out = tmp_path / "pd"
    main(["distill", "progressive", "--teacher", str(teacher), "--data", "gmm8", "--steps", "2",
          "--start-steps", "8", "--iters", "3", "--batch", "16", "--out", str(out), "--no-progress"])
    text = capsys.readouterr().out
    assert "8 → 2 steps in 2 folds, 6 iterations" in text
    assert (out / "fold-4" / "fewstep.json").is_file() and (out / "fold-2" / "fewstep.json").is_file()
    card = json.loads((out / "fewstep.json").read_text())
    assert card["method"]["head"] == "x0" and card["method"]["clip_targets"] is False
    main(["sample", str(out), "--n", "8"])
    assert "ddim, NFE 2" in capsys.readouterr().out
    main(["distill", "progressive", "--teacher", str(teacher), "--data", "gmm8", "--steps", "4",
          "--start-steps", "8", "--iters", "2", "--batch", "16", "--out", str(tmp_path / "pdv"), "--no-progress",
          "--head", "v", "--clip-targets"])
    m = json.loads((tmp_path / "pdv" / "fewstep.json").read_text())["method"]
    assert m["head"] == "v" and m["weight"] == "SNR + 1" and m["clip_targets"] is True
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["distill", "progressive", "--teacher", str(teacher), "--data", "gmm8", "--steps", "3",
              "--start-steps", "8", "--out", str(tmp_path / "bad"), "--no-progress"])
    assert "power of two" in capsys.readouterr().err


# ---- as published: output heads, their weights, unclipped targets -------------------------------------------

def wide_teacher(T=64):
    """An ε-MLP whose x0 estimates leave [-1, 1] (so clipping them changes something)."""
    torch.manual_seed(1)
    net = MLP(2, hidden=16, depth=1)
    nn.init.normal_(net.out.weight, std=2.0)
    den = Denoiser(net, Schedule.vp("linear", T), "eps").eval()
    for q in den.parameters():
        q.requires_grad_(False)
    return den


def test_heads_start_as_the_teacher_and_weight_as_the_paper():
    teacher = wide_teacher()
    grid = teacher_grid(teacher, 8)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(64, 2, generator=g), torch.randn(64, 2, generator=g)
    j = torch.arange(64) % 4
    sigma = halve_grid(grid)[j]
    x = x0 + sigma[:, None].float() * eps
    losses = {}
    for head in HEADS:
        fold = ProgressiveFold(teacher, grid, head=head)
        fold.student.train()
        # at initialisation the student's x0 is the teacher's, whatever head it is trained through
        with torch.no_grad():
            assert torch.equal(fold.student(x, sigma), teacher(x, sigma))
        losses[head] = float(fold.losses(x0, j, eps)[0].detach())
        assert fold.card()["method"]["head"] == head and fold.card()["method"]["weight"] == HEADS[head]
    # each head's loss is the x0 error under the paper's weight: max(SNR,1), SNR+1, SNR
    fold = ProgressiveFold(teacher, grid)
    sig, mid, nxt = fold.student_grid[j], grid[2 * j + 1], grid[2 * j + 2]
    with torch.no_grad():
        target = two_step_target(teacher, x, sig, mid, nxt).float()
        per = (teacher(x, sig).float() - target).square().mean(1).double()
    for head in HEADS:
        want = float((head_weight(head, sig) * per).mean())
        assert losses[head] == pytest.approx(want, rel=1e-4), head
    assert losses["x0"] != pytest.approx(losses["eps"], rel=1e-2)
    snr = 1 / sig.double() ** 2
    assert torch.equal(head_weight("x0", sig), truncated_snr(sig)) and torch.allclose(head_weight("v", sig), snr + 1)
    # the head conversions are exact and invertible: v and ε of the same x0 give it back
    s2 = sig[:, None].float()
    v = head_output("v", x0, x, sig)
    a = 1 / (1 + s2**2).sqrt()
    assert torch.allclose(a * (a * x) - s2 * a * v, x0, atol=1e-5)
    assert torch.allclose(x - s2 * head_output("eps", x0, x, sig), x0, atol=1e-4)
    with pytest.raises(FewstepError, match="head='score'"):
        ProgressiveFold(teacher, grid, head="score")


def test_targets_are_unclipped_unless_asked_and_sampling_keeps_its_clip():
    teacher = wide_teacher()
    grid = teacher_grid(teacher, 8)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(64, 2, generator=g), torch.randn(64, 2, generator=g)
    j = torch.arange(64) % 4
    sig, mid, nxt = halve_grid(grid)[j], grid[2 * j + 1], grid[2 * j + 2]
    x = x0 + sig[:, None].float() * eps
    assert teacher(x, sig).abs().max() > 1.5  # clipping at 1 would change this teacher's targets
    with torch.no_grad():
        pred = teacher(x, sig).float()
    for clip_targets, clip_in_target in [(False, None), (True, 1.0)]:
        fold = ProgressiveFold(teacher, grid, clip=1.0, clip_targets=clip_targets)
        with torch.no_grad():
            target = two_step_target(teacher, x, sig, mid, nxt, clip_in_target).float()
        want = float((truncated_snr(sig) * (pred - target).square().mean(1).double()).mean())
        assert float(fold.losses(x0, j, eps)[0].detach()) == pytest.approx(want, rel=1e-4)
        assert fold.sampler_card()["clip"] == 1.0 and fold.card()["method"]["clip_targets"] is clip_targets
    a = float(ProgressiveFold(teacher, grid, clip=1.0).losses(x0, j, eps)[0].detach())
    b = float(ProgressiveFold(teacher, grid, clip=1.0, clip_targets=True).losses(x0, j, eps)[0].detach())
    assert a != pytest.approx(b, rel=1e-3)
