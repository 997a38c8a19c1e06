"""The side-by-side benchmark: every method on one teacher, in one process, with fixed seeds.

Rows are (method, NFE). Each distillation runs once and is cached in OUT/models/<key>; each row's
numbers are cached in OUT/rows/<key>.json, so re-running skips finished work. Quality is the mean
over three sample seeds with its spread. Timing per row: sampling time per 1,000 samples, the pure
network time of the same number of forward passes (so sampler overhead is visible), and the
distillation's wall time next to the teacher's own training time. Each distillation row also carries
its profile (per iteration: teacher calls, student forward + backward, optimizer, the rest, and the
floor, the same network calls timed alone; see `fewstep.train.Profiler`) and its quality along the run
(snapshots scored with the first sample seed) against the wall time spent so far.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import fewstep
from fewstep.checkpoint import atomic_write, load_checkpoint, read_card, teacher_reference, write_json
from fewstep.distill.sfd import (SFD, SFD_GRAD_CLIP, SFD_LR, SFDV_TRAJECTORY_FACTOR, STAGE2_LR,
                                 STAGE2_TRAJECTORY_FACTOR, SFDConfig, iterations_for)
from fewstep.errors import FewstepError
from fewstep.metrics import evaluate_samples, mean_interval, paired_values
from fewstep.models import load_model
from fewstep.sampling import sample, sample_shape
from fewstep.train import TrainConfig, Trainer

# the data floor: subset sizes (fractions of the disjoint split) and draws per size of its 1/k fit; bump
# FLOOR_VERSION when its method changes, so cached floor rows are measured again
# (12 draws at 5 sizes: on the 180 held-out digits the seed-to-seed spread of the fit fell from 11.6 to 5.6 FCD)
FLOOR_FRACTIONS = (1 / 4, 1 / 3, 1 / 2, 2 / 3, 5 / 6)
FLOOR_DRAWS = 12
FLOOR_VERSION = 3
SOLVER_ROWS = ("ddim", "dpmpp2m", "dpmpp3m", "heun", "ipndm")
# Each training-free solver on its own authors' grid on a discrete (table) teacher: DDIM uniform in the table
# index, DPM-Solver++ uniform in logSNR (the DPM-Solver authors' choice for small images), Heun and iPNDM on
# EDM's rho = 7 grid (as in EDM and the SFD authors' code); a continuous teacher: EDM's grid for all. Like the
# field's tables they take NFE steps from sigma_max to sigma_min, without a final denoise.
SOLVER_GRIDS = {"ddim": "uniform", "dpmpp2m": "logsnr", "dpmpp3m": "logsnr", "heun": "polynomial",
                "ipndm": "polynomial"}
# bump when a row's measured fields change, so rows cached before are measured again
ROW_FORMAT = 2
# along-the-run snapshots are scored on at most this many samples (the first seed's first ones), in the
# quality metric only: a curve point costs a fraction of a row
CURVE_SAMPLES = 2000
DISTILL_ROWS = ("sfd", "sfd-v", "sfd-stage2", "sfddm", "progressive")
# "data": real samples disjoint from the reference scored like a method's, what a perfect sampler scores
ALL_METHODS = ("data", "teacher") + SOLVER_ROWS + DISTILL_ROWS


@dataclass(frozen=True)
class RecipeSetting:
    """One setting of SFD's recipe measured both ways: the run with the authors' value is the bench's own
    row (every default is the authors'), and an ablation row trains the same run again with the other value."""
    name: str
    label: str
    method: str               # the rows it changes: "sfd", "sfd-v" or "sfd-stage2"
    authors: str              # the authors' value, in words
    other: str                # the value it is measured against
    config: tuple = ()        # SFDConfig fields of the other value, as (name, value) pairs
    grad_clip: float | None = None   # the other value's gradient clip, where that is the setting
    lr: float | None = None          # ... learning rate
    factor: float | None = None      # ... budget, in trajectories of one SFD run
    nfe: int | None = None           # SFD rows: the NFE it is measured at (the smallest where it matters)


SFD_RECIPE = {r.name: r for r in (
    RecipeSetting("grad-clip", "gradient clipping (SFD)", "sfd", "none", "norm 1", grad_clip=1.0, nfe=2),
    RecipeSetting("grad-clip-sfdv", "gradient clipping (SFD-v)", "sfd-v", "none", "norm 1", grad_clip=1.0),
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


@dataclass
class BenchSpec:
    teacher: str
    data: str
    resolution: int | None = None
    methods: list = field(default_factory=lambda: list(ALL_METHODS))
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
    sfd_grad_clip: float | None = SFD_GRAD_CLIP
    sfdv_trajectory_factor: float = SFDV_TRAJECTORY_FACTOR        # SFD-v sees this many times SFD's trajectories
    sfd_stage2_trajectory_factor: float = STAGE2_TRAJECTORY_FACTOR  # ... and the 1-NFE stage this many
    sfd_stage2_lr: float = STAGE2_LR
    sfd_recipe: list = field(default_factory=list)    # SFD_RECIPE settings measured against the authors' value
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


# SFD's budgets follow the authors' ratios (SFD-v 4x one SFD run, the 1-NFE stage 10x) at a scale a CPU can
# hold; SFDDM and progressive distillation train at their CLI defaults (sfddm_iters / pd_iters_per_fold None)
PRESETS = {
    "toy": dict(teacher="gmm8-teacher", data="gmm8", nfe=[1, 2, 4, 8], sfdv_nfe=[2, 3, 4, 5], sfddm_steps=[4, 8, 16],
                sfddm_variants=["trailing/random", "trailing/teacher"], n_samples=4000, ref_nfe=256,
                sfd_trajectories=64_000, sfd_batch=256, sfd_lr=2e-4, sfddm_batch=256, sfddm_lr=1e-3,
                pd_start_steps=128, pd_batch=256, pd_lr=3e-4),
    # SFD at 320 iterations of 128 trajectories (a fifth of the authors' 1,563), every SFD recipe setting measured
    # both ways; 10,000 samples of one seed, Fréchet distances with 95 % intervals, paired distances to the
    # teacher's samples; every SFDDM variant at T' = 10, the default one at 32 and 128
    "digits": dict(teacher="digits-teacher", data="digits", nfe=[2, 3, 4, 5, 10], sfd_nfe=[2, 3, 4, 5],
                   sfdv_nfe=[2, 3, 4, 5], sfddm_steps=[10, 32, 128],
                   sfddm_variants=["trailing/random", "trailing/teacher", "leading/random", "leading/teacher"],
                   sfddm_variants_at=[10], n_samples=10_000, seeds=[0], fd_intervals=200, ref_nfe=256,
                   sfd_trajectories=40_960, sfd_recipe=list(SFD_RECIPE), pd_start_steps=256),
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
    # same quality (FCD 47.6 ± 4 in 85 s against 46.9 ± 7 in 147 s, 2 CPU cores)
    "demo": dict(teacher="digits-teacher", data="digits", methods=["data", "teacher", "ddim", "dpmpp3m", "sfd", "sfddm"],
                 nfe=[2, 10], sfd_nfe=[2], sfddm_steps=[10], sfddm_variants=["trailing/random"], n_samples=500, ref_nfe=256,
                 seeds=[0, 1, 2], sfd_trajectories=9_600, sfd_batch=64, sfd_lr=1e-4),
}


def sfd_nfe_for(nfe: list) -> list:
    """The NFEs SFD distils at when none are named: the bench's NFEs up to 10 (a few-step method)."""
    return [n for n in nfe if n <= 10]


def preset(name: str, **overrides) -> BenchSpec:
    if name not in PRESETS:
        raise FewstepError(f"--preset {name!r}: expected one of {', '.join(PRESETS)}")
    return BenchSpec(**{**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}})


# ---- timing helpers ---------------------------------------------------------------------------------

def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux: the process's peak RSS


@torch.no_grad()
def forward_seconds(den, n: int, nfe: int, batch_size: int, shape: tuple, sigma: float, step=None) -> float:
    """Pure network time of nfe × n forward passes (same batch sizes as sampling), no solver around it.
    At most 16 rounds are timed and scaled to nfe, so a 256-NFE reference does not cost a second run.
    `sigma` must be a noise level the model accepts (an exact-table model refuses others)."""
    dev = next(den.parameters()).device
    x = torch.randn((min(n, batch_size), *shape), device=dev)
    sigma = torch.full((len(x),), sigma, device=dev, dtype=torch.float64)
    model = den.with_step(step)
    model(x, sigma)  # warm-up
    t0 = time.perf_counter()
    full, rest = divmod(n, batch_size)
    rounds = min(nfe, 16)
    for _ in range(rounds):
        for _ in range(full):
            model(x, sigma)
        if rest:
            model(x[:rest], sigma[:rest])
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * nfe / rounds


def _save_array(path: Path, array: np.ndarray) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, array)
    atomic_write(path, write)


def _mean_and_spread(per_seed: list[dict]) -> dict:
    """{metric: {mean, std over seeds}} from one metrics dict per sample seed (sizes left out)."""
    quality = {}
    for k, v in per_seed[0].items():
        if k in ("n", "n_ref") or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        vals = np.array([r[k] for r in per_seed], dtype=np.float64)
        quality[k] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0}
    return quality


# ---- the benchmark ----------------------------------------------------------------------------------

class Bench:
    def __init__(self, spec: BenchSpec, out: str | Path, device: str = "cpu", progress: bool = True):
        self.spec, self.out, self.progress = spec, Path(out), progress
        self.device = torch.device(device)
        unknown = set(spec.methods) - set(ALL_METHODS)
        if unknown:
            raise FewstepError(f"--methods: unknown {sorted(unknown)}; expected some of {', '.join(ALL_METHODS)}")
        self.teacher = load_model(spec.teacher, device=self.device)
        self.teacher_card = self.teacher.card
        self.teacher_train_s = float((self.teacher_card.get("training") or {}).get("wall_time_s") or 0) or None
        self.shape = sample_shape(self.teacher_card)
        self.is_toy = len(self.shape) == 1
        from fewstep.featnet import available_classifiers
        res = spec.resolution or (None if self.is_toy else self.shape[-1])
        # the Fréchet classifier distance where a shipped classifier applies, else pixel-space SWD
        self.quality_key = ("swd" if self.is_toy else "fcd" if (spec.data, res) in available_classifiers()
                            else "swd_pixel")
        self.split_seed = int((self.teacher_card.get("data") or {}).get("split_seed", 0))
        for sub in ("models", "rows", "figures"):
            (self.out / sub).mkdir(parents=True, exist_ok=True)
        self.noise = {s: torch.randn((spec.n_samples, *self.shape), generator=torch.Generator().manual_seed(1000 + s))
                      for s in spec.seeds}

    # ---- plan ------------------------------------------------------------------------------------
    def plan(self) -> list[dict]:
        s, rows = self.spec, []
        if "data" in s.methods:
            rows.append({"key": "data-floor", "method": "data", "nfe": 0, "model": None})
        if "teacher" in s.methods:
            rows.append({"key": f"teacher-{s.ref_sampler}-{s.ref_nfe}", "method": "teacher", "nfe": s.ref_nfe,
                         "sampler": s.ref_sampler, "model": None})
        for name in SOLVER_ROWS:
            if name in s.methods:
                grid = self.solver_grid(name)
                # Heun: 2 evaluations a step, so even NFEs only (an odd one rounds up)
                for n in sorted({n + n % 2 for n in s.nfe}) if name == "heun" else s.nfe:
                    rows.append({"key": f"{name}-{n}", "method": name, "nfe": n, "sampler": name, "grid": grid,
                                 "final_zero": False, "model": None})
        if "sfd" in s.methods:
            sfd_nfe = s.sfd_nfe if s.sfd_nfe is not None else sfd_nfe_for(s.nfe)
            rows += [{"key": f"sfd-{n}", "method": "sfd", "nfe": n, "model": f"sfd-{n}"} for n in sfd_nfe]
        if "sfd-v" in s.methods:
            tag = self.sfdv_model()
            rows += [{"key": f"{tag}-{n}", "method": "sfd-v", "nfe": n, "model": tag} for n in s.sfdv_nfe]
        if "sfd-stage2" in s.methods:
            rows.append({"key": "sfd-stage2-1", "method": "sfd-stage2", "nfe": 1, "model": "sfd-stage2"})
        rows += self.recipe_rows()
        for T in s.sfddm_steps:
            if "sfddm" in s.methods:
                every = s.sfddm_variants_at is None or T in s.sfddm_variants_at
                for variant in s.sfddm_variants if every else s.sfddm_variants[:1]:
                    index, init = variant.split("/")
                    rows.append({"key": f"sfddm-{T}-{index}-{init}", "method": "sfddm", "nfe": T,
                                 "variant": variant, "model": f"sfddm-{T}-{index}-{init}"})
            if ("ddim" in s.methods and "sfddm" in s.methods and self.teacher.denoiser.schedule.is_discrete
                    and T not in s.nfe):
                rows.append({"key": f"ddim-trailing-{T}", "method": "ddim", "nfe": T, "sampler": "ddim",
                             "model": None, "trailing": True})
            if "sfddm" in s.methods:
                rows += self.ceiling_rows(T, [v.split("/")[0] for v in s.sfddm_variants if every or v == s.sfddm_variants[0]])
        if "sfddm" in s.methods and s.sfddm_long_fraction:
            # does longer training close the gap to the teacher's own chain on phi? (that row is the ceiling)
            T, (index, init) = s.sfddm_steps[0], s.sfddm_variants[0].split("/")
            key = f"sfddm-{T}-{index}-{init}-long"
            rows.append({"key": key, "method": "sfddm", "nfe": T, "variant": s.sfddm_variants[0], "model": key,
                         "long": True})
        if "progressive" in s.methods:
            # one chain of folds serves every row: the T-step row samples the chain's fold-T student
            for T in self.progressive_targets():
                rows.append({"key": f"progressive-{T}", "method": "progressive", "nfe": T,
                             "model": f"{self.progressive_chain()}/fold-{T}"})
                rows += [r for r in self.ceiling_rows(T, ["trailing"]) if r["key"] not in {x["key"] for x in rows}]
        return rows

    def solver_grid(self, name: str) -> str:
        return SOLVER_GRIDS[name] if self.teacher.denoiser.schedule.is_discrete else "polynomial"

    def recipe_rows(self) -> list[dict]:
        """For each SFD recipe setting the spec names, the run with the other value: its model is the row's
        model (key) with `~setting` added. They come after the rows with the authors' values, so they read
        those runs' teacher trajectories from the cache (and the 1-NFE ablations start from that SFD-v)."""
        rows = []
        for name in self.spec.sfd_recipe:
            if name not in SFD_RECIPE:
                raise FewstepError(f"sfd_recipe: unknown setting {name!r}; expected some of {', '.join(SFD_RECIPE)}")
            setting = SFD_RECIPE[name]
            if setting.method not in self.spec.methods:
                continue
            if setting.method == "sfd":
                rows.append({"key": f"sfd-{setting.nfe}~{name}", "method": "sfd", "nfe": setting.nfe,
                             "model": f"sfd-{setting.nfe}~{name}", "recipe": name})
            elif setting.method == "sfd-v":
                tag = f"{self.sfdv_model()}~{name}"
                rows += [{"key": f"{tag}-{n}", "method": "sfd-v", "nfe": n, "model": tag, "recipe": name}
                         for n in self.spec.sfdv_nfe]
            else:
                rows.append({"key": f"sfd-stage2~{name}-1", "method": "sfd-stage2", "nfe": 1,
                             "model": f"sfd-stage2~{name}", "recipe": name})
        return rows

    def ceiling_rows(self, T: int, indices: list) -> list[dict]:
        """The teacher on its own T'-step chain at φ (DDPM ancestral and DDIM), the best an SFDDM student
        can score; progressive distillation's grids are the trailing φ. Discrete teachers only."""
        if not self.teacher.denoiser.schedule.is_discrete:
            return []
        return [{"key": f"teacher-on-phi-{T}-{index}-{name}", "method": "teacher-on-phi", "nfe": T, "sampler": name,
                 "index": index, "model": None} for index in dict.fromkeys(indices) for name in ("ddpm", "ddim")]

    # ---- distillation (cached) ---------------------------------------------------------------------
    def progressive_targets(self) -> list[int]:
        """Progressive distillation's step counts: each SFDDM T' rounded to the nearest power of two."""
        return sorted({2 ** round(math.log2(t)) for t in self.spec.sfddm_steps})

    def sfdv_model(self) -> str:
        """The SFD-v model's folder name; the 1-NFE second stage starts from it."""
        return "sfdv-" + "_".join(map(str, self.spec.sfdv_nfe))

    def progressive_chain(self) -> str:
        return f"progressive-from-{self.spec.pd_start_steps}"

    def model_dir(self, name: str) -> Path:
        return self.out / "models" / name

    @property
    def trajectory_cache(self) -> Path:
        """SFD's teacher trajectories, shared by the SFD rows and SFD-v (same seed and batch: exact reuse)."""
        return self.out / "trajectory-cache"

    def budget(self, row: dict) -> dict:
        """Training budget of one row's distillation (per fold for progressive distillation)."""
        s, method = self.spec, row["method"]
        if row.get("long"):
            return {"iterations": self.long_iterations(), "batch": s.sfddm_batch, "lr": s.sfddm_lr}
        if method in ("sfd", "sfd-v", "sfd-stage2"):
            setting = SFD_RECIPE.get(row.get("recipe"))
            factor = {"sfd": 1, "sfd-v": s.sfdv_trajectory_factor, "sfd-stage2": s.sfd_stage2_trajectory_factor}[method]
            lr = s.sfd_stage2_lr if method == "sfd-stage2" else s.sfd_lr
            if setting is not None:
                factor = setting.factor if setting.factor is not None else factor
                lr = setting.lr if setting.lr is not None else lr
            return {"iterations": iterations_for(round(s.sfd_trajectories * factor), s.sfd_batch), "batch": s.sfd_batch,
                    "lr": lr}
        if method == "sfddm":
            from fewstep.distill.sfddm import default_iterations
            iters = s.sfddm_iters if s.sfddm_iters is not None else default_iterations(self.teacher_card, s.sfddm_batch)[0]
            return {"iterations": iters, "batch": s.sfddm_batch, "lr": s.sfddm_lr}
        if method == "progressive":
            from fewstep.distill.progressive import ITERS_PER_FOLD
            iters = s.pd_iters_per_fold if s.pd_iters_per_fold is not None else ITERS_PER_FOLD
            return {"iterations": iters, "batch": s.pd_batch, "lr": s.pd_lr}
        raise AssertionError(method)

    def sfd_grad_clip(self, row: dict) -> float | None:
        setting = SFD_RECIPE.get(row.get("recipe"))
        return setting.grad_clip if setting is not None and setting.grad_clip is not None else self.spec.sfd_grad_clip

    def sfd_config(self, row: dict, **fields) -> SFDConfig:
        """An SFD row's config: the authors' recipe (the defaults), with its setting's other value if it has one."""
        setting = SFD_RECIPE.get(row.get("recipe"))
        return SFDConfig(**fields, **dict(setting.config if setting else ()))

    def long_iterations(self) -> int:
        """The long SFDDM run's length: its fraction of the iterations the teacher's card says it trained."""
        done = (self.teacher_card.get("training") or {}).get("iterations")
        if not done:
            raise FewstepError(f"sfddm_long_fraction: the teacher {self.spec.teacher} has no training iterations "
                               "on its card to take a fraction of")
        return max(1, round(self.spec.sfddm_long_fraction * int(done)))

    def _finished(self, path: Path, budget: dict) -> bool:
        """A finished model made with this budget. One made with another budget is never reused or
        overwritten silently: that is an error naming both."""
        try:
            card = read_card(path)
        except FewstepError:
            return False
        training = card.get("training") or {}
        if not training.get("finished"):
            return False
        lr = json.loads((path / "config.json").read_text())["train"]["lr"] if (path / "config.json").is_file() else None
        made = {"iterations": training.get("iterations"), "batch": training.get("batch"), "lr": lr}
        if made != budget:
            raise FewstepError(f"{path} was distilled with {made}, but this bench asks for {budget}; "
                               "delete that folder to distil it again, or choose another --out")
        return True

    def _train(self, method, path: Path, budget: dict, lr_schedule="constant", data=None, grad_clip=None,
               curve_points=None):
        steps = budget["iterations"]
        points = self.spec.curve_points if curve_points is None else curve_points
        cfg = TrainConfig(steps=steps, batch=budget["batch"], lr=budget["lr"], lr_schedule=lr_schedule,
                          seed=self.spec.seed, device=str(self.device), progress=self.progress,
                          ckpt_every=max(100, steps // 5), log_every=max(10, steps // 50), grad_clip=grad_clip,
                          snapshot_every=max(1, steps // points) if points else 0)
        resume = (path / "train_state.pt").exists()
        Trainer(method, cfg, path, data=data, resume=resume,
                run_info={"command": f"fewstep bench ({method.name})"}).run()

    def _data(self):
        from fewstep.data import load_dataset
        return load_dataset(self.spec.data, self.spec.resolution, split="train", seed=self.split_seed)

    def ensure_model(self, row: dict) -> Path:
        s, name = self.spec, row["model"]
        path = self.model_dir(name)
        budget = self.budget(row)
        if self._finished(path, budget):
            return path
        tref = teacher_reference(self.teacher.path)
        if row["method"] in ("sfd", "sfd-v"):
            nfe = [row["nfe"]] if row["method"] == "sfd" else list(s.sfdv_nfe)
            method = SFD(self.teacher, self.sfd_config(row, nfe=nfe), teacher_ref=tref,
                         trajectory_cache=self.trajectory_cache)
            self._train(method, path, budget, "step", grad_clip=self.sfd_grad_clip(row))
        elif row["method"] == "sfd-stage2":
            first_row = {"method": "sfd-v", "nfe": max(s.sfdv_nfe), "model": self.sfdv_model()}
            first_path = self.ensure_model(first_row)
            first = load_checkpoint(first_path, device=self.device)
            method = SFD(first, self.sfd_config(row, stage2=True), teacher_ref=teacher_reference(first_path),
                         trajectory_cache=self.trajectory_cache)
            self._train(method, path, budget, "step", grad_clip=self.sfd_grad_clip(row))
        elif row["method"] == "sfddm":
            from fewstep.distill.sfddm import SFDDM, SFDDMConfig
            index, init = row["variant"].split("/")
            ds = self._data()
            info = {**ds.info, "name": ds.name, "kind": ds.kind, "shape": list(ds.shape)}
            method = SFDDM(self.teacher.denoiser, SFDDMConfig(steps=row["nfe"], index=index, init=init,
                                                              seed=s.seed), data_info=info, teacher_ref=tref)
            self._train(method, path, budget, data=ds.x,  # the authors clip no gradients
                        curve_points=s.sfddm_long_curve_points if row.get("long") else None)
        elif row["method"] == "progressive":
            from fewstep.distill.progressive import FOLD_LR_SCHEDULE, progressive_distill
            ds = self._data()
            info = {**ds.info, "name": ds.name, "kind": ds.kind, "shape": list(ds.shape)}
            chain = self.model_dir(self.progressive_chain())
            train = TrainConfig(steps=budget["iterations"], batch=budget["batch"], lr=budget["lr"],
                                lr_schedule=FOLD_LR_SCHEDULE, seed=s.seed, device=str(self.device),
                                progress=self.progress, n_preview=0, log_every=max(10, budget["iterations"] // 20))
            # finished folds are reused and an interrupted one continues
            progressive_distill(self.teacher, ds.x, s.pd_start_steps, min(self.progressive_targets()), chain,
                                train, data_info=info, resume=chain.exists(),
                                run_info={"command": "fewstep bench (progressive)"}, log=lambda msg: None)
        else:
            raise AssertionError(row)
        return path

    def distill_profile(self, row: dict, card: dict) -> dict | None:
        """Per-iteration split of the distillation's wall time and its network floor (the card's
        training.profile); progressive distillation: the folds down to the row's, iteration-weighted."""
        if row["method"] != "progressive":
            return (card.get("training") or {}).get("profile")
        chain = self.model_dir(self.progressive_chain())
        folds = [f for f in read_card(chain)["method"]["folds"] if f["student_steps"] >= row["nfe"]]
        profs = []
        for f in folds:
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

    def cost_curve(self, row: dict, ckpt, kw: dict) -> list[dict]:
        """Quality against distillation wall time along the run (the quality metric on the first seed's first
        CURVE_SAMPLES samples): the snapshots the training wrote (SFD, SFD-v at the row's NFE, stage 2, SFDDM)
        or, for progressive distillation, each fold's final student at its own step count, down to the row's."""
        seed = self.spec.seeds[0]
        n = min(self.spec.n_samples, CURVE_SAMPLES)
        noise = self.noise[seed][:n]
        points = []
        if row["method"] == "progressive":
            chain = self.model_dir(self.progressive_chain())
            wall = 0.0
            for f in read_card(chain)["method"]["folds"]:
                wall += float(f.get("wall_time_s") or 0)
                if f["student_steps"] < row["nfe"]:
                    break
                fold = load_checkpoint(chain / f.get("dir", f"fold-{f['student_steps']}"), device=self.device)
                x = sample(fold, n, seed=seed, noise=noise, progress=False)
                points.append({"wall_s": wall, "nfe": f["student_steps"], "n": n,
                               "quality": self._score_curve_point(x, seed)})
            return points
        from safetensors.torch import load_file
        path = self.model_dir(row["model"])
        log = path / "snapshots" / "snapshots.jsonl"
        if not log.is_file():
            return points
        offset = self.distill_seconds(row, ckpt.card) - float((ckpt.card.get("training") or {}).get("wall_time_s") or 0)
        snap = load_checkpoint(path, device=self.device)
        entries = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        for e in tqdm(entries, desc=f"  {row['key']}: quality along the run", unit="snapshot", leave=False,
                      disable=not self.progress):
            snap.denoiser.net.load_state_dict(load_file(path / "snapshots" / e["file"]))
            x = sample(snap, n, seed=seed, noise=noise, progress=False, **kw)
            points.append({"wall_s": offset + float(e["wall_s"]), "step": e["step"], "nfe": row["nfe"], "n": n,
                           "quality": self._score_curve_point(x, seed)})
        return points

    def distill_seconds(self, row: dict, card: dict) -> float:
        """Wall time that produced a row's model, counting the earlier stages it was built from."""
        own = float((card.get("training") or {}).get("wall_time_s") or 0)
        if row["method"] == "sfd-stage2":  # the first stage it starts from
            first_stage = read_card(self.model_dir(self.sfdv_model()))
            return own + float(first_stage["training"]["wall_time_s"])
        if row["method"] == "progressive":  # every fold down to this one
            folds = read_card(self.model_dir(self.progressive_chain()))["method"]["folds"]
            return float(sum(f["wall_time_s"] or 0 for f in folds if f["student_steps"] >= row["nfe"]))
        return own

    # ---- evaluation --------------------------------------------------------------------------------
    def _sampling_plan(self, row):
        """(checkpoint, sample kwargs, step condition) for a row."""
        if row.get("model"):
            ckpt = load_checkpoint(self.ensure_model(row), device=self.device)
            kw = {"nfe": row["nfe"]} if "grids" in ckpt.sampler else {}
            step = None
            if "grids" in ckpt.sampler:
                step = len(ckpt.sampler["grids"][str(row["nfe"])])
            elif ckpt.sampler.get("step"):
                step = ckpt.sampler["step"]
            return ckpt, kw, step
        if row["method"] == "teacher-on-phi":
            from fewstep.distill.sfddm import index_set, teacher_on_phi
            phi = index_set(self.teacher.denoiser, row["nfe"], row["index"])
            return teacher_on_phi(self.teacher, phi, row["sampler"], None if self.is_toy else 1.0), {}, None
        kw = {"nfe": row["nfe"], "sampler": row["sampler"]}
        if row.get("trailing"):  # DDIM on the teacher's own steps at the SFDDM index set
            kw["grid"] = "discrete"
        if row.get("grid"):
            kw.update(grid=row["grid"], final_zero=row["final_zero"])
        return self.teacher, kw, None

    def evaluate(self, row: dict) -> dict:
        """A row's numbers, measured or read from its cache. ``row_wall_s`` is what measuring it cost in
        the run that did (its distillation included, when it was the first row to need the model)."""
        t0 = time.perf_counter()
        cache = self.out / "rows" / f"{row['key']}.json"
        if row.get("model"):
            self.ensure_model(row)  # distils once; checks a finished model's budget
        made_from = self._made_from(row)
        if cache.is_file():
            try:
                cached = json.loads(cache.read_text())
            except (ValueError, RecursionError):
                cached = {}  # a damaged row file is measured again
            cached = cached if isinstance(cached, dict) else {}
            # rows measured with other sample counts, seeds, teacher or model weights are measured again
            if (cached.get("n_samples") == self.spec.n_samples and cached.get("seeds") == list(self.spec.seeds)
                    and cached.get("made_from") == made_from):
                if row.get("model") and "distill_profile" not in cached:  # rows cached before profiles
                    cached["distill_profile"] = self.distill_profile(row, read_card(self.model_dir(row["model"])))
                return cached
        if row["method"] == "data":
            return self._evaluate_data(row, cache, made_from, t0)
        ckpt, kw, step = self._sampling_plan(row)
        per_seed, seconds, preview, pairs = [], None, None, {}
        for seed in self.spec.seeds:
            with self._sampling_bar(row, ckpt, seed):
                x, info = sample(ckpt, self.spec.n_samples, seed=seed, noise=self.noise[seed], progress=False,
                                 return_info=True, **kw)
            if preview is None:
                preview, seconds = x, info["seconds"]
                nfe, sigma0 = info["nfe"], info["sigmas"][0]
            if row["method"] == "teacher":  # every other row is paired with these samples
                _save_array(self._teacher_samples_path(seed), x.numpy())
            elif "teacher" in self.spec.methods:
                for k, v in paired_values(x, self.teacher_samples(seed), self._paired_classifier()).items():
                    pairs.setdefault(k, []).append(v)
            per_seed.append(self._score(x, seed))
        fwd = forward_seconds(ckpt.denoiser, self.spec.n_samples, nfe, 500, self.shape, sigma0, step)
        quality = _mean_and_spread(per_seed)
        distill_s = self.distill_seconds(row, ckpt.card) if row.get("model") else None
        scale = 1000 / self.spec.n_samples
        result = {**row, "nfe": nfe, "quality": quality, "made_from": made_from,
                  "n_samples": self.spec.n_samples, "seeds": self.spec.seeds,
                  "sample_s_per_1000": seconds * scale, "forward_s_per_1000": fwd * scale,
                  "sampler_overhead": seconds / fwd if fwd > 0 else None,
                  "distill_wall_s": distill_s,
                  "distill_vs_teacher_training": (distill_s / self.teacher_train_s
                                                  if distill_s and self.teacher_train_s else None),
                  "peak_memory_mb": peak_memory_mb(self.device)}
        if pairs:
            result["paired"] = {k: mean_interval(np.concatenate(v)) for k, v in pairs.items()}
            result["paired"]["n"] = int(sum(len(v) for v in pairs["rmse"]))
        if row.get("model"):
            result["distill_profile"] = self.distill_profile(row, ckpt.card)
            result["trajectory_cache"] = (ckpt.card.get("method") or {}).get("trajectory_cache")
            result["budget"] = self.budget(row)
            if self.spec.curve_points or row.get("long"):
                result["cost_curve"] = self.cost_curve(row, ckpt, kw)
        _save_array(self.out / "rows" / f"{row['key']}.npy", preview[:64].numpy())
        result["row_wall_s"] = time.perf_counter() - t0
        write_json(cache, result)
        return result

    def _teacher_samples_path(self, seed: int) -> Path:
        return self.out / "rows" / f"teacher-samples-seed{seed}.npy"

    def teacher_samples(self, seed: int) -> torch.Tensor:
        """The teacher reference row's samples from this seed's noises (sampled again where the file is gone
        or holds another count)."""
        path = self._teacher_samples_path(seed)
        if path.is_file():
            x = torch.from_numpy(np.load(path))
            if len(x) == self.spec.n_samples:
                return x
        ckpt, kw, _ = self._sampling_plan(next(r for r in self.plan() if r["method"] == "teacher"))
        x = sample(ckpt, self.spec.n_samples, seed=seed, noise=self.noise[seed], progress=False, **kw)
        _save_array(path, x.numpy())
        return x

    def _paired_classifier(self):
        """The classifier whose features the paired distance uses (the shipped one for this data), or None."""
        if not hasattr(self, "_pair_clf"):
            from fewstep.featnet import available_classifiers, load_classifier
            res = self.spec.resolution or (None if self.is_toy else self.shape[-1])
            self._pair_clf = (load_classifier(self.spec.data, res) if (self.spec.data, res) in available_classifiers()
                              else None)
        return self._pair_clf

    def _score(self, x, seed: int, metrics=None, intervals: int | None = None) -> dict:
        return evaluate_samples(x, self.spec.data, resolution=self.spec.resolution, seed=seed,
                                split_seed=self.split_seed, reference=self.spec.reference, metrics=metrics,
                                intervals=self.spec.fd_intervals if intervals is None else intervals)

    def _score_curve_point(self, x, seed: int) -> dict:
        """A point along a run: the quality metric alone, no interval."""
        return self._score(x[:CURVE_SAMPLES], seed, metrics=self.quality_key.split("_")[0], intervals=0)

    @contextlib.contextmanager
    def _sampling_bar(self, row: dict, ckpt, seed: int):
        """A bar inside a row: one tick per network evaluation while it samples (rate and ETA)."""
        batches = -(-self.spec.n_samples // 500)  # `sample` runs batches of 500
        bar = tqdm(total=batches * row["nfe"], desc=f"  {row['key']} seed {seed}: sampling", unit="eval",
                   leave=False, disable=not self.progress)
        def tick(*_):  # returns None: a forward hook's return value would replace the network's output
            bar.update(1)
        hook = ckpt.denoiser.net.register_forward_hook(tick)
        try:
            yield bar
        finally:
            hook.remove()
            bar.close()

    def _made_from(self, row: dict) -> dict:
        """Content hashes of what a row's numbers depend on: the teacher and, if any, the distilled model,
        and the reference split every row is compared with."""
        if row["method"] == "data":
            return {"data": self.spec.data, "resolution": self.spec.resolution, "reference": self.spec.reference,
                    "floor": FLOOR_VERSION}
        made = {"teacher": self.teacher_card.get("weights_sha256"), "reference": self.spec.reference,
                "format": ROW_FORMAT, "fd_intervals": self.spec.fd_intervals,
                "paired": "teacher" in self.spec.methods and row["method"] != "teacher"}
        if row.get("grid"):
            made["sampling"] = {"grid": row["grid"], "final_zero": row["final_zero"]}
        if row.get("model"):
            try:
                made["model"] = read_card(self.model_dir(row["model"])).get("weights_sha256")
            except FewstepError:
                made["model"] = None  # not distilled yet
        return made

    def _evaluate_data(self, row: dict, cache: Path, made_from: dict, t0: float) -> dict:
        """The data floor: real samples disjoint from the reference, scored like a method's samples, i.e.
        what a perfect sampler scores with the same sample count against the same reference.

        Toys: fresh draws of the true distribution. Images: the split the reference leaves out (held-out
        for the default training-set reference). Where that split is smaller than the sample count (the
        180 held-out digits against 1,000 samples), the Fréchet distances are measured on random subsets
        of several sizes k and extrapolated along FD(k) = a + c/k, the 1/N law of Fréchet distances
        (Chong & Forsyth 2020), to k = the sample count; the other numbers (unbiased KID, precision and
        recall, pixel metrics) are those of the whole split and say so in ``floor``.
        """
        from fewstep.data import TOY_DATASETS, load_dataset, sample_toy
        s, n = self.spec, self.spec.n_samples
        per_seed, preview, floor = [], None, {}
        pool = None
        if s.data not in TOY_DATASETS:
            other = {"train": "heldout", "heldout": "train"}.get(s.reference)
            if other is None:
                raise FewstepError(f"the data floor needs real samples disjoint from the reference, and reference "
                                   f"{s.reference!r} leaves none; use reference 'train' or 'heldout'")
            pool = load_dataset(s.data, s.resolution, split=other, seed=self.split_seed).x
            floor = {"samples": f"{other} split ({len(pool)} real samples, disjoint from the {s.reference} reference)"}
        else:
            floor = {"samples": "fresh draws of the true distribution, independent of the reference"}
        bar = tqdm(total=len(s.seeds), desc=f"  {row['key']}: scoring real samples", unit="seed", leave=False,
                   disable=not self.progress)
        for seed in s.seeds:
            gen = torch.Generator().manual_seed(2000 + seed)
            if pool is None:
                x = sample_toy(s.data, n, seed=5000 + seed)  # another stream than the reference's draw
            elif len(pool) >= n:
                x = pool[torch.randperm(len(pool), generator=gen)[:n]]
            else:
                x = pool
            q = self._score(x, seed, intervals=0)  # an interval of the real samples' own distance says nothing here
            if pool is not None and len(pool) < n:
                q.update(self._extrapolated_floor(pool, q, seed, gen))
                floor.update(extrapolated=[k for k in ("fcd", "fid") if k in q], to_n=n,
                             method=f"FD(k) = a + c/k fitted on random subsets of k = "
                                    f"{', '.join(map(str, self._floor_sizes(len(pool))))} of the {len(pool)} "
                                    f"(x{FLOOR_DRAWS} draws below the full split), evaluated at k = {n}; other numbers "
                                    f"at k = {len(pool)}")
            per_seed.append(q)
            preview = x if preview is None else preview
            bar.update(1)
        bar.close()
        result = {**row, "quality": _mean_and_spread(per_seed), "made_from": made_from, "n_samples": n,
                  "seeds": s.seeds, "floor": floor, "sample_s_per_1000": None,
                  "forward_s_per_1000": None, "sampler_overhead": None, "distill_wall_s": None,
                  "distill_vs_teacher_training": None, "peak_memory_mb": None}
        _save_array(self.out / "rows" / f"{row['key']}.npy", preview[:64].numpy())
        result["row_wall_s"] = time.perf_counter() - t0
        write_json(cache, result)
        return result

    @staticmethod
    def _floor_sizes(m: int) -> list[int]:
        return sorted({max(8, round(f * m)) for f in FLOOR_FRACTIONS} | {m})

    def _extrapolated_floor(self, pool: torch.Tensor, full: dict, seed: int, gen) -> dict:
        """Fréchet distances of real subsets of several sizes k, fitted by a + c/k and read at the sample count."""
        keys = [k for k in ("fcd", "fid") if k in full]
        if not keys:
            return {}
        ks, vals = [], {k: [] for k in keys}
        for k in self._floor_sizes(len(pool)):
            for _ in range(1 if k == len(pool) else FLOOR_DRAWS):
                q = full if k == len(pool) else self._score(pool[torch.randperm(len(pool), generator=gen)[:k]],
                                                            seed, metrics=",".join(keys), intervals=0)
                ks.append(k)
                for key in keys:
                    vals[key].append(q[key])
        design = np.stack([np.ones(len(ks)), 1.0 / np.asarray(ks, dtype=np.float64)], axis=1)
        out = {}
        for key in keys:
            (a, c), *_ = np.linalg.lstsq(design, np.asarray(vals[key]), rcond=None)
            out[key] = float(max(a + c / self.spec.n_samples, 0.0))
        return out

    def distill(self) -> list[Path]:
        """Every model the plan needs, distilled in row order (or found finished); nothing is measured."""
        done = {}
        rows = [r for r in self.plan() if r.get("model")]
        for i, row in enumerate(rows):
            if row["model"] not in done:
                if self.progress:
                    tqdm.write(f"bench model {len(done) + 1}: {row['model']} (row {i + 1}/{len(rows)})")
                done[row["model"]] = self.ensure_model(row)
        return list(done.values())

    def run(self) -> dict:
        rows = self.plan()
        t0 = time.perf_counter()
        results = []
        bar = tqdm(rows, desc="bench", unit="row", disable=not self.progress)
        for i, row in enumerate(bar):
            bar.set_postfix_str(row["key"])
            if self.progress:
                tqdm.write(f"bench row {i + 1}/{len(rows)}: {row['key']}")
            results.append(self.evaluate(row))
        env = {"fewstep_version": fewstep.__version__, "torch": torch.__version__, "device": str(self.device),
               "device_name": (torch.cuda.get_device_name(self.device) if self.device.type == "cuda"
                               else platform.processor() or platform.machine()),
               "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "python": platform.python_version()}
        summary = {"spec": asdict(self.spec), "environment": env, "teacher": {
            "path": str(self.teacher.path), "training_wall_s": self.teacher_train_s,
            "card_method": self.teacher_card.get("method")}, "quality_key": self.quality_key,
            "sfd_recipe": {n: {"label": SFD_RECIPE[n].label, "method": SFD_RECIPE[n].method,
                               "authors": SFD_RECIPE[n].authors, "other": SFD_RECIPE[n].other}
                           for n in self.spec.sfd_recipe},
            "rows": results, "bench_wall_s": time.perf_counter() - t0}
        write_json(self.out / "results.json", summary)
        from fewstep.report import write_report
        write_report(self.out, summary, self)
        write_json(self.out / "results.json", summary)  # again, with what the report measured (consistency)
        return summary
