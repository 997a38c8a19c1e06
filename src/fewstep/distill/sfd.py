"""SFD — Simple and Fast Distillation (Zhou et al., NeurIPS 2024).

Data-free trajectory distillation: the student (a copy of the teacher network, all weights tuned)
learns to land, with one plain Euler step per student timestamp, where a strong teacher solver
lands. The student continues from its own state between steps (global trajectory matching), with
one optimizer step per network-using student step and a stop-gradient in between.

Variants in this module:
  * AFS (analytical first step): the first step uses d = x / sqrt(1 + t0²), no network call.
  * SFD-v: one step-conditioned model for a set of NFEs; N is drawn per iteration.
  * second stage: a first-stage student sampled with Euler on its own grid is the teacher of a
    1-NFE student (AFS + one step), with an optional perceptual term on the last step.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import math
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from fewstep import argtypes as A
from fewstep.checkpoint import Checkpoint, load_checkpoint, read_card, teacher_reference
from fewstep.components import default_prompts
from fewstep.distill.trajectory_cache import TrajectoryCache, module_digest
from fewstep.errors import FewstepError
from fewstep.featnet import available_classifiers
from fewstep.method import Method, Row
from fewstep.models import as_model
from fewstep.nets import STEP_CONDITIONS, channels_last_copy, set_dropout
from fewstep.perceptual import perceptual_distance
from fewstep.recipe import (check_loop_options, config_defaults, loop_options_from_args, loop_recipe,
                            method_config, take_config_options)
from fewstep.recipe import run_info as api_run_info
from fewstep.sampling import sample_shape
from fewstep.schedule import GRID_KINDS, check_grid, check_nested, nested_grids
from fewstep.show import (budget_label, fmt_paired, fmt_quality, fmt_time, interval, lower_beyond, plt,
                          reference_levels, savefig, versus)
from fewstep.solvers import LOWER_ORDER_FINAL, afs_direction, solve
from fewstep.train import StepContext, TrainConfig, Trainer, TrainMethod, pick_device, run_record

TEACHER_SOLVERS = ("dpmpp3m", "dpmpp2m", "heun", "euler", "ipndm")
TEACHER_PRECISIONS = ("fp32", "bf16")
STAGE2_CONDITIONS = ("own", "teacher")
PERCEPTUAL_NETS = ("classifier", "lpips")
LOSS_REDUCTIONS = ("sum", "mean")
# The paper's grid ends for EDM (continuous) teachers: σ_min = 0.006 rather than EDM's 0.002.
EDM_SIGMA_MIN, EDM_SIGMA_MAX = 0.006, 80.0
LATENT_SIGMA_MIN, LATENT_TEXT_SIGMA_MIN = 0.006, 0.1

# The authors' budgets and optimizer (zju-pi/diff-sampler sfd-main, launch.sh and training_loop.py), the
# defaults of every mode: trajectories of one SFD run, SFD-v four times that, the 1-NFE stage ten times;
# Adam 5e-5 (5e-4 for the 1-NFE stage), divided by 10 at half the run. One default is not theirs: their
# loop clips no gradient (it only replaces NaNs); fewstep clips SFD and SFD-v at norm 1, which distilled
# better beyond the 95 % intervals on the digits and MNIST teachers (docs/results.md, "SFD recipe"). The
# 1-NFE stage keeps their unclipped default: clipping it was not measured.
SFD_TRAJECTORIES = 200_000
SFDV_TRAJECTORY_FACTOR = 4
STAGE2_TRAJECTORY_FACTOR = 10
SFD_LR, STAGE2_LR = 5e-5, 5e-4
AUTHORS_GRAD_CLIP = None
SFD_GRAD_CLIP, STAGE2_GRAD_CLIP = 1.0, AUTHORS_GRAD_CLIP


def recipe(nfe: list, stage2: bool, trajectories_of_one_run: int = SFD_TRAJECTORIES) -> dict:
    """A mode's default budget and optimizer: {"trajectories", "lr", "grad_clip"} (see above)."""
    factor = STAGE2_TRAJECTORY_FACTOR if stage2 else SFDV_TRAJECTORY_FACTOR if len(nfe) > 1 else 1
    return {"trajectories": trajectories_of_one_run * factor, "lr": STAGE2_LR if stage2 else SFD_LR,
            "grad_clip": default_grad_clip(stage2)}


def default_grad_clip(stage2: bool) -> float | None:
    """fewstep's gradient clip: SFD and SFD-v at norm 1, the 1-NFE stage none (see above)."""
    return STAGE2_GRAD_CLIP if stage2 else SFD_GRAD_CLIP


@dataclass(frozen=True)
class SFDConfig:
    """What an SFD run distils (its training budget and optimizer are the loop's options, `SFD_LOOP`). Checked
    when made; `nfe` may be one int (SFD) or a list (SFD-v). Never changed by a run: what a run resolves
    ("auto", the 1-NFE stage's NFE) goes into its own copy, the one its card records."""
    nfe: list = field(default_factory=lambda: [2])   # one value: SFD; several: SFD-v
    afs: bool = True
    m: int = 3                                        # teacher points inserted per student interval
    teacher_solver: str = "dpmpp3m"
    # DPM-Solver++ teachers: orders 2 then 1 on the last two steps of every grid ("always", the authors'),
    # only on grids under 15 steps ("short", diffusers'), or "never"
    teacher_final_orders: str = "always"
    grid: str = "polynomial"
    rho: float = 7.0
    sigma_min: float | None = None
    sigma_max: float | None = None
    loss_reduction: str = "sum"                      # sum over pixels (paper) or mean
    thresholding: bool = False                        # clip the teacher's x0 to [-1, 1] (a fixed clip)
    dropout: float | None = None                      # None: keep the teacher's
    step_condition: str = "authors"                   # SFD-v: "authors" (per-block affine) or "zero"
    stage2: bool = False
    # the 1-NFE student's step condition: "own" (its own N = 3, as the authors train it) or "teacher" (the N of
    # the first-stage mode it distils)
    stage2_condition: str = "own"
    # a perceptual term on the last step: None, "classifier", "lpips", or "auto" (the authors' for the 1-NFE
    # stage where it needs no download: LPIPS with --lpips-weights, else the shipped classifier of built-in
    # data, else none; nothing in the first stage)
    perceptual: str | None = "auto"
    perceptual_weight: float | None = None            # None: the authors' (the distance added to every pixel)
    lpips_weights: str | None = None                  # perceptual "lpips": the converted weight file
    lpips_resolution: int = 224                       # ... and the size images are resized to (the authors')
    # bf16: the teacher's trajectories under bf16 autocast, kept only if on the first batch every kept state
    # is within this relative RMS deviation of the fp32 trajectory (else the run stays fp32 and says so)
    teacher_precision: str = "fp32"
    teacher_precision_tol: float = 0.02

    def __post_init__(self):
        # one NFE may come as an int, several as any sequence of ints; the values are checked in validate()
        nfe = [self.nfe] if isinstance(self.nfe, int) and not isinstance(self.nfe, bool) else self.nfe
        if not isinstance(nfe, (list, tuple)) or not all(isinstance(n, int) and not isinstance(n, bool) for n in nfe):
            raise FewstepError(f"--nfe {self.nfe!r}: expected an integer or a list of integers")
        object.__setattr__(self, "nfe", list(nfe))
        if self.perceptual == "none":  # the command line's spelling of no perceptual term
            object.__setattr__(self, "perceptual", None)
        self.validate()

    def validate(self):
        if not self.nfe or min(self.nfe) < 1:
            raise FewstepError(f"--nfe {self.nfe}: expected NFE values >= 1")
        if len(set(self.nfe)) != len(self.nfe):
            raise FewstepError(f"--nfe {self.nfe}: values must be distinct")
        if self.m < 0:
            raise FewstepError(f"--m {self.m}: expected m >= 0 teacher points per student interval")
        if self.teacher_solver not in TEACHER_SOLVERS:
            raise FewstepError(f"--teacher-solver {self.teacher_solver!r}: expected one of {', '.join(TEACHER_SOLVERS)}")
        if self.grid not in GRID_KINDS:
            raise FewstepError(f"--grid {self.grid!r}: expected one of {', '.join(GRID_KINDS)}")
        if self.loss_reduction not in LOSS_REDUCTIONS:
            raise FewstepError(f"--loss-reduction {self.loss_reduction!r}: expected sum or mean")
        if self.perceptual not in (None, "auto", *PERCEPTUAL_NETS):
            raise FewstepError(f"--perceptual {self.perceptual!r}: expected auto, {', '.join(PERCEPTUAL_NETS)} or none")
        if self.perceptual == "lpips" and not self.lpips_weights:
            raise FewstepError("--perceptual lpips needs --lpips-weights FILE (convert VGG16 and LPIPS weights once "
                               "with scripts/convert_lpips.py)")
        if self.perceptual_weight is not None and self.perceptual_weight < 0:
            raise FewstepError(f"--perceptual-weight {self.perceptual_weight}: expected a weight >= 0")
        if self.teacher_final_orders not in LOWER_ORDER_FINAL:
            raise FewstepError(f"--teacher-final-orders {self.teacher_final_orders!r}: expected one of "
                               f"{', '.join(LOWER_ORDER_FINAL)}")
        if self.step_condition not in STEP_CONDITIONS:
            raise FewstepError(f"--step-condition {self.step_condition!r}: expected one of {', '.join(STEP_CONDITIONS)}")
        if self.stage2_condition not in STAGE2_CONDITIONS:
            raise FewstepError(f"--stage2-condition {self.stage2_condition!r}: expected one of "
                               f"{', '.join(STAGE2_CONDITIONS)}")
        if self.teacher_precision not in TEACHER_PRECISIONS:
            raise FewstepError(f"--teacher-precision {self.teacher_precision!r}: expected one of "
                               f"{', '.join(TEACHER_PRECISIONS)}")
        if not 0 < self.teacher_precision_tol < 1:
            raise FewstepError(f"--teacher-precision-tol {self.teacher_precision_tol}: expected a relative "
                               "deviation in (0, 1)")


def timestamps_for_nfe(nfe: int, afs: bool) -> int:
    """N student timestamps: N−1 Euler steps, one of which is free with AFS."""
    return nfe + 1 + (1 if afs else 0)


def student_nfe(n_timestamps: int, afs: bool) -> int:
    return n_timestamps - 1 - (1 if afs else 0)


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
                  f"(relative RMS) on the first batch, over --teacher-precision-tol {tolerance:g}; "
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


class SFD(TrainMethod):
    """SFD / SFD-v / second stage as one TrainMethod on the shared loop."""
    needs_data = False

    def __init__(self, teacher: Checkpoint, cfg: SFDConfig, teacher_ref: dict | None = None,
                 trajectory_cache: str | Path | None = None, prompts: list[str] | None = None,
                 negative_prompt: str | None = None, guidance: float | None = None):
        self.cfg = cfg  # replaced below by the resolved copy (perceptual term, the 1-NFE stage's NFE)
        # teacher trajectories stored and reused by content (see fewstep.distill.trajectory_cache)
        self.cache = TrajectoryCache(trajectory_cache) if trajectory_cache is not None else None
        self.teacher = teacher
        self.teacher_ref = teacher_ref
        tden = teacher.denoiser.eval()
        for p in tden.parameters():
            p.requires_grad_(False)
        self.shape = tuple(sample_shape(teacher.card))
        self.clip = 1.0 if cfg.thresholding else None
        self.perceptual_net = self._perceptual_net(teacher.card.get("data") or {}, next(tden.parameters()).device)
        if cfg.stage2:
            self._init_stage2(teacher)
        else:
            self.name = "sfd-v" if len(cfg.nfe) > 1 else "sfd"
            self.grids = {n: sfd_grids(tden, cfg, n) for n in cfg.nfe}
            self.traj = TeacherTrajectory(tden, cfg.teacher_solver, clip=self.clip,
                                          final_orders=cfg.teacher_final_orders)
            self.student_step_cond = None  # per-iteration N for SFD-v
        self.traj.cache = self.cache
        self.student = copy.deepcopy(tden)
        if len(cfg.nfe) > 1 and not cfg.stage2:
            # a fixed seed makes the new layers' (non-zero) weights independent of RNG history
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                self.student.net.add_step_condition(cfg.step_condition)
        for p in self.student.parameters():
            p.requires_grad_(True)
        if cfg.dropout is not None:
            set_dropout(self.student, cfg.dropout)
        self.positions = {n: check_nested(s, t) for n, (s, t) in self.grids.items()}
        self.trajectories = 0
        self._init_text(prompts, negative_prompt, guidance)

    def _init_text(self, prompts, negative_prompt, guidance):
        """A text teacher: trajectories of the guided teacher on prompts drawn uniformly from a list (the given
        one, else fewstep's shipped list), as the authors distil Stable Diffusion at a fixed guidance scale; the
        student takes the prompt alone (guidance 1) and its card keeps the scale it learnt."""
        tden = self.traj.den
        self.prompts = None
        if tden.text is None:
            if prompts or negative_prompt is not None or guidance is not None:
                raise FewstepError("--prompt / --prompts / --negative-prompt / --guidance: the teacher is not "
                                   "text-conditioned")
            return
        self.prompts = list(prompts) if prompts else default_prompts()
        self.negative_prompt = tden.negative_prompt if negative_prompt is None else negative_prompt
        # the teacher's guidance for this run: given, or its card's (the teacher model itself is left as it is)
        self.guidance = tden.guidance if guidance is None else float(guidance)
        self.distilled_guidance = (self.teacher.card.get("text") or {}).get("distilled_guidance", self.guidance) \
            if self.cfg.stage2 else self.guidance
        self.student.guidance = 1.0

    def _batch_prompts(self, index: torch.Tensor):
        """This batch's prompts, encoded once: the teacher's conditioning (guided) and the student's (the same
        prompts alone, guidance 1)."""
        text = self.traj.den.encode_prompts([self.prompts[i] for i in index.tolist()], self.negative_prompt,
                                            self.guidance)
        return text, text.with_guidance(1.0)

    def _perceptual_net(self, data: dict, device):
        """The last step's perceptual distance (None: none); resolves "auto" in the config, for the card."""
        cfg, kind = self.cfg, self.cfg.perceptual
        if kind == "auto":
            kind = None
            if cfg.stage2 and cfg.lpips_weights:
                kind = "lpips"
            elif cfg.stage2 and (data.get("name"), (data.get("shape") or [0])[-1]) in available_classifiers():
                kind = "classifier"
            elif cfg.stage2:
                print("fewstep: note: the 1-NFE stage runs without the authors' perceptual term: give "
                      "--lpips-weights FILE (see scripts/convert_lpips.py) to add LPIPS", file=sys.stderr)
        self.cfg = replace(cfg, perceptual=kind)
        if kind is None:
            return None
        return perceptual_distance(kind, data, device, cfg.lpips_weights, cfg.lpips_resolution)

    def perceptual_weight(self) -> float:
        """The authors add the perceptual distance to every pixel's L1: C·H·W times it against the summed
        L1 (once against the mean)."""
        if self.cfg.perceptual_weight is not None:
            return self.cfg.perceptual_weight
        return float(math.prod(self.shape)) if self.cfg.loss_reduction == "sum" else 1.0

    def _init_stage2(self, first: Checkpoint):
        """Teacher: the first-stage model on its own Euler grid; student: AFS + 1 step (1 NFE)."""
        spec = first.sampler
        if first.card.get("method", {}).get("name") not in ("sfd", "sfd-v"):
            raise FewstepError("--stage2 needs a first-stage SFD or SFD-v model as --teacher")
        if "grids" in spec:
            nfe_t = max(int(k) for k in spec["grids"])  # the paper uses SFD-v's largest-N mode
            t_grid = torch.tensor(spec["grids"][str(nfe_t)], dtype=torch.float64)
            step = len(t_grid)
        else:
            t_grid = torch.tensor(spec["sigmas"], dtype=torch.float64)
            step = None
        if not spec.get("afs"):
            raise FewstepError("--stage2: the first-stage model must use AFS (the 1-NFE student is AFS + one step)")
        intervals = len(t_grid) - 1
        if intervals % 2:
            raise FewstepError(f"--stage2: the first-stage grid has {intervals} intervals; the 3-timestamp student "
                               "needs an even count to sit on teacher timestamps (use a first-stage NFE of 1, 3 or 5)")
        student_grid = t_grid[:: intervals // 2].clone()
        self.cfg = replace(self.cfg, nfe=[1], afs=True)
        self.name = "sfd-stage2"
        self.grids = {1: (check_grid(student_grid), check_grid(t_grid))}
        self.traj = TeacherTrajectory(first.denoiser, "euler", afs=True, step=step)
        # a step-conditioned student takes one N for good: its own 3 timestamps (the authors') or the
        # first-stage mode it distils and starts from
        if step is None:
            self.student_step_cond = None
        else:
            self.student_step_cond = len(student_grid) if self.cfg.stage2_condition == "own" else step
        self.stage2_teacher_nfe = student_nfe(len(t_grid), True)

    @property
    def precision_check(self) -> dict | None:
        return self.traj.precision_check

    # ---- TrainMethod hooks -------------------------------------------------------------------
    def trainable(self):
        return self.student

    def _student_model(self, n_timestamps: int, class_labels=None, text=None):
        step = (self.student_step_cond or n_timestamps) if self.student.has_step_condition else None
        return self.student.with_step(step, class_labels, text)

    def _labels(self, ctx: StepContext, B: int, gen: torch.Generator):
        """(labels, the teacher's text conditioning, the student's). Class labels of a conditional teacher's
        trajectories: uniform over its classes (as the SFD code does), drawn for the global batch and sliced. A
        text teacher's prompts are drawn the same way from the prompt list; the batch's are encoded and its
        labels index them."""
        if self.prompts is not None:
            text, student_text = self._batch_prompts(torch.randint(len(self.prompts), (B,), generator=gen))
            return ctx.local(torch.arange(B)).to(ctx.device), text, student_text
        k = self.teacher.denoiser.num_classes
        return (ctx.local(torch.randint(k, (B,), generator=gen)).to(ctx.device) if k else None), None, None

    def train_step(self, ctx: StepContext, batch, gen: torch.Generator) -> dict:
        cfg = self.cfg
        B = ctx.world * self._local_batch(ctx)
        eps = ctx.local(torch.randn((B, *self.shape), generator=gen)).to(ctx.device)
        labels, text, student_text = self._labels(ctx, B, gen)
        # N is drawn from the iteration's global generator, so all processes pick the same N; after the
        # noise, so SFD-v's iteration k starts where an SFD run at that N does (shared cached trajectories)
        nfe = cfg.nfe[int(torch.randint(len(cfg.nfe), (1,), generator=gen))] if len(cfg.nfe) > 1 else cfg.nfe[0]
        s_grid, t_grid = self.grids[nfe]
        x = eps * float(s_grid[0])

        with ctx.timed("teacher"), ctx.autocast():
            if cfg.teacher_precision == "bf16" and self.precision_check is None:
                self.traj.check_precision(x, t_grid, self.positions[nfe], labels, nfe, cfg.teacher_precision_tol,
                                          text)
            targets, teacher_nfe, cached = self.traj.states(x, t_grid, self.positions[nfe], labels, text)
        # the floor replays the teacher calls the iteration made: none when it read its trajectories
        self._last = (ctx, x, s_grid, t_grid, 0 if cached else teacher_nfe, labels, text, student_text)

        model = self._student_model(len(s_grid), labels, student_text)
        losses = []
        s_grid = s_grid.to(ctx.device)
        for i in range(len(s_grid) - 1):
            t, t_next = s_grid[i], s_grid[i + 1]
            use_net = not (cfg.afs and i == 0)
            if use_net:
                with ctx.timed("student"), ctx.autocast():
                    d = (x - model(x, t)) / t.to(x.dtype)
            else:
                d = afs_direction(x, float(t))
            x_next = x + (t_next - t).to(x.dtype) * d.float()
            target = targets[i + 1]
            loss = self._loss(x_next, target, last=(i == len(s_grid) - 2))
            if use_net:
                ctx.step(loss)
            losses.append(float(loss.detach()))
            x = x_next.detach()
        self.trajectories += B
        logs = {"loss": sum(losses) / len(losses), "nfe": nfe, "teacher_nfe": teacher_nfe,
                "trajectories": self.trajectories}
        if self.cache is not None:
            logs["teacher_cached"] = int(cached)
        logs.update({f"loss_step{i}": v for i, v in enumerate(losses)})
        return logs

    def use_channels_last(self):
        self.traj.den = channels_last_copy(self.traj.den)

    def floor_calls(self):
        """The last iteration's calls alone: the teacher at each of its evaluations on the iteration's
        batch (no grad), the student's forward and backward at each network-using student step."""
        last = getattr(self, "_last", None)
        if last is None:
            return None
        ctx, x, s_grid, t_grid, teacher_nfe, labels, text, student_text = last
        tmodel = self.traj.den.with_step(self.traj.step, labels, text)
        sigmas = t_grid.to(x.device)
        model = self._student_model(len(s_grid), labels, student_text)

        def teacher_call(sigma):
            def call():
                with torch.no_grad(), ctx.autocast(), self.traj.autocast(x.device.type):
                    tmodel(x, sigma)
            return call

        def student_call(sigma):
            def call():
                with ctx.autocast():
                    out = model(x, sigma)
                out.float().sum().backward()
            return call

        first = 1 if self.cfg.afs else 0
        return {"teacher": [teacher_call(sigmas[min(k, len(sigmas) - 2)]) for k in range(teacher_nfe)],
                "student": [student_call(s_grid[i].to(x.device)) for i in range(first, len(s_grid) - 1)]}

    def _local_batch(self, ctx) -> int:
        return ctx.t.config.batch // ctx.world

    def _loss(self, x_next, target, last: bool) -> torch.Tensor:
        diff = (x_next - target).abs().reshape(x_next.shape[0], -1)
        loss = diff.sum(1).mean() if self.cfg.loss_reduction == "sum" else diff.mean()
        if last and self.perceptual_net is not None:
            loss = loss + self.perceptual_weight() * self.perceptual_net(x_next, target).mean()
        return loss

    def state_dict(self):
        state = {"trajectories": self.trajectories}
        if self.cache is not None:
            state["cache"] = {"hits": self.cache.hits, "misses": self.cache.misses}
        if self.precision_check is not None:
            state["precision_check"] = self.precision_check
        return state

    def load_state_dict(self, state):
        self.trajectories = int(state.get("trajectories", 0))
        if self.cache is not None:
            counts = state.get("cache") or {}
            self.cache.hits, self.cache.misses = int(counts.get("hits", 0)), int(counts.get("misses", 0))
        if state.get("precision_check"):  # a resumed run keeps the precision its first batch chose
            self.traj.keep_precision(state["precision_check"])

    def sampler_card(self) -> dict:
        cfg = self.cfg
        if len(self.grids) > 1:
            return {"name": "euler", "afs": cfg.afs, "nfe": max(self.grids), "final_zero": False, "clip": None,
                    "grids": {str(n): [float(s) for s in g[0]] for n, g in sorted(self.grids.items())}}
        (nfe, (s_grid, _)), = self.grids.items()
        spec = {"name": "euler", "afs": cfg.afs, "nfe": nfe, "final_zero": False, "clip": None,
                "sigmas": [float(s) for s in s_grid]}
        if self.student_step_cond is not None:
            spec["step"] = self.student_step_cond
        return spec

    def card(self) -> dict:
        cfg = self.cfg
        method = {"name": self.name, **asdict(cfg), "trajectories": self.trajectories,
                  "teacher_nfe_per_trajectory": {str(n): (len(t) - 1) * (2 if cfg.teacher_solver == "heun" else 1)
                                                 for n, (_, t) in self.grids.items()}}
        if cfg.stage2:
            method["first_stage_nfe"] = self.stage2_teacher_nfe
        if self.prompts is not None:
            method["prompts"] = {"count": len(self.prompts), "distribution": "uniform",
                                 "sha256": hashlib.sha256("\n".join(self.prompts).encode()).hexdigest(),
                                 "negative_prompt": self.negative_prompt, "guidance": self.guidance}
        elif self.teacher.denoiser.num_classes:
            method["class_distribution"] = "uniform"
        if self.cache is not None:
            method["trajectory_cache"] = self.cache.summary()
        if self.precision_check is not None:
            method["teacher_precision_check"] = self.precision_check
        card = {"method": method, "sampler": self.sampler_card(), "teacher": self.teacher_ref,
                "data": self.teacher.card.get("data")}
        if self.prompts is not None:
            card["text"] = {"distilled_guidance": self.distilled_guidance, "negative_prompt": self.negative_prompt}
        return card

    @torch.no_grad()
    def preview(self, model, n, seed):
        nfe = max(self.grids)
        s_grid = self.grids[nfe][0]
        x = torch.randn((n, *self.shape), generator=torch.Generator().manual_seed(seed))
        x = x.to(next(model.parameters()).device) * float(s_grid[0])
        step = (self.student_step_cond or len(s_grid)) if model.has_step_condition else None
        text = None
        if self.prompts is not None:  # the first prompts of the list, every preview alike, at the model's guidance
            text = model.encode_prompts(self.prompts[:n], self.negative_prompt)
            labels = torch.arange(n, device=x.device) % len(text.prompts)
        else:
            labels = torch.arange(n, device=x.device) % model.num_classes if model.num_classes else None
        return solve("euler", model.with_step(step, labels, text), x, s_grid.to(x.device), afs=self.cfg.afs).x


def iterations_for(trajectories: int, batch: int) -> int:
    return max(1, math.ceil(trajectories / batch))


# the loop's recipe: batch 128 and the authors' step decay; iterations, lr and clip follow from the mode (`recipe`)
SFD_LOOP = loop_recipe(iters=None, batch=128, lr=None, lr_schedule="step", grad_clip=None)


def distill_sfd(teacher, out, config: SFDConfig | None = None, *, trajectories: int | None = None,
                trajectory_cache=None, prompts: list[str] | None = None, negative_prompt: str | None = None,
                guidance: float | None = None, resume: bool = False, run_info: dict | None = None,
                **options) -> Checkpoint:
    """Distil `teacher` (a loaded model, a built-in name or a checkpoint folder) with SFD into the folder `out`
    and return the student, loaded.

    SFD's own options come as `config` (an `SFDConfig`) or as keywords (`nfe=2` for SFD, `nfe=[2, 3, 4, 5]` for
    SFD-v, `stage2=True` for the 1-NFE stage from a first-stage student, ...); the training loop's as keywords
    too (`fewstep.recipe.LOOP_OPTIONS`: iters, batch, lr, ...). What is not given is the authors' recipe:
    `trajectories` 200,000 (four times that for SFD-v, ten times for the 1-NFE stage) at batch 128, so
    iterations = trajectories / batch; Adam at 5e-5 (5e-4 for the 1-NFE stage) divided by 10 at half the run;
    gradients clipped at norm 1 (none for the 1-NFE stage), fewstep's one departure from the authors.

    `trajectory_cache`: a folder where the teacher's trajectories are kept and reused exactly. A text teacher
    distils on `prompts` (default: fewstep's shipped list) at its card's guidance and negative prompt unless
    given. `resume=True` continues an interrupted run in `out`."""
    config = method_config(SFDConfig, config, take_config_options(SFDConfig, options), "distill_sfd")
    loop = check_loop_options(options, "distill_sfd")
    if trajectories is not None:
        trajectories = A.check("trajectories", trajectories, A.integer(1, 10**12))
    defaults = recipe(config.nfe, config.stage2)
    resolved = {**SFD_LOOP, **loop}
    if resolved["lr"] is None:
        resolved["lr"] = defaults["lr"]
    if resolved["grad_clip"] is None:
        resolved["grad_clip"] = defaults["grad_clip"]
    if resolved["iters"] is None:  # iterations follow from the trajectory budget, as in the paper
        resolved["iters"] = iterations_for(trajectories or defaults["trajectories"], resolved["batch"])
    teacher = as_model(teacher, device=pick_device(resolved["device"]), what="teacher")
    if run_info is None:
        run_info = api_run_info("distill_sfd", {"teacher": teacher, "out": str(out), **asdict(config),
                                                "trajectories": trajectories, **loop})
    method = SFD(teacher, config, teacher_ref=teacher_reference(teacher.path), trajectory_cache=trajectory_cache,
                 prompts=prompts, negative_prompt=negative_prompt, guidance=guidance)
    Trainer(method, TrainConfig.from_options(resolved), out, resume=resume, run_info=run_info).run()
    return load_checkpoint(out, device=next(teacher.denoiser.parameters()).device)


# ---- the bench: SFD, SFD-v and the 1-NFE stage, and the recipe measured both ways ---------------------------

PANEL = "SFD, SFD-v and the 1-NFE stage"
LABELS = {"sfd": "SFD", "sfd-v": "SFD-v", "sfd-stage2": "SFD 2nd stage"}


@dataclass(frozen=True)
class RecipeSetting:
    """One setting of SFD's recipe measured both ways: the run with the authors' value is the bench's own
    row (a bench that measures recipe settings runs the authors' whole recipe), and an ablation row trains the
    same run again with the other value."""
    name: str
    label: str
    method: str               # the rows it changes: "sfd", "sfd-v" or "sfd-stage2"
    authors: str              # the authors' value, in words
    other: str                # the value it is measured against
    default: str = "authors"  # fewstep's default: "authors" or "other" (where the other won beyond the intervals)
    config: tuple = ()        # SFDConfig fields of the other value, as (name, value) pairs
    grad_clip: float | None = None   # the other value's gradient clip, where that is the setting
    lr: float | None = None          # ... learning rate
    factor: float | None = None      # ... budget, in trajectories of one SFD run
    nfe: int | None = None           # SFD rows: the NFE it is measured at (the smallest where it matters)


SFD_RECIPE = {r.name: r for r in (
    RecipeSetting("grad-clip", "gradient clipping (SFD)", "sfd", "none", "norm 1", "other", grad_clip=SFD_GRAD_CLIP,
                  nfe=2),
    RecipeSetting("grad-clip-sfdv", "gradient clipping (SFD-v)", "sfd-v", "none", "norm 1", "other",
                  grad_clip=SFD_GRAD_CLIP),
    RecipeSetting("final-orders", "teacher's last steps", "sfd", "orders 2 then 1 on every grid",
                  "lowered on grids under 15 steps only", config=(("teacher_final_orders", "short"),), nfe=3),
    RecipeSetting("sfdv-budget", "SFD-v budget", "sfd-v", f"{SFDV_TRAJECTORY_FACTOR}x one SFD run", "1x one SFD run",
                  factor=1),
    RecipeSetting("step-condition", "SFD-v step condition", "sfd-v", "per-block affine, xavier init",
                  "one zero-initialised embedding", config=(("step_condition", "zero"),)),
    RecipeSetting("stage2-lr", "1-NFE stage learning rate", "sfd-stage2", f"{STAGE2_LR:g}", f"{SFD_LR:g}", lr=SFD_LR),
    RecipeSetting("stage2-budget", "1-NFE stage budget", "sfd-stage2", f"{STAGE2_TRAJECTORY_FACTOR}x one SFD run",
                  "1x one SFD run", factor=1),
    RecipeSetting("stage2-perceptual", "1-NFE stage perceptual term", "sfd-stage2",
                  "on, added to every pixel (weight C·H·W)", "off", config=(("perceptual", None),)),
    RecipeSetting("stage2-condition", "1-NFE stage step condition", "sfd-stage2", "its own N = 3",
                  "the first stage's mode, N = 7", config=(("stage2_condition", "teacher"),)),
)}


def sfd_nfe_for(nfe: list) -> list:
    """The NFEs SFD distils at when none are named: the bench's NFEs up to 10 (a few-step method)."""
    return [n for n in nfe if n <= 10]


def sfdv_model(spec) -> str:
    """The SFD-v model's folder name; the 1-NFE second stage starts from it."""
    return "sfdv-" + "_".join(map(str, spec.sfdv_nfe))


@dataclass
class SFDRow(Row):
    """A row of SFD (method "sfd"), SFD-v ("sfd-v") or the 1-NFE stage ("sfd-stage2"); with `recipe`, the same
    run with that recipe setting's other value (drawn apart, in the recipe table)."""

    recipe: str | None = None

    @property
    def setting(self) -> RecipeSetting | None:
        return SFD_RECIPE.get(self.recipe)

    def budget(self, bench) -> dict:
        s, setting = bench.spec, self.setting
        factor = {"sfd": 1, "sfd-v": s.sfdv_trajectory_factor, "sfd-stage2": s.sfd_stage2_trajectory_factor}[self.method]
        lr = s.sfd_stage2_lr if self.method == "sfd-stage2" else s.sfd_lr
        if setting is not None:
            factor = setting.factor if setting.factor is not None else factor
            lr = setting.lr if setting.lr is not None else lr
        return {"iterations": iterations_for(round(s.sfd_trajectories * factor), s.sfd_batch), "batch": s.sfd_batch,
                "lr": lr, "grad_clip": self.grad_clip(bench)}

    def grad_clip(self, bench) -> float | None:
        """The setting's other value where it is the clip; else the authors' (no clipping) when the bench measures
        recipe settings, which are all measured from the authors' whole recipe; else fewstep's default."""
        setting = self.setting
        if setting is not None and setting.grad_clip is not None:
            return setting.grad_clip
        if bench.spec.sfd_recipe:
            return AUTHORS_GRAD_CLIP
        return default_grad_clip(self.method == "sfd-stage2")

    def config(self, **fields) -> SFDConfig:
        """The authors' recipe (SFDConfig's defaults), with the setting's other value if the row has one."""
        return SFDConfig(**fields, **dict(self.setting.config if self.setting else ()))

    def ensure_model(self, bench):
        path, budget = bench.model_dir(self.model), self.budget(bench)
        if bench.finished(path, budget):
            return path
        s = bench.spec
        if self.method == "sfd-stage2":
            first_path = first_stage_row(bench).ensure_model(bench)
            first = load_checkpoint(first_path, device=bench.device)
            method = SFD(first, self.config(stage2=True), teacher_ref=teacher_reference(first_path),
                         trajectory_cache=bench.trajectory_cache)
        else:
            nfe = [self.nfe] if self.method == "sfd" else list(s.sfdv_nfe)
            method = SFD(bench.teacher, self.config(nfe=nfe), teacher_ref=teacher_reference(bench.teacher.path),
                         trajectory_cache=bench.trajectory_cache)
        bench.train(method, path, budget, "step", grad_clip=budget["grad_clip"])
        return path

    def distill_seconds(self, bench, card: dict) -> float:
        own = float((card.get("training") or {}).get("wall_time_s") or 0)
        if self.method == "sfd-stage2":  # the first stage it starts from
            return own + float(read_card(bench.model_dir(sfdv_model(bench.spec)))["training"]["wall_time_s"])
        return own


def _row(method: str, nfe: int, model: str, key: str | None = None, recipe: str | None = None) -> SFDRow:
    label = LABELS[method] + (f" ~ {recipe}" if recipe else "")
    return SFDRow(key or model, method, nfe, label, model=model, panel=PANEL, recipe=recipe, apart=recipe is not None)


def first_stage_row(bench) -> SFDRow:
    """The SFD-v run the 1-NFE stage starts from (at its largest NFE)."""
    return _row("sfd-v", max(bench.spec.sfdv_nfe), sfdv_model(bench.spec))


def bench_rows(bench) -> list[SFDRow]:
    """SFD at each of its NFEs, SFD-v at each of its, the 1-NFE stage, then each recipe setting's other value
    (after the authors' runs, so they read those runs' teacher trajectories from the cache)."""
    s, rows = bench.spec, []
    tag = sfdv_model(s)
    if "sfd" in s.methods:
        rows += [_row("sfd", n, f"sfd-{n}") for n in (s.sfd_nfe if s.sfd_nfe is not None else sfd_nfe_for(s.nfe))]
    if "sfd-v" in s.methods:
        rows += [_row("sfd-v", n, tag, key=f"{tag}-{n}") for n in s.sfdv_nfe]
    if "sfd-stage2" in s.methods:
        rows.append(_row("sfd-stage2", 1, "sfd-stage2", key="sfd-stage2-1"))
    for name in s.sfd_recipe:
        if name not in SFD_RECIPE:
            raise FewstepError(f"sfd_recipe: unknown setting {name!r}; expected some of {', '.join(SFD_RECIPE)}")
        setting = SFD_RECIPE[name]
        if setting.method not in s.methods:
            continue
        if setting.method == "sfd":
            rows.append(_row("sfd", setting.nfe, f"sfd-{setting.nfe}~{name}", recipe=name))
        elif setting.method == "sfd-v":
            rows += [_row("sfd-v", n, f"{tag}~{name}", key=f"{tag}~{name}-{n}", recipe=name) for n in s.sfdv_nfe]
        else:
            rows.append(_row("sfd-stage2", 1, f"sfd-stage2~{name}", key=f"sfd-stage2~{name}-1", recipe=name))
    return rows


def bench_extras(bench, summary: dict, figdir) -> dict:
    """The recipe settings the bench measured, described for the report."""
    return {"sfd_recipe": {n: {"label": SFD_RECIPE[n].label, "method": SFD_RECIPE[n].method,
                               "authors": SFD_RECIPE[n].authors, "other": SFD_RECIPE[n].other}
                           for n in bench.spec.sfd_recipe}}


# ---- the report -----------------------------------------------------------------------------------------

def _own_rows(summary: dict) -> dict:
    return {(r["method"], r["nfe"]): r for r in summary["rows"] if r["method"] in LABELS and not r.get("recipe")}


def recipe_table(summary: dict) -> str:
    """Each SFD recipe setting measured both ways, one line per NFE: the run with the authors' value (the
    bench's own row) against the run with the other value, in the paired distance to the teacher's samples
    and the quality metric, each with its 95 % interval, and which is lower beyond both intervals."""
    settings = summary.get("sfd_recipe") or {}
    key = summary["quality_key"]
    own = _own_rows(summary)
    head = ["setting", "authors' value", "other value", "NFE", "paired RMSE: authors'", "other",
            f"{key.upper()}: authors'", "other", "distill time: authors'", "other", "lower beyond the intervals",
            "fewstep's default"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary["rows"]:
        setting = settings.get(r.get("recipe"))
        base = own.get((r["method"], r["nfe"]))
        if setting is None or base is None:
            continue
        verdicts = []
        pa, pb = (base.get("paired") or {}).get("rmse"), (r.get("paired") or {}).get("rmse")
        if pa and pb:
            verdicts.append(("paired RMSE", lower_beyond((pa["ci_low"], pa["ci_high"]), (pb["ci_low"], pb["ci_high"]))))
        qa, qb = interval(base["quality"], key), interval(r["quality"], key)
        if qa and qb:
            verdicts.append((key.upper(), lower_beyond(qa, qb)))
        said = [f"{'authors' if v < 0 else 'other'} ({m})" for m, v in verdicts if v]
        lines.append("| " + " | ".join([
            setting["label"], setting["authors"], setting["other"], str(r["nfe"]), fmt_paired(base), fmt_paired(r),
            fmt_quality(base["quality"], key), fmt_quality(r["quality"], key), fmt_time(base.get("distill_wall_s")),
            fmt_time(r.get("distill_wall_s")), "; ".join(said) if said else "neither",
            setting[SFD_RECIPE[r["recipe"]].default] if r["recipe"] in SFD_RECIPE else "–"]) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def plot_recipe(summary: dict, path: Path) -> bool:
    """Each recipe line as two points with their 95 % intervals: the authors' value and the other, in the
    paired RMSE (left) and the quality metric (right)."""
    if not recipe_table(summary):
        return False
    settings, key = summary["sfd_recipe"], summary["quality_key"]
    own = _own_rows(summary)
    lines = [(r, own[(r["method"], r["nfe"])]) for r in summary["rows"]
             if r.get("recipe") in settings and (r["method"], r["nfe"]) in own]
    pyplot = plt()
    fig, axes = pyplot.subplots(1, 2, figsize=(11, 0.32 * len(lines) + 1.4), sharey=True)
    labels = [f"{settings[r['recipe']]['label']}, NFE {r['nfe']}" for r, _ in lines]
    y = np.arange(len(lines))[::-1]
    for ax, metric in zip(axes, ("paired RMSE", key.upper())):
        for which, offset, color, name in ((1, 0.15, "tab:blue", "authors' value"), (0, -0.15, "tab:orange", "other value")):
            vals, errs = [], []
            for pair in lines:
                r = pair[which]
                if metric == "paired RMSE":
                    p = (r.get("paired") or {}).get("rmse") or {"mean": np.nan, "ci_low": np.nan, "ci_high": np.nan}
                    lo, mid, hi = p["ci_low"], p["mean"], p["ci_high"]
                else:
                    ci = interval(r["quality"], key) or (np.nan, np.nan)
                    lo, mid, hi = ci[0], r["quality"][key]["mean"], ci[1]
                vals.append(mid)
                errs.append((mid - lo, hi - mid))
            ax.errorbar(vals, y + offset, xerr=np.array(errs).T, fmt="o", ms=4, capsize=2, color=color, label=name)
        ax.set_xlabel(f"{metric} (lower is better; bars: 95 % intervals)")
        ax.grid(alpha=0.3)
    axes[0].set_yticks(y)
    axes[0].set_yticklabels(labels, fontsize=8)
    axes[0].legend(fontsize=8)
    savefig(fig, path)
    pyplot.close(fig)
    return True


def family_table(summary: dict) -> str:
    """The SFD family with the authors' recipe at each NFE, beside the teacher and the data floor."""
    key = summary["quality_key"]
    rows = [r for r in summary["rows"] if (r.get("reference") or r["method"] in LABELS) and not r.get("recipe")]
    if not any(r["method"] in LABELS for r in rows):
        return ""
    head = ["method", "NFE", key.upper(), "paired RMSE", "budget", "distill time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: (not r.get("reference"), r["nfe"], r["method"])):
        lines.append("| " + " | ".join([r["label"], str(r["nfe"]) if r["nfe"] else "–", fmt_quality(r["quality"], key),
                                        fmt_paired(r), budget_label(r), fmt_time(r.get("distill_wall_s"))]) + " |")
    return "\n".join(lines)


RECIPE_INTRO = ("fewstep's SFD follows its authors' recipe (zju-pi/diff-sampler, `sfd-main`) in every setting but "
                "one: SFD-v on four times one SFD run's trajectories with the step condition as a per-block affine, "
                "the 1-NFE stage on ten times at learning rate 5e-4 with a perceptual term on its last step, a "
                "DPM-Solver++(3M) teacher whose last two steps drop to orders 2 and 1; but SFD and SFD-v clip their "
                "gradients at norm 1, where the authors clip none. Here every SFD row runs the authors' whole recipe, "
                "and each setting below was also trained with its other value, on the same seeds and teacher "
                "trajectories, at budgets that keep the authors' ratios.")
RECIPE_NOTE = ("Each line trains one run twice, with the SFD authors' value of one setting (the bench's own row) "
               "and with the other value, everything else equal (same seeds, same teacher trajectories). Paired "
               "RMSE: the RMS pixel difference between a student's sample and the teacher reference's sample from "
               "the same noise, mean over the pairs with half its 95 % interval; the quality metric with half its "
               "95 % interval. \"Lower beyond the intervals\" names the value whose interval lies wholly below the "
               "other's; the last column, the value fewstep uses by default: the authors' unless the other was lower "
               "beyond the intervals on both the digits and the MNIST teacher.")


def targets_reading(summary: dict) -> list[str]:
    """The SFD family against the paper's own ratios (CIFAR-10, FID): SFD-v within 10 % of SFD at each NFE it
    shares (the paper's SFD-v is better), the 1-NFE stage at most 1.3x SFD at NFE 2, SFD at NFE 2 at most
    2.3x the teacher."""
    key = summary["quality_key"]
    K = key.upper()
    q = {k: r["quality"][key]["mean"] for k, r in _own_rows(summary).items()}
    teacher = reference_levels(summary["rows"], key)[0]
    lines = []
    shared = sorted(n for (m, n) in q if m == "sfd-v" and ("sfd", n) in q)
    if shared:
        ratios = [(n, q[("sfd-v", n)] / q[("sfd", n)]) for n in shared]
        lines.append(f"- SFD-v / SFD ({K}; target ≤ 1.10 at every NFE, the paper's 0.94–0.97): " +
                     ", ".join(f"NFE {n} {v:.2f}" for n, v in ratios) +
                     f" ({'met' if all(v <= 1.10 for _, v in ratios) else 'not met'}).")
    if ("sfd-stage2", 1) in q and ("sfd", 2) in q:
        v = q[("sfd-stage2", 1)] / q[("sfd", 2)]
        lines.append(f"- 1-NFE stage / SFD at NFE 2 ({K}; target ≤ 1.3, the paper's 1.29): {v:.2f} "
                     f"({'met' if v <= 1.3 else 'not met'}).")
    if teacher is not None and ("sfd", 2) in q:
        v = q[("sfd", 2)] / teacher["quality"][key]["mean"]
        lines.append(f"- SFD at NFE 2 / teacher ({K}; target ≤ 2.3, the paper's 2.3): {v:.2f} "
                     f"({'met' if v <= 2.3 else 'not met'}).")
    # fewstep's defaults differ from the authors' recipe in the clip alone: those runs are the clip settings' rows
    clipped = {(r["method"], r["nfe"]): r["quality"][key]["mean"] for r in summary["rows"]
               if r.get("recipe") in ("grad-clip", "grad-clip-sfdv")}
    shared = sorted(n for (m, n) in clipped if m == "sfd-v" and ("sfd", n) in clipped)
    for n in shared:
        sfd = clipped[("sfd", n)]
        said = f"SFD-v / SFD at NFE {n} {clipped[('sfd-v', n)] / sfd:.2f}"
        if teacher is not None:
            said += f", SFD at NFE {n} / teacher {sfd / teacher['quality'][key]['mean']:.2f}"
        lines.append(f"- With fewstep's defaults (SFD and SFD-v clipped at norm 1: the clip settings' other rows), "
                     f"{K}: {said}.")
    return lines


def reading(summary: dict) -> list[str]:
    key, K = summary["quality_key"], summary["quality_key"].upper()
    rows = [r for r in summary["rows"] if not r.get("recipe")]
    teacher, floor = reference_levels(rows, key)
    lines = targets_reading(summary)
    own = _own_rows(summary)
    if teacher is not None:
        rq = teacher["quality"][key]["mean"]
        for nfe, factor in ((2, 2.0), (4, 1.5)):
            r = own.get(("sfd", nfe))
            if r:
                q = r["quality"][key]["mean"]
                cost = r.get("distill_vs_teacher_training")
                lines.append(f"- SFD at NFE {nfe}: {K} {versus(q, rq, floor)} (target ≤ {factor:g}×: "
                             f"{'met' if q <= factor * rq else 'not met'}); distillation cost "
                             f"{100 * (cost or float('nan')):.1f} % of teacher training "
                             f"(target ≤ 2 %: {'met' if cost is not None and cost <= 0.02 else 'not met'}).")
    seen = set()
    for r in rows:  # one line per model: SFD-v's rows share theirs
        cache = r.get("trajectory_cache")
        if r["method"] in LABELS and cache and cache.get("hits") and r["model"] not in seen:
            seen.add(r["model"])
            total = cache["hits"] + cache["misses"]
            name = f"SFD at NFE {r['nfe']}" if r["method"] == "sfd" else r["label"]  # one SFD model per NFE
            lines.append(f"- {name}: {cache['hits']} of its {total} iterations read their teacher "
                         "trajectories from the bench's trajectory cache (computed by the SFD rows with the same "
                         "noise; exact), so its distill time has no teacher part for those.")
    separation = separation_reading(rows, key)
    return lines + ([separation] if separation else [])


def separation_reading(rows: list, key: str) -> str | None:
    """Whether the rows that matter most are told apart: the teacher, SFD at NFE 2 and DPM-Solver++(3M) at NFE 5."""
    teacher = next((r for r in rows if r["method"] == "teacher"), None)
    sfd2 = next((r for r in rows if r["method"] == "sfd" and r["nfe"] == 2), None)
    solver = next((r for r in rows if r["method"] == "dpmpp3m" and r["nfe"] == 5), None)
    found = [teacher, sfd2, solver]
    if any(f is None for f in found):
        return None
    pairs, ok = [], True
    for i in range(len(found)):
        for j in range(i + 1, len(found)):
            a, b = found[i]["quality"][key], found[j]["quality"][key]
            gap = abs(a["mean"] - b["mean"])
            ia, ib = interval(found[i]["quality"], key), interval(found[j]["quality"], key)
            if ia and ib:
                apart = lower_beyond(ia, ib) != 0
                how = "intervals apart" if apart else "intervals overlap"
            else:
                spread = max(a["std"], b["std"])
                apart = gap > spread
                how = f"{'>' if apart else '≤'} the larger spread {spread:.2g}"
            ok &= apart
            pairs.append(f"{found[i]['label']} vs {found[j]['label']} {gap:.3g} apart ({how})")
    return (f"- Separation ({key.upper()}, teacher / SFD NFE 2 / DPM-Solver++(3M) NFE 5): " + "; ".join(pairs) +
            f". {'All three told apart.' if ok else 'Not all told apart.'}")


def report_section(summary: dict, figdir: Path, prefix: str = "") -> tuple[str, list[str]] | None:
    """("SFD recipe", its lines): the recipe table and figure, the family beside the teacher, the ratios."""
    table = recipe_table(summary)
    if not table:
        return None
    figure = f"{prefix}sfd-recipe.png"
    plot_recipe(summary, figdir / figure)
    return "SFD recipe", [RECIPE_INTRO, "", RECIPE_NOTE, "", table, "",
                          f"![SFD recipe](figures/{figure})", "", "The SFD family with the authors' recipe:", "",
                          family_table(summary), "", *targets_reading(summary)]


# ---- the command line ---------------------------------------------------------------------------------

def add_arguments(p, add_loop_options):
    D = config_defaults(SFDConfig)
    p.add_argument("--teacher", required=True, help="teacher checkpoint or built-in name (e.g. digits-teacher)")
    p.add_argument("--nfe", type=A.nfe_list, default=D["nfe"],
                   help=f"student NFE, or a list for SFD-v (default {','.join(map(str, D['nfe']))})")
    p.add_argument("--afs", action=argparse.BooleanOptionalAction, default=D["afs"],
                   help="analytical first step: saves one network call (default on)")
    p.add_argument("--m", type=A.integer(0, 64), default=D["m"],
                   help=f"teacher points inserted per student interval (default {D['m']})")
    p.add_argument("--teacher-solver", default=D["teacher_solver"], choices=TEACHER_SOLVERS,
                   help=f"the teacher's solver over the refined grid (default {D['teacher_solver']})")
    p.add_argument("--teacher-final-orders", default=D["teacher_final_orders"], choices=LOWER_ORDER_FINAL,
                   help="DPM-Solver++ teacher: orders 2 then 1 on the last two steps of every grid (always, the "
                        "authors'), only on grids under 15 steps (short, diffusers'), or never")
    p.add_argument("--grid", default=D["grid"], choices=GRID_KINDS,
                   help=f"the student's time grid (default {D['grid']})")
    p.add_argument("--rho", type=A.positive, default=D["rho"], help=f"the polynomial grid's rho (default {D['rho']:g})")
    p.add_argument("--sigma-min", type=A.positive, default=D["sigma_min"],
                   help="default: the teacher's (0.006 for EDM teachers and LDMs, 0.1 for Stable Diffusion)")
    p.add_argument("--sigma-max", type=A.positive, default=D["sigma_max"],
                   help="default: the teacher's (80 for EDM teachers)")
    p.add_argument("--trajectories", type=A.integer(1, 10**12), default=None,
                   help=f"teacher trajectories to train on (iterations = trajectories / batch; default "
                        f"{SFD_TRAJECTORIES}, {SFDV_TRAJECTORY_FACTOR}x that for SFD-v and "
                        f"{STAGE2_TRAJECTORY_FACTOR}x for --stage2, the authors' budgets)")
    p.add_argument("--loss-reduction", default=D["loss_reduction"], choices=LOSS_REDUCTIONS,
                   help="L1 summed over pixels (paper) or averaged")
    p.add_argument("--thresholding", action="store_true", default=D["thresholding"],
                   help="clip the teacher's x0 estimate to [-1, 1] (a fixed clip; the authors' dynamic "
                        "thresholding is in effect off, as their fp16 run skips it)")
    p.add_argument("--dropout", type=A.probability, default=D["dropout"],
                   help="student dropout (default: the teacher's)")
    p.add_argument("--step-condition", default=D["step_condition"], choices=STEP_CONDITIONS,
                   help="SFD-v's step condition: authors (N's embedding as a per-block affine beside each block's "
                        "time modulation, xavier init; default) or zero (one zero-initialised embedding added to "
                        "the time embedding, so the student starts as its teacher)")
    p.add_argument("--stage2", action="store_true", default=D["stage2"],
                   help="1-NFE second stage from a first-stage SFD/SFD-v model")
    p.add_argument("--stage2-condition", default=D["stage2_condition"], choices=STAGE2_CONDITIONS,
                   help="--stage2 from SFD-v: the step condition the 1-NFE student takes, its own N = 3 (own, the "
                        "authors') or the first-stage mode it distils (teacher)")
    p.add_argument("--perceptual", default=D["perceptual"], choices=["auto", *PERCEPTUAL_NETS, "none"],
                   help=f"perceptual term on the last step: {', '.join(PERCEPTUAL_NETS)}, none, or auto (default: the "
                        "authors' for --stage2 where no download is needed: LPIPS with --lpips-weights, else the "
                        "shipped classifier of built-in digits/MNIST, else none; none in the first stage)")
    p.add_argument("--perceptual-weight", type=A.non_negative, default=D["perceptual_weight"],
                   help="weight of the perceptual term (default: the authors', the distance added to every pixel's "
                        "L1: C*H*W with --loss-reduction sum, 1 with mean)")
    p.add_argument("--lpips-weights", default=D["lpips_weights"], metavar="FILE",
                   help="LPIPS (VGG16) weights converted once by scripts/convert_lpips.py; never downloaded")
    p.add_argument("--lpips-resolution", type=A.integer(16, 4096), default=D["lpips_resolution"],
                   help=f"LPIPS resizes images (bilinear) to this size (default {D['lpips_resolution']}, the authors')")
    p.add_argument("--teacher-precision", default=D["teacher_precision"], choices=TEACHER_PRECISIONS,
                   help="bf16: the teacher under bf16 autocast (faster on CPUs with bf16 support), kept only if "
                        "its trajectories on the first batch stay within --teacher-precision-tol of fp32's")
    p.add_argument("--teacher-precision-tol", type=A.real(0, 1, lo_open=True, hi_open=True),
                   default=D["teacher_precision_tol"],
                   help="largest relative RMS deviation from the fp32 trajectory that bf16 may show "
                        f"(default {D['teacher_precision_tol']:g})")
    p.add_argument("--trajectory-cache", type=A.folder, default=None, metavar="DIR",
                   help="store the teacher's trajectories in DIR and reuse those computed before for the same "
                        "teacher, grid and noise (exact): SFD-v after SFD runs at its NFEs with the same seed "
                        "and batch, a rerun with another --lr, a resume (default: no cache)")
    A.add_prompt_args(p, what="a prompt to distil on", many=" to draw each trajectory's prompt from (default: "
                      "fewstep's shipped list)")
    add_loop_options(SFD_LOOP, notes={
        "iters": "default: --trajectories / --batch",
        "lr": f"default: the authors', {SFD_LR:g}, or {STAGE2_LR:g} with --stage2",
        "grad_clip": f"default {SFD_GRAD_CLIP:g}, or none with --stage2 (the authors': none)"})


def run(args):
    config = SFDConfig(**take_config_options(SFDConfig, dict(vars(args))))
    student = distill_sfd(args.teacher, args.out, config, trajectories=args.trajectories,
                          trajectory_cache=args.trajectory_cache, prompts=A.read_prompts(args.prompt, args.prompts),
                          negative_prompt=args.negative_prompt, guidance=args.guidance, resume=args.resume,
                          run_info=run_record(args), **loop_options_from_args(args))
    name = student.card["method"]["name"]
    print(f"{name} student saved to {args.out} "
          f"(sample it with: fewstep sample {args.out}{' --nfe N' if 'grids' in student.sampler else ''})")


METHOD = Method(add_arguments=add_arguments, run=run, bench_methods=tuple(LABELS), bench_rows=bench_rows,
                bench_extras=bench_extras, reading=reading, report_section=report_section, parser_options=dict(
    description="Distil a teacher into a few-step Euler sampler without training data. One NFE gives SFD; a list "
                "(e.g. 2,3,4,5) gives SFD-v, one model for all. Every default is the SFD authors' recipe but one: SFD "
                "and SFD-v clip gradients at norm 1 (--grad-clip 0 for the authors' none)."))
