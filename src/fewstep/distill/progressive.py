"""Progressive distillation (Salimans & Ho, ICLR 2022): the multi-fold baseline.

Each fold halves the step count. The student starts as a copy of its teacher and learns to do in
ONE DDIM step what the teacher does in TWO. In σ-space a DDIM (η = 0) step from σ to σ' is
x' = x̂0 + (σ'/σ)·(x − x̂0); from x at σ the teacher steps to σ' and then σ'', and the target x̃0
is the x0 prediction that a single step σ → σ'' would need to land on the same x'':

    x̃0 = (x'' − (σ''/σ)·x) / (1 − σ''/σ)          (σ'' = 0 at the last step: x̃0 = x'')

The student's noise level is drawn uniformly from its own grid points. The student becomes the
next fold's teacher. Every fold's run directory (`fold-<steps>/`) is kept; the output directory
itself holds the final student, with the total cost of all folds in its card.

As published. Salimans & Ho show that an ε output fails at few steps: the x0 it implies,
x − σ·ε̂, amplifies the error of ε̂ by σ, and an ε-MSE (weight SNR on x0) puts no weight on x0 at
the noisiest steps. The student's output head (`head`) says in which output the student is compared
with the target and how the error is weighted, as in the paper:
  x0 (default): max(SNR, 1)·|x̂0 − x̃0|²     ("truncated SNR", SNR = 1/σ²)
  v:            |v̂ − ṽ|² = (1 + SNR)·|x̂0 − x̃0|²  ("SNR+1")
  eps:          |ε̂ − ε̃|² = SNR·|x̂0 − x̃0|²    (the ε-MSE the paper shows failing; for comparison)
The head is a re-parameterisation of the same network, so the student starts as the teacher's
exact copy (its x0 equals the teacher's). Note what that implies: a head that matches an
ε-network exactly is the same function of the same weights, so the gradient of an x0-space loss
is the same whichever head is named; what the choice changes is the weighting above. A network
whose raw output *is* v (the paper's teachers) cannot start as an exact copy of an ε teacher.

The teacher's x̂0 is not clipped inside the targets (the paper's targets are the unclipped DDIM
steps; a clipped x̂0 gives targets no DDIM step of the student reproduces). Clipping when sampling
stays (default 1 for images); `clip_targets` restores the old clipped targets.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from fewstep import argtypes as A
from fewstep.checkpoint import (CARD_NAME, Checkpoint, finished_run, load_checkpoint, read_card,
                                remove_stale_temp_files, save_checkpoint, teacher_reference)
from fewstep.denoiser import Denoiser
from fewstep.distill import sfddm
from fewstep.distill.common import distill_data, distill_labels, trained_shape
from fewstep.errors import FewstepError
from fewstep.method import Method, Row
from fewstep.models import as_model
from fewstep.recipe import check_loop_options, loop_options_from_args, loop_recipe
from fewstep.recipe import run_info as api_run_info
from fewstep.nets import channels_last_copy, set_dropout
from fewstep.sampling import sample, sample_shape
from fewstep.schedule import check_grid, index_subsequence, make_grid
from fewstep.solvers import solve
from fewstep.train import (StepContext, TrainConfig, Trainer, TrainMethod, fresh_autocast, pick_device, run_record,
                           untimed)

# each fold's default training: iterations, batch, learning rate and its schedule (the CLI's and the bench's)
ITERS_PER_FOLD, FOLD_BATCH, FOLD_LR, FOLD_LR_SCHEDULE = 1000, 64, 1e-4, "cosine"


# ---- grids and the target -------------------------------------------------------------------------

def teacher_grid(teacher: Denoiser, steps: int) -> torch.Tensor:
    """The DDIM grid of the first fold's teacher: `steps` noise levels, noisiest first, then 0.

    Discrete teachers: the trailing subsequence of the table (all T entries when steps = T), so
    every later fold's grid is again a trailing subsequence. Continuous teachers: EDM's ρ = 7 grid.
    """
    if steps < 2:
        raise FewstepError(f"start steps {steps}: expected at least 2")
    if teacher.schedule.is_discrete:
        T = teacher.schedule.T
        if steps > T:
            raise FewstepError(f"start steps {steps}: the teacher has only T={T} steps")
        phi = index_subsequence(T, steps, "trailing", allow_full=True)
        g = teacher.schedule.sigmas[phi].flip(0)
    else:
        g = make_grid("polynomial", steps, teacher.sigma_min, teacher.sigma_max, 7.0)
    return torch.cat([g, torch.zeros(1, dtype=torch.float64)])


def halve_grid(grid: torch.Tensor) -> torch.Tensor:
    """Every other point of an N-step grid (N + 1 points ending in 0): the N/2-step student grid."""
    grid = check_grid(grid, "teacher grid")
    n = len(grid) - 1
    if n % 2 or grid[-1] != 0:
        raise FewstepError(f"teacher grid: expected an even number of steps ending at sigma 0, got {n} steps")
    return grid[::2].clone()


def fold_plan(start_steps: int, target_steps: int) -> list[int]:
    """Step counts after each fold: start/2, start/4, ..., target (start/target a power of two)."""
    if target_steps < 1:
        raise FewstepError(f"target steps {target_steps}: expected at least 1")
    if start_steps <= target_steps:
        raise FewstepError(f"start steps {start_steps} must exceed the target {target_steps}")
    ratio = start_steps // target_steps
    if start_steps % target_steps or ratio & (ratio - 1):
        raise FewstepError(f"start steps {start_steps} / target steps {target_steps} must be a power of two "
                           "(each fold halves the steps); e.g. --start-steps 1024 --steps 8")
    plan, n = [], start_steps
    while n > target_steps:
        n //= 2
        plan.append(n)
    return plan


def ddim_step(x0: torch.Tensor, x: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """x' = x̂0 + (σ'/σ)·(x − x̂0) with a per-sample ratio σ'/σ."""
    r = ratio.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return x0 + r * (x - x0)


@torch.no_grad()
def two_step_target(teacher, x: torch.Tensor, sigma: torch.Tensor, sigma_mid: torch.Tensor,
                    sigma_next: torch.Tensor, clip: float | None = None) -> torch.Tensor:
    """x̃0 such that one DDIM step σ → σ'' from x lands where two teacher DDIM steps σ → σ' → σ'' land."""
    def d(z, s):
        x0 = teacher(z, s)
        return x0.clamp(-clip, clip) if clip is not None else x0

    x_mid = ddim_step(d(x, sigma), x, sigma_mid / sigma)
    x_next = ddim_step(d(x_mid, sigma_mid), x_mid, sigma_next / sigma_mid)
    r = (sigma_next / sigma).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return (x_next - r * x) / (1 - r)


def truncated_snr(sigma: torch.Tensor) -> torch.Tensor:
    """max(SNR, 1) with SNR = 1/σ² (= ᾱ/(1 − ᾱ) for a VP model)."""
    return (1 / sigma.double() ** 2).clamp(min=1.0)


HEADS = {"x0": "max(SNR, 1)", "v": "SNR + 1", "eps": "SNR"}


def head_weight(head: str, sigma: torch.Tensor) -> torch.Tensor:
    """The weight on |x̂0 − x̃0|² that a loss in the head's own output gives (float64, per σ)."""
    if head not in HEADS:
        raise FewstepError(f"--head {head!r}: expected one of {', '.join(HEADS)}")
    snr = 1 / sigma.double() ** 2
    if head == "x0":
        return snr.clamp(min=1.0)
    return snr + 1 if head == "v" else snr


def head_output(head: str, x0: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A prediction of x0 at (x, σ) expressed in the head's output: x0, v = a·ε − b·x0 (VP, with
    a = 1/sqrt(1+σ²), b = σ·a) or ε = (x − x0)/σ. Exact and invertible for σ > 0."""
    if head == "x0":
        return x0
    s = sigma.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    eps = (x - x0) / s
    if head == "eps":
        return eps
    a = 1 / (1 + s**2).sqrt()
    return a * eps - s * a * x0


# ---- one fold ---------------------------------------------------------------------------------------

def _net_shape(net) -> list[int]:
    return list(sample_shape({"net": net.config}))


class ProgressiveFold(TrainMethod):
    """One fold: a copy of the teacher learns its two DDIM steps in one (N → N/2 steps)."""
    name = "progressive"
    needs_data = True

    def __init__(self, teacher: Denoiser, grid: torch.Tensor, data_info: dict | None = None,
                 clip: float | None = None, teacher_ref: dict | None = None, fold_info: dict | None = None,
                 dropout: float | None = None, head: str = "x0", clip_targets: bool = False):
        if teacher.has_step_condition:
            raise FewstepError("progressive distillation: the teacher is step-conditioned (SFD-v); "
                               "distil a plain teacher")
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        if head not in HEADS:
            raise FewstepError(f"--head {head!r}: expected one of {', '.join(HEADS)}")
        self.grid = check_grid(grid, "teacher grid").cpu()
        self.student_grid = halve_grid(self.grid)
        self.clip = clip  # when sampling (and inside the targets only with clip_targets)
        self.head, self.clip_targets = head, clip_targets
        self.data_info = data_info or {}
        self.teacher_ref = teacher_ref
        self.fold_info = fold_info or {}
        net = copy.deepcopy(teacher.net)
        for p in net.parameters():
            p.requires_grad_(True)
        if dropout is not None:
            set_dropout(net, dropout)
        # the student is evaluated on the teacher's own noise levels, so it keeps its time convention
        self.student = Denoiser(net, teacher.schedule, teacher.param,
                                exact_table=teacher.exact_table).take_components(teacher)
        self.shape = _net_shape(teacher.net)
        shape = trained_shape(self.data_info)
        if shape is not None and list(shape) != self.shape:
            hint = f"; pass --resolution {self.shape[-1]}" if len(self.shape) == 3 else ""
            raise FewstepError(f"data shape {list(shape)} does not match the teacher's sample shape {self.shape}{hint}")

    @property
    def student_steps(self) -> int:
        return len(self.student_grid) - 1

    def trainable(self):
        return self.student

    def losses(self, x0: torch.Tensor, j: torch.Tensor, eps: torch.Tensor, student=None, autocast=None,
               class_labels=None, timed=None):
        """Loss at student grid positions j (long): x = x0 + σ_j·ε, target from two teacher steps.
        `timed(part)`: the training loop's profile."""
        timed = timed or untimed
        student = student or self.student
        class_labels = self.teacher.check_labels(class_labels, len(x0))
        dev = x0.device
        if next(self.teacher.parameters()).device != dev:
            self.teacher.to(dev)
        j = j.cpu()
        sigma = self.student_grid[j].to(dev)
        sigma_mid, sigma_next = self.grid[2 * j + 1].to(dev), self.grid[2 * j + 2].to(dev)
        x = x0 + student._bcast(sigma, x0) * eps
        ctx = autocast if autocast is not None else torch.autocast("cpu", enabled=False)
        self._last = (x, sigma, sigma_mid, class_labels, autocast)
        with ctx:
            with timed("teacher"):
                target = two_step_target(self.teacher.with_step(None, class_labels), x, sigma, sigma_mid,
                                         sigma_next, self.clip if self.clip_targets else None).float()
            with timed("student"):
                pred = student(x, sigma, class_labels=class_labels).float()
        # the error in the head's own output (for v and ε the conversion folds the weight in exactly)
        xf = x.float()
        diff = head_output(self.head, pred, xf, sigma) - head_output(self.head, target, xf, sigma)
        per = diff.square().reshape(len(x), -1).mean(1)
        if self.head == "x0":
            per = truncated_snr(sigma).float() * per
        loss = per.mean()
        return loss, {"loss": float(loss.detach())}

    def train_step(self, ctx: StepContext, batch, gen):
        gb = batch.shape[0] * ctx.world
        j = ctx.local(torch.randint(0, self.student_steps, (gb,), generator=gen))
        eps = ctx.local(torch.randn((gb, *batch.shape[1:]), generator=gen)).to(batch.device)
        loss, logs = self.losses(batch, j, eps, autocast=ctx.autocast(), class_labels=ctx.labels, timed=ctx.timed)
        logs["grad_norm"] = ctx.step(loss)
        return logs

    def use_channels_last(self):
        self.teacher = channels_last_copy(self.teacher)

    def floor_calls(self):
        """The last iteration's calls alone: the teacher's two DDIM evaluations (no grad) and the student's
        forward and backward, on the iteration's batch."""
        last = getattr(self, "_last", None)
        if last is None:
            return None
        x, sigma, sigma_mid, labels, autocast = last
        teacher = self.teacher.with_step(None, labels)

        def teacher_call(s):
            def call():
                with torch.no_grad(), fresh_autocast(autocast):
                    teacher(x, s)
            return call

        def student():
            with fresh_autocast(autocast):
                out = self.student(x, sigma, class_labels=labels)
            out.float().sum().backward()
        return {"teacher": [teacher_call(sigma), teacher_call(sigma_mid)], "student": [student]}

    def sampler_card(self) -> dict:
        return {"name": "ddim", "nfe": self.student_steps, "sigmas": [float(s) for s in self.student_grid],
                "clip": self.clip}

    def card(self) -> dict:
        method = {"name": "progressive", "teacher_steps": len(self.grid) - 1, "student_steps": self.student_steps,
                  "head": self.head, "weight": HEADS[self.head], "target": "two teacher DDIM steps",
                  "clip_targets": self.clip_targets, **self.fold_info}
        return {"method": method, "sampler": self.sampler_card(), "teacher": self.teacher_ref,
                "data": self.data_info}

    def preview(self, model, n, seed):
        dev = next(model.parameters()).device
        grid = self.student_grid.to(dev)
        x = torch.randn((n, *self.shape), generator=torch.Generator().manual_seed(seed)).to(dev) * float(grid[0])
        labels = torch.arange(n, device=dev) % model.num_classes if model.num_classes else None
        return solve("ddim", model.with_step(None, labels), x, grid, clip=self.clip).x


# ---- all folds ----------------------------------------------------------------------------------------

def progressive_distill(teacher_ckpt, data: torch.Tensor, start_steps: int | None, target_steps: int,
                        out_dir, config: TrainConfig, data_info: dict | None = None, clip="auto",
                        dropout: float | None = None, resume: bool = False, run_info: dict | None = None,
                        log=print, labels: torch.Tensor | None = None, head: str = "x0",
                        clip_targets: bool = False) -> Path:
    """Run folds start → start/2 → … → target into out_dir/fold-<steps>/, then put the final student in
    out_dir itself with the summed cost of all folds. `teacher_ckpt` is a path / built-in name or a
    loaded Checkpoint. With resume, finished folds are reused and an interrupted one continues.
    A class-conditional teacher needs the data's class `labels`. `head` and `clip_targets`: see the
    module's docstring (defaults: x0 with truncated-SNR weight, unclipped targets)."""
    out_dir = Path(out_dir)
    device = pick_device(config.device)
    root = teacher_ckpt if isinstance(teacher_ckpt, Checkpoint) else load_checkpoint(teacher_ckpt, device=device)
    teacher = root.denoiser.to(device)
    if start_steps is None:
        if not teacher.schedule.is_discrete:
            raise FewstepError("a continuous teacher (EDM, VE or VP-SDE) has no step table: give --start-steps, "
                               "the first teacher's DDIM steps on EDM's rho=7 grid over its sigma range "
                               f"[{teacher.sigma_min:g}, {teacher.sigma_max:g}] (e.g. --start-steps 64 --steps 4)")
        start_steps = teacher.schedule.T
    plan = fold_plan(start_steps, target_steps)
    data_info = data_info or {}
    if clip == "auto":
        clip = 1.0 if data_info.get("kind") == "image" else None
    root_ref = teacher_reference(root.path) if root.path is not None else None
    if not resume and (out_dir / CARD_NAME).exists():
        raise FewstepError(f"{out_dir} already holds a model; pass --resume to continue it or choose another --out")
    grid = teacher_grid(teacher, start_steps)
    teacher_ref, folds = root_ref, []
    for k, steps in enumerate(plan, start=1):
        fold_dir = out_dir / f"fold-{steps}"
        info = {"fold": k, "folds": len(plan), "start_steps": start_steps, "target_steps": target_steps,
                "root_teacher": root_ref}
        if resume and finished_run(fold_dir):
            remove_stale_temp_files(fold_dir)  # a kill may have cut the finished fold's last state write
            ck = load_checkpoint(fold_dir, device=device)
            log(f"fold {k}/{len(plan)}: {len(grid) - 1} → {steps} steps already done ({fold_dir})")
            student = ck.denoiser
            card = ck.card
        else:
            method = ProgressiveFold(teacher, grid, data_info, clip, teacher_ref, info, dropout, head, clip_targets)
            cont = resume and (fold_dir / "train_state.pt").exists()
            log(f"fold {k}/{len(plan)}: {len(grid) - 1} → {steps} steps{' (resuming)' if cont else ''}")
            # only the last fold draws the end-of-run preview: an early fold samples at hundreds of steps
            fold_config = config if k == len(plan) else replace(config, n_preview=0)
            trainer = Trainer(method, fold_config, fold_dir, data=data, resume=cont, run_info=run_info, labels=labels)
            trainer.run()
            student = copy.deepcopy(trainer.eval_model()).eval()
            for p in student.parameters():
                p.requires_grad_(False)
            card = read_card(fold_dir) if trainer.is_main else method.card()
        tr = card.get("training", {})
        folds.append({"fold": k, "teacher_steps": len(grid) - 1, "student_steps": steps,
                      "iterations": tr.get("iterations"), "wall_time_s": tr.get("wall_time_s"),
                      "dir": fold_dir.name})
        teacher, grid = student, halve_grid(grid)
        teacher_ref = teacher_reference(fold_dir) if (fold_dir / CARD_NAME).exists() else None
    if int(os.environ.get("RANK", "0")) != 0:
        return out_dir
    total_wall = round(sum(f["wall_time_s"] or 0.0 for f in folds), 2)
    total_its = sum(f["iterations"] or 0 for f in folds)
    final = {k: v for k, v in card.items()
             if k not in ("format", "format_version", "fewstep_version", "saved_at", "net", "denoiser",
                          "weights_sha256")}
    final["method"] = {"name": "progressive", "teacher_steps": start_steps, "student_steps": target_steps,
                       "head": head, "weight": HEADS[head], "target": "two teacher DDIM steps", "clip": clip,
                       "clip_targets": clip_targets,
                       "dropout": dropout, "folds": folds, "total_iterations": total_its,
                       "total_wall_time_s": total_wall}
    final["teacher"] = root_ref
    final["training"] = {**final.get("training", {}), "iterations": total_its, "wall_time_s": total_wall,
                         "per_fold_iterations": config.steps, "finished": True}
    if out_dir.is_dir():
        remove_stale_temp_files(out_dir)
    save_checkpoint(out_dir, teacher, final)
    return out_dir


# ---- the bench: one chain of folds, a row per fold the SFDDM step counts name ---------------------------------

def targets(spec) -> list[int]:
    """Progressive distillation's step counts: each SFDDM T' rounded to the nearest power of two."""
    return sorted({2 ** round(math.log2(t)) for t in spec.sfddm_steps})


def chain_name(spec) -> str:
    return f"progressive-from-{spec.pd_start_steps}"


@dataclass
class ProgressiveRow(Row):
    """The fold of one chain (start steps → … → the smallest target) that samples in nfe steps; its cost is the
    folds up to it."""

    def budget(self, bench) -> dict:
        s = bench.spec
        iters = s.pd_iters_per_fold if s.pd_iters_per_fold is not None else ITERS_PER_FOLD
        return {"iterations": iters, "batch": s.pd_batch, "lr": s.pd_lr, "per_fold": True}

    def ensure_model(self, bench):
        path, budget = bench.model_dir(self.model), self.budget(bench)
        if bench.finished(path, budget):
            return path
        s = bench.spec
        ds = bench.data()
        info = {**ds.info, "name": ds.name, "kind": ds.kind, "shape": list(ds.shape)}
        chain = bench.model_dir(chain_name(s))
        train = TrainConfig(steps=budget["iterations"], batch=budget["batch"], lr=budget["lr"],
                            lr_schedule=FOLD_LR_SCHEDULE, seed=s.seed, device=str(bench.device),
                            progress=bench.progress, n_preview=0, log_every=max(10, budget["iterations"] // 20))
        # finished folds are reused and an interrupted one continues
        progressive_distill(bench.teacher, ds.x, s.pd_start_steps, min(targets(s)), chain, train, data_info=info,
                            resume=chain.exists(), run_info={"command": "fewstep bench (progressive)"},
                            log=lambda msg: None)
        return path

    def _folds(self, bench) -> tuple[Path, list]:
        chain = bench.model_dir(chain_name(bench.spec))
        return chain, read_card(chain)["method"]["folds"]

    def distill_seconds(self, bench, card: dict) -> float:
        return float(sum(f["wall_time_s"] or 0 for f in self._folds(bench)[1] if f["student_steps"] >= self.nfe))

    def distill_profile(self, bench, card: dict) -> dict | None:
        """The folds down to the row's, iteration-weighted."""
        chain, folds = self._folds(bench)
        profs = []
        for f in (f for f in folds if f["student_steps"] >= self.nfe):
            try:
                fc = read_card(chain / f.get("dir", f"fold-{f['student_steps']}"))
            except FewstepError:
                return None
            prof = (fc.get("training") or {}).get("profile")
            if prof is None:
                return None
            profs.append((int(fc["training"]["iterations"]), prof))
        if not profs:
            return None
        n = sum(it for it, _ in profs)
        out = {k: sum(it * p[k] for it, p in profs) / n for k in profs[0][1]
               if k not in ("iterations_measured", "overhead")}
        out["iterations_measured"] = sum(p["iterations_measured"] for _, p in profs)
        out["overhead"] = out["iter_s"] / out["floor_s"] if out.get("floor_s") else None
        out["folds"] = len(profs)
        return out

    def cost_curve(self, bench, ckpt, kw: dict) -> list[dict]:
        """Each fold's final student at its own step count, down to the row's, against the wall time so far."""
        seed, noise = bench.curve_noise()
        chain, folds = self._folds(bench)
        points, wall = [], 0.0
        for f in folds:
            wall += float(f.get("wall_time_s") or 0)
            if f["student_steps"] < self.nfe:
                break
            fold = load_checkpoint(chain / f.get("dir", f"fold-{f['student_steps']}"), device=bench.device)
            x = sample(fold, len(noise), seed=seed, noise=noise, progress=False)
            points.append({"wall_s": wall, "nfe": f["student_steps"], "n": len(noise),
                           "quality": bench.score_curve_point(x, seed)})
        return points


def bench_rows(bench) -> list[Row]:
    if "progressive" not in bench.spec.methods:
        return []
    rows, chain = [], chain_name(bench.spec)
    for T in targets(bench.spec):
        rows.append(ProgressiveRow(f"progressive-{T}", "progressive", T, "progressive distillation",
                                   model=f"{chain}/fold-{T}", panel=sfddm.PANEL))
        rows += sfddm.ceiling_rows(bench, T, ["trailing"])  # its grids are the trailing phi
    return rows


def reading(summary: dict) -> list[str]:
    key = summary["quality_key"]
    rows = [r for r in summary["rows"] if not r.get("apart")]
    return [line for r in rows if r["method"] == "progressive"
            for line in [sfddm.ceiling_line(r, rows, key, "trailing")] if line]


# ---- the command line ---------------------------------------------------------------------------------

PROGRESSIVE_LOOP = loop_recipe(iters=ITERS_PER_FOLD, batch=FOLD_BATCH, lr=FOLD_LR, lr_schedule=FOLD_LR_SCHEDULE)


def distill_progressive(teacher, data, out, *, steps: int = 8, start_steps: int | None = None, head: str = "x0",
                        clip="auto", clip_targets: bool = False, dropout: float | None = None,
                        resolution: int | None = None, data_seed: int | None = None, resume: bool = False,
                        run_info: dict | None = None, **options) -> Checkpoint:
    """Progressive distillation (Salimans & Ho) of `teacher` (a loaded model, a built-in name or a checkpoint
    folder) on `data`, in folds that halve the DDIM steps from `start_steps` (default: the teacher's T) down to
    `steps`; every fold is kept in out/fold-<steps>/ and the final student, returned, in `out`.

    `head`: the output compared, with the paper's weight (x0 with max(SNR, 1), v or eps); `clip`: x0 clipping
    when sampling (auto: 1 for images); `clip_targets` also clips the teacher inside the targets. Training-loop
    keywords (`fewstep.recipe.LOOP_OPTIONS`) apply to each fold: 1,000 iterations at batch 64, Adam 1e-4 with a
    cosine decay, gradients clipped at norm 1."""
    loop = check_loop_options(options, "distill_progressive")
    steps = A.check("steps", steps, A.positive_int)
    start_steps = None if start_steps is None else A.check("start_steps", start_steps, A.integer(2, 10**6))
    head = A.check("head", head, A.choice(tuple(HEADS)))
    resolution = None if resolution is None else A.check("resolution", resolution, A.resolution)
    data_seed = None if data_seed is None else A.check("data_seed", data_seed, A.seed)
    dropout = None if dropout is None else A.check("dropout", dropout, A.probability)
    resolved = {**PROGRESSIVE_LOOP, **loop}
    teacher = as_model(teacher, device=pick_device(resolved["device"]), what="teacher")
    if run_info is None:
        run_info = api_run_info("distill_progressive", {
            "teacher": teacher, "data": data, "out": str(out), "steps": steps, "start_steps": start_steps,
            "head": head, "clip": clip, "clip_targets": clip_targets, "dropout": dropout, "resolution": resolution,
            "data_seed": data_seed, **loop})
    ds, info = distill_data(data, resolution, data_seed, teacher)
    out = progressive_distill(teacher, ds.x, start_steps, steps, out, TrainConfig.from_options(resolved),
                              data_info=info, clip=clip, dropout=dropout, resume=resume, run_info=run_info,
                              labels=distill_labels(teacher, ds), head=head, clip_targets=clip_targets)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun the final card is process 0's to write
        return None
    return load_checkpoint(out, device=next(teacher.denoiser.parameters()).device)


def add_arguments(p, add_loop_options):
    p.add_argument("--teacher", required=True, help="teacher checkpoint or built-in name")
    p.add_argument("--data", required=True, help="training data (built-in name or path)")
    p.add_argument("--resolution", type=A.resolution, default=None, help="image size (default: the teacher's)")
    p.add_argument("--data-seed", type=A.seed, default=None, help="train/held-out split seed (default: the teacher's)")
    add_loop_options(PROGRESSIVE_LOOP, notes={"iters": f"per fold; default {ITERS_PER_FOLD}"})
    p.add_argument("--steps", type=A.positive_int, default=8, help="the final student's DDIM steps (= NFE; default 8)")
    p.add_argument("--start-steps", type=A.integer(2, 10**6), default=None,
                   help="the first teacher's DDIM steps (default: its T; e.g. 256 starts from a 256-step "
                        "DDIM teacher); start/steps must be a power of two")
    p.add_argument("--head", default="x0", choices=list(HEADS),
                   help="the output the student is compared in, with the paper's weight: x0 with max(SNR,1) "
                        "('truncated SNR', default), v (SNR+1), or eps (SNR, the epsilon-MSE the paper shows "
                        "failing at few steps). The student starts as the teacher's exact copy either way")
    p.add_argument("--clip", type=A.clip_bound, default="auto",
                   help="clip x0 when sampling: a bound or 'none' (default: 1 for images, none for 2-D)")
    p.add_argument("--clip-targets", action="store_true",
                   help="also clip the teacher's x0 inside the training targets (fewstep's earlier behaviour; "
                        "the paper's targets are unclipped)")
    p.add_argument("--dropout", type=A.probability, default=None, help="student dropout (default: the teacher's)")


def run(args):
    student = distill_progressive(args.teacher, args.data, args.out, steps=args.steps, start_steps=args.start_steps,
                                  head=args.head, clip=args.clip, clip_targets=args.clip_targets,
                                  dropout=args.dropout, resolution=args.resolution, data_seed=args.data_seed,
                                  resume=args.resume, run_info=run_record(args), **loop_options_from_args(args))
    m = student.card["method"]
    print(f"progressive student ({m['teacher_steps']} → {m['student_steps']} steps in {len(m['folds'])} folds, "
          f"{m['total_iterations']} iterations, {m['total_wall_time_s']:.1f} s) saved to {args.out} "
          f"(sample it with: fewstep sample {args.out}; NFE {m['student_steps']})")


METHOD = Method(add_arguments=add_arguments, run=run, bench_methods=("progressive",), bench_rows=bench_rows,
                reading=reading, parser_options=dict(
    conflict_handler="resolve", formatter_class=argparse.RawDescriptionHelpFormatter,
    description="Each fold trains a copy of its teacher to do two teacher DDIM steps in one, halving the\n"
                "steps, until --steps remain. Every fold is kept in OUT/fold-<steps>/; OUT holds the final\n"
                "student with the summed cost. Note: --steps is the final step count; --iters is per fold.",
    epilog="example:\n"
           "  fewstep distill progressive --teacher digits-teacher --data digits --steps 8 --out runs/pd8"))
