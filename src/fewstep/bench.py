"""The side-by-side benchmark: every method on one teacher, in one process, with fixed seeds.

A plan is a list of typed rows (fewstep.method.Row): the bench's own — the data floor, the teacher reference,
the training-free solvers — then the rows each registered method adds. Each distillation runs once and is
cached in OUT/models/<name>; each row's numbers are cached in OUT/rows/<key>.json, so re-running skips
finished work. Quality is the mean over the sample seeds with its spread (or, with `fd_intervals`, each
Fréchet distance with a 95 % interval), beside a paired distance to the teacher reference's samples from
the same noises. Timing per row: sampling time per 1,000 samples, the pure network time of the same
number of forward passes (so sampler overhead is visible), and the distillation's wall time next to the
teacher's own training time, with its profile (per iteration: teacher calls, student forward + backward,
optimizer, the rest, and the floor; see `fewstep.timing.Profiler`) and its quality along the run.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

import fewstep
from fewstep.bench_rows import (CURVE_SAMPLES, GRID_NAMES, ROW_FORMAT, SOLVER_GRIDS, SOLVER_LABELS, DataFloorRow,
                                PairedReference, SolverRow, TeacherRow, described_once, mean_and_spread,
                                save_array, forward_seconds, sampling_bar)
from fewstep.benchspec import SOLVER_ROWS, BenchSpec, bench_methods
from fewstep.checkpoint import load_checkpoint, read_card, write_json
from fewstep.data import load_dataset
from fewstep.errors import FewstepError, option
from fewstep.featnet import available_classifiers
from fewstep.method import Row
from fewstep.distances import mean_interval
from fewstep.metrics import evaluate_samples
from fewstep.models import load_model
from fewstep.registry import methods as registered_methods
from fewstep.report import write_report
from fewstep.runfolder import read_snapshots
from fewstep.sampling import sample, sample_shape
from fewstep.timing import peak_memory_mb
from fewstep.train import TrainConfig, Trainer

__all__ = ["Bench", "BenchSpec", "bench_methods", "SOLVER_ROWS", "SOLVER_GRIDS"]


def _cached_row(cache: Path, n_samples: int, seeds: list, made_from: dict) -> dict | None:
    """A row's numbers from its cache file, if they were measured with these sample counts, seeds, teacher and
    model weights (a damaged file, or one measured otherwise, is measured again)."""
    if not cache.is_file():
        return None
    try:
        cached = json.loads(cache.read_text())
    except (ValueError, RecursionError):
        return None
    if isinstance(cached, dict) and cached.get("n_samples") == n_samples and cached.get("seeds") == list(seeds) \
            and cached.get("made_from") == made_from:
        return cached
    return None


def _environment(device: torch.device) -> dict:
    return {"fewstep_version": fewstep.__version__, "torch": torch.__version__, "device": str(device),
            "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                            else platform.processor() or platform.machine()),
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "python": platform.python_version()}


# ---- the benchmark ------------------------------------------------------------------------------------------

class NotStarted(FewstepError):
    """A row whose distillation has no checkpoint yet, met by a bench that measures runs as reached."""


class Bench:
    def __init__(self, spec: BenchSpec, out: str | Path, device: str = "cpu", progress: bool = True,
                 as_reached: bool = False):
        """`as_reached`: measure each distillation as far as it has trained (its latest snapshot or
        checkpoint, while another process may still be training it) and train none; a row whose run has not
        started is left out. Its budget then says how far it got."""
        self.spec, self.out, self.progress, self.as_reached = spec, Path(out), progress, as_reached
        self._reached = {}  # model -> how far its run was when first looked at (a training run goes on)
        self.device = torch.device(device)
        self.methods = registered_methods()
        known = bench_methods()
        unknown = set(spec.methods) - set(known)
        if unknown:
            raise FewstepError(f"{option('methods')}: unknown {sorted(unknown)}; expected some of {', '.join(known)}")
        self.teacher = load_model(spec.teacher, device=self.device)
        self.teacher_card = self.teacher.card
        self.teacher_train_s = float((self.teacher_card.get("training") or {}).get("wall_time_s") or 0) or None
        self.shape = sample_shape(self.teacher_card)
        self.is_toy = len(self.shape) == 1
        res = spec.resolution or (None if self.is_toy else self.shape[-1])
        self.classifier_res = res
        # the Fréchet classifier distance where a shipped classifier applies, else pixel-space SWD
        self.quality_key = ("swd" if self.is_toy else "fcd" if (spec.data, res) in available_classifiers()
                            else "swd_pixel")
        self.split_seed = int((self.teacher_card.get("data") or {}).get("split_seed", 0))
        for sub in ("models", "rows", "figures"):
            (self.out / sub).mkdir(parents=True, exist_ok=True)
        self.noise = {s: torch.randn((spec.n_samples, *self.shape), generator=torch.Generator().manual_seed(1000 + s))
                      for s in spec.seeds}
        self.paired = PairedReference(self)

    # ---- plan ---------------------------------------------------------------------------------------------
    def plan(self) -> list[Row]:
        """The bench's own rows, then each registered method's, in registry order; a row two methods both
        add (a ceiling they share) is kept once."""
        s, rows = self.spec, []
        if "data" in s.methods:
            rows.append(DataFloorRow("data-floor", "data", 0, "data floor (real samples)", reference=True))
        if "teacher" in s.methods:
            rows.append(TeacherRow(f"teacher-{s.ref_sampler}-{s.ref_nfe}", "teacher", s.ref_nfe,
                                   f"teacher (reference), {s.ref_sampler}", reference=True, sampler=s.ref_sampler))
        for name in SOLVER_ROWS:
            if name in s.methods:
                grid = self.solver_grid(name)
                # Heun: 2 evaluations a step, so even NFEs only (an odd one rounds up)
                for n in sorted({n + n % 2 for n in s.nfe}) if name == "heun" else s.nfe:
                    rows.append(SolverRow(f"{name}-{n}", name, n, f"{SOLVER_LABELS[name]}, {GRID_NAMES[grid]} grid",
                                          sampler=name, grid=grid))
        for method in self.methods:
            rows += method.bench_rows(self)
        unique = {}
        for r in rows:
            unique.setdefault(r.key, r)
        return list(unique.values())

    def solver_grid(self, name: str) -> str:
        return SOLVER_GRIDS[name] if self.teacher.denoiser.schedule.is_discrete else "polynomial"

    # ---- services for the rows ------------------------------------------------------------------------------
    def model_dir(self, name: str) -> Path:
        return self.out / "models" / name

    @property
    def trajectory_cache(self) -> Path:
        """SFD's teacher trajectories, shared by the SFD rows and SFD-v (same seed and batch: exact reuse)."""
        return self.out / "trajectory-cache"

    def data(self):
        """The training split of the spec's data (the data-based distillations train on it)."""
        return load_dataset(self.spec.data, self.spec.resolution, split="train", seed=self.split_seed)

    def finished(self, path: Path, budget: dict) -> bool:
        """A finished model made with this budget (iterations, batch, lr, and the gradient clip where the budget
        names one). One made with another budget is never reused or overwritten silently: that is an error
        naming both. Measuring as reached, a run on its way to this budget counts as finished, and one with no
        checkpoint is NotStarted."""
        try:
            card = read_card(path)
        except FewstepError:
            if self.as_reached:
                raise NotStarted(f"{path}: not started") from None
            return False
        training = card.get("training") or {}
        train = json.loads((path / "config.json").read_text())["train"] if (path / "config.json").is_file() else {}
        if training.get("finished"):
            iterations = training.get("iterations")
        elif self.as_reached:
            iterations = train.get("steps")  # the budget the run is on its way to
        else:
            return False
        made = {"iterations": iterations, "batch": training.get("batch"), "lr": train.get("lr"),
                "grad_clip": train.get("grad_clip")}
        # a budget names the gradient clip where the method's rows differ in it (SFD's recipe)
        asked = {k: budget[k] for k in made if k in budget}
        made = {k: made[k] for k in asked}
        if made != asked:
            raise FewstepError(f"{path} was distilled with {made}, but this bench asks for {asked}; "
                               f"delete that folder to distil it again, or choose another folder for {option('out')}")
        return True

    def train(self, method, path: Path, budget: dict, lr_schedule="constant", data=None, grad_clip=None,
              curve_points=None):
        """Run a method's training into `path` with the row's budget (resuming an interrupted run), writing
        snapshots along the run for the quality-against-time curve."""
        steps = budget["iterations"]
        points = self.spec.curve_points if curve_points is None else curve_points
        cfg = TrainConfig(steps=steps, batch=budget["batch"], lr=budget["lr"], lr_schedule=lr_schedule,
                          seed=self.spec.seed, device=str(self.device), progress=self.progress,
                          ckpt_every=max(100, steps // 5), ckpt_minutes=10, log_every=max(10, steps // 50),
                          grad_clip=grad_clip,
                          snapshot_every=max(1, steps // points) if points else 0)
        resume = (path / "train_state.pt").exists()
        Trainer(method, cfg, path, data=data, resume=resume,
                run_info={"command": f"fewstep bench ({method.name})"}).run()

    def reached(self, row: Row) -> dict | None:
        """How far an unfinished run of the row's model has trained, measuring as reached: {"iterations",
        "wall_s", "snapshot": its latest snapshot's file, or None where the checkpoint is as far}; None for a
        finished model or a row without one."""
        if not (self.as_reached and row.model):
            return None
        if row.model not in self._reached:
            self._reached[row.model] = self._latest(self.model_dir(row.model))
        return self._reached[row.model]

    @staticmethod
    def _latest(path: Path) -> dict | None:
        """How far the run in `path` is (None: finished)."""
        training = read_card(path).get("training") or {}
        if training.get("finished"):
            return None
        at = {"iterations": int(training.get("iterations") or 0), "wall_s": float(training.get("wall_time_s") or 0),
              "snapshot": None}
        newer = [e for e in read_snapshots(path)
                 if e["step"] > at["iterations"] and (path / "snapshots" / e["file"]).is_file()]
        if newer:
            last = newer[-1]
            at = {"iterations": int(last["step"]), "wall_s": float(last["wall_s"]), "snapshot": last["file"]}
        return at

    def model_sampling(self, row: Row) -> tuple:
        """(checkpoint, sample kwargs, step condition) of a row's distilled model (an SFD-v model at the
        row's NFE, a step-conditioned one with the step it keeps); measuring as reached, with the weights of
        the run's latest snapshot."""
        path = row.ensure_model(self)
        ckpt = load_checkpoint(path, device=self.device)
        reached = self.reached(row)
        if reached and reached["snapshot"]:
            ckpt.denoiser.net.load_state_dict(load_file(path / "snapshots" / reached["snapshot"]))
        kw = {"nfe": row.nfe} if "grids" in ckpt.sampler else {}
        step = None
        if "grids" in ckpt.sampler:
            step = len(ckpt.sampler["grids"][str(row.nfe)])
        elif ckpt.sampler.get("step"):
            step = ckpt.sampler["step"]
        return ckpt, kw, step

    def curve_noise(self) -> tuple[int, torch.Tensor]:
        """(seed, noises) the points along a run are sampled from: the first seed's first CURVE_SAMPLES."""
        seed = self.spec.seeds[0]
        return seed, self.noise[seed][:min(self.spec.n_samples, CURVE_SAMPLES)]

    def score_curve_point(self, x, seed: int) -> dict:
        """A point along a run: the quality metric alone, no interval."""
        return self._score(x, seed, metrics=self.quality_key.split("_")[0], intervals=0)

    def snapshot_curve(self, row: Row, ckpt, kw: dict) -> list[dict]:
        """Quality against distillation wall time at the snapshots the row's training wrote."""
        seed, noise = self.curve_noise()
        path = self.model_dir(row.model)
        entries = read_snapshots(path)
        if not entries:
            return []
        offset = row.distill_seconds(self, ckpt.card) - float((ckpt.card.get("training") or {}).get("wall_time_s") or 0)
        snap = load_checkpoint(path, device=self.device)
        reached = self.reached(row)
        if reached:  # not the snapshots a run still training wrote after the weights measured
            entries = [e for e in entries if e["step"] <= reached["iterations"]]
        points = []
        for e in tqdm(entries, desc=f"  {row.key}: quality along the run", unit="snapshot", leave=False,
                      disable=not self.progress):
            snap.denoiser.net.load_state_dict(load_file(path / "snapshots" / e["file"]))
            x = sample(snap, len(noise), seed=seed, noise=noise, progress=False, **kw)
            points.append({"wall_s": offset + float(e["wall_s"]), "step": e["step"], "nfe": row.nfe, "n": len(noise),
                           "quality": self.score_curve_point(x, seed)})
        return points

    # ---- evaluation -----------------------------------------------------------------------------------------
    def distill(self) -> list[Path]:
        """Every model the plan needs, distilled in row order (or found finished); nothing is measured."""
        done = {}
        rows = [r for r in self.plan() if r.model]
        for i, row in enumerate(rows):
            if row.model not in done:
                if self.progress:
                    tqdm.write(f"bench model {len(done) + 1}: {row.model} (row {i + 1}/{len(rows)})")
                done[row.model] = row.ensure_model(self)
        return list(done.values())

    def evaluate(self, row: Row) -> dict:
        """A row's numbers, measured or read from its cache. ``row_wall_s`` is what measuring it cost in
        the run that did (its distillation included, when it was the first row to need the model)."""
        t0 = time.perf_counter()
        cache = self.out / "rows" / f"{row.key}.json"
        if row.model:
            row.ensure_model(self)  # distils once; checks a finished model's budget
        made_from = self._made_from(row)
        cached = _cached_row(cache, self.spec.n_samples, self.spec.seeds, made_from)
        if cached is not None:
            return cached
        if isinstance(row, DataFloorRow):
            return row.measure(self, cache, made_from, t0)
        ckpt, kw, step = row.sampling(self)
        per_seed, seconds, preview, pairs, about = [], None, None, {}, {}
        for seed in self.spec.seeds:
            # `sample` runs batches of 500: one network call per batch and evaluation
            with sampling_bar(f"  {row.key} seed {seed}: sampling", ckpt, -(-self.spec.n_samples // 500) * row.nfe,
                              self.progress):
                x, info = sample(ckpt, self.spec.n_samples, seed=seed, noise=self.noise[seed], progress=False,
                                 return_info=True, **kw)
            if preview is None:
                preview, seconds = x, info["seconds"]
                nfe, sigma0 = info["nfe"], info["sigmas"][0]
            if isinstance(row, TeacherRow):  # every other row is paired with these samples
                self.paired.keep(seed, x)
            elif "teacher" in self.spec.methods:
                for k, v in self.paired.values(seed, x).items():
                    pairs.setdefault(k, []).append(v)
            per_seed.append(self._score(x, seed, about=about))
        fwd = forward_seconds(ckpt.denoiser, self.spec.n_samples, nfe, 500, self.shape, sigma0, step)
        quality = mean_and_spread(per_seed)
        distill_s = row.distill_seconds(self, ckpt.card) if row.model else None
        reached = self.reached(row)
        if reached:  # the run's time up to the weights measured, not to its checkpoint
            distill_s += reached["wall_s"] - float((ckpt.card.get("training") or {}).get("wall_time_s") or 0)
        scale = 1000 / self.spec.n_samples
        result = {**row.record(), "nfe": nfe, "quality": quality, "about": about, "made_from": made_from,
                  "n_samples": self.spec.n_samples, "seeds": self.spec.seeds,
                  "sample_s_per_1000": seconds * scale, "forward_s_per_1000": fwd * scale,
                  "sampler_overhead": seconds / fwd if fwd > 0 else None,
                  "distill_wall_s": distill_s,
                  "distill_vs_teacher_training": (distill_s / self.teacher_train_s
                                                  if distill_s and self.teacher_train_s else None),
                  "peak_memory_mb": peak_memory_mb(self.device)}
        if not row.model and self.spec.curve_points:
            # a training-free row (the teacher, a ceiling) on the samples a point along a run is scored on, the
            # level that run is read against (Fréchet distances depend on n)
            seed, noise = self.curve_noise()
            result["curve_quality"] = self.score_curve_point(preview[:len(noise)], seed)
        if pairs:
            result["paired"] = {k: mean_interval(np.concatenate(v)) for k, v in pairs.items()}
            result["paired"]["n"] = int(sum(len(v) for v in pairs["rmse"]))
        if row.model:
            result["distill_profile"] = row.distill_profile(self, ckpt.card)
            result["trajectory_cache"] = (ckpt.card.get("method") or {}).get("trajectory_cache")
            result["budget"] = row.budget(self)
            if reached:
                result["budget"] = {**result["budget"], "iterations": reached["iterations"],
                                    "planned_iterations": result["budget"]["iterations"]}
            if self.spec.curve_points or getattr(row, "long", False):
                result["cost_curve"] = row.cost_curve(self, ckpt, kw)
        save_array(self.out / "rows" / f"{row.key}.npy", preview[:64].numpy())
        result["row_wall_s"] = time.perf_counter() - t0
        write_json(cache, result)
        return result

    def _score(self, x, seed: int, metrics=None, intervals: int | None = None, about: dict | None = None) -> dict:
        """The numbers of one evaluation. What they mean (feature space, reference data) is the same for every
        row, so it is left out here and kept in ``about`` when given: results.json holds it once."""
        q = evaluate_samples(x, self.spec.data, resolution=self.spec.resolution, seed=seed,
                             split_seed=self.split_seed, reference=self.spec.reference, metrics=metrics,
                             intervals=self.spec.fd_intervals if intervals is None else intervals)
        described, reference = q.pop("about"), q.pop("reference")
        if about is not None:
            about.setdefault("reference", reference)
            about.setdefault("metrics", {}).update(
                {k: {f: v for f, v in d.items() if f != "n"} for k, d in described.items()})
        return q

    def _made_from(self, row: Row) -> dict:
        """Content hashes of what a row's numbers depend on: the teacher and, if any, the distilled model,
        the reference split every row is compared with, and what the row itself adds."""
        if isinstance(row, DataFloorRow):
            return row.made_from(self)
        made = {"teacher": self.teacher_card.get("weights_sha256"), "reference": self.spec.reference,
                "format": ROW_FORMAT, "fd_intervals": self.spec.fd_intervals,
                "paired": "teacher" in self.spec.methods and not isinstance(row, TeacherRow), **row.made_from(self)}
        if row.model:
            try:
                made["model"] = read_card(self.model_dir(row.model)).get("weights_sha256")
            except FewstepError:
                made["model"] = None  # not distilled yet
            reached = self.reached(row) if made["model"] else None
            if reached:
                made["reached"] = reached["iterations"]  # a later snapshot of the same run is measured again
        return made

    def run(self) -> dict:
        rows = self.plan()
        t0 = time.perf_counter()
        results, not_started = [], []
        bar = tqdm(rows, desc="bench", unit="row", disable=not self.progress)
        for i, row in enumerate(bar):
            bar.set_postfix_str(row.key)
            if self.progress:
                tqdm.write(f"bench row {i + 1}/{len(rows)}: {row.key}")
            try:
                results.append(self.evaluate(row))
            except NotStarted:
                not_started.append(row.key)
        summary = {"spec": self.spec.record(), "environment": _environment(self.device), "teacher": {
            "path": str(self.teacher.path), "training_wall_s": self.teacher_train_s,
            "card_method": self.teacher_card.get("method")}, "quality_key": self.quality_key,
            "rows": results,
            # the whole bench's wall time: every row's, each measured when it ran (a reused row keeps its own,
            # distillations counted once); run_wall_s: this invocation's
            "bench_wall_s": sum(float(r.get("row_wall_s") or 0) for r in results),
            "run_wall_s": time.perf_counter() - t0, **described_once(results)}
        if self.as_reached:
            summary["not_started"] = not_started
        for method in self.methods:  # what a method measures beyond its rows (figures, consistency)
            summary.update(method.bench_extras(self, summary, self.out / "figures"))
        write_json(self.out / "results.json", summary)
        write_report(self.out, summary)
        return summary
