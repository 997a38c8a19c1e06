"""Perceptual distances for SFD's 1-NFE stage: LPIPS from a converted local file, checked against its formula
written out here; the classifier distance; and SFD's use of them with the authors' weighting."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from fewstep.checkpoint import load_checkpoint
from fewstep.sfd.config import SFDConfig
from fewstep.sfd.method import SFD
from fewstep.errors import FewstepError
from fewstep.featnet import load_classifier
from fewstep.models import builtin_models
from fewstep.perceptual import LPIPS_CHANNELS, ClassifierDistance, load_lpips
from fewstep.train import TrainConfig, Trainer

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "convert_lpips.py"
VGG_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)  # torchvision's vgg16().features conv indices
VGG_CHANNELS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)


def _converter():
    spec = importlib.util.spec_from_file_location("convert_lpips", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _random_sources(folder: Path, heads_layout: str = "lpips"):
    """A torchvision-shaped VGG16 state dict (with its classifier, which the converter drops) and LPIPS heads."""
    gen = torch.Generator().manual_seed(0)
    vgg, cin = {}, 3
    for idx, cout in zip(VGG_CONVS, VGG_CHANNELS):
        vgg[f"features.{idx}.weight"] = torch.randn(cout, cin, 3, 3, generator=gen) * math.sqrt(2 / (9 * cin))
        vgg[f"features.{idx}.bias"] = torch.randn(cout, generator=gen) * 0.01
        cin = cout
    vgg["classifier.0.weight"] = torch.randn(8, 8, generator=gen)
    heads = [torch.rand(1, c, 1, 1, generator=gen) for c in LPIPS_CHANNELS]
    torch.save(vgg, folder / "vgg16.pth")
    torch.save({f"lin{k}.model.1.weight": h for k, h in enumerate(heads)} if heads_layout == "lpips" else heads,
               folder / "heads.pth")
    return vgg, heads


def _reference_lpips(vgg: dict, heads: list, a: torch.Tensor, b: torch.Tensor, size: int) -> torch.Tensor:
    """LPIPS written out: bilinear resize, ImageNet normalisation of the values as given, VGG16 with average
    pooling, unit-normalised relu1_2 ... relu5_3 maps, head-weighted squared differences averaged over positions."""
    mean = torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)

    def maps(x):
        x = F.interpolate(x.expand(-1, 3, -1, -1), size=size, mode="bilinear")
        x = (x - mean) / std
        out, convs = [], iter(VGG_CONVS)
        for block in (2, 2, 3, 3, 3):
            for _ in range(block):
                i = next(convs)
                x = F.relu(F.conv2d(x, vgg[f"features.{i}.weight"], vgg[f"features.{i}.bias"], padding=1))
            out.append(x)
            x = F.avg_pool2d(x, 2)
        return out

    total = 0
    for fa, fb, w in zip(maps(a), maps(b), heads):
        na = fa / (fa.square().sum(1, keepdim=True).sqrt() + 1e-10)
        nb = fb / (fb.square().sum(1, keepdim=True).sqrt() + 1e-10)
        total = total + ((na - nb).square() * w).sum(1).mean((1, 2))
    return total


@pytest.mark.parametrize("layout", ["lpips", "piq"])
def test_converted_lpips_equals_its_formula(tmp_path, layout):
    vgg, heads = _random_sources(tmp_path, layout)
    out = _converter().convert(tmp_path / "vgg16.pth", tmp_path / "heads.pth", tmp_path / "lpips.safetensors")
    net = load_lpips(out, resolution=32)
    a, b = torch.rand(3, 1, 8, 8) * 2 - 1, torch.rand(3, 1, 8, 8) * 2 - 1
    ours, ref = net(a, b), _reference_lpips(vgg, heads, a, b, 32)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6)
    assert ours.shape == (3,) and (ours > 0).all()
    assert torch.equal(net(a, a), torch.zeros(3))  # identical images: distance 0
    torch.testing.assert_close(net(b, a), ours)  # symmetric
    x = a.clone().requires_grad_(True)
    net(x, b).sum().backward()  # differentiable in the student's image; the net itself stays frozen
    assert x.grad.abs().sum() > 0 and not any(p.requires_grad for p in net.parameters())


def test_lpips_files_are_checked(tmp_path):
    with pytest.raises(FewstepError, match="convert_lpips.py"):
        load_lpips(tmp_path / "missing.safetensors")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(FewstepError, match="not written by scripts/convert_lpips.py"):
        load_lpips(tmp_path / "other.safetensors")
    _random_sources(tmp_path)
    torch.save([torch.zeros(1, 3, 1, 1)] * 5, tmp_path / "bad-heads.pth")
    conv = _converter()
    with pytest.raises(FewstepError, match="head 0 has 3 weights, expected 64"):
        conv.convert(tmp_path / "vgg16.pth", tmp_path / "bad-heads.pth", tmp_path / "x.safetensors")
    assert conv.main(["--vgg16", str(tmp_path / "nope.pth"), "--heads", str(tmp_path / "heads.pth"),
                      "--out", str(tmp_path / "y.safetensors")]) == 2
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()


def test_classifier_distance_is_lpips_shaped():
    from fewstep.data import load_dataset
    x = load_dataset("digits").x[:32]
    d = ClassifierDistance(load_classifier("digits", 8))
    assert torch.equal(d(x, x), torch.zeros(32))
    far, near = d(x, x.flip(0)), d(x, (x + 0.05 * torch.randn_like(x)).clamp(-1, 1))
    assert ((far >= 0) & (far <= 4)).all() and far.mean() > 10 * near.mean()


def test_sfd_adds_the_perceptual_term_with_the_authors_weight(tiny_digits_teacher):
    """The authors add the per-sample distance to every pixel's L1: C·H·W times it against the summed L1."""
    teacher = load_checkpoint(tiny_digits_teacher)
    x, y = torch.rand(4, 1, 8, 8) * 2 - 1, torch.rand(4, 1, 8, 8) * 2 - 1
    dist = ClassifierDistance(load_classifier("digits", 8))(x, y).mean()
    l1 = (x - y).abs().flatten(1).sum(1).mean()
    summed = SFD(teacher, SFDConfig(nfe=[2], perceptual="classifier"))
    torch.testing.assert_close(summed._loss(x, y, last=True), l1 + 64 * dist)
    torch.testing.assert_close(summed._loss(x, y, last=False), l1)  # the last step only
    mean = SFD(teacher, SFDConfig(nfe=[2], perceptual="classifier", loss_reduction="mean"))
    torch.testing.assert_close(mean._loss(x, y, last=True), (x - y).abs().mean() + dist)
    weighted = SFD(teacher, SFDConfig(nfe=[2], perceptual="classifier", perceptual_weight=0.5))
    torch.testing.assert_close(weighted._loss(x, y, last=True), l1 + 0.5 * dist)
    assert SFD(teacher, SFDConfig(nfe=[2])).perceptual_net is None  # auto: nothing in the first stage


def test_stage2_auto_perceptual_and_condition(tiny_digits_teacher, tmp_path):
    """--stage2 on built-in digits picks the shipped classifier (the authors' perceptual term, offline); the
    1-NFE student takes its own N = 3 by default, or the first stage's mode."""
    first = SFD(load_checkpoint(tiny_digits_teacher), SFDConfig(nfe=[3, 5]))
    Trainer(first, TrainConfig(steps=1, batch=4, lr=1e-5, progress=False, n_preview=0), tmp_path / "v").run()
    sfdv = load_checkpoint(tmp_path / "v")
    own = SFD(sfdv, SFDConfig(stage2=True))
    assert own.cfg.perceptual == "classifier" and isinstance(own.perceptual_net, ClassifierDistance)
    assert own.sampler_card()["step"] == 3
    theirs = SFD(sfdv, SFDConfig(stage2=True, stage2_condition="teacher", perceptual=None))
    assert theirs.perceptual_net is None and theirs.sampler_card()["step"] == 7
    with pytest.raises(FewstepError, match="lpips_weights=FILE"):
        SFD(sfdv, SFDConfig(stage2=True, perceptual="lpips"))


def test_stage2_on_points_has_no_perceptual_term_to_miss(tmp_path, capsys):
    first = SFD(load_checkpoint(builtin_models()["gmm8-teacher"]), SFDConfig(nfe=[1, 3]))
    Trainer(first, TrainConfig(steps=1, batch=4, lr=1e-5, progress=False, n_preview=0), tmp_path / "v").run()
    capsys.readouterr()
    stage2 = SFD(load_checkpoint(tmp_path / "v"), SFDConfig(stage2=True))
    assert stage2.perceptual_net is None and stage2.cfg.perceptual is None
    assert "perceptual" not in capsys.readouterr().err  # an image model's stage is told LPIPS is missing
