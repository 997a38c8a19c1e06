"""Pictures: image grids (Pillow) and 2-D scatter plots (matplotlib), written atomically."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fewstep.checkpoint import atomic_write


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] → (N, H, W, C) uint8."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def image_grid(x: torch.Tensor, nrow: int | None = None, pad: int = 1, scale: int | None = None) -> Image.Image:
    """Tile images into one picture; small images are enlarged (nearest) so they stay visible."""
    imgs = to_uint8(x)
    n, h, w, c = imgs.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    ncol = int(math.ceil(n / nrow))
    canvas = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = imgs[i]
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    if scale is None:
        scale = max(1, 256 // max(canvas.shape[:2]))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return img


def picture_format(path: Path) -> str:
    """The image format a picture's file name asks for (.png, .jpg, .webp, ...); PNG for a name without a
    known suffix."""
    return Image.registered_extensions().get(Path(path).suffix.lower(), "PNG")


def save_png(img: Image.Image, path: str | Path) -> Path:
    """Write a picture in the format its name asks for (PNG unless the suffix names another)."""
    path = Path(path)
    atomic_write(path, lambda p: img.save(p, format=picture_format(path)))
    return path


def scatter_png(points: dict[str, torch.Tensor], path: str | Path, title: str = "", lim: float = 3.5) -> Path:
    """One panel per named 2-D point set, on shared axes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(points), figsize=(3.2 * len(points), 3.4), squeeze=False)
    for ax, (name, pts) in zip(axes[0], points.items()):
        p = pts.detach().float().cpu().numpy()
        ax.scatter(p[:, 0], p[:, 1], s=1.5, alpha=0.5)
        ax.set_title(name, fontsize=9)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fmt = picture_format(path).lower()
    atomic_write(path, lambda p: fig.savefig(p, format=fmt if fmt in ("png", "jpeg", "pdf", "svg") else "png", dpi=110))
    plt.close(fig)
    return path


def save_samples_picture(x: torch.Tensor, path: str | Path, title: str = "") -> Path:
    """A grid for images, a scatter plot for 2-D points."""
    if x.ndim == 4:
        return save_png(image_grid(x), path)
    return scatter_png({title or "samples": x}, path)


def pairs_picture(xa: torch.Tensor, xb: torch.Tensor, path: str | Path, name_a: str, name_b: str) -> Path:
    """Two models' samples from the same noises: alternating rows of A and B (images), or two panels."""
    if xa.ndim != 4:
        return scatter_png({f"A: {name_a}": xa, f"B: {name_b}": xb}, path, title="same noises")
    per_row = min(8, len(xa))
    rows = []
    for i in range(0, len(xa), per_row):
        ca, cb = xa[i:i + per_row], xb[i:i + per_row]
        pad = per_row - len(ca)
        if pad:  # a short last block: fill with blank (white) cells
            blank = torch.ones((pad, *xa.shape[1:]))
            ca, cb = torch.cat([ca, blank]), torch.cat([cb, blank])
        rows += [ca, cb]
    return save_png(image_grid(torch.cat(rows), nrow=per_row), path)
