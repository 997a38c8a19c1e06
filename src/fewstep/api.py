"""What `import fewstep` gives: one call per task, each returning objects and raising `FewstepError` with the
same one-line message the command line prints. Every command of `fewstep` is one of these calls with its
arguments parsed; the defaults are the methods' own (their configs and recipes), written once.

    import fewstep
    teacher = fewstep.load("digits-teacher")
    student = fewstep.distill_sfd(teacher, "runs/sfd2", nfe=2, iters=50)
    samples = fewstep.sample(student, 1000, seed=0)
    print(fewstep.evaluate(samples, "digits")["fcd"])

See docs/api.md for one example per task.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fewstep import argtypes as A
from fewstep.checkpoint import Checkpoint, atomic_write, load_checkpoint
from fewstep.compare import compare_models as _compare_models
from fewstep.compare import interpolation_noises, sample_same_noise
from fewstep.devices import pick_device
from fewstep.userdata import checked_samples, load_samples_file, read_image_folder
from fewstep.errors import FewstepError, option
from fewstep.metrics import evaluate_samples
from fewstep.models import as_model
from fewstep.sampling import sample as _sample
from fewstep.sampling import sample_shape
from fewstep.viz import image_grid, pairs_picture, save_png, save_samples_picture, scatter_png


def load(model, device: str = "cpu") -> Checkpoint:
    """A model, loaded: a built-in name (`digits-teacher`, `mnist16-teacher`, `gmm8-teacher`), a fewstep
    checkpoint folder, a diffusers folder or an NVlabs/edm snapshot (.pkl, imported once into fewstep's cache).
    The result has `.denoiser` (the network behind D(x, σ)), `.card` (everything about it) and `.path`."""
    return as_model(model, pick_device(A.check("device", device, A.device)), "model")


@dataclass
class Samples:
    """Samples drawn by `sample`: `x` (N, C, H, W) images in [-1, 1] or (N, D) points, and `info`
    (sampler, NFE, seed, σ grid, seconds, and a text model's prompts and guidance)."""
    x: torch.Tensor
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.x)

    def save(self, path) -> Path:
        """Write the samples atomically, as the name's suffix says: a .npz holds `samples`, `info` (JSON)
        and, for a class model, `labels`; a .npy the samples array alone. `fewstep eval` reads both."""
        path = Path(path)
        if path.suffix.lower() not in A.SAMPLE_FILE_SUFFIXES:
            raise FewstepError(f"{str(path)!r}: expected {A.SAMPLE_FILE_NAMES}")
        info = dict(self.info)
        arrays = {"labels": np.asarray(info.pop("labels"), dtype=np.int64)} if "labels" in info else {}

        def write(tmp):
            with open(tmp, "wb") as f:
                if path.suffix.lower() == ".npy":
                    np.save(f, self.x.numpy())
                else:
                    np.savez(f, samples=self.x.numpy(), info=json.dumps(info), **arrays)
        atomic_write(path, write)
        return path

    def picture(self, path, n: int = 64, title: str | None = None) -> Path:
        """A PNG of the first n samples (a grid of images, or a scatter plot of 2-D points)."""
        if title is None:
            title = f"{self.info.get('sampler')} NFE {self.info.get('nfe')}"
        return save_samples_picture(self.x[:n], path, title=title)


def sample(model, n: int = 64, *, seed: int = 0, nfe: int | None = None, sampler: str | None = None,
           grid: str | None = None, rho: float | None = None, final_denoise: bool | None = None,
           prompts: list[str] | str | None = None, negative_prompt: str | None = None, guidance: float | None = None,
           class_label=None, clip="auto", batch_size: int = 500, decode: bool = True, progress: bool = True,
           device: str = "cpu", max_seconds: float | None = None) -> Samples:
    """Draw n samples from `model` (loaded, or anything `load` takes); the same seed gives the same samples.

    Every setting defaults to the model's card: its sampler, NFE and grid (an SFD-v student: pass one of its
    trained `nfe`), and for a text model its guidance scale and negative prompt. Prompts, negative prompt and
    guidance apply to this call only. A class-conditional model draws `class_label` (one int, or n of them)
    or uniform classes; a latent model's samples are decoded into images unless `decode=False`. `clip`: the
    bound x0 is clipped to while sampling, None for none, or "auto" (the card's; an imported model's other
    samplers clip as diffusers' schedulers from its config would). `max_seconds`:
    refuse, after the first batch, a run projected to take longer."""
    model = load(model, device=device)
    n = A.check("n", n, A.positive_int)
    seed = A.check("seed", seed, A.seed)
    nfe = None if nfe is None else A.check("nfe", nfe, A.nfe)
    batch_size = A.check("batch_size", batch_size, A.batch)
    x, info = _sample(model, n, seed=seed, nfe=nfe, sampler=sampler, grid=grid, rho=rho, batch_size=batch_size,
                      return_info=True, class_label=class_label, final_zero=final_denoise,
                      prompts=prompts, negative_prompt=negative_prompt,
                      guidance=guidance, decode=decode, progress=progress, max_seconds=max_seconds, clip=clip)
    return Samples(x, info)


def evaluate(samples, data: str, *, resolution: int | None = None, metrics=None, reference: str = "train",
             n_ref: int | None = None, data_seed: int = 0, seed: int = 0, classifier=None, inception=None,
             intervals: int = 0) -> dict:
    """Quality of `samples` (a `Samples`, a tensor or numpy array, a .npz / .npy written by `Samples.save` /
    `fewstep sample --out`, or a folder of images another tool sampled, read at `resolution` when given)
    against the data set `data` (built-in name, image folder or array). Returns a dict: each metric (fid, kid,
    pr, fcd, swd, mmd: those that apply, or the comma list `metrics`), `n`, `reference` and `about` (each
    number's feature space). `intervals` > 0 adds 95 % intervals to the Fréchet distances."""
    if isinstance(samples, Samples):
        x = samples.x
    elif isinstance(samples, torch.Tensor):
        x = samples
    elif isinstance(samples, (str, Path)) and Path(samples).is_dir():
        x, _ = read_image_folder(Path(samples), resolution)
    elif isinstance(samples, (str, Path)):
        x = load_samples_file(samples)
    elif isinstance(samples, np.ndarray):
        x = checked_samples(samples, "samples=ndarray")
    else:
        raise FewstepError(f"samples={type(samples).__name__}: expected Samples, a tensor, a numpy array, the "
                           "path of a .npz or .npy, or a folder of images")
    return evaluate_samples(x, data, resolution=resolution, seed=seed, n_ref=n_ref, classifier=classifier,
                            split_seed=data_seed, reference=reference, metrics=metrics, inception=inception,
                            intervals=intervals)


@dataclass
class Comparison:
    """Two models on the same noises: their samples and the PSNR of matched against shuffled pairs."""
    a: Samples
    b: Samples
    stats: dict

    def picture(self, path, n: int = 32, names: tuple[str, str] = ("A", "B")) -> Path:
        """The first n pairs side by side (images: alternating rows of A and B; points: two panels)."""
        return pairs_picture(self.a.x[:n], self.b.x[:n], path, *names)


def compare_models(a, b, n: int = 256, *, seed: int = 0, sampler_a: str | None = None, nfe_a: int | None = None,
                   sampler_b: str | None = None, nfe_b: int | None = None, batch_size: int = 500,
                   device: str = "cpu") -> Comparison:
    """Semantic consistency of two models (loaded, or anything `load` takes): the same n initial noises through
    both, each with its card's sampler unless given."""
    dev = pick_device(A.check("device", device, A.device))
    a, b = as_model(a, dev, "a"), as_model(b, dev, "b")
    xa, xb, stats = _compare_models(a, b, A.check("n", n, A.positive_int), A.check("seed", seed, A.seed),
                                    sampler_a, nfe_a, sampler_b, nfe_b, batch_size=batch_size)
    return Comparison(Samples(xa, stats["a"]), Samples(xb, stats["b"]), stats)


@dataclass
class Interpolation:
    """Frames sampled from noises between two seeds' (`frames`: one (F, ...) tensor per mode, slerp and/or
    linear) and how they were sampled (`info`: sampler, NFE, seeds)."""
    frames: dict
    info: dict

    def picture(self, path) -> Path:
        """One strip a mode (images), or one scatter panel a mode (2-D points)."""
        rows = list(self.frames.values())
        if rows[0].ndim == 4:
            return save_png(image_grid(torch.cat(rows), nrow=len(rows[0])), path)
        a, b = self.info["seeds"]
        return scatter_png({f"{m} ({len(x)} frames)": x for m, x in self.frames.items()}, path,
                           title=f"seeds {a} → {b}")


INTERPOLATION_MODES = ("slerp", "linear", "both")


def interpolate(model, seeds=(3, 7), *, frames: int = 9, mode: str = "slerp", sampler: str | None = None,
                nfe: int | None = None, device: str = "cpu") -> Interpolation:
    """Sample `frames` noises from seed a's initial noise to seed b's (each the first noise `sample(..., seed=S)`
    draws), interpolated by slerp, linear or both, with the model's deterministic sampler (or `sampler`)."""
    try:
        pair = tuple(int(s) for s in (seeds.split(",") if isinstance(seeds, str) else seeds))
    except (TypeError, ValueError):
        pair = ()
    if len(pair) != 2:
        raise FewstepError(f"{option('seeds', seeds)}: expected two integers a,b")
    frames = A.check("frames", frames, A.integer(2, 1000))
    mode = A.check("mode", mode, A.choice(INTERPOLATION_MODES))
    ckpt = load(model, device=device)
    shape = tuple(sample_shape(ckpt.card))
    out, info = {}, {}
    for m in (["slerp", "linear"] if mode == "both" else [mode]):
        noise = interpolation_noises(shape, pair, frames, m)
        out[m], info = sample_same_noise(ckpt, noise, seed=pair[0], sampler=sampler, nfe=nfe)
    return Interpolation(out, {**info, "seeds": list(pair), "mode": mode})


def train_classifier(data, out, *, resolution: int | None = None, iters: int | None = None, seed: int = 0,
                     progress: bool = True) -> dict:
    """Train the feature classifier `evaluate(..., classifier=out)` measures in (its Fréchet distance, KID and
    precision/recall) on labelled images: `data` a folder with one sub-folder of images per class, or digits /
    mnist. Writes `out` (refused if it holds a model or a classifier) and returns its record (held-out accuracy
    among it)."""
    from fewstep.featnet import train_classifier as _train
    return _train(str(data), None if resolution is None else A.check("resolution", resolution, A.resolution),
                  None if iters is None else A.check("iters", iters, A.iterations), A.check("seed", seed, A.seed),
                  out_dir=out, progress=progress)


def import_model(source, out, *, feature_layer: str | None = None, resolution: int | None = None) -> Checkpoint:
    """Convert a diffusers folder or an NVlabs/edm snapshot (.pkl) into a fewstep checkpoint folder `out`
    (refused if `out` already holds a model) and return it, loaded. `resolution`: a flow-matching pipeline's
    image side (Flux has none of its own: default 1024 at an 8× autoencoder; its shift depends on it)."""
    from fewstep.interop import import_model as _import
    options = {"feature_layer": feature_layer} if feature_layer else {}
    if resolution is not None:
        options["resolution"] = A.check("resolution", resolution, A.resolution)
    out = _import(source, out, **options)
    return load_checkpoint(out)


def export_model(model, out, *, nfe: int | None = None, format: str = "diffusers") -> Path:
    """Write `model` (a fewstep folder, a built-in name or a loaded model from a folder) as a diffusers pipeline
    folder `out` whose sampler reproduces `sample` (grid, AFS, NFE; an SFD-v student: one of its trained `nfe`).
    Returns the folder."""
    from fewstep.interop.diffusers_export import export_diffusers
    from fewstep.models import resolve_model
    A.check("format", format, A.choice(("diffusers",)))
    path = model.path if isinstance(model, Checkpoint) else resolve_model(model)
    if path is None:
        raise FewstepError("export_model: the model has no folder; save it first (or pass its folder)")
    return export_diffusers(Path(path), Path(out), nfe=None if nfe is None else A.check("nfe", nfe, A.nfe))


def run_bench(out, preset: str | None = None, *, spec=None, progress: bool = True, device: str = "auto",
          distill_only: bool = False, as_reached: bool = False, **fields) -> dict | None:
    """Every method side by side on one teacher, into the folder `out` (finished work there is reused): a
    preset (`fewstep.benchspec.PRESETS`: toy, digits, digits-defaults, digits-authors, mnist, mnist-authors,
    demo) with `fields` of `fewstep.benchspec.BenchSpec` over it (teacher, data, methods, nfe, n_samples, seeds,
    ..., and each method's settings, flat as `sfd_batch=64` or nested as `sfd={"sfd_batch": 64}`), a spec of your
    own from `fields` (at least `teacher` and `data`), or a ready `spec`. Writes report.md there and returns the
    summary it is written from (None with `distill_only`, which trains every model the bench needs and measures
    nothing). `as_reached` trains nothing and measures each distillation as far as it has got (its latest
    snapshot; another process may still be training it): its rows name the iterations reached, and rows whose
    run has not started are left out (the summary's `not_started`)."""
    from fewstep.bench import Bench
    from fewstep.benchspec import BenchSpec
    from fewstep.benchspec import preset as preset_spec
    if spec is None:
        if preset is not None:
            spec = preset_spec(preset, **fields)
        elif not fields.get("teacher") or not fields.get("data"):
            raise FewstepError("bench: pass preset=, or both teacher= and data=")
        else:  # an unknown field is named by from_fields
            spec = BenchSpec.from_fields(**fields)
    elif preset is not None or fields:
        raise FewstepError("bench: give spec= alone, or a preset and fields")
    if distill_only and as_reached:
        raise FewstepError("bench: distill_only trains and as_reached measures without training; pass one")
    b = Bench(spec, out, device=str(pick_device(A.check("device", device, A.device))), progress=progress,
              as_reached=as_reached)
    if distill_only:
        b.distill()
        return None
    return b.run()
