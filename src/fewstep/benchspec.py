"""What a bench runs: its spec (teacher, data, methods, NFEs, budgets, sample counts) and the presets.

Rows of the bench's own (the data floor, the teacher reference, the training-free solvers) and the rows each
registered method adds (its `bench_methods`) are what `methods` may name. Budgets keep SFD's authors' ratios
(SFD-v 4x one SFD run, the 1-NFE stage 10x) at a scale a CPU can hold; SFDDM and progressive distillation train
at their CLI defaults (sfddm_iters / pd_iters_per_fold None).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from fewstep.distill.sfd import (SFD_LR, SFD_RECIPE, SFDV_TRAJECTORY_FACTOR, STAGE2_LR,
                                 STAGE2_TRAJECTORY_FACTOR)
from fewstep.errors import FewstepError
from fewstep.registry import methods as registered_methods

SOLVER_ROWS = ("ddim", "dpmpp2m", "dpmpp3m", "heun", "ipndm")
# the bench's own rows: real samples disjoint from the reference scored like a method's (what a perfect sampler
# scores), the teacher at its own setting, and the training-free solvers
OWN_ROWS = ("data", "teacher") + SOLVER_ROWS


def bench_methods() -> tuple:
    """Every name `methods` may hold: the bench's own rows, then each registered method's."""
    return OWN_ROWS + tuple(name for m in registered_methods() for name in m.bench_methods)


@dataclass
class BenchSpec:
    teacher: str
    data: str
    resolution: int | None = None
    methods: list = field(default_factory=lambda: list(bench_methods()))
    nfe: list = field(default_factory=lambda: [2, 4, 8])
    sfd_nfe: list | None = None                       # NFEs to distil SFD at (default: every NFE up to 10)
    sfdv_nfe: list = field(default_factory=lambda: [2, 3, 4, 5])
    sfddm_steps: list = field(default_factory=lambda: [10])
    sfddm_variants: list = field(default_factory=lambda: ["trailing/random"])  # index/init pairs
    sfddm_variants_at: list | None = None             # T' values that get every variant (default all; others: the first)
    ref_nfe: int = 256
    ref_sampler: str = "dpmpp2m"
    reference: str = "train"                          # split every row is compared with (as FID is measured)
    n_samples: int = 1000
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    sfd_trajectories: int = 25_600                    # one SFD run's budget; the others are multiples (the authors')
    sfd_batch: int = 128
    sfd_lr: float = SFD_LR
    sfdv_trajectory_factor: float = SFDV_TRAJECTORY_FACTOR        # SFD-v sees this many times SFD's trajectories
    sfd_stage2_trajectory_factor: float = STAGE2_TRAJECTORY_FACTOR  # ... and the 1-NFE stage this many
    sfd_stage2_lr: float = STAGE2_LR
    # SFD_RECIPE settings measured against the authors' value; with any, every SFD row runs the authors' whole
    # recipe (no gradient clipping), without, fewstep's defaults
    sfd_recipe: list = field(default_factory=list)
    sfddm_iters: int | None = None                    # None: the CLI's default (a fifth of the teacher's samples)
    sfddm_batch: int = 64
    sfddm_lr: float = 2e-4
    pd_start_steps: int = 256
    pd_iters_per_fold: int | None = None              # None: the CLI's default
    pd_batch: int = 64
    pd_lr: float = 1e-4
    seed: int = 0
    fd_intervals: int = 0                             # >0: random halves drawn for 95 % intervals of Fréchet distances
    curve_points: int = 8                             # snapshots along each distillation for quality vs time (0: none)
    sfddm_long_fraction: float = 0.0                  # >0: one more SFDDM run (first T', first variant) of this
                                                      # fraction of the teacher's training iterations
    sfddm_long_curve_points: int = 12                 # ... scored at this many points along it


PRESETS = {
    "toy": dict(teacher="gmm8-teacher", data="gmm8", nfe=[1, 2, 4, 8], sfdv_nfe=[2, 3, 4, 5], sfddm_steps=[4, 8, 16],
                sfddm_variants=["trailing/random", "trailing/teacher"], n_samples=4000, ref_nfe=256,
                sfd_trajectories=64_000, sfd_batch=256, sfd_lr=2e-4, sfddm_batch=256, sfddm_lr=1e-3,
                pd_start_steps=128, pd_batch=256, pd_lr=3e-4),
    # SFD at 320 iterations of 128 trajectories (a fifth of the authors' 1,563), every SFD recipe setting measured
    # both ways; 10,000 samples of one seed, Fréchet distances with 95 % intervals, paired distances to the
    # teacher's samples; every SFDDM variant at T' = 10, the default one at 32 (a T' of 128 costs over an hour of
    # 10,000-sample rows, curves and ceilings on 2 CPU cores: `--sfddm-steps 10,32,128` adds it)
    "digits": dict(teacher="digits-teacher", data="digits", nfe=[2, 3, 4, 5, 10], sfd_nfe=[2, 3, 4, 5],
                   sfdv_nfe=[2, 3, 4, 5], sfddm_steps=[10, 32],
                   sfddm_variants=["trailing/random", "trailing/teacher", "leading/random", "leading/teacher"],
                   sfddm_variants_at=[10], n_samples=10_000, seeds=[0], fd_intervals=200, ref_nfe=256,
                   sfd_trajectories=40_960, sfd_recipe=list(SFD_RECIPE), pd_start_steps=256),
    # the digits preset's SFD family with fewstep's defaults (SFD and SFD-v clipped at norm 1) instead of the
    # authors' whole recipe, which the digits preset measures every setting from
    "digits-defaults": dict(teacher="digits-teacher", data="digits", methods=["teacher", "sfd", "sfd-v", "sfd-stage2"],
                            nfe=[2, 3, 4, 5], sfd_nfe=[2, 3, 4, 5], sfdv_nfe=[2, 3, 4, 5], n_samples=10_000, seeds=[0],
                            fd_intervals=200, ref_nfe=256, sfd_trajectories=40_960, curve_points=0),
    # the shipped MNIST 16x16 teacher: SFD at 64 iterations of 128 (a 24th of the authors', about 5 s an iteration
    # here), every recipe setting both ways, one T' for SFDDM plus its long run
    "mnist": dict(teacher="mnist16-teacher", data="mnist", resolution=16,
                  methods=["data", "teacher", "ddim", "dpmpp3m", "ipndm", "sfd", "sfd-v", "sfd-stage2", "sfddm",
                           "progressive"],
                  nfe=[2, 3, 4, 5, 10], sfd_nfe=[2, 3, 4, 5], sfdv_nfe=[2, 3, 4, 5], sfddm_steps=[10],
                  sfddm_variants=["trailing/random"], n_samples=10_000, seeds=[0], fd_intervals=200, ref_nfe=100,
                  sfd_trajectories=8_192, sfd_recipe=list(SFD_RECIPE), pd_start_steps=256, curve_points=6,
                  sfddm_long_fraction=0.25),
    # SFD at batch 64: the same 150 iterations as batch 128 on half the trajectories, in 58 % of the time with the
    # same quality (FCD 47.6 ± 4 in 85 s against 46.9 ± 7 in 147 s, 2 CPU cores, gradients clipped at norm 1 as
    # fewstep's default; unclipped, as its authors train it, the demo's SFD NFE 2 row read 70 ± 7)
    "demo": dict(teacher="digits-teacher", data="digits", methods=["data", "teacher", "ddim", "dpmpp3m", "sfd", "sfddm"],
                 nfe=[2, 10], sfd_nfe=[2], sfddm_steps=[10], sfddm_variants=["trailing/random"], n_samples=500, ref_nfe=256,
                 seeds=[0, 1, 2], sfd_trajectories=9_600, sfd_batch=64, sfd_lr=1e-4),
}


def preset(name: str, **overrides) -> BenchSpec:
    if name not in PRESETS:
        raise FewstepError(f"--preset {name!r}: expected one of {', '.join(PRESETS)}")
    return BenchSpec(**{**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}})
