"""LoRA students: a low-rank adapter trained on the teacher's own weights instead of a full copy.

The adapter is peft's (the library diffusers uses for LoRA), added to the diffusers network inside a fewstep
network (a UNet2DModel, Stable Diffusion's or SDXL's UNet2DConditionModel, SD3's or Flux's transformer) under
the name "fewstep". Its B matrices start at zero, so the student starts as its teacher. One set of weights is
in memory: the student is the network with the adapter, the teacher is the same network with it switched off
(`TeacherView`). A student's card names the adapter (`net.lora`), so the network is rebuilt with it and its
weights load key for key; `export_lora` writes it as the diffusers LoRA file a pipeline's `load_lora_weights`
reads.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

from torch import nn

from fewstep.components import require
from fewstep.errors import FewstepError, option

ADAPTER = "fewstep"
# diffusers' own LoRA training scripts' choice: the attention projections
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# the pipeline class whose save_lora_weights writes a network's LoRA, and the keyword it takes it by
PIPELINE_LORA = {"diffusers-unet2d-cond": ("StableDiffusionPipeline", "unet"),
                 "diffusers-unet2d-xl": ("StableDiffusionXLPipeline", "unet"),
                 "diffusers-sd3-transformer": ("StableDiffusion3Pipeline", "transformer"),
                 "diffusers-flux-transformer": ("FluxPipeline", "transformer")}


def lora_spec(rank: int, alpha: float | None = None, targets=None) -> dict:
    """The card's description of an adapter: rank, alpha (default: the rank, a scale of 1) and target modules."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise FewstepError(f"{option('lora', rank)}: expected a rank >= 1")
    alpha = float(rank if alpha is None else alpha)
    if not alpha > 0:
        raise FewstepError(f"{option('lora_alpha', alpha)}: expected a positive number")
    targets = list(DEFAULT_TARGETS if not targets else targets)
    if not all(isinstance(t, str) and t for t in targets):
        raise FewstepError(f"{option('lora_targets', targets)}: expected module names (e.g. to_q,to_k,to_v,to_out.0)")
    return {"rank": rank, "alpha": alpha, "targets": targets}


def diffusers_module(net: nn.Module) -> nn.Module:
    """The diffusers model inside a fewstep network, which carries the adapter."""
    module = getattr(net, "unet", None) or getattr(net, "transformer", None)
    if module is None or not hasattr(module, "add_adapter"):
        raise FewstepError(f"{option('lora')}: network type {net.config.get('type')!r} has no diffusers model to "
                           "adapt; LoRA students are for diffusers teachers (fewstep's own networks are small enough "
                           "to copy)")
    return module


def add_lora(net: nn.Module, spec: dict) -> nn.Module:
    """Add the adapter `spec` to `net` (in place) and record it on its config; only the adapter trains."""
    peft = require("peft", "lora")
    module = diffusers_module(net)
    names = [n for n, _ in module.named_modules()]
    missing = [t for t in spec["targets"] if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise FewstepError(f"{option('lora_targets')}: no module named {', '.join(missing)} in this "
                           f"{type(module).__name__}")
    config = peft.LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], target_modules=list(spec["targets"]),
                             init_lora_weights=True)
    module.add_adapter(config, adapter_name=ADAPTER)
    for name, p in module.named_parameters():
        p.requires_grad_(f".{ADAPTER}." in f".{name}.")
    net.config["lora"] = dict(spec)
    return net


def lora_parameters(net: nn.Module) -> int:
    return sum(p.numel() for n, p in diffusers_module(net).named_parameters() if f".{ADAPTER}." in f".{n}.")


@contextlib.contextmanager
def adapter_off(net: nn.Module):
    """The network as it was before the adapter (and without an SFD-v step condition): the teacher."""
    module = diffusers_module(net)
    step_cond = net.step_cond
    module.disable_adapters()
    net.step_cond = None
    try:
        yield net
    finally:
        module.enable_adapters()
        net.step_cond = step_cond


class TeacherView(nn.Module):
    """The teacher a LoRA student is trained against: the student's own network with the adapter off."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.config = {k: v for k, v in net.config.items() if k not in ("lora", "step_condition")}

    @property
    def step_cond(self):
        return None

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        """The teacher's own weights under their own names (the adapter, the step condition and peft's
        `base_layer` level left out): the same content hash as the teacher without the adapter, so the
        trajectory cache is shared with full-copy runs."""
        out = {} if destination is None else destination
        for k, v in self.net.state_dict(keep_vars=keep_vars).items():
            if f".{ADAPTER}." not in f".{k}." and not k.startswith("step_cond."):
                out[prefix + k.replace(".base_layer.", ".")] = v
        return out

    def forward(self, *args, **kwargs):
        kwargs.pop("step", None)
        with adapter_off(self.net):
            return self.net(*args, **kwargs)


def remove_lora(net: nn.Module) -> None:
    """Take the adapter out again (the teacher a run borrowed goes back as it came)."""
    diffusers_module(net).unload_lora()
    net.config.pop("lora", None)


def fuse_lora(net: nn.Module) -> nn.Module:
    """`net` (a copy, changed in place) with the adapter merged into the weights it adapts and removed: a plain
    network computing the same function (up to float rounding)."""
    diffusers_module(net).fuse_lora(adapter_names=[ADAPTER])
    remove_lora(net)
    return net


def export_lora(net: nn.Module, folder: Path) -> Path:
    """Write the adapter as a diffusers LoRA file (`pytorch_lora_weights.safetensors`) that the teacher's pipeline
    class loads with `pipe.load_lora_weights(folder)`."""
    peft = require("peft", "lora")
    diffusers = require("diffusers", "diffusers")
    kind = net.config.get("type")
    if kind not in PIPELINE_LORA:
        raise FewstepError(f"export: a {kind} network has no diffusers pipeline that loads LoRA files; the exported "
                           "pipeline folder carries the student with its adapter fused")
    pipeline, part = PIPELINE_LORA[kind]
    module = diffusers_module(net)
    layers = {k: v.detach().float().cpu().contiguous() for k, v in
              peft.utils.get_peft_model_state_dict(module, adapter_name=ADAPTER).items()}
    spec = net.config["lora"]
    metadata = {"r": spec["rank"], "lora_alpha": spec["alpha"], "target_modules": list(spec["targets"])}
    getattr(diffusers, pipeline).save_lora_weights(str(folder), **{f"{part}_lora_layers": layers,
                                                                    f"{part}_lora_adapter_metadata": metadata})
    return Path(folder) / "pytorch_lora_weights.safetensors"
