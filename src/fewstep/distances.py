"""Distances between two sets of samples or features, as numbers: the Fréchet distance (with its interval over
random halves), KID, k-NN precision and recall, sliced Wasserstein and MMD. fewstep.metrics decides which apply to a data set and in which feature
space."""
from __future__ import annotations

import hashlib
import math
from collections import OrderedDict

import numpy as np
import torch

from fewstep.errors import FewstepError

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
