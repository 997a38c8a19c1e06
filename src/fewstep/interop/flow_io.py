"""Flow-matching teachers from diffusers: StableDiffusion3Pipeline and FluxPipeline folders → fewstep checkpoints.

SD3 is a rectified flow, x_t = (1 − t)·x0 + t·ε, whose transformer predicts the velocity v = ε − x0 from x_t,
the timestep 1000·t, the prompt's token embeddings and its pooled embedding. In fewstep's σ-space that is
x = x_t/(1 − t) = x0 + σ·ε with σ = t/(1 − t), and x0 = x_t − t·v (the Denoiser's "flow" parameterization on
`Schedule.flow`). The pipeline's FlowMatchEulerDiscreteScheduler steps x_t' = x_t + (t' − t)·v, which is
DDIM in σ-space; the card's default sampler is that, on the scheduler's own grid from t = 1 (grid "flow").

The transformer stays diffusers' `SD3Transformer2DModel` or `FluxTransformer2DModel` (parameters under
`transformer.*`); the autoencoder (with its shift_factor) and the text encoders (SD3: two CLIPs and T5 or none;
Flux: CLIP and T5) are components. Flux packs the latents into 2×2 patches and, guidance-distilled, takes the
guidance scale as an input (no classifier-free guidance); its scheduler's shift depends on the resolution, fixed
at import (`resolution`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fewstep.checkpoint import refuse_to_overwrite, save_checkpoint
from fewstep.components import FluxTextEncoders, LatentCodec, SD3TextEncoders, TextEncoder, tokenizer_role
from fewstep.denoiser import Denoiser
from fewstep.errors import FewstepError, option
from fewstep.hashing import folder_digest
from fewstep.interop.diffusers_io import _plain, require_diffusers
from fewstep.interop.sources import read_json, read_weights, weights_digest, weights_file
from fewstep.interop.sources import source_digest
from fewstep.lora import add_lora
from fewstep.nets import StepConditioned
from fewstep.flow_grid import flux_mu
from fewstep.schedule import Schedule

# FlowMatchEulerDiscreteScheduler settings whose sampler fewstep does not reproduce, each with what it does
UNSUPPORTED_SCHEDULER = {"use_karras_sigmas": "Karras sigmas", "use_exponential_sigmas": "exponential sigmas",
                         "use_beta_sigmas": "beta sigmas", "invert_sigmas": "inverted sigmas (Mochi)",
                         "shift_terminal": "a stretched terminal shift", "stochastic_sampling": "stochastic steps"}
SUPPORTED = ("supported flow-matching pipelines: StableDiffusion3Pipeline (SD3Transformer2DModel, AutoencoderKL, "
             "two CLIPTextModelWithProjection encoders and an optional T5EncoderModel) and FluxPipeline "
             "(FluxTransformer2DModel, AutoencoderKL, CLIPTextModel and T5EncoderModel), each with a "
             "FlowMatchEulerDiscreteScheduler")


def is_flow_pipeline(src: Path) -> bool:
    index = Path(src) / "model_index.json"
    if not index.is_file():
        return False
    name = read_json(index, "the pipeline's component list").get("_class_name")
    return isinstance(name, str) and name in PIPELINES  # a custom pipeline names [module, class]


class FlowTransformer(StepConditioned, nn.Module):
    """A diffusers flow-matching transformer behind fewstep's network interface
    `net(x_t, 1000·t, step=None, context=token embeddings, pooled=pooled embedding)` on (N, C, H, W) latents.
    SFD-v's step condition goes where the time embedding does: the "zero" kind is added to the combined
    time-and-text embedding, the "authors" kind to each block's adaptive-norm projection of it."""

    KIND, CLASS = "", ""

    def __init__(self, transformer: dict, resolution: int | None = None, in_channels: int | None = None,
                 out_channels: int | None = None, num_classes: int | None = None, dropout: float | None = None,
                 step_condition: bool | str = False, context_dim: int | None = None, pooled_dim: int | None = None,
                 lora: dict | None = None):
        super().__init__()
        diffusers = require_diffusers()
        if dropout:
            raise FewstepError(f"dropout {dropout}: a {self.CLASS} has no dropout layers; leave it unset")
        if num_classes:
            raise FewstepError(f"a {self.CLASS} is text-conditioned; it takes no class labels")
        cfg = {k: _plain(v) for k, v in dict(transformer).items() if not k.startswith("_")}
        self.transformer = getattr(diffusers, self.CLASS).from_config(cfg)
        cfg = {k: _plain(v) for k, v in dict(self.transformer.config).items() if not k.startswith("_")}
        have = self._shape(cfg, resolution)
        given = {"resolution": resolution, "in_channels": in_channels, "out_channels": out_channels,
                 "context_dim": context_dim, "pooled_dim": pooled_dim}
        for k, v in given.items():
            if v is not None and v != have[k]:
                raise FewstepError(f"{self.KIND} config: {k}={v} differs from the transformer's own {have[k]}")
        self.config = dict(type=self.KIND, transformer=cfg, **have, num_classes=0, dropout=0.0, step_condition=False)
        self.step_cond = None
        if step_condition:
            self.add_step_condition("zero" if step_condition is True else step_condition)
        if lora:  # a LoRA student (fewstep.lora)
            add_lora(self, lora)

    def _shape(self, cfg: dict, resolution: int | None) -> dict:
        raise NotImplementedError

    def _step_embedding_layer(self):
        return self.transformer.time_text_embed.timestep_embedder.linear_2

    def _step_block_layers(self) -> list:
        layers = []
        for block in self.transformer.transformer_blocks:
            layers += [m.linear for m in (block.norm1, block.norm1_context) if hasattr(m, "linear")]
        for block in getattr(self.transformer, "single_transformer_blocks", []):
            layers.append(block.norm.linear)
        return layers + [self.transformer.norm_out.linear]

    def set_gradient_checkpointing(self, on: bool = True):
        """Recompute the transformer's blocks in the backward pass instead of keeping their activations."""
        if on:
            self.transformer.enable_gradient_checkpointing()
        else:
            self.transformer.disable_gradient_checkpointing()

    def forward(self, x, t, step=None, class_labels=None, context=None, pooled=None, return_features=False,
                guidance=None):
        c = self.config
        if return_features:
            raise FewstepError(f"a {self.CLASS} gives no hidden features to match (SFDDM's feature loss)")
        if class_labels is not None:
            raise FewstepError(f"a {self.CLASS} takes no class labels")
        if context is None or pooled is None:
            raise FewstepError(f"a {self.CLASS} is text-conditioned: it needs token and pooled prompt embeddings")
        if x.ndim != 4 or x.shape[1] != c["in_channels"]:
            raise FewstepError(f"{self.CLASS} input: expected (N, {c['in_channels']}, H, W), got {tuple(x.shape)}")
        t = torch.as_tensor(t, device=x.device).float().reshape(-1).expand(x.shape[0])
        with self._step_context(self._step_input(x, step), self.transformer.time_text_embed):
            return self._call(x, t, context.to(x.dtype), pooled.to(x.dtype), guidance)


class DiffusersSD3Transformer(FlowTransformer):
    """SD3's `SD3Transformer2DModel` (parameters under `transformer.*`): it takes the latents as they are."""

    KIND, CLASS = "diffusers-sd3-transformer", "SD3Transformer2DModel"

    def _shape(self, cfg, resolution):
        return {"resolution": cfg["sample_size"], "in_channels": cfg["in_channels"],
                "out_channels": cfg["out_channels"] or cfg["in_channels"], "context_dim": cfg["joint_attention_dim"],
                "pooled_dim": cfg["pooled_projection_dim"]}

    def _call(self, x, t, context, pooled, guidance):
        return self.transformer(hidden_states=x, timestep=t, encoder_hidden_states=context,
                                pooled_projections=pooled, return_dict=False)[0]


class DiffusersFluxTransformer(FlowTransformer):
    """Flux's `FluxTransformer2DModel`: the latents go in packed as FluxPipeline packs them (2×2 patches, one
    token each, with their row and column as position ids; the prompt's tokens at position 0), the timestep as
    t (the pipeline's timestep / 1000), and a guidance-distilled model's guidance scale as an input. It has no
    size of its own: `resolution` (the latents' side, even) is the card's."""

    KIND, CLASS = "diffusers-flux-transformer", "FluxTransformer2DModel"

    def _shape(self, cfg, resolution):
        if resolution is None or resolution < 2 or resolution % 2:
            raise FewstepError(f"{self.KIND} config: resolution {resolution!r}: expected the latents' even side")
        if cfg["in_channels"] % 4:
            raise FewstepError(f"{self.KIND} config: in_channels {cfg['in_channels']} is not 4 × the latent channels")
        return {"resolution": resolution, "in_channels": cfg["in_channels"] // 4,
                "out_channels": (cfg["out_channels"] or cfg["in_channels"]) // 4,
                "context_dim": cfg["joint_attention_dim"], "pooled_dim": cfg["pooled_projection_dim"]}

    def _call(self, x, t, context, pooled, guidance):
        n, ch, h, w = x.shape
        packed = x.view(n, ch, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, h * w // 4, ch * 4)
        img_ids = torch.zeros(h // 2, w // 2, 3, device=x.device)
        img_ids[..., 1] += torch.arange(h // 2, device=x.device)[:, None]
        img_ids[..., 2] += torch.arange(w // 2, device=x.device)[None, :]
        txt_ids = torch.zeros(context.shape[1], 3, device=x.device, dtype=x.dtype)
        if self.transformer.config.guidance_embeds:
            if guidance is None:
                raise FewstepError("this Flux transformer is guidance-distilled: it needs the guidance scale")
            guidance = torch.full((n,), float(guidance), device=x.device, dtype=torch.float32)
        else:
            guidance = None
        out = self.transformer(hidden_states=packed, timestep=t / 1000, guidance=guidance, pooled_projections=pooled,
                               encoder_hidden_states=context, txt_ids=txt_ids,
                               img_ids=img_ids.reshape(-1, 3).to(x.dtype), return_dict=False)[0]
        ch_out = out.shape[-1] // 4
        return out.view(n, h // 2, w // 2, ch_out, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, ch_out, h, w)


@dataclass(frozen=True)
class FlowPipeline:
    """What fewstep reads of one diffusers flow-matching pipeline class: its network, its text encoders (role →
    class; `optional` may be null in the folder), its call's defaults (steps, guidance, T5 tokens, the
    dynamic shift's max_shift when the scheduler config has none) and how its grid is made."""
    net: type
    encoders: dict
    optional: tuple
    steps: int
    guidance: float
    max_sequence_length: int
    max_shift: float
    grid_rule: str


PIPELINES = {
    "StableDiffusion3Pipeline": FlowPipeline(
        DiffusersSD3Transformer, {"text_encoder": "CLIPTextModelWithProjection",
                                  "text_encoder_2": "CLIPTextModelWithProjection", "text_encoder_3": "T5EncoderModel"},
        ("text_encoder_3",), steps=28, guidance=7.0, max_sequence_length=256, max_shift=1.16, grid_rule="scheduler"),
    "FluxPipeline": FlowPipeline(
        DiffusersFluxTransformer, {"text_encoder": "CLIPTextModel", "text_encoder_2": "T5EncoderModel"}, (),
        steps=28, guidance=3.5, max_sequence_length=512, max_shift=1.15, grid_rule="pipeline"),
}
# FluxPipeline's default image side is 128 latent pixels (its default_sample_size) times the autoencoder's scale
FLUX_DEFAULT_LATENT = 128


def _components(src: Path) -> tuple[str, FlowPipeline, dict]:
    index = read_json(src / "model_index.json", "the pipeline's component list")
    name = index.get("_class_name")
    pipe = PIPELINES[name]
    comps = {k: v[1] for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and len(v) == 2
             and v[0] is not None}
    where = src / "model_index.json"
    refused = {"image_encoder": "an image encoder (IP-Adapter)", "feature_extractor": "an image processor (IP-Adapter)",
               "controlnet": "a ControlNet"}
    named = [f"{k} ({what})" for k, what in refused.items() if k in comps]
    if named:
        raise FewstepError(f"{where}: {name} has {', '.join(named)}, which fewstep does not run; {SUPPORTED}")
    need = {"transformer": pipe.net.CLASS, "scheduler": "FlowMatchEulerDiscreteScheduler", "vae": "AutoencoderKL",
            **pipe.encoders}
    for role, cls in need.items():
        if role in pipe.optional and role not in comps:
            continue
        if role not in comps:
            raise FewstepError(f"{where}: {name} lists no {role}; {SUPPORTED}")
        if comps[role] != cls:
            raise FewstepError(f"{where}: its {role} is a {comps[role]} where a {cls} belongs; {SUPPORTED}")
        tok = tokenizer_role(role)
        if role in pipe.encoders and tok not in comps:
            raise FewstepError(f"{where}: {role} comes with {tok}, which is missing or null; {SUPPORTED}")
    return name, pipe, comps


def flow_sampler(cfg: dict, where: str, image_seq_len: int, pipe: FlowPipeline) -> tuple[dict, float, int]:
    """(the card's default sampler, the shift fewstep's other grids use, T) from a FlowMatchEulerDiscreteScheduler
    config: static shifting keeps its shift; dynamic shifting is fixed at the model's resolution, whose mu the
    pipeline computes from the number of latent patches."""
    cls = cfg.get("_class_name")
    if cls != "FlowMatchEulerDiscreteScheduler":
        raise FewstepError(f"{where}: scheduler {cls!r}; a flow-matching pipeline needs a "
                           "FlowMatchEulerDiscreteScheduler")
    for key, what in UNSUPPORTED_SCHEDULER.items():
        if cfg.get(key):
            raise FewstepError(f"{where}: {key}={cfg[key]!r} ({what}) is not reproduced; supported: the scheduler's "
                               "default Euler grid with a static or dynamic shift")
    T = cfg.get("num_train_timesteps", 1000)
    if not isinstance(T, int) or T < 2:
        raise FewstepError(f"{where}: num_train_timesteps {T!r}: expected an integer >= 2")
    flow = {"T": T, "rule": pipe.grid_rule}
    if cfg.get("use_dynamic_shifting"):
        if cfg.get("time_shift_type", "exponential") != "exponential":
            raise FewstepError(f"{where}: time_shift_type {cfg['time_shift_type']!r}; supported: 'exponential'")
        flow["mu"] = flux_mu(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                             cfg.get("base_shift", 0.5), cfg.get("max_shift", pipe.max_shift))
        shift = math.exp(flow["mu"])  # exp(mu)/(exp(mu) + 1/t − 1) is the static shift by exp(mu)
    else:
        shift = float(cfg.get("shift", 1.0))
        if not shift > 0:
            raise FewstepError(f"{where}: shift {shift!r}: expected a positive number")
        flow["shift"] = shift
    sampler = {"name": "ddim", "nfe": pipe.steps, "grid": "flow", "flow": flow, "scale": "flow", "clip": None,
               "scheduler": cls}
    return sampler, shift, T


def denoiser_from_flow_pipeline(src: Path, resolution: int | None = None) -> tuple[Denoiser, str, dict, dict, dict]:
    """(Denoiser with the transformer's weights and the pipeline's components; the pipeline class; the
    transformer and scheduler configs; the card's sampler). `resolution`: the image side (Flux: default 1024 at
    an 8× autoencoder; SD3: its transformer's own)."""
    require_diffusers()
    src = Path(src)
    name, pipe, comps = _components(src)
    tdir = src / "transformer"
    tcfg = read_json(tdir / "config.json", "the transformer config")
    weights = weights_file(tdir)
    codec_entry = LatentCodec.describe(src / "vae")
    scale = codec_entry["downsampling"]
    latent = None
    if resolution is not None:
        if resolution % (2 * scale if name == "FluxPipeline" else scale):
            raise FewstepError(f"{option('resolution', resolution)}: expected a multiple of "
                               f"{2 * scale if name == 'FluxPipeline' else scale} for this autoencoder")
        latent = resolution // scale
    if name == "FluxPipeline":
        latent = latent or FLUX_DEFAULT_LATENT
    elif latent is not None and latent != tcfg.get("sample_size", 128):
        raise FewstepError(f"{option('resolution', resolution)}: this SD3 transformer samples "
                           f"{tcfg.get('sample_size', 128) * scale}"
                           f" pixels (its sample_size); other sizes are not supported")
    net = pipe.net(tcfg, resolution=latent)
    cfg = net.config["transformer"]
    if net.config["out_channels"] != net.config["in_channels"]:
        raise FewstepError(f"{tdir / 'config.json'}: out_channels={cfg['out_channels']} differs from in_channels="
                           f"{cfg['in_channels']}; supported: a transformer that predicts one velocity from its input")
    sd = read_weights(weights)
    try:
        net.load_state_dict({f"transformer.{k}": v.float() for k, v in sd.items()}, strict=True)
    except RuntimeError as e:
        raise FewstepError(f"{weights}: the weights do not fit the {pipe.net.CLASS} of its config.json: "
                           f"{str(e).strip().splitlines()[-1][:300]}") from None
    sched_path = src / "scheduler" / "scheduler_config.json"
    sched_cfg = read_json(sched_path, "the scheduler config")
    side = net.config["resolution"]
    patches = (side // 2) ** 2 if name == "FluxPipeline" else (side // cfg["patch_size"]) ** 2
    sampler, shift, T = flow_sampler(sched_cfg, str(sched_path), patches, pipe)
    den = Denoiser(net, Schedule.flow(shift, T), "flow").eval()
    if codec_entry["latent_channels"] != net.config["in_channels"]:
        raise FewstepError(f"{src / 'vae'}: the autoencoder's {codec_entry['latent_channels']} latent channels do not "
                           f"match the transformer's {net.config['in_channels']}")
    den.codec = LatentCodec(src / "vae", {**codec_entry, "sha256": folder_digest(src / "vae")})
    encoders = {}
    for role in pipe.encoders:
        if role in comps:
            tok = tokenizer_role(role)
            e = TextEncoder.describe(src / role, src / tok, comps[tok])
            encoders[role] = TextEncoder(src / role, {**e, "sha256": folder_digest(src / role)}, src / tok)
    joint = cfg["joint_attention_dim"]
    if name == "FluxPipeline":
        t5 = encoders["text_encoder_2"]
        den.text = FluxTextEncoders(encoders["text_encoder"], t5, pipe.max_sequence_length,
                                    embedded_guidance=bool(cfg.get("guidance_embeds")))
        pooled = encoders["text_encoder"].entry["hidden_size"]
        den.guidance = pipe.guidance if cfg.get("guidance_embeds") else 1.0
    else:
        clip_width = encoders["text_encoder"].entry["hidden_size"] + encoders["text_encoder_2"].entry["hidden_size"]
        if clip_width > joint:
            raise FewstepError(f"{src}: the two CLIP encoders' widths ({clip_width}) exceed the transformer's "
                               f"joint_attention_dim={joint}")
        t5 = encoders.get("text_encoder_3")
        den.text = SD3TextEncoders(encoders["text_encoder"], encoders["text_encoder_2"], t5, joint,
                                   pipe.max_sequence_length)
        pooled = None  # the CLIPs' projections, checked by the transformer's own layer on first use
        den.guidance = pipe.guidance
    if t5 is not None and t5.entry["hidden_size"] != joint:
        raise FewstepError(f"{t5.folder}: T5's width {t5.entry['hidden_size']} does not match the transformer's "
                           f"joint_attention_dim={joint}")
    if pooled is not None and pooled != cfg["pooled_projection_dim"]:
        raise FewstepError(f"{src / 'text_encoder'}: CLIP's width {pooled} does not match the transformer's "
                           f"pooled_projection_dim={cfg['pooled_projection_dim']}")
    return den, name, cfg, {k: _plain(v) for k, v in sched_cfg.items()}, sampler


def import_flow_pipeline(src: Path, out: Path, resolution: int | None = None) -> Path:
    """Convert a StableDiffusion3Pipeline or FluxPipeline folder into a fewstep checkpoint folder `out`."""
    src, out = Path(src), Path(out)
    refuse_to_overwrite(out)
    den, name, tcfg, sched_cfg, sampler = denoiser_from_flow_pipeline(src, resolution)
    net = den.net.config
    weights = weights_file(src / "transformer")
    e = den.codec.entry
    size = net["resolution"] * e["downsampling"]
    card = {"method": {"name": "imported"},
            "source": {"format": "diffusers", "layout": "pipeline", "path": str(src.resolve()),
                       "sha256": source_digest(src), "pipeline": name,
                       "weights": str(weights.resolve()), "weights_sha256": weights_digest(weights),
                       "scheduler_path": str((src / "scheduler" / "scheduler_config.json").resolve()),
                       "transformer_config": tcfg, "scheduler_config": sched_cfg},
            "sampler": sampler, "teacher": None,
            "data": {"kind": "image", "shape": [e["image_channels"], size, size], "name": f"diffusers:{src.resolve().name}",
                     "num_classes": 0, "latent_shape": [net["in_channels"], net["resolution"], net["resolution"]]},
            "text": {"negative_prompt": ""}}
    return save_checkpoint(out, den, card)
