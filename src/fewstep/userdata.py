"""The user's own data, read safely: a folder of PNG / JPEG images (size-checked before decoding, resized as
read) or a ``.npy`` / ``.npz`` array of images or 2-D points (its size checked against the free memory before
loading), as float32 tensors in [-1, 1]; and sample files written by ``fewstep sample``."""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from fewstep.errors import FewstepError, option

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


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


# ----------------------------------------------------------------------------- user folders


def read_image_folder(folder: Path, resolution) -> tuple[torch.Tensor, dict]:

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
                    f"pass {option('resolution', shown='N')} to resize them all to one square size"
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
        raise FewstepError(f"image file {str(path)!r} is {w}x{h}: without {option('resolution')} fewstep trains "
                           "at the images' "
                           f"own size, at most {MAX_NATIVE_SIDE}; pass {option('resolution', shown='N')} (e.g. "
                           "64) to resize them")


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


def read_array_file(path: Path, resolution) -> tuple[torch.Tensor, dict]:
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
    return checked_samples(arr, str(path))


def checked_samples(arr: np.ndarray, where: str) -> torch.Tensor:
    """An array of samples (images (N, C, H, W) or points (N, D), finite numbers) as a float tensor of its own."""
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise FewstepError(f"{where}: samples have dtype {arr.dtype}; expected float values")
    if arr.ndim not in (2, 4) or len(arr) == 0:
        raise FewstepError(f"{where}: samples have shape {arr.shape}; expected images (N, C, H, W) or points (N, D)")
    if not np.isfinite(arr).all():
        raise FewstepError(f"{where}: samples contain NaN or infinite values")
    return torch.from_numpy(np.array(arr, dtype=np.float32))  # a copy: a .npy is mapped read-only
