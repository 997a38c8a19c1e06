"""Flow-matching teachers from diffusers: StableDiffusion3Pipeline folders → fewstep checkpoints.

SD3 is a rectified flow, x_t = (1 − t)·x0 + t·ε, whose transformer predicts the velocity v = ε − x0 from x_t,
the timestep 1000·t, the prompt's token embeddings and its pooled embedding. In fewstep's σ-space that is
x = x_t/(1 − t) = x0 + σ·ε with σ = t/(1 − t), and x0 = x_t − t·v (the Denoiser's "flow" parameterization on
`Schedule.flow`). The pipeline's FlowMatchEulerDiscreteScheduler steps x_t' = x_t + (t' − t)·v, which is
DDIM in σ-space; the card's default sampler is that, on the scheduler's own grid from t = 1 (grid "flow").

The transformer stays diffusers' `SD3Transformer2DModel` (parameters under `transformer.*`); the autoencoder
(with SD3's shift_factor), the two CLIP encoders and T5 (or none, as the pipeline allows) are components.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from fewstep.checkpoint import refuse_to_overwrite, save_checkpoint
from fewstep.components import LatentCodec, SD3TextEncoders, TextEncoder, tokenizer_role
from fewstep.denoiser import Denoiser
from fewstep.errors import FewstepError
from fewstep.hashing import folder_digest, sha256_file
from fewstep.interop.diffusers_io import WEIGHTS, _plain, _read_json, require_diffusers
from fewstep.interop.sources import source_digest
from fewstep.nets import StepConditioned
from fewstep.schedule import Schedule, flux_mu

FLOW_PIPELINES = ("StableDiffusion3Pipeline",)
# StableDiffusion3Pipeline's defaults: steps, guidance scale, T5 tokens
SD3_STEPS, SD3_GUIDANCE, SD3_MAX_SEQUENCE_LENGTH = 28, 7.0, 256
# FlowMatchEulerDiscreteScheduler settings whose sampler fewstep does not reproduce, each with what it does
UNSUPPORTED_SCHEDULER = {"use_karras_sigmas": "Karras sigmas", "use_exponential_sigmas": "exponential sigmas",
                         "use_beta_sigmas": "beta sigmas", "invert_sigmas": "inverted sigmas (Mochi)",
                         "shift_terminal": "a stretched terminal shift", "stochastic_sampling": "stochastic steps"}
SUPPORTED = ("supported flow-matching pipelines: StableDiffusion3Pipeline (SD3Transformer2DModel, AutoencoderKL, "
             "two CLIPTextModelWithProjection encoders and an optional T5EncoderModel) with a "
             "FlowMatchEulerDiscreteScheduler")


def is_flow_pipeline(src: Path) -> bool:
    index = Path(src) / "model_index.json"
    return index.is_file() and _read_json(index, "the pipeline's component list").get("_class_name") in FLOW_PIPELINES


class DiffusersSD3Transformer(StepConditioned, nn.Module):
    """diffusers' `SD3Transformer2DModel` behind fewstep's network interface
    `net(x_t, 1000·t, step=None, context=token embeddings, pooled=pooled embedding)`. SFD-v's step condition
    goes where the time embedding does: the "zero" kind is added to the combined time-and-text embedding, the
    "authors" kind to each block's adaptive-norm projection of it."""

    KIND = "diffusers-sd3-transformer"

    def __init__(self, transformer: dict, resolution: int | None = None, in_channels: int | None = None,
                 out_channels: int | None = None, num_classes: int | None = None, dropout: float | None = None,
                 step_condition: bool | str = False, context_dim: int | None = None, pooled_dim: int | None = None):
        super().__init__()
        diffusers = require_diffusers()
        if dropout:
            raise FewstepError(f"dropout {dropout}: SD3's transformer has no dropout layers; leave it unset")
        if num_classes:
            raise FewstepError("an SD3 transformer is text-conditioned; it takes no class labels")
        cfg = {k: _plain(v) for k, v in dict(transformer).items() if not k.startswith("_")}
        self.transformer = diffusers.SD3Transformer2DModel.from_config(cfg)
        cfg = {k: _plain(v) for k, v in dict(self.transformer.config).items() if not k.startswith("_")}
        have = {"resolution": cfg["sample_size"], "in_channels": cfg["in_channels"],
                "out_channels": cfg["out_channels"] or cfg["in_channels"], "context_dim": cfg["joint_attention_dim"],
                "pooled_dim": cfg["pooled_projection_dim"]}
        given = {"resolution": resolution, "in_channels": in_channels, "out_channels": out_channels,
                 "context_dim": context_dim, "pooled_dim": pooled_dim}
        for k, v in given.items():
            if v is not None and v != have[k]:
                raise FewstepError(f"{self.KIND} config: {k}={v} differs from the transformer's own {have[k]}")
        self.config = dict(type=self.KIND, transformer=cfg, **have, num_classes=0, dropout=0.0, step_condition=False)
        self.step_cond = None
        if step_condition:
            self.add_step_condition("zero" if step_condition is True else step_condition)

    def _step_embedding_layer(self):
        return self.transformer.time_text_embed.timestep_embedder.linear_2

    def _step_block_layers(self) -> list:
        layers = []
        for block in self.transformer.transformer_blocks:
            layers += [m.linear for m in (block.norm1, block.norm1_context) if hasattr(m, "linear")]
        return layers + [self.transformer.norm_out.linear]

    def set_gradient_checkpointing(self, on: bool = True):
        """Recompute the transformer's blocks in the backward pass instead of keeping their activations."""
        if on:
            self.transformer.enable_gradient_checkpointing()
        else:
            self.transformer.disable_gradient_checkpointing()

    def forward(self, x, t, step=None, class_labels=None, context=None, pooled=None, return_features=False):
        c = self.config
        if return_features:
            raise FewstepError("an SD3 transformer gives no hidden features to match (SFDDM's feature loss)")
        if class_labels is not None:
            raise FewstepError("an SD3 transformer takes no class labels")
        if context is None or pooled is None:
            raise FewstepError("an SD3 transformer is text-conditioned: it needs token and pooled prompt embeddings")
        if x.ndim != 4 or x.shape[1] != c["in_channels"]:
            raise FewstepError(f"SD3 transformer input: expected (N, {c['in_channels']}, H, W), got {tuple(x.shape)}")
        t = torch.as_tensor(t, device=x.device).float().reshape(-1).expand(x.shape[0])
        step = self._step_input(x, step)
        handles = []
        if self.step_condition_kind == "zero":
            s_emb = self.step_cond(step)
            handles.append(self.transformer.time_text_embed.register_forward_hook(
                lambda m, i, o: o + s_emb.to(o.dtype)))
        try:
            with self._block_step_context(step):
                return self.transformer(hidden_states=x, timestep=t, encoder_hidden_states=context.to(x.dtype),
                                        pooled_projections=pooled.to(x.dtype), return_dict=False)[0]
        finally:
            for h in handles:
                h.remove()


def _components(src: Path) -> tuple[str, dict]:
    index = _read_json(src / "model_index.json", "the pipeline's component list")
    pipe = index.get("_class_name")
    comps = {k: v[1] for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and len(v) == 2
             and v[0] is not None}
    where = src / "model_index.json"
    refused = {"image_encoder": "an image encoder (IP-Adapter)", "feature_extractor": "an image processor (IP-Adapter)",
               "controlnet": "a ControlNet"}
    named = [f"{k} ({what})" for k, what in refused.items() if k in comps]
    if named:
        raise FewstepError(f"{where}: {pipe} has {', '.join(named)}, which fewstep does not run; {SUPPORTED}")
    need = {"transformer": "SD3Transformer2DModel", "scheduler": "FlowMatchEulerDiscreteScheduler",
            "vae": "AutoencoderKL", "text_encoder": "CLIPTextModelWithProjection", "tokenizer": None,
            "text_encoder_2": "CLIPTextModelWithProjection", "tokenizer_2": None}
    for name, cls in need.items():
        if name not in comps:
            raise FewstepError(f"{where}: {pipe} lists no {name}; {SUPPORTED}")
        if cls is not None and comps[name] != cls:
            raise FewstepError(f"{where}: its {name} is a {comps[name]} where a {cls} belongs; {SUPPORTED}")
    if ("text_encoder_3" in comps) != ("tokenizer_3" in comps):
        raise FewstepError(f"{where}: text_encoder_3 and tokenizer_3 come together (or are both null); {SUPPORTED}")
    if "text_encoder_3" in comps and comps["text_encoder_3"] != "T5EncoderModel":
        raise FewstepError(f"{where}: its text_encoder_3 is a {comps['text_encoder_3']} where a T5EncoderModel "
                           f"belongs; {SUPPORTED}")
    return pipe, comps


def flow_sampler(cfg: dict, where: str, image_seq_len: int) -> tuple[dict, float, int]:
    """(the card's default sampler, the shift fewstep's other grids use, T) from a FlowMatchEulerDiscreteScheduler
    config: static shifting keeps its shift; dynamic shifting (Flux) is fixed at the model's resolution, whose
    mu the pipeline computes from the number of latent patches."""
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
    flow = {"T": T}
    if cfg.get("use_dynamic_shifting"):
        if cfg.get("time_shift_type", "exponential") != "exponential":
            raise FewstepError(f"{where}: time_shift_type {cfg['time_shift_type']!r}; supported: 'exponential'")
        flow["mu"] = flux_mu(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                             cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.16))
        shift = float(torch.tensor(flow["mu"], dtype=torch.float64).exp())
    else:
        shift = float(cfg.get("shift", 1.0))
        if not shift > 0:
            raise FewstepError(f"{where}: shift {shift!r}: expected a positive number")
        flow["shift"] = shift
    sampler = {"name": "ddim", "nfe": SD3_STEPS, "grid": "flow", "flow": flow, "scale": "flow", "clip": None,
               "scheduler": cls}
    return sampler, shift, T


def denoiser_from_sd3(src: Path) -> tuple[Denoiser, dict, dict, dict]:
    """(Denoiser with the transformer's weights and the pipeline's components; the transformer and scheduler
    configs; the card's sampler)."""
    require_diffusers()
    src = Path(src)
    pipe, comps = _components(src)
    tdir = src / "transformer"
    tcfg = _read_json(tdir / "config.json", "the transformer config")
    weights = tdir / WEIGHTS
    if not weights.is_file():
        raise FewstepError(f"{tdir}: no {WEIGHTS} (fewstep reads safetensors weights in one file; sharded or "
                           "pickled weights: re-save with save_pretrained(..., safe_serialization=True, "
                           "max_shard_size='100GB'))")
    net = DiffusersSD3Transformer(tcfg)
    cfg = net.config["transformer"]
    if net.config["out_channels"] != net.config["in_channels"]:
        raise FewstepError(f"{tdir / 'config.json'}: out_channels={cfg['out_channels']} differs from in_channels="
                           f"{cfg['in_channels']}; supported: a transformer that predicts one velocity from its input")
    try:
        sd = load_file(str(weights), device="cpu")
    except Exception as e:  # safetensors raises its own error types for malformed files
        raise FewstepError(f"{weights}: not a readable safetensors file ({e})") from None
    try:
        net.load_state_dict({f"transformer.{k}": v.float() for k, v in sd.items()}, strict=True)
    except RuntimeError as e:
        raise FewstepError(f"{weights}: the weights do not fit the SD3Transformer2DModel of its config.json: "
                           f"{str(e).strip().splitlines()[-1][:300]}") from None
    sched_path = src / "scheduler" / "scheduler_config.json"
    sched_cfg = _read_json(sched_path, "the scheduler config")
    patches = (cfg["sample_size"] // cfg["patch_size"]) ** 2
    sampler, shift, T = flow_sampler(sched_cfg, str(sched_path), patches)
    den = Denoiser(net, Schedule.flow(shift, T), "flow").eval()
    entry = LatentCodec.describe(src / "vae")
    if entry["latent_channels"] != cfg["in_channels"]:
        raise FewstepError(f"{src / 'vae'}: the autoencoder's {entry['latent_channels']} latent channels do not "
                           f"match the transformer's in_channels={cfg['in_channels']}")
    den.codec = LatentCodec(src / "vae", {**entry, "sha256": folder_digest(src / "vae")})
    encoders = {}
    for role in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if role in comps:
            tok = tokenizer_role(role)
            e = TextEncoder.describe(src / role, src / tok, comps[tok])
            encoders[role] = TextEncoder(src / role, {**e, "sha256": folder_digest(src / role)}, src / tok)
    clip_width = encoders["text_encoder"].entry["hidden_size"] + encoders["text_encoder_2"].entry["hidden_size"]
    if clip_width > cfg["joint_attention_dim"]:
        raise FewstepError(f"{src}: the two CLIP encoders' widths ({clip_width}) exceed the transformer's "
                           f"joint_attention_dim={cfg['joint_attention_dim']}")
    t5 = encoders.get("text_encoder_3")
    if t5 is not None and t5.entry["hidden_size"] != cfg["joint_attention_dim"]:
        raise FewstepError(f"{src / 'text_encoder_3'}: T5's width {t5.entry['hidden_size']} does not match the "
                           f"transformer's joint_attention_dim={cfg['joint_attention_dim']}")
    den.text = SD3TextEncoders(encoders["text_encoder"], encoders["text_encoder_2"], t5, cfg["joint_attention_dim"],
                               SD3_MAX_SEQUENCE_LENGTH)
    den.guidance = SD3_GUIDANCE
    return den, cfg, {k: _plain(v) for k, v in sched_cfg.items()}, sampler


def import_flow_pipeline(src: Path, out: Path) -> Path:
    """Convert a StableDiffusion3Pipeline folder into a fewstep checkpoint folder `out`."""
    src, out = Path(src), Path(out)
    refuse_to_overwrite(out)
    den, tcfg, sched_cfg, sampler = denoiser_from_sd3(src)
    net = den.net.config
    weights = src / "transformer" / WEIGHTS
    e = den.codec.entry
    size = net["resolution"] * e["downsampling"]
    card = {"method": {"name": "imported"},
            "source": {"format": "diffusers", "layout": "pipeline", "path": str(src.resolve()),
                       "sha256": source_digest(src), "pipeline": "StableDiffusion3Pipeline",
                       "weights": str(weights.resolve()), "weights_sha256": sha256_file(weights),
                       "scheduler_path": str((src / "scheduler" / "scheduler_config.json").resolve()),
                       "transformer_config": tcfg, "scheduler_config": sched_cfg},
            "sampler": sampler, "teacher": None,
            "data": {"kind": "image", "shape": [e["image_channels"], size, size], "name": f"diffusers:{src.resolve().name}",
                     "num_classes": 0, "latent_shape": [net["in_channels"], net["resolution"], net["resolution"]]},
            "text": {"negative_prompt": ""}}
    return save_checkpoint(out, den, card)
