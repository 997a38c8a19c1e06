"""The teacher's side of SFD: the student's timestamps inside a refined teacher grid, and the teacher states
y_k at those timestamps for a batch of noises (a strong solver in the first stage; a first-stage student on its
own Euler grid in the 1-NFE stage), computed or read back from the trajectory cache."""
from __future__ import annotations

import contextlib
import sys

import torch

from fewstep.checkpoint import Checkpoint
from fewstep.distill.trajectory_cache import TrajectoryCache, module_digest
from fewstep.errors import FewstepError, option
from fewstep.schedule import check_grid, nested_grids
from fewstep.sfd.config import (EDM_SIGMA_MAX, EDM_SIGMA_MIN, LATENT_SIGMA_MIN, LATENT_TEXT_SIGMA_MIN, SFDConfig,
                                student_nfe, timestamps_for_nfe)
from fewstep.solvers import solve


def sfd_grids(teacher_den, cfg: SFDConfig, nfe: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(student timestamps, refined teacher grid) for one NFE; every student timestamp is a teacher one."""
    smin, smax = sigma_range(teacher_den, cfg)
    n = timestamps_for_nfe(nfe, cfg.afs)
    return nested_grids(cfg.grid, n, cfg.m, smin, smax, cfg.rho, schedule=teacher_den.schedule)


def sigma_range(teacher_den, cfg: SFDConfig) -> tuple[float, float]:
    continuous = not teacher_den.schedule.is_discrete
    # continuous teachers: the paper's ends, inside the teacher's own range (a VE model stops at 0.02)
    lo = max(EDM_SIGMA_MIN, teacher_den.sigma_min) if continuous else teacher_den.sigma_min
    hi = min(EDM_SIGMA_MAX, teacher_den.sigma_max) if continuous else teacher_den.sigma_max
    if teacher_den.codec is not None:
        # latent teachers: the authors' σ_min, 0.1 for Stable Diffusion and 0.006 for an LDM, inside the table
        lo = max(LATENT_TEXT_SIGMA_MIN if teacher_den.text is not None else LATENT_SIGMA_MIN, teacher_den.sigma_min)
    smin = cfg.sigma_min if cfg.sigma_min is not None else lo
    smax = cfg.sigma_max if cfg.sigma_max is not None else hi
    return smin, smax


def teacher_evaluations(solver: str, t_grid) -> int:
    """The teacher's network evaluations over a refined grid (Heun: two a step)."""
    return (len(t_grid) - 1) * (2 if solver == "heun" else 1)


class TeacherTrajectory:
    """Produces the teacher states y_k at the student timestamps, for a batch of initial noises.

    first stage: a strong solver over the refined grid; second stage: a first-stage student with
    Euler (and its AFS) on its own grid, whose states at the student timestamps are kept.
    """
    def __init__(self, den, solver: str, afs: bool = False, clip: float | None = None, step: int | None = None,
                 precision: str = "fp32", final_orders: str = "always"):
        self.den, self.solver, self.afs, self.clip, self.step = den, solver, afs, clip, step
        self.precision, self.final_orders = precision, final_orders
        self.cache: TrajectoryCache | None = None  # states stored and reused by content
        self._digest = None
        self.precision_check = None  # bf16: the first batch's deviation from fp32 and the precision kept

    def setup(self, text=None) -> dict:
        """What, besides the teacher, the grid and the noise, decides the trajectories (the cache key)."""
        setup = {"solver": self.solver, "afs": self.afs, "clip": self.clip, "step": self.step,
                 "precision": self.precision, **(text.key() if text is not None else {})}
        if self.solver in ("dpmpp2m", "dpmpp3m"):
            setup["final_orders"] = self.final_orders
        return setup

    def autocast(self, device_type: str):
        """The network's precision: bf16 autocast, or as it is (the solver's own arithmetic stays fp32)."""
        if self.precision == "bf16":
            return torch.autocast(device_type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def __call__(self, x_T: torch.Tensor, teacher_grid: torch.Tensor, positions: list[int], class_labels=None,
                 text=None):
        kw = {"afs": True} if self.afs else {}
        if self.solver in ("dpmpp2m", "dpmpp3m"):
            kw["lower_order_final"] = self.final_orders
        with self.autocast(x_T.device.type):
            r = solve(self.solver, self.den.with_step(self.step, class_labels, text), x_T, teacher_grid.to(x_T.device),
                      clip=self.clip, return_trajectory=True, **kw)
        return [r.trajectory[p].to(x_T.dtype) for p in positions], r.nfe

    def check_precision(self, x, t_grid, positions, labels, nfe: int, tolerance: float, text=None):
        """bf16 teacher: keep it only if its trajectory on this batch stays within the tolerance of fp32's
        (relative RMS deviation, the largest over the kept states)."""
        self.precision = "fp32"
        exact, _ = self(x, t_grid, positions, labels, text)
        self.precision = "bf16"
        fast, _ = self(x, t_grid, positions, labels, text)
        deviation = max(float((f - e).square().mean().sqrt() / e.square().mean().sqrt().clamp_min(1e-12))
                        for f, e in zip(fast[1:], exact[1:]))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # each process checked its own slice: the largest deviation decides for all, so they agree
            worst = torch.tensor([deviation], dtype=torch.float64, device=x.device)
            torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
            deviation = float(worst)
        kept = "bf16" if deviation <= tolerance else "fp32"
        self.keep_precision({"deviation": deviation, "tolerance": tolerance, "nfe": nfe, "kept": kept})
        if kept == "fp32":
            print(f"fewstep: note: the bf16 teacher's trajectories deviate from fp32 by {deviation:.3g} "
                  f"(relative RMS) on the first batch, over {option('teacher_precision_tol', tolerance)}; "
                  "the teacher runs in fp32", file=sys.stderr)

    def keep_precision(self, check: dict):
        self.precision_check = check
        self.precision = check["kept"]

    def states(self, x, t_grid, positions, labels, text=None):
        """(teacher states at the student timestamps, teacher NFE, whether they came from the cache)."""
        if self.cache is None:
            return (*self(x, t_grid, positions, labels, text), False)
        if self._digest is None:  # after use_channels_last: the format is part of the teacher
            self._digest = module_digest(self.den)
        setup = {**self.setup(text), "grid": [float(s) for s in t_grid], "positions": list(positions)}
        key = self.cache.key(self._digest, setup, x, labels)
        found = self.cache.get(key, x.device)
        if found is not None:
            return (*found, True)
        states, teacher_nfe = self(x, t_grid, positions, labels, text)
        self.cache.put(key, states, teacher_nfe)
        return states, teacher_nfe, False


def stage2_setup(first: Checkpoint, cfg: SFDConfig):
    """The 1-NFE stage's teacher and grid: the first-stage model on its own Euler grid (SFD-v's largest-N
    mode, as in the paper) teaches a student of AFS + one step (1 NFE). Returns (grids, trajectory, the
    student's step condition, the first stage's NFE)."""
    spec = first.sampler
    if first.card.get("method", {}).get("name") not in ("sfd", "sfd-v"):
        raise FewstepError(f"{option('stage2', True)} needs a first-stage SFD or SFD-v model as {option('teacher')}")
    if "grids" in spec:
        nfe_t = max(int(k) for k in spec["grids"])
        t_grid = torch.tensor(spec["grids"][str(nfe_t)], dtype=torch.float64)
        step = len(t_grid)
    else:
        t_grid = torch.tensor(spec["sigmas"], dtype=torch.float64)
        step = None
    if not spec.get("afs"):
        raise FewstepError(f"{option('stage2')}: the first-stage model must use AFS (the 1-NFE student is AFS + "
                           "one step)")
    intervals = len(t_grid) - 1
    if intervals % 2:
        raise FewstepError(f"{option('stage2')}: the first-stage grid has {intervals} intervals; the 3-timestamp "
                           "student needs an even count to sit on teacher timestamps (use a first-stage NFE of 1, 3 "
                           "or 5)")
    student_grid = t_grid[:: intervals // 2].clone()
    grids = {1: (check_grid(student_grid), check_grid(t_grid))}
    traj = TeacherTrajectory(first.denoiser, "euler", afs=True, step=step)
    # a step-conditioned student takes one N for good: its own 3 timestamps (the authors') or the first-stage mode
    # it distils and starts from
    if step is None:
        condition = None
    else:
        condition = len(student_grid) if cfg.stage2_condition == "own" else step
    return grids, traj, condition, student_nfe(len(t_grid), True)
