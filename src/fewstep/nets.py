"""Pure networks: they map (x_in, t_in) to an output of x's shape and know nothing of σ or schedules.

Both nets share one interface:
    net(x, t, step=None, class_labels=None, return_features=False)
`t` is the time input the Denoiser chose (a table index or a continuous noise code), one per sample.
`step` is the optional step condition of SFD-v (the student's number of timestamps N, one per
sample); its layers exist only after `add_step_condition(kind)`: "zero" (an embedding of N added to the
time embedding, zero-initialised, so the network starts as an exact copy) or "authors" (as the SFD
authors build it: a per-block affine of N's embedding beside each block's time modulation, xavier init).
`return_features=True` also returns the penultimate feature map (SFDDM's hidden-feature loss).
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from fewstep.errors import FewstepError


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of a (B,) float tensor, as in DDPM/ADM."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class StepCondition(nn.Module):
    """Embedding of the step count N added to the time embedding; zero output at initialisation."""

    def __init__(self, emb_dim: int):
        super().__init__()
        self.freq_dim = min(64, emb_dim)
        self.fc1 = nn.Linear(self.freq_dim, emb_dim)
        self.fc2 = nn.Linear(emb_dim, emb_dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, step: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(timestep_embedding(step, self.freq_dim, max_period=100.0))))


class BlockStepCondition(nn.Module):
    """SFD-v's step condition as the SFD authors build it: N's sinusoidal embedding through two linear
    layers, each followed by SiLU, then one linear map per residual block whose output is added to that
    block's projection of the time embedding (its time modulation). Xavier-uniform weights and zero
    biases, as theirs: the student does not start as an exact copy of its teacher."""

    def __init__(self, emb_dim: int, block_dims: list):
        super().__init__()
        self.freq_dim = min(64, emb_dim)
        self.fc1 = nn.Linear(self.freq_dim, emb_dim)
        self.fc2 = nn.Linear(emb_dim, emb_dim)
        self.blocks = nn.ModuleList(nn.Linear(emb_dim, int(d)) for d in block_dims)
        for layer in (self.fc1, self.fc2, *self.blocks):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, step: torch.Tensor) -> list:
        """One (B, d_k) addition per block."""
        e = F.silu(self.fc2(F.silu(self.fc1(timestep_embedding(step, self.freq_dim, max_period=100.0)))))
        return [block(e) for block in self.blocks]


STEP_CONDITIONS = ("authors", "zero")


def _step_kind(value) -> str | None:
    """A config's `step_condition`: False (none), True (the zero-initialised kind, as cards before the
    authors' kind said it) or a kind's name."""
    if value is False or value is None:
        return None
    kind = "zero" if value is True else value
    if kind not in STEP_CONDITIONS:
        raise FewstepError(f"step_condition {value!r}: expected one of {', '.join(STEP_CONDITIONS)}")
    return kind


@contextlib.contextmanager
def added_to_outputs(modules: list, values: list):
    """While active, each module's output gets its value added (per-call hooks: a copied network keeps
    no hook that points back at the original)."""
    handles = [m.register_forward_hook(lambda mod, inputs, out, v=v: out + v.to(out.dtype))
               for m, v in zip(modules, values)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class StepConditioned:
    """SFD-v's step condition for any fewstep network. A network names two places: the linear layer whose
    output the "zero" kind's embedding is added to (`_step_embedding_layer`) and each residual block's
    projection of the time embedding, which the "authors" kind modulates (`_step_block_layers`). For a
    fixed N both are constant additions to those layers' outputs, so `fold_step_condition` can move
    them into biases."""

    config: dict
    step_cond: nn.Module | None

    def _step_embedding_layer(self) -> nn.Linear:
        raise NotImplementedError

    def _step_block_layers(self) -> list:
        raise NotImplementedError

    @property
    def step_condition_kind(self) -> str | None:
        if self.step_cond is None:
            return None
        return "authors" if isinstance(self.step_cond, BlockStepCondition) else "zero"

    def add_step_condition(self, kind: str = "zero"):
        """Add SFD-v's step-condition layers of one kind (see STEP_CONDITIONS)."""
        kind = _step_kind(kind)
        if self.step_cond is not None:
            if kind != self.step_condition_kind:
                raise FewstepError(f"this network already has a {self.step_condition_kind!r} step condition")
            return self
        device = next(self.parameters()).device
        emb_dim = self._step_embedding_layer().out_features
        if kind == "zero":
            self.step_cond = StepCondition(emb_dim).to(device)
        else:
            self.step_cond = BlockStepCondition(emb_dim, [m.out_features for m in self._step_block_layers()]).to(device)
        self.config["step_condition"] = True if kind == "zero" else kind
        return self

    def _step_input(self, x, step) -> torch.Tensor | None:
        if self.step_cond is None:
            return None
        if step is None:
            raise FewstepError("this network has a step condition (SFD-v): pass the step count N")
        return torch.as_tensor(step, device=x.device).float().reshape(-1).expand(x.shape[0])

    def _step_term(self, step):
        """The "zero" kind's addition to the embedding layer's output (0 otherwise)."""
        return self.step_cond(step) if self.step_condition_kind == "zero" else 0

    def _block_step_context(self, step):
        """Around the network's body: the "authors" kind's per-block additions (nothing otherwise)."""
        if self.step_condition_kind != "authors":
            return contextlib.nullcontext()
        return added_to_outputs(self._step_block_layers(), self.step_cond(step))

    def _step_context(self, step, embedding: nn.Module):
        """Around a foreign network's body, which takes no step: either kind as additions to module outputs,
        the "zero" kind's to `embedding` (the module that outputs the time embedding), the "authors" kind's
        to each block's projection of it."""
        if self.step_condition_kind == "zero":
            return added_to_outputs([embedding], [self.step_cond(step)])
        return self._block_step_context(step)


def fold_step_condition(net: nn.Module, step: int) -> nn.Module:
    """A copy of a step-conditioned network for one N, without the condition: its additions for that N
    go into the biases of the layers they are added to, so the copy computes the same function as
    `net(x, t, step=N)` (up to float rounding) with no step input."""
    if getattr(net, "step_cond", None) is None:
        return net
    net = copy.deepcopy(net)
    cond, kind = net.step_cond, net.step_condition_kind
    device = next(net.parameters()).device
    n = torch.tensor([float(step)], device=device)
    with torch.no_grad():
        if kind == "zero":
            layers, values = [net._step_embedding_layer()], [cond(n)]
        else:
            layers, values = net._step_block_layers(), cond(n)
        for layer, v in zip(layers, values):
            if layer.bias is None:
                raise FewstepError(f"cannot fold the step condition: {type(layer).__name__} has no bias")
            layer.bias.add_(v[0].to(layer.bias.dtype))
    net.step_cond = None
    net.config["step_condition"] = False
    return net


class _ConditionedNet(StepConditioned, nn.Module):
    """Time, class and step-condition embeddings shared by UNet and MLP."""

    config: dict

    def _init_embeddings(self, emb_dim: int, freq_dim: int, num_classes: int):
        self.emb_dim, self.freq_dim = emb_dim, freq_dim
        self.time_mlp = nn.Sequential(nn.Linear(freq_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(num_classes, emb_dim) if num_classes else None
        self.step_cond = None

    def _step_embedding_layer(self) -> nn.Linear:
        return self.time_mlp[2]

    def _embed(self, x, t, step, class_labels):
        t = torch.as_tensor(t, device=x.device).float().reshape(-1).expand(x.shape[0])
        emb = self.time_mlp(timestep_embedding(t, self.freq_dim))
        if self.class_emb is not None:
            if class_labels is None:
                raise FewstepError("this network is class-conditional: pass class_labels")
            emb = emb + self.class_emb(class_labels)
        if self.step_condition_kind == "zero":
            emb = emb + self.step_cond(step)
        return emb


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(groups, cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2 = nn.GroupNorm(min(groups, cout), cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.skip(x) + h) / math.sqrt(2)  # DDPM++ skip rescale


class Attention(nn.Module):
    def __init__(self, ch: int, groups: int, heads: int = 1):
        super().__init__()
        self.norm = nn.GroupNorm(min(groups, ch), ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        self.heads = heads

    def forward(self, x, emb=None):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W).unbind(1)
        h = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        h = h.transpose(-1, -2).reshape(B, C, H, W)
        return (x + self.proj(h)) / math.sqrt(2)


class UNet(_ConditionedNet):
    """A DDPM++-style U-Net: residual blocks with GroupNorm + SiLU, sinusoidal time embedding,
    dropout, optional self-attention at chosen resolutions, optional class label."""

    def __init__(self, resolution: int, in_channels: int = 1, out_channels: int | None = None,
                 channels: int = 64, channel_mult=(1, 2), num_res_blocks: int = 2,
                 attn_resolutions=(), dropout: float = 0.1, num_classes: int = 0, groups: int = 8,
                 step_condition: bool | str = False):
        super().__init__()
        halvings = len(channel_mult) - 1
        if resolution < 1 or resolution % 2**halvings:
            raise FewstepError(f"U-Net resolution {resolution}: expected a multiple of {2**halvings} (the network "
                               f"halves the image {halvings} time(s) and doubles it back); choose a resolution such as "
                               f"{max(2**halvings, resolution + (-resolution) % 2**halvings)}")
        out_channels = out_channels or in_channels
        self.config = dict(type="unet", resolution=resolution, in_channels=in_channels, out_channels=out_channels,
                           channels=channels, channel_mult=list(channel_mult), num_res_blocks=num_res_blocks,
                           attn_resolutions=list(attn_resolutions), dropout=dropout, num_classes=num_classes,
                           groups=groups, step_condition=False)
        emb_dim = channels * 4
        self._init_embeddings(emb_dim, channels, num_classes)
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)

        self.down = nn.ModuleList()
        skip_ch, ch, res = [channels], channels, resolution
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                blocks = [ResBlock(ch, channels * mult, emb_dim, dropout, groups)]
                ch = channels * mult
                if res in attn_resolutions:
                    blocks.append(Attention(ch, groups))
                self.down.append(nn.ModuleList(blocks))
                skip_ch.append(ch)
            if level < len(channel_mult) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(ch, ch, 3, stride=2, padding=1)]))
                skip_ch.append(ch)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, dropout, groups), Attention(ch, groups),
                                  ResBlock(ch, ch, emb_dim, dropout, groups)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                blocks = [ResBlock(ch + skip_ch.pop(), channels * mult, emb_dim, dropout, groups)]
                ch = channels * mult
                if res in attn_resolutions:
                    blocks.append(Attention(ch, groups))
                self.up.append(nn.ModuleList(blocks))
            if level > 0:
                self.up.append(nn.ModuleList([nn.Upsample(scale_factor=2, mode="nearest"),
                                              nn.Conv2d(ch, ch, 3, padding=1)]))
                res *= 2
        self.norm_out = nn.GroupNorm(min(groups, ch), ch)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        if _step_kind(step_condition):
            self.add_step_condition(_step_kind(step_condition))

    def _step_block_layers(self) -> list:
        return [b.emb for b in self.modules() if isinstance(b, ResBlock)]

    def forward(self, x, t, step=None, class_labels=None, return_features=False):
        if x.ndim != 4 or x.shape[1] != self.config["in_channels"]:
            raise FewstepError(f"UNet input: expected (N, {self.config['in_channels']}, H, W), got {tuple(x.shape)}")
        step = self._step_input(x, step)
        emb = self._embed(x, t, step, class_labels)
        with self._block_step_context(step):
            h = self.conv_in(x)
            skips = [h]
            for blocks in self.down:
                for b in blocks:
                    h = b(h, emb) if isinstance(b, (ResBlock, Attention)) else b(h)
                skips.append(h)
            for b in self.mid:
                h = b(h, emb)
            for blocks in self.up:
                if isinstance(blocks[0], ResBlock):
                    h = torch.cat([h, skips.pop()], dim=1)
                for b in blocks:
                    h = b(h, emb) if isinstance(b, (ResBlock, Attention)) else b(h)
        features = h  # output of the last residual block: SFDDM's hidden variable
        out = self.conv_out(F.silu(self.norm_out(h)))
        return (out, features) if return_features else out


class MLP(_ConditionedNet):
    """Residual MLP for 2-D (or any flat) data, with the UNet's interface."""

    def __init__(self, dim: int = 2, hidden: int = 256, depth: int = 4, dropout: float = 0.0,
                 num_classes: int = 0, step_condition: bool | str = False):
        super().__init__()
        self.config = dict(type="mlp", dim=dim, hidden=hidden, depth=depth, dropout=dropout,
                           num_classes=num_classes, step_condition=False)
        self._init_embeddings(hidden, 64, num_classes)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(dict(norm=nn.LayerNorm(hidden), fc1=nn.Linear(hidden, hidden * 2),
                               emb=nn.Linear(hidden, hidden * 2), fc2=nn.Linear(hidden * 2, hidden),
                               drop=nn.Dropout(dropout)))
            for _ in range(depth))
        # a linear read-out of the residual stream: a final norm would cap the output's scale, and an
        # ε-predictor must return about its (unbounded) input at high noise
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        if _step_kind(step_condition):
            self.add_step_condition(_step_kind(step_condition))

    def _step_block_layers(self) -> list:
        return [b["emb"] for b in self.blocks]

    def forward(self, x, t, step=None, class_labels=None, return_features=False):
        if x.ndim != 2 or x.shape[1] != self.config["dim"]:
            raise FewstepError(f"MLP input: expected (N, {self.config['dim']}), got {tuple(x.shape)}")
        step = self._step_input(x, step)
        emb = self._embed(x, t, step, class_labels)
        h = self.inp(x)
        with self._block_step_context(step):
            for b in self.blocks:
                z = b["fc1"](b["norm"](h)) + b["emb"](F.silu(emb))
                h = h + b["fc2"](b["drop"](F.silu(z)))
        out = self.out(h)
        return (out, h) if return_features else out


NETS = {"unet": UNet, "mlp": MLP}
# networks of other code bases, rebuilt by fewstep's own implementations (imported on first use,
# so fewstep runs without their optional dependencies): type -> "module:Class"
FOREIGN_NETS = {
    "edm-songunet": "fewstep.interop.edm_nets:SongUNet",
    "edm-dhariwalunet": "fewstep.interop.edm_nets:DhariwalUNet",
    "diffusers-unet2d": "fewstep.interop.diffusers_io:DiffusersUNet",
    "diffusers-unet2d-cond": "fewstep.interop.diffusers_io:DiffusersCondUNet",
    "diffusers-unet2d-xl": "fewstep.interop.diffusers_io:DiffusersXLUNet",
    "diffusers-sd3-transformer": "fewstep.interop.flow_io:DiffusersSD3Transformer",
    "diffusers-flux-transformer": "fewstep.interop.flow_io:DiffusersFluxTransformer",
}


def net_class(kind: str):
    if kind in NETS:
        return NETS[kind]
    if kind in FOREIGN_NETS:
        module, name = FOREIGN_NETS[kind].split(":")
        return getattr(importlib.import_module(module), name)
    raise FewstepError(f"network type {kind!r}: expected one of {', '.join([*NETS, *FOREIGN_NETS])}")


def build_net(config: dict) -> nn.Module:
    """Rebuild a network from its `config` dict (as stored in a model card)."""
    config = copy.deepcopy(config)
    kind = config.pop("type", None)
    cls = net_class(kind)
    try:
        return cls(**config)
    except TypeError as e:
        raise FewstepError(f"network config for {kind!r} is not valid: {e}") from None


class FeatureTap:
    """Captures the output of one named sub-module during a forward pass: the hidden features of a
    network fewstep did not write (SFDDM's feature loss). Use as `with FeatureTap(net, name) as tap:`
    around the call, then read `tap.value`."""

    def __init__(self, net: nn.Module, layer: str):
        modules = dict(net.named_modules())
        if layer not in modules:
            names = [n for n in modules if n][:12]
            raise FewstepError(f"feature layer {layer!r}: no such sub-module in this network "
                               f"(some names: {', '.join(names)}, ...)")
        self.module, self.value, self._handle = modules[layer], None, None

    def _hook(self, module, inputs, output):
        self.value = output[0] if isinstance(output, tuple) else output

    def __enter__(self):
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        return False


def _to_channels_last(module, args, kwargs):
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.ndim == 4:
        args = (x.contiguous(memory_format=torch.channels_last),) + tuple(args[1:])
    return args, kwargs


def channels_last_copy(module: nn.Module) -> nn.Module:
    """A copy of a frozen network (or Denoiser) that runs in channels-last memory format: its 4-D
    weights are stored channels-last and every 4-D input is made so. The same weights and the same
    outputs up to float rounding (tested); on a CPU the digits UNet's forward is about 20 % faster.
    A network without 4-D weights (an MLP) is returned as it is."""
    if not any(p.ndim == 4 for p in module.parameters()):
        return module
    fast = copy.deepcopy(module).to(memory_format=torch.channels_last)
    nets = [m for m in fast.modules() if isinstance(m, _ConditionedNet)] or [fast]
    for net in nets:
        net.register_forward_pre_hook(_to_channels_last, with_kwargs=True)
    return fast


def set_dropout(net: nn.Module, p: float) -> None:
    """Change every dropout rate of a network (or a Denoiser around one) and its config to p."""
    for mod in net.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = p
    inner = getattr(net, "net", net)
    if "dropout" in getattr(inner, "config", {}):
        inner.config["dropout"] = p


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
