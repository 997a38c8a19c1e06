"""Perceptual distances for SFD's 1-NFE second stage: a per-sample number that is small when two images
look alike, differentiable in the first image.

- `LPIPS`: VGG16 features with the LPIPS linear heads, as the SFD authors use it (piq's LPIPS with
  average pooling; images resized bilinearly to 224 and normalised with ImageNet's mean and std as
  they are given, in [-1, 1]). Its weights come from a local file written once by
  `scripts/convert_lpips.py` from torchvision's VGG16 file and the LPIPS heads; nothing is downloaded.
- `ClassifierDistance`: the same construction on fewstep's shipped digit classifier (its three
  convolution maps, unit-normalised along channels, squared differences averaged over positions and
  layers, no learned heads): the offline perceptual net for the built-in digits and MNIST. Its values
  lie in [0, 4], the scale of LPIPS's.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from torch import nn

from fewstep.errors import FewstepError, option
from fewstep.featnet import available_classifiers, load_classifier

# torchvision's vgg16().features up to relu5_3: channel counts, "P" a 2x2 pooling
VGG16_LAYOUT = (64, 64, "P", 128, 128, "P", 256, 256, 256, "P", 512, 512, 512, "P", 512, 512, 512)
LPIPS_TAPS = (3, 8, 15, 22, 29)            # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (torchvision indices)
LPIPS_CHANNELS = (64, 128, 256, 512, 512)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
LPIPS_FORMAT = "fewstep-lpips-vgg16"
EPS = 1e-10


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Unit length along channels (LPIPS's feature normalisation)."""
    return x / (x.square().sum(1, keepdim=True).sqrt() + EPS)


def _layer_distances(maps_a: list, maps_b: list, heads=None) -> torch.Tensor:
    """(B, layers): per layer, the (head-weighted) squared difference of unit features, averaged over positions."""
    out = []
    for i, (a, b) in enumerate(zip(maps_a, maps_b)):
        d = (_unit(a) - _unit(b)).square()
        d = (d * heads[i]).sum(1) if heads is not None else d.sum(1)
        out.append(d.mean((1, 2)))
    return torch.stack(out, 1)


class LPIPS(nn.Module):
    """LPIPS (VGG16) as the SFD authors compute it: d(a, b) = Σ_layers mean_positions Σ_c w_c·(â_c − b̂_c)²."""
    def __init__(self, resolution: int = 224, pooling: str = "avg"):
        super().__init__()
        if pooling not in ("avg", "max"):
            raise FewstepError(f"LPIPS pooling {pooling!r}: expected avg or max")
        if resolution < 16:
            raise FewstepError(f"LPIPS resolution {resolution}: expected at least 16 (four 2x poolings)")
        layers, cin = [], 3
        for v in VGG16_LAYOUT:
            if v == "P":
                layers.append(nn.AvgPool2d(2, 2) if pooling == "avg" else nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU()]
                cin = v
        self.features = nn.Sequential(*layers)
        self.heads = nn.ParameterList(nn.Parameter(torch.zeros(1, c, 1, 1)) for c in LPIPS_CHANNELS)
        self.resolution = int(resolution)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)

    def maps(self, x: torch.Tensor) -> list:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise FewstepError(f"LPIPS input: expected (N, 1 or 3, H, W) images, got {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            x = F.interpolate(x, size=self.resolution, mode="bilinear")
        x = (x - self.mean) / self.std
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in LPIPS_TAPS:
                out.append(x)
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return _layer_distances(self.maps(a), self.maps(b), list(self.heads)).sum(1)


def load_lpips(path, resolution: int = 224, device=None) -> LPIPS:
    """LPIPS from a file written by scripts/convert_lpips.py (safetensors: VGG16 features + heads)."""
    path = Path(path)
    if not path.is_file():
        raise FewstepError(f"{option('lpips_weights', path)}: no such file; convert VGG16 and the LPIPS heads once "
                           "with `python scripts/convert_lpips.py --vgg16 vgg16-397923af.pth --heads vgg.pth --out "
                           f"{path}` (fewstep never downloads weights)")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise FewstepError(f"{option('lpips_weights', path)}: not a safetensors file ({e})") from None
    if meta.get("format") != LPIPS_FORMAT:
        raise FewstepError(f"{option('lpips_weights', path)}: not written by scripts/convert_lpips.py "
                           f"(metadata format {meta.get('format')!r}, expected {LPIPS_FORMAT!r})")
    net = LPIPS(resolution, pooling=meta.get("pooling", "avg"))
    want = net.state_dict()
    missing = sorted(set(want) - set(state))
    wrong = sorted(k for k in set(want) & set(state) if state[k].shape != want[k].shape)
    if missing or wrong or set(state) - set(want):
        raise FewstepError(f"{option('lpips_weights', path)}: tensors do not match VGG16 + LPIPS heads "
                           f"(missing {missing[:3]}, wrong shape {wrong[:3]}, unexpected {sorted(set(state) - set(want))[:3]})")
    net.load_state_dict(state)
    return net.to(device) if device is not None else net


class ClassifierDistance(nn.Module):
    """LPIPS's construction on a digit classifier's convolution maps, with uniform weights: the mean over
    its three layers of the squared difference of unit-normalised features, averaged over positions."""
    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return _layer_distances(self.classifier.feature_maps(a), self.classifier.feature_maps(b)).mean(1)


def perceptual_distance(kind: str, data: dict, device, lpips_weights=None, lpips_resolution: int = 224) -> nn.Module:
    """The second stage's perceptual net: "lpips" from its weight file, or "classifier": the shipped
    classifier of the teacher's data set (built-in digits or MNIST at their resolutions)."""
    if kind == "lpips":
        return load_lpips(lpips_weights, lpips_resolution, device)
    if kind != "classifier":
        raise FewstepError(f"{option('perceptual', kind)}: expected classifier or lpips")
    name, shape = data.get("name"), data.get("shape") or [0, 0, 0]
    if (name, shape[-1]) not in available_classifiers():
        raise FewstepError(f"{option('perceptual', 'classifier')}: fewstep ships classifiers for "
                           f"{', '.join(f'{n} at {r}x{r}' for n, r in available_classifiers())}, not for the "
                           f"teacher's data {name!r} at {shape[-1]}x{shape[-1]}; use {option('perceptual', 'lpips')}")
    return ClassifierDistance(load_classifier(name, shape[-1])).to(device)
