"""The bench's own rows (the data floor, the teacher reference, the training-free solvers on the grids their
authors recommend) and what every row's measurement shares: the sampling progress bar, the per-seed mean and
spread, the network-only timing, and the teacher reference's samples that paired distances are taken to."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fewstep.checkpoint import atomic_write, write_json
from fewstep.data import TOY_DATASETS, load_dataset, sample_toy
from fewstep.errors import FewstepError
from fewstep.featnet import available_classifiers, load_classifier
from fewstep.method import Row
from fewstep.metrics import paired_values
from fewstep.sampling import sample

# the data floor: subset sizes (fractions of the disjoint split) and draws per size of its 1/k fit; bump
# FLOOR_VERSION when its method changes, so cached floor rows are measured again (why 12 draws: docs/bench.md)
FLOOR_FRACTIONS = (1 / 4, 1 / 3, 1 / 2, 2 / 3, 5 / 6)
FLOOR_DRAWS = 12
FLOOR_VERSION = 3
# Each training-free solver on a grid its own authors recommend, on a discrete (table) teacher: DDIM uniform in
# the table index; DPM-Solver++ time-uniform (the same), the DPM-Solver authors' grid for large images and the
# SFD authors' for discrete-time teachers. Their logSNR grid for small images is not monotone in NFE on either
# bench teacher (a spike at NFE 3 in FCD) and lands further from the teacher's own samples at every NFE 2-5;
# in FCD it wins on digits at NFE 2, 4, 5 and loses on MNIST at 3 and 4 (numbers in docs/bench.md). Heun and
# iPNDM on EDM's rho = 7 grid (as in EDM and the SFD authors' code). A continuous teacher: EDM's grid for all.
# Like the field's tables they take NFE steps from sigma_max to sigma_min, without a final denoise.
SOLVER_GRIDS = {"ddim": "uniform", "dpmpp2m": "uniform", "dpmpp3m": "uniform", "heun": "polynomial",
                "ipndm": "polynomial"}
SOLVER_LABELS = {"ddim": "DDIM", "dpmpp2m": "DPM-Solver++(2M)", "dpmpp3m": "DPM-Solver++(3M)", "heun": "Heun",
                 "ipndm": "iPNDM"}
GRID_NAMES = {"uniform": "time-uniform", "logsnr": "logSNR", "polynomial": "EDM ρ=7", "discrete": "the table's steps"}
# bump when a row's measured fields change, so rows cached before are measured again
ROW_FORMAT = 2
# along-the-run snapshots are scored on at most this many samples (the first seed's first ones), in the
# quality metric only: a curve point costs a fraction of a row
CURVE_SAMPLES = 2000
# a row's network time is timed on at most this many of its samples (same batch size) and scaled
TIMED_SAMPLES = 2000



# ---- the bench's own rows -----------------------------------------------------------------------------------

@dataclass
class DataFloorRow(Row):
    """Real samples disjoint from the reference, scored like a method's: what a perfect sampler scores."""

    def made_from(self, bench) -> dict:
        s = bench.spec
        return {"data": s.data, "resolution": s.resolution, "reference": s.reference, "floor": FLOOR_VERSION}

    def measure(self, bench, cache: Path, made_from: dict, t0: float) -> dict:
        """The data floor: real samples disjoint from the reference, scored like a method's samples, i.e.
        what a perfect sampler scores with the same sample count against the same reference.

        Toys: fresh draws of the true distribution. Images: the split the reference leaves out (held-out
        for the default training-set reference). Where that split is smaller than the sample count (the
        180 held-out digits against 1,000 samples), the Fréchet distances are measured on random subsets
        of several sizes k and extrapolated along FD(k) = a + c/k, the 1/N law of Fréchet distances
        (Chong & Forsyth 2020), to k = the sample count; the other numbers (unbiased KID, precision and
        recall, pixel metrics) are those of the whole split and say so in ``floor``.
        """
        s, n = bench.spec, bench.spec.n_samples
        per_seed, preview, floor, about = [], None, {}, {}
        pool = None
        if s.data not in TOY_DATASETS:
            other = {"train": "heldout", "heldout": "train"}.get(s.reference)
            if other is None:
                raise FewstepError(f"the data floor needs real samples disjoint from the reference, and reference "
                                   f"{s.reference!r} leaves none; use reference 'train' or 'heldout'")
            pool = load_dataset(s.data, s.resolution, split=other, seed=bench.split_seed).x
            floor = {"samples": f"{other} split ({len(pool)} real samples, disjoint from the {s.reference} reference)"}
        else:
            floor = {"samples": "fresh draws of the true distribution, independent of the reference"}
        bar = tqdm(total=len(s.seeds), desc=f"  {self.key}: scoring real samples", unit="seed", leave=False,
                   disable=not bench.progress)
        for seed in s.seeds:
            gen = torch.Generator().manual_seed(2000 + seed)
            if pool is None:
                x = sample_toy(s.data, n, seed=5000 + seed)  # another stream than the reference's draw
            elif len(pool) >= n:
                x = pool[torch.randperm(len(pool), generator=gen)[:n]]
            else:
                x = pool
            q = bench._score(x, seed, intervals=0, about=about)  # an interval of the floor's own distance says nothing
            if pool is not None and len(pool) < n:
                q.update(self._extrapolated_floor(bench, pool, q, seed, gen))
                floor.update(extrapolated=[k for k in ("fcd", "fid") if k in q], to_n=n,
                             method=f"FD(k) = a + c/k fitted on random subsets of k = "
                                    f"{', '.join(map(str, self._floor_sizes(len(pool))))} of the {len(pool)} "
                                    f"(x{FLOOR_DRAWS} draws below the full split), evaluated at k = {n}; other numbers "
                                    f"at k = {len(pool)}")
            per_seed.append(q)
            preview = x if preview is None else preview
            bar.update(1)
        bar.close()
        result = {**self.record(), "quality": mean_and_spread(per_seed), "about": about, "made_from": made_from,
                  "n_samples": n,
                  "seeds": s.seeds, "floor": floor, "sample_s_per_1000": None,
                  "forward_s_per_1000": None, "sampler_overhead": None, "distill_wall_s": None,
                  "distill_vs_teacher_training": None, "peak_memory_mb": None}
        save_array(bench.out / "rows" / f"{self.key}.npy", preview[:64].numpy())
        result["row_wall_s"] = time.perf_counter() - t0
        write_json(cache, result)
        return result

    @staticmethod
    def _floor_sizes(m: int) -> list[int]:
        return sorted({max(8, round(f * m)) for f in FLOOR_FRACTIONS} | {m})

    def _extrapolated_floor(self, bench, pool: torch.Tensor, full: dict, seed: int, gen) -> dict:
        """Fréchet distances of real subsets of several sizes k, fitted by a + c/k and read at the sample count."""
        keys = [k for k in ("fcd", "fid") if k in full]
        if not keys:
            return {}
        ks, vals = [], {k: [] for k in keys}
        for k in self._floor_sizes(len(pool)):
            for _ in range(1 if k == len(pool) else FLOOR_DRAWS):
                q = full if k == len(pool) else bench._score(pool[torch.randperm(len(pool), generator=gen)[:k]],
                                                             seed, metrics=",".join(keys), intervals=0)
                ks.append(k)
                for key in keys:
                    vals[key].append(q[key])
        design = np.stack([np.ones(len(ks)), 1.0 / np.asarray(ks, dtype=np.float64)], axis=1)
        out = {}
        for key in keys:
            (a, c), *_ = np.linalg.lstsq(design, np.asarray(vals[key]), rcond=None)
            out[key] = float(max(a + c / bench.spec.n_samples, 0.0))
        return out


@dataclass
class TeacherRow(Row):
    """The teacher at its own setting (the reference every other row is paired with)."""

    sampler: str = "dpmpp2m"

    def sampling(self, bench) -> tuple:
        # on fewstep's reference grid (a teacher imported from diffusers defaults to its scheduler's spacing,
        # which at many steps can skip the noisiest levels, as diffusers' "leading" does)
        return bench.teacher, {"nfe": self.nfe, "sampler": self.sampler, "grid": "logsnr"}, None


@dataclass
class SolverRow(Row):
    """A training-free solver on the teacher: NFE steps on its own grid, no final denoise (the field's count)."""

    sampler: str = "ddim"
    grid: str | None = None
    final_zero: bool = False
    trailing: bool = False   # on the teacher's own steps at an SFDDM index set (see fewstep.distill.step_table)

    def sampling(self, bench) -> tuple:
        kw = {"nfe": self.nfe, "sampler": self.sampler}
        if self.trailing:
            kw["grid"] = "discrete"
        if self.grid:
            kw.update(grid=self.grid, final_zero=self.final_zero)
        return bench.teacher, kw, None

    def made_from(self, bench) -> dict:
        return {"sampling": {"grid": self.grid, "final_zero": self.final_zero}} if self.grid else {}


def save_array(path: Path, array: np.ndarray) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, array)
    atomic_write(path, write)


def described_once(results: list[dict]) -> dict:
    """What the rows' numbers mean, lifted out of each row: {"metrics": {name: feature space, counts, unit},
    "metric_reference": the data the samples were compared with}."""
    about = {"metrics": {}}
    for r in results:
        row_about = r.pop("about", None) or {}
        about["metrics"].update(row_about.get("metrics") or {})
        about.setdefault("metric_reference", row_about.get("reference"))
    return about


@contextlib.contextmanager
def sampling_bar(desc: str, ckpt, evaluations: int, progress: bool):
    """A bar inside a row: one tick per network evaluation while it samples (rate and ETA)."""
    bar = tqdm(total=evaluations, desc=desc, unit="eval", leave=False, disable=not progress)

    def tick(*_):  # returns None: a forward hook's return value would replace the network's output
        bar.update(1)
    hook = ckpt.denoiser.net.register_forward_hook(tick)
    try:
        yield bar
    finally:
        hook.remove()
        bar.close()


def mean_and_spread(per_seed: list[dict]) -> dict:
    """{metric: {mean, std over seeds}} from one metrics dict per sample seed (sizes left out)."""
    quality = {}
    for k, v in per_seed[0].items():
        if k in ("n", "n_ref") or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        vals = np.array([r[k] for r in per_seed], dtype=np.float64)
        quality[k] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0}
    return quality


# ---- timing helpers -------------------------------------------------------------------------------------------

@torch.no_grad()
def forward_seconds(den, n: int, nfe: int, batch_size: int, shape: tuple, sigma: float, step=None) -> float:
    """Pure network time of nfe × n forward passes (same batch sizes as sampling), no solver around it.
    At most 16 rounds on at most TIMED_SAMPLES samples are timed and scaled to nfe × n, so timing a row costs a
    fraction of sampling it. `sigma` must be a noise level the model accepts (an exact-table model refuses others)."""
    total, n = n, min(n, TIMED_SAMPLES)
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
    return (time.perf_counter() - t0) * nfe / rounds * total / n


class PairedReference:
    """The teacher reference row's samples, kept per seed, that every other row is paired with (the same
    noises through both), and the distances of a row's samples to them."""

    def __init__(self, bench):
        self.bench, self._classifier = bench, None

    def path(self, seed: int) -> Path:
        return self.bench.out / "rows" / f"teacher-samples-seed{seed}.npy"

    def keep(self, seed: int, x: torch.Tensor):
        save_array(self.path(seed), x.numpy())

    def samples(self, seed: int) -> torch.Tensor:
        """This seed's teacher samples (sampled again where the file is gone or holds another count)."""
        b = self.bench
        if self.path(seed).is_file():
            x = torch.from_numpy(np.load(self.path(seed)))
            if len(x) == b.spec.n_samples:
                return x
        ckpt, kw, _ = next(r for r in b.plan() if isinstance(r, TeacherRow)).sampling(b)
        x = sample(ckpt, b.spec.n_samples, seed=seed, noise=b.noise[seed], progress=False, **kw)
        self.keep(seed, x)
        return x

    def values(self, seed: int, x: torch.Tensor) -> dict:
        """Per-pair distances (see metrics.paired_values), in the shipped classifier's features where one applies."""
        b = self.bench
        if self._classifier is None and (b.spec.data, b.classifier_res) in available_classifiers():
            self._classifier = load_classifier(b.spec.data, b.classifier_res)
        return paired_values(x, self.samples(seed), self._classifier)
