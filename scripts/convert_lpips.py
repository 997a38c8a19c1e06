"""Convert VGG16 and the LPIPS heads, once, into the weight file `--perceptual lpips` reads.

    python scripts/convert_lpips.py --vgg16 vgg16-397923af.pth --heads vgg.pth --out lpips-vgg16.safetensors
    fewstep distill sfd --stage2 --teacher runs/sfdv --lpips-weights lpips-vgg16.safetensors --out runs/sfd1

--vgg16: torchvision's ImageNet VGG16 state dict (`vgg16-397923af.pth`, keys `features.N.weight`; the
classifier layers are dropped). --heads: the LPIPS linear heads, either the LPIPS package's `weights/v0.1/vgg.pth`
(keys `lin0.model.1.weight` ... `lin4.model.1.weight`) or piq's `lpips_weights.pt` (a list of five tensors).
Both files are read as plain tensors (`torch.load(weights_only=True)`: no code in them runs). The output is a
safetensors file with the sha256 of both sources in its metadata. `--pooling avg` (default) replaces VGG's
max-pooling by average pooling, as the SFD authors' LPIPS (piq, replace_pooling=True) does; `max` keeps VGG's.
fewstep never downloads these files: fetch them yourself where you are allowed to.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from fewstep.checkpoint import atomic_write
from fewstep.errors import FewstepError
from fewstep.hashing import sha256_file
from fewstep.perceptual import LPIPS, LPIPS_CHANNELS, LPIPS_FORMAT


def _load(path: Path, what: str):
    if not path.is_file():
        raise FewstepError(f"{what} {path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle with anything but tensors and containers is refused by weights_only
        raise FewstepError(f"{what} {path}: not a plain tensor file ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def _heads(obj, path: Path) -> list:
    if isinstance(obj, dict) and all(f"lin{k}.model.1.weight" in obj for k in range(5)):
        heads = [obj[f"lin{k}.model.1.weight"] for k in range(5)]
    elif isinstance(obj, (list, tuple)) and len(obj) == 5 and all(isinstance(t, torch.Tensor) for t in obj):
        heads = list(obj)
    else:
        raise FewstepError(f"--heads {path}: expected the LPIPS package's vgg.pth (lin0..lin4) or piq's "
                           "lpips_weights.pt (five tensors)")
    for k, (t, c) in enumerate(zip(heads, LPIPS_CHANNELS)):
        if t.numel() != c:
            raise FewstepError(f"--heads {path}: head {k} has {t.numel()} weights, expected {c} (VGG16's channels)")
    return [t.detach().float().reshape(1, c, 1, 1).contiguous() for t, c in zip(heads, LPIPS_CHANNELS)]


def convert(vgg16: Path, heads: Path, out: Path, pooling: str = "avg") -> Path:
    vgg, lin = _load(vgg16, "--vgg16"), _heads(_load(heads, "--heads"), heads)
    if not isinstance(vgg, dict):
        raise FewstepError(f"--vgg16 {vgg16}: expected a state dict")
    net = LPIPS(pooling=pooling)
    want = net.state_dict()
    state = {}
    for k, t in want.items():
        if k.startswith("features."):
            if k not in vgg:
                raise FewstepError(f"--vgg16 {vgg16}: no tensor {k!r}; expected torchvision's vgg16 state dict")
            if tuple(vgg[k].shape) != tuple(t.shape):
                raise FewstepError(f"--vgg16 {vgg16}: {k} has shape {tuple(vgg[k].shape)}, expected {tuple(t.shape)}")
            state[k] = vgg[k].detach().float().contiguous()
    for k, t in enumerate(lin):
        state[f"heads.{k}"] = t
    meta = {"format": LPIPS_FORMAT, "pooling": pooling, "vgg16_sha256": sha256_file(vgg16),
            "heads_sha256": sha256_file(heads), "heads_file": heads.name, "vgg16_file": vgg16.name}
    atomic_write(out, lambda p: save_file(state, p, metadata=meta))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vgg16", type=Path, required=True, help="torchvision's vgg16 state dict (.pth)")
    ap.add_argument("--heads", type=Path, required=True, help="LPIPS heads: vgg.pth or piq's lpips_weights.pt")
    ap.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    ap.add_argument("--pooling", choices=["avg", "max"], default="avg",
                    help="VGG's pooling: avg (the SFD authors', default) or max (VGG's own)")
    args = ap.parse_args(argv)
    try:
        out = convert(args.vgg16, args.heads, args.out, args.pooling)
    except FewstepError as e:
        print(f"convert_lpips: error: {e}", file=sys.stderr)
        return 2
    print(f"LPIPS weights written to {out} (pooling {args.pooling}); use: --perceptual lpips --lpips-weights {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
