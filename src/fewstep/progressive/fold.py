"""Progressive distillation (Salimans & Ho, ICLR 2022), one fold: the target, the output heads and the fold's
TrainMethod.

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

import copy

import torch

from fewstep.denoiser import Denoiser
from fewstep.distill.common import check_trained_shape
from fewstep.errors import FewstepError, option
from fewstep.nets import channels_last_copy, set_dropout
from fewstep.sampling import sample_shape
from fewstep.schedule import check_grid, index_subsequence, make_grid
from fewstep.solvers import solve
from fewstep.timing import fresh_autocast, untimed
from fewstep.train import StepContext, TrainMethod

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
    start, target = option("start_steps", start_steps), option("steps", target_steps)
    if target_steps < 1:
        raise FewstepError(f"{target}: expected at least 1")
    if start_steps <= target_steps:
        raise FewstepError(f"{start} must exceed the target, {target}")
    ratio = start_steps // target_steps
    if start_steps % target_steps or ratio & (ratio - 1):
        raise FewstepError(f"{start} / {target} must be a power of two (each fold halves the steps); e.g. "
                           f"{option('start_steps', 1024)} and {option('steps', 8)}")
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
        raise FewstepError(f"{option('head', head)}: expected one of {', '.join(HEADS)}")
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
            raise FewstepError(f"{option('head', head)}: expected one of {', '.join(HEADS)}")
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
        check_trained_shape(self.data_info, self.shape)

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
        last = self._last
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
