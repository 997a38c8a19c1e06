"""diffusers folders → fewstep checkpoints (the export back is fewstep.interop.diffusers_export).

A folder written by `save_pretrained` — a pipeline folder (`model_index.json`), a bare
`unet/` + `scheduler/` pair, or a bare `UNet2DModel` folder with a scheduler config beside it —
becomes a fewstep checkpoint: the `UNet2DModel` stays the network (wrapped by `DiffusersUNet`, its
parameters under `unet.*`), and the scheduler's training table becomes a discrete VP schedule:

    betas      linear / scaled_linear / squaredcos_cap_v2 / trained_betas, T = num_train_timesteps,
               ᾱ computed by diffusers' own DDPMScheduler (float32, as the model was trained)
    prediction epsilon → "eps", v_prediction → "v", sample → "x0"
    time input the (fractional) table index, which is what a UNet2DModel takes as `timestep`
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from fewstep.checkpoint import refuse_to_overwrite, save_checkpoint
from fewstep.components import LatentCodec, SDXLTextEncoders, TextEncoder, require
from fewstep.denoiser import Denoiser
from fewstep.errors import FewstepError
from fewstep.hashing import folder_digest, sha256_file
from fewstep.interop.sources import read_json, read_weights, source_digest, weights_digest, weights_file
from fewstep.lora import add_lora
from fewstep.nets import FeatureTap, StepConditioned
from fewstep.schedule import SCHEDULER_SPACINGS, Schedule
from fewstep.solvers import DDPM_VARIANCES

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
# schedulers whose config describes a discrete VP training table (beta_* and num_train_timesteps)
VP_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
                 "PNDMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                 "HeunDiscreteScheduler", "LMSDiscreteScheduler", "KDPM2DiscreteScheduler",
                 "KDPM2AncestralDiscreteScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler",
                 "DDPMParallelScheduler", "DDIMParallelScheduler")
# pipeline components fewstep does not run, each refused by name (SDXL's second encoder, ControlNet, unCLIP's
# prior, LDM's BERT text model, IP-Adapter's image encoder, transformer denoisers)
UNSUPPORTED_COMPONENTS = {"text_encoder_2": "a second text encoder outside SDXL",
                          "tokenizer_2": "a second tokenizer outside SDXL",
                          "controlnet": "a ControlNet", "prior": "an unCLIP prior", "bert": "LDM's BERT text model",
                          "image_encoder": "an image encoder (IP-Adapter)",
                          "transformer": "a transformer denoiser other than SD3's",
                          "vqgan": "a VQGAN", "image_noising_scheduler": "an image-noising scheduler"}
SUPPORTED = ("supported: UNet2DModel models in pixels (unconditional or with num_class_embeds, e.g. DDPMPipeline / "
             "DDIMPipeline folders) or in latents (LDMPipeline, with a VQModel or AutoencoderKL), and "
             "StableDiffusionPipeline folders (UNet2DConditionModel, AutoencoderKL, CLIPTextModel + CLIPTokenizer), "
             "and StableDiffusionXLPipeline folders (two text encoders, pooled text and size conditioning), each with a "
             "discrete VP scheduler; and StableDiffusion3Pipeline and FluxPipeline folders (flow matching)")


def require_diffusers():
    return require("diffusers", "diffusers")


def _plain(v):
    """JSON-friendly copy of a config value (tuples → lists)."""
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def check_unet_config(cfg: dict, where: str = "UNet config", conditional: bool = False, xl: bool = False) -> dict:
    """A UNet2DModel (or, `conditional`, a text-conditioned UNet2DConditionModel; `xl`, SDXL's, with its pooled
    text and size conditioning) config fewstep can run as a Denoiser network, without diffusers' private keys."""
    if not isinstance(cfg, dict):
        raise FewstepError(f"{where}: expected a JSON object")
    want = "UNet2DConditionModel" if conditional else "UNet2DModel"
    cls = cfg.get("_class_name", want)
    if cls != want or ("cross_attention_dim" in cfg) != conditional:
        found = cls if cls != want else ("a UNet with cross_attention_dim" if not conditional else
                                         "a UNet without cross_attention_dim")
        raise FewstepError(f"{where}: found {found} where a {want} belongs; {SUPPORTED}")
    if conditional:
        if xl and cfg.get("addition_embed_type") != "text_time":
            raise FewstepError(f"{where}: addition_embed_type {cfg.get('addition_embed_type')!r}: an SDXL UNet has "
                               "'text_time' (pooled text and size conditioning)")
        refused = {"addition_embed_type": "added conditioning (SDXL's text_time)",
                   "encoder_hid_dim": "a projected encoder input (IP-Adapter, DeepFloyd IF)",
                   "num_class_embeds": "class embeddings beside the text"}
        for key, what in refused.items():
            if cfg.get(key) is not None and not (xl and key == "addition_embed_type"):
                raise FewstepError(f"{where}: {key} {cfg[key]!r}: {what} is not supported; {SUPPORTED}")
    emb = cfg.get("time_embedding_type", "positional")
    if emb != "positional":
        raise FewstepError(f"{where}: time_embedding_type {emb!r} is not supported (fourier nets take σ, not a "
                           "table index; learned ones cannot take the fractional index between table entries); "
                           "supported: 'positional'")
    if cfg.get("class_embed_type") is not None:
        raise FewstepError(f"{where}: class_embed_type {cfg['class_embed_type']!r} is not supported; supported: "
                           "class labels through num_class_embeds (class_embed_type null)")
    size = cfg.get("sample_size")
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise FewstepError(f"{where}: sample_size {list(size)} is not square; fewstep handles square images")
        size = size[0]
    if not isinstance(size, int) or size < 1:
        raise FewstepError(f"{where}: sample_size {cfg.get('sample_size')!r}: expected the image size (an integer)")
    out = {k: _plain(v) for k, v in cfg.items() if not k.startswith("_")}
    out["sample_size"] = size
    return out


class DiffusersUNet(StepConditioned, nn.Module):
    """A diffusers `UNet2DModel` behind fewstep's network interface
    `net(x, t, step=None, class_labels=None, return_features=False)`.

    `t` is the model's (possibly fractional) table index, which is what the UNet takes as its
    timestep. SFD-v's step condition (see fewstep.nets.StepConditioned) is added by forward hooks
    during the call: the "zero" kind to the UNet's time embedding, the "authors" kind to each resnet
    block's `time_emb_proj`. `return_features=True` also returns the output of `feature_layer`
    (default: the last up block, the map the output layers read).
    """
    KIND, CLASS, CONDITIONAL, XL = "diffusers-unet2d", "UNet2DModel", False, False

    def __init__(self, unet: dict, resolution: int | None = None, in_channels: int | None = None,
                 out_channels: int | None = None, num_classes: int | None = None, dropout: float | None = None,
                 step_condition: bool = False, feature_layer: str | None = None, context_dim: int | None = None,
                 time_ids: list | None = None, lora: dict | None = None):
        super().__init__()
        diffusers = require_diffusers()
        cfg = check_unet_config(dict(unet), conditional=self.CONDITIONAL, xl=self.XL)
        if dropout is not None:
            cfg["dropout"] = float(dropout)
        self.unet = getattr(diffusers, self.CLASS).from_config(cfg)
        # with diffusers' defaults filled in
        cfg = check_unet_config(dict(self.unet.config), conditional=self.CONDITIONAL, xl=self.XL)
        given = {"resolution": resolution, "in_channels": in_channels, "out_channels": out_channels}
        have = {"resolution": cfg["sample_size"], "in_channels": cfg["in_channels"],
                "out_channels": cfg["out_channels"]}
        for k, v in given.items():
            if v is not None and v != have[k]:
                raise FewstepError(f"{self.KIND} config: {k}={v} differs from the UNet's own {have[k]}")
        if num_classes is not None and int(num_classes) != int(cfg.get("num_class_embeds") or 0):
            raise FewstepError(f"{self.KIND} config: num_classes={num_classes} differs from the UNet's "
                               f"num_class_embeds={cfg.get('num_class_embeds')}")
        modules = dict(self.named_modules())
        if feature_layer is None:
            feature_layer = f"unet.up_blocks.{len(self.unet.up_blocks) - 1}"
        elif feature_layer not in modules and f"unet.{feature_layer}" in modules:
            feature_layer = f"unet.{feature_layer}"  # diffusers' own name of the sub-module
        if feature_layer not in modules:
            names = [n for n in modules if n.count(".") <= 2 and n][:12]
            raise FewstepError(f"feature layer {feature_layer!r}: no such sub-module in this UNet2DModel "
                               f"(some names: {', '.join(names)}, ...)")
        self.config = dict(type=self.KIND, unet=cfg, resolution=cfg["sample_size"],
                           in_channels=cfg["in_channels"], out_channels=cfg["out_channels"],
                           num_classes=int(cfg.get("num_class_embeds") or 0), dropout=cfg.get("dropout", 0.0),
                           step_condition=False, feature_layer=feature_layer)
        if self.CONDITIONAL:
            self.config["context_dim"] = int(cfg["cross_attention_dim"])
        if self.XL:  # SDXL's size conditioning: original size, crop corner, target size, in pixels
            if time_ids is None or len(time_ids) != 6:
                raise FewstepError(f"{self.KIND} config: time_ids {time_ids!r}: expected SDXL's six size values")
            self.config["time_ids"] = [float(v) for v in time_ids]
        elif time_ids is not None:
            raise FewstepError(f"{self.KIND} config: time_ids belong to an SDXL UNet")
        self.step_cond = None
        if step_condition:
            self.add_step_condition("zero" if step_condition is True else step_condition)
        if lora:  # a LoRA student (fewstep.lora): the adapter's layers, so its weights load key for key
            add_lora(self, lora)

    def _step_embedding_layer(self):
        return self.unet.time_embedding.linear_2

    def _step_block_layers(self) -> list:
        return [m.time_emb_proj for m in self.unet.modules() if getattr(m, "time_emb_proj", None) is not None]

    def set_gradient_checkpointing(self, on: bool = True):
        """Recompute the UNet's blocks in the backward pass instead of keeping their activations."""
        if on:
            self.unet.enable_gradient_checkpointing()
        else:
            self.unet.disable_gradient_checkpointing()

    def _call_unet(self, x, t, class_labels, context, pooled):
        if context is not None:
            raise FewstepError("this network takes no text: it is not text-conditioned")
        return self.unet(x, t, class_labels=class_labels).sample

    def forward(self, x, t, step=None, class_labels=None, context=None, return_features=False, pooled=None):
        c = self.config
        if x.ndim != 4 or x.shape[1] != c["in_channels"]:
            raise FewstepError(f"UNet2DModel input: expected (N, {c['in_channels']}, H, W), got {tuple(x.shape)}")
        t = torch.as_tensor(t, device=x.device).float().reshape(-1).expand(x.shape[0])
        if c["num_classes"]:
            if class_labels is None:
                raise FewstepError(f"this network is class-conditional ({c['num_classes']} classes): pass class_labels")
            class_labels = torch.as_tensor(class_labels, device=x.device).long().reshape(-1).expand(x.shape[0])
        else:
            class_labels = None
        step = self._step_input(x, step)
        with contextlib.ExitStack() as stack:
            tap = stack.enter_context(FeatureTap(self, c["feature_layer"])) if return_features else None
            stack.enter_context(self._step_context(step, self.unet.time_embedding))
            out = self._call_unet(x, t, class_labels, context, pooled)
        return (out, tap.value) if return_features else out


class DiffusersCondUNet(DiffusersUNet):
    """A text-conditioned `UNet2DConditionModel` (Stable Diffusion's) behind the same interface: `context`
    is the prompt embeddings it attends to (encoder_hidden_states), as fewstep.denoiser passes them."""

    KIND, CLASS, CONDITIONAL = "diffusers-unet2d-cond", "UNet2DConditionModel", True

    def _call_unet(self, x, t, class_labels, context, pooled):
        if context is None:
            raise FewstepError("this network is text-conditioned: it needs prompt embeddings")
        return self.unet(x, t, encoder_hidden_states=context.to(x.dtype)).sample


class DiffusersXLUNet(DiffusersCondUNet):
    """SDXL's `UNet2DConditionModel`: besides the prompt's token embeddings it takes the pooled prompt embedding
    and the size conditioning (`time_ids`: original size, crop corner, target size), as
    StableDiffusionXLPipeline passes them (added_cond_kwargs)."""

    KIND, XL = "diffusers-unet2d-xl", True

    def _call_unet(self, x, t, class_labels, context, pooled):
        if context is None or pooled is None:
            raise FewstepError("an SDXL UNet is text-conditioned: it needs token and pooled prompt embeddings")
        ids = torch.tensor(self.config["time_ids"], device=x.device, dtype=x.dtype).expand(x.shape[0], -1)
        return self.unet(x, t, encoder_hidden_states=context.to(x.dtype),
                         added_cond_kwargs={"text_embeds": pooled.to(x.dtype), "time_ids": ids}).sample


# ---- import -------------------------------------------------------------------------------------

def locate(src: Path) -> dict:
    """Where a diffusers folder keeps its UNet and its scheduler config, and how it is laid out."""
    src = Path(src)
    if not src.is_dir():
        raise FewstepError(f"diffusers folder {str(src)!r}: not a directory")
    index = None
    if (src / "model_index.json").is_file():
        index = read_json(src / "model_index.json", "the pipeline's component list")
        comps = {k: v for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and len(v) == 2
                 and v[0] is not None}
        pipe = index.get("_class_name", "?")
        where = src / "model_index.json"
        xl = pipe == "StableDiffusionXLPipeline"  # its second text encoder and tokenizer are read, not refused
        refused = [f"{k} ({UNSUPPORTED_COMPONENTS[k]})" for k in comps if k in UNSUPPORTED_COMPONENTS
                   and not (xl and k in ("text_encoder_2", "tokenizer_2"))]
        if refused:
            raise FewstepError(f"{where}: {pipe} has {', '.join(refused)}, which fewstep does not run; {SUPPORTED}")
        if "unet" not in comps:
            raise FewstepError(f"{where}: {pipe} lists no unet (components: {', '.join(comps) or 'none'}); {SUPPORTED}")
        unet_cls = comps["unet"][1]
        codec = next((k for k in ("vae", "vqvae") if k in comps), None)
        text = "text_encoder" in comps
        if text and (unet_cls != "UNet2DConditionModel" or codec is None or "tokenizer" not in comps):
            raise FewstepError(f"{where}: {pipe} pairs a text encoder with a {unet_cls}"
                               f"{'' if codec else ' and no autoencoder'}; {SUPPORTED}")
        if unet_cls == "UNet2DConditionModel" and not text:
            raise FewstepError(f"{where}: {pipe}'s UNet2DConditionModel has no text encoder beside it; {SUPPORTED}")
        if unet_cls not in ("UNet2DModel", "UNet2DConditionModel"):
            raise FewstepError(f"{where}: its unet is a {unet_cls}; {SUPPORTED}")
        layout, unet_dir, sched = "pipeline", src / "unet", [src / "scheduler" / "scheduler_config.json"]
        latent = {"codec": src / codec} if codec else None
        if text:
            latent.update(text_encoder=src / "text_encoder", tokenizer=src / "tokenizer")
        if xl:
            if not all(k in comps for k in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")):
                raise FewstepError(f"{where}: {pipe} needs text_encoder, tokenizer, text_encoder_2 and tokenizer_2 "
                                   f"(a refiner without the first encoder is not supported); {SUPPORTED}")
            latent.update(text_encoder_2=src / "text_encoder_2", tokenizer_2=src / "tokenizer_2",
                          force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
                          classes={k: comps[k][1] for k in ("tokenizer", "tokenizer_2")})
    elif (src / "unet").is_dir() and (src / "scheduler").is_dir():
        layout, unet_dir, sched = "unet+scheduler", src / "unet", [src / "scheduler" / "scheduler_config.json"]
        latent = None
    elif any(src.glob("*lora*.safetensors")) and not (src / "config.json").is_file():
        raise FewstepError(f"{src}: LoRA weights alone ({', '.join(p.name for p in src.glob('*lora*.safetensors'))}); "
                           "fewstep imports whole models: load the LoRA into its base pipeline in diffusers, fuse it "
                           "(pipe.fuse_lora()) and save_pretrained the result")
    else:
        latent = None
        layout, unet_dir = "unet", src
        sched = [src / "scheduler_config.json", src / "scheduler" / "scheduler_config.json",
                 src.parent / "scheduler" / "scheduler_config.json"]
    if not (unet_dir / "config.json").is_file():
        raise FewstepError(f"{unet_dir}: no config.json (expected a UNet2DModel saved with save_pretrained)")
    weights = weights_file(unet_dir)
    found = [p for p in sched if p.is_file()]
    if not found:
        raise FewstepError(f"{src}: no scheduler config (looked for {', '.join(str(p) for p in sched)}); the "
                           "noise schedule a UNet was trained with is in the scheduler_config.json that "
                           "save_pretrained writes for its scheduler")
    return {"layout": layout, "unet_dir": unet_dir, "weights": weights, "scheduler_config": found[0],
            "pipeline": None if index is None else index.get("_class_name"), "latent": latent}


def schedule_from_config(cfg: dict, where: str = "scheduler config"):
    """(ᾱ table as float64, fewstep parameterization, the scheduler facts for the card)."""
    cls = cfg.get("_class_name")
    if cls is not None and cls not in VP_SCHEDULERS:
        raise FewstepError(f"{where}: scheduler {cls!r} is not a discrete VP scheduler; supported: "
                           f"{', '.join(VP_SCHEDULERS)}")
    pred = cfg.get("prediction_type", "epsilon")
    if pred not in PREDICTION_TYPES:
        raise FewstepError(f"{where}: prediction_type {pred!r}: expected one of {', '.join(PREDICTION_TYPES)}")
    trained = cfg.get("trained_betas")
    kind = cfg.get("beta_schedule", "linear")
    if trained is None and kind not in BETA_SCHEDULES:
        raise FewstepError(f"{where}: beta_schedule {kind!r} is not supported; expected one of "
                           f"{', '.join(BETA_SCHEDULES)}, or explicit trained_betas")
    if cfg.get("rescale_betas_zero_snr"):
        raise FewstepError(f"{where}: rescale_betas_zero_snr=true gives a last step of zero signal (infinite σ), "
                           "which a σ-space sampler cannot start from; not supported")
    if cfg.get("timestep_type", "discrete") != "discrete":
        raise FewstepError(f"{where}: timestep_type {cfg['timestep_type']!r} is not supported; supported: 'discrete'")
    T = cfg.get("num_train_timesteps", 1000)
    if not isinstance(T, int) or T < 2:
        raise FewstepError(f"{where}: num_train_timesteps {T!r}: expected an integer >= 2")
    from diffusers import DDPMScheduler

    try:
        # diffusers' own table (float32), exactly what the model saw in training
        ref = DDPMScheduler(num_train_timesteps=T, beta_start=float(cfg.get("beta_start", 1e-4)),
                            beta_end=float(cfg.get("beta_end", 0.02)), beta_schedule=kind,
                            trained_betas=trained)
    except (ValueError, TypeError, NotImplementedError) as e:
        raise FewstepError(f"{where}: diffusers cannot build its betas ({e})") from None
    ab = ref.alphas_cumprod.double()
    if len(ab) != T:
        raise FewstepError(f"{where}: trained_betas has {len(ab)} entries but num_train_timesteps is {T}")
    if not ((ab > 0) & (ab < 1)).all() or not (ab[1:] < ab[:-1]).all():
        raise FewstepError(f"{where}: its betas do not give a strictly decreasing ᾱ inside (0, 1)")
    name = "trained_betas" if trained is not None else kind
    return ab, PREDICTION_TYPES[pred], name


def denoiser_from_folder(src: Path, feature_layer: str | None = None):
    """(Denoiser with the UNet's weights loaded key for key and, for a latent or text-to-image pipeline, its
    autoencoder and text encoder attached; where things were found; both configs)."""
    require_diffusers()
    where = locate(src)
    latent = where["latent"] or {}
    text, xl = "text_encoder" in latent, "text_encoder_2" in latent
    unet_cfg = check_unet_config(read_json(where["unet_dir"] / "config.json", "the UNet config"),
                                 str(where["unet_dir"] / "config.json"), conditional=text, xl=xl)
    if unet_cfg["out_channels"] != unet_cfg["in_channels"]:
        raise FewstepError(f"{where['unet_dir'] / 'config.json'}: out_channels={unet_cfg['out_channels']} differs "
                           f"from in_channels={unet_cfg['in_channels']} (a learned-variance output, or an "
                           "inpainting UNet's masked-image input?); supported: networks that predict one image or "
                           "latent (ε, v or x0) from it alone")
    sched_cfg = read_json(where["scheduler_config"], "the scheduler config")
    alpha_bar, param, table = schedule_from_config(sched_cfg, str(where["scheduler_config"]))
    if xl:
        codec = LatentCodec.describe(latent["codec"])
        size = unet_cfg["sample_size"] * codec["downsampling"]  # the pipeline's default height and width
        net = DiffusersXLUNet(unet=unet_cfg, feature_layer=feature_layer, time_ids=[size, size, 0, 0, size, size])
    else:
        net = (DiffusersCondUNet if text else DiffusersUNet)(unet=unet_cfg, feature_layer=feature_layer)
    sd = {f"unet.{k}": v.float() for k, v in read_weights(where["weights"]).items()}
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise FewstepError(f"{where['weights']}: the weights do not fit the UNet2DModel of its config.json: "
                           f"{str(e).strip().splitlines()[-1][:300]}") from None
    den = Denoiser(net, Schedule.discrete(alpha_bar, table_name=f"diffusers:{table}"), param).eval()
    if "codec" in latent:
        entry = LatentCodec.describe(latent["codec"])
        if entry["latent_channels"] != unet_cfg["in_channels"]:
            raise FewstepError(f"{latent['codec']}: the autoencoder's {entry['latent_channels']} latent channels do "
                               f"not match the UNet's in_channels={unet_cfg['in_channels']}")
        den.codec = LatentCodec(latent["codec"], {**entry, "sha256": folder_digest(latent["codec"])})
    if xl:
        den.text = _sdxl_text(latent, unet_cfg)
        den.guidance = SDXL_GUIDANCE
    elif text:
        entry = TextEncoder.describe(latent["text_encoder"], latent["tokenizer"])
        if entry["hidden_size"] != unet_cfg["cross_attention_dim"]:
            raise FewstepError(f"{latent['text_encoder']}: its hidden size {entry['hidden_size']} does not match the "
                               f"UNet's cross_attention_dim={unet_cfg['cross_attention_dim']}")
        den.text = TextEncoder(latent["text_encoder"], {**entry, "sha256": folder_digest(latent["text_encoder"])},
                               latent["tokenizer"])
        den.guidance = DEFAULT_GUIDANCE
    return den, where, unet_cfg, {k: _plain(v) for k, v in sched_cfg.items()}


# StableDiffusionPipeline's and StableDiffusionXLPipeline's default classifier-free guidance scales
DEFAULT_GUIDANCE, SDXL_GUIDANCE = 7.5, 5.0


def _sdxl_text(latent: dict, unet_cfg: dict) -> SDXLTextEncoders:
    """SDXL's two CLIP encoders, checked against the UNet: their widths side by side are its cross-attention
    width, the second's projection and the six size values its added embedding's input."""
    parts = []
    for role in ("text_encoder", "text_encoder_2"):
        tok = role.replace("text_encoder", "tokenizer")
        entry = TextEncoder.describe(latent[role], latent[tok], latent["classes"][tok])
        parts.append(TextEncoder(latent[role], {**entry, "sha256": folder_digest(latent[role])}, latent[tok]))
    width = sum(p.entry["hidden_size"] for p in parts)
    if width != unet_cfg["cross_attention_dim"]:
        raise FewstepError(f"{latent['text_encoder_2']}: the two encoders' widths side by side ({width}) do not match "
                           f"the UNet's cross_attention_dim={unet_cfg['cross_attention_dim']}")
    if parts[1].entry["kind"] != "clip-projection":
        raise FewstepError(f"{latent['text_encoder_2']}: SDXL's second encoder is a CLIPTextModelWithProjection "
                           f"(its pooled embedding), found {parts[1].entry['class']}")
    return SDXLTextEncoders(parts[0], parts[1], latent["force_zeros_for_empty_prompt"])


def default_sampler() -> dict:
    """The sampler fewstep's own teachers default to: DPM-Solver++(2M), 50 NFE on a logSNR grid."""
    return {"name": "dpmpp2m", "nfe": 50, "grid": "logsnr", "rho": 7.0, "final_zero": True, "clip": None}


# diffusers' default timestep_spacing of each scheduler class, where its config does not name one
DEFAULT_SPACING = {"DDIMScheduler": "leading", "DDPMScheduler": "leading", "PNDMScheduler": "leading",
                   "DDIMParallelScheduler": "leading", "DDPMParallelScheduler": "leading"}


def scheduler_sampler(cfg: dict) -> dict:
    """The imported model's default sampler: its scheduler's own, as its diffusers pipeline runs it (timestep
    spacing and offset, where the last step lands, clip_sample, DDPM's variance, the VP-scaled first state,
    50 steps; DDPMPipeline's 1000 for DDPMScheduler). Schedulers fewstep does not reproduce step for step get
    fewstep's default (DPM-Solver++(2M), 50 NFE on a logSNR grid), and the card says so."""
    cls = cfg.get("_class_name")
    spacing = cfg.get("timestep_spacing") or DEFAULT_SPACING.get(cls, "linspace")
    base = {"grid": spacing, "steps_offset": int(cfg.get("steps_offset", 0) or 0), "scale": "vp",
            "scheduler": cls}
    clip = float(cfg.get("clip_sample_range", 1.0)) if cfg.get("clip_sample", True) else None
    variance = {"fixed_small_log": "fixed_small"}.get(cfg.get("variance_type"), cfg.get("variance_type"))
    reproduced = spacing in SCHEDULER_SPACINGS and not cfg.get("thresholding")
    if cls in ("DDIMScheduler", "DDIMParallelScheduler") and reproduced:
        return {"name": "ddim", "nfe": 50, **base, "clip": clip,
                "final_sigma": "zero" if cfg.get("set_alpha_to_one", True) else "table-min"}
    if cls in ("DDPMScheduler", "DDPMParallelScheduler") and reproduced and variance in (None, *DDPM_VARIANCES):
        return {"name": "ddpm", "nfe": int(cfg.get("num_train_timesteps", 1000)), **base, "clip": clip,
                "variance": variance or "fixed_small"}
    if (cls == "DPMSolverMultistepScheduler" and reproduced and cfg.get("algorithm_type", "dpmsolver++") == "dpmsolver++"
            and int(cfg.get("solver_order", 2)) in (2, 3) and cfg.get("lower_order_final", True)
            and not cfg.get("euler_at_final") and not any(cfg.get(k) for k in KARRAS_LIKE)):
        return {"name": f"dpmpp{int(cfg.get('solver_order', 2))}m", "nfe": 50, **base, "clip": None,
                "final_sigma": "table-min" if cfg.get("final_sigmas_type") == "sigma_min" else "zero"}
    return {**default_sampler(), "note": f"{cls or 'the scheduler'} with these settings is not reproduced step for "
                                         "step; fewstep's default sampler instead"}


# DPM-Solver options that replace the table's own σ at the timesteps
KARRAS_LIKE = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas")


def import_diffusers(src: Path, out: Path, feature_layer: str | None = None) -> Path:
    """Convert a diffusers folder (pipeline, unet/ + scheduler/, or a bare UNet2DModel folder) into a
    fewstep checkpoint folder `out`; the card names the source and its content hash."""
    src, out = Path(src), Path(out)
    refuse_to_overwrite(out)
    den, where, unet_cfg, sched_cfg = denoiser_from_folder(src, feature_layer)
    net = den.net.config
    card = {"method": {"name": "imported"},
            "source": {"format": "diffusers", "layout": where["layout"], "path": str(src.resolve()),
                       "sha256": source_digest(src), "pipeline": where["pipeline"],
                       "weights": str(where["weights"].resolve()), "weights_sha256": weights_digest(where["weights"]),
                       "scheduler_path": str(where["scheduler_config"].resolve()),
                       "scheduler_sha256": sha256_file(where["scheduler_config"]),
                       "unet_config": unet_cfg, "scheduler_config": sched_cfg},
            "sampler": scheduler_sampler(sched_cfg), "teacher": None,
            "data": {"kind": "image", "shape": [net["in_channels"], net["resolution"], net["resolution"]],
                     "name": f"diffusers:{src.resolve().name}", "num_classes": net["num_classes"]}}
    if den.codec is not None:  # samples are images of the autoencoder's size; the network's are latents
        e = den.codec.entry
        size = net["resolution"] * e["downsampling"]
        card["data"].update(shape=[e["image_channels"], size, size],
                            latent_shape=[net["in_channels"], net["resolution"], net["resolution"]])
    if den.text is not None:
        card["text"] = {"negative_prompt": ""}
    return save_checkpoint(out, den, card)
