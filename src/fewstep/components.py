"""The frozen parts of a latent or text-conditioned model beside its denoising network: the autoencoder
between images and latents (a diffusers AutoencoderKL or VQModel) and the text encoder with its tokenizer (a
transformers CLIPTextModel and CLIPTokenizer).

Each lives in a sub-folder of the checkpoint (`vae/`, `text_encoder/`, `tokenizer/`, as diffusers lays them
out; safetensors only), is named with its content hash on the card (`components`), is loaded on first use,
and is never trained: a student shares its teacher's (a deep copy of a denoiser keeps the same component
object, and saving a student links the folders into its checkpoint, or copies them across file systems).

Latents follow diffusers' pipelines: an image x in [-1, 1] encodes to z = scaling_factor · (E(x) − shift_factor)
(the AutoencoderKL posterior's mean, a VQModel's pre-quantisation latents; SD3's and Flux's autoencoders have a
shift_factor, the others 0) and a latent decodes as D(z / scaling_factor + shift_factor) (a VQModel quantises
first, as LDMPipeline decodes). Prompts follow StableDiffusionPipeline: padded to the tokenizer's max length,
the encoder's last hidden state; or StableDiffusion3Pipeline (SD3TextEncoders): two CLIP encoders' penultimate
hidden states side by side and T5's last, one sequence, with the CLIPs' pooled projections beside it; or
FluxPipeline (FluxTextEncoders): T5's last hidden state, with CLIP's pooled output beside it.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch

from fewstep.errors import FewstepError
from fewstep.hashing import folder_digest

CODEC_KINDS = {"AutoencoderKL": "autoencoderkl", "VQModel": "vqmodel"}
ENCODER_KINDS = {"CLIPTextModel": "clip", "CLIPTextModelWithProjection": "clip-projection", "T5EncoderModel": "t5"}
TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast", "T5Tokenizer", "T5TokenizerFast")
# the batch components run in (their memory, not the model's, bounds it)
COMPONENT_BATCH = 16


def require(package: str, extra: str):
    """An optional package, or one line naming the extra that installs it."""
    try:
        return __import__(package)
    except ImportError:
        raise FewstepError(f"this model needs the optional package {package}: pip install 'fewstep[{extra}]'") from None


def check_safetensors_only(folder: Path, what: str):
    if not any(folder.glob("*.safetensors")):
        found = ", ".join(sorted(p.name for p in folder.iterdir() if p.is_file())) or "nothing"
        raise FewstepError(f"{folder}: no safetensors weights for the {what} (found: {found}); fewstep reads "
                           "safetensors only (pickled .bin files are never loaded; re-save with "
                           "save_pretrained(..., safe_serialization=True))")


class Component:
    """A frozen part of a model, in a folder, loaded on first use and shared by every copy of the model."""

    def __init__(self, folder: Path, entry: dict):
        self.folder, self.entry = Path(folder), dict(entry)
        self._module, self.device, self.dtype = None, torch.device("cpu"), torch.float32

    def __deepcopy__(self, memo):
        return self  # frozen: a student's copy of its teacher shares it

    @property
    def module(self):
        if self._module is None:
            module = self._load().to(self.device)
            self._module = (module if self.dtype == torch.float32 else module.to(self.dtype)).eval().requires_grad_(False)
        return self._module

    def to(self, device=None, dtype=None):
        self.device = torch.device(device) if device is not None else self.device
        self.dtype = dtype or self.dtype
        if self._module is not None:
            self._module.to(self.device)
            if self.dtype != torch.float32:
                self._module.to(self.dtype)
        return self

    def _load(self):
        raise NotImplementedError


class LatentCodec(Component):
    """Images ↔ latents (see the module's docstring)."""

    @classmethod
    def describe(cls, folder: Path, image_resolution: int | None = None) -> dict:
        """The card entry of an autoencoder folder, checked: kind, scaling factor, channels."""
        cfg = _read_config(folder / "config.json", "the autoencoder config")
        kind = CODEC_KINDS.get(cfg.get("_class_name"))
        if kind is None:
            raise FewstepError(f"{folder}: autoencoder {cfg.get('_class_name')!r}; supported: {', '.join(CODEC_KINDS)}")
        check_safetensors_only(folder, "autoencoder")
        down = len(cfg.get("block_out_channels") or [1]) - 1
        return {"kind": kind, "class": cfg["_class_name"], "scaling_factor": float(cfg.get("scaling_factor") or 1.0),
                "shift_factor": float(cfg.get("shift_factor") or 0.0),
                "latent_channels": int(cfg.get("latent_channels", 4)), "image_channels": int(cfg.get("out_channels", 3)),
                "downsampling": 2 ** down}

    def _load(self):
        diffusers = require("diffusers", "diffusers")
        cls = getattr(diffusers, self.entry["class"])
        try:
            return cls.from_pretrained(self.folder, use_safetensors=True, local_files_only=True,
                                       low_cpu_mem_usage=False)  # the same without the `accelerate` package
        except (OSError, ValueError, RuntimeError) as e:
            raise FewstepError(f"{self.folder}: cannot load the autoencoder ({str(e).splitlines()[0]})") from None

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        vae, s = self.module, self.entry["scaling_factor"]
        out = []
        for i in range(0, len(images), COMPONENT_BATCH):
            x = images[i:i + COMPONENT_BATCH].to(self.device, self.dtype)
            enc = vae.encode(x)
            z = enc.latent_dist.mean if self.entry["kind"] == "autoencoderkl" else enc.latents
            out.append(((z - self.entry.get("shift_factor", 0.0)) * s).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae, s = self.module, self.entry["scaling_factor"]
        out = []
        for i in range(0, len(latents), COMPONENT_BATCH):
            z = latents[i:i + COMPONENT_BATCH].to(self.device, self.dtype) / s + self.entry.get("shift_factor", 0.0)
            out.append(vae.decode(z).sample.float().to(latents.device))
        return torch.cat(out)


class TextEncoder(Component):
    """Prompts → the conditioning a text-to-image network attends to (see the module's docstring); its
    folder is the encoder's, `entry["tokenizer"]` names the tokenizer's folder beside it."""

    @classmethod
    def describe(cls, encoder: Path, tokenizer: Path, tokenizer_class: str = "CLIPTokenizer") -> dict:
        cfg = _read_config(encoder / "config.json", "the text encoder config")
        arch = (cfg.get("architectures") or [None])[0]
        if arch not in ENCODER_KINDS:
            raise FewstepError(f"{encoder}: text encoder {arch!r}; supported: {', '.join(ENCODER_KINDS)}")
        if tokenizer_class not in TOKENIZER_CLASSES:
            raise FewstepError(f"{tokenizer}: tokenizer {tokenizer_class!r}; supported: {', '.join(TOKENIZER_CLASSES)}")
        check_safetensors_only(encoder, "text encoder")
        if not tokenizer.is_dir() or not any(tokenizer.iterdir()):
            raise FewstepError(f"{tokenizer}: the tokenizer's files are missing")
        hidden = cfg.get("d_model") if arch == "T5EncoderModel" else cfg.get("hidden_size", 768)
        return {"kind": ENCODER_KINDS[arch], "class": arch, "hidden_size": int(hidden),
                "max_length": int(cfg.get("max_position_embeddings", 77)), "tokenizer_class": tokenizer_class,
                "role": encoder.name}

    def __init__(self, folder: Path, entry: dict, tokenizer_folder: Path):
        super().__init__(folder, entry)
        self.tokenizer_folder = Path(tokenizer_folder)
        self._tokenizer = None
        self._told_truncated = set()  # prompts whose cut part was already named

    def _load(self):
        transformers = require("transformers", "text")
        transformers.utils.logging.disable_progress_bar()
        try:
            return getattr(transformers, self.entry["class"]).from_pretrained(
                self.folder, use_safetensors=True, local_files_only=True)
        except (OSError, ValueError, RuntimeError) as e:
            raise FewstepError(f"{self.folder}: cannot load the text encoder ({str(e).splitlines()[0]})") from None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            transformers = require("transformers", "text")
            try:
                cls = getattr(transformers, self.entry.get("tokenizer_class", "CLIPTokenizer"))
                self._tokenizer = cls.from_pretrained(self.tokenizer_folder, local_files_only=True)
            except (OSError, ValueError) as e:
                raise FewstepError(f"{self.tokenizer_folder}: cannot load the tokenizer "
                                   f"({str(e).splitlines()[0]})") from None
        return self._tokenizer

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """(len(prompts), max length, hidden size), float32 on the component's device: the last hidden state."""
        return self.hidden_and_pooled(prompts)[0]

    @torch.no_grad()
    def hidden_and_pooled(self, prompts: list[str], max_length: int | None = None, penultimate: bool = False,
                          note: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states, pooled projection or None): the last hidden state (or the one before it), padded to
        `max_length` tokens (None: the tokenizer's), and a CLIPTextModelWithProjection's text_embeds. `note`:
        name what the length cuts off (once for encoders that cut alike)."""
        tok, enc = self.tokenizer, self.module
        max_length = max_length or tok.model_max_length
        if note:
            self._note_truncated(prompts, max_length)
        hidden, pooled = [], []
        for i in range(0, len(prompts), COMPONENT_BATCH):
            ids = tok(list(prompts[i:i + COMPONENT_BATCH]), padding="max_length", max_length=max_length,
                      truncation=True, return_tensors="pt")
            mask = ids.attention_mask.to(self.device) if getattr(enc.config, "use_attention_mask", False) else None
            out = enc(ids.input_ids.to(self.device), attention_mask=mask, output_hidden_states=penultimate)
            hidden.append((out.hidden_states[-2] if penultimate else out[0]).float())
            if self.entry["kind"] == "clip-projection":
                pooled.append(out.text_embeds.float())
            elif self.entry["kind"] == "clip":  # CLIPTextModel's pooled output (Flux's pooled embedding)
                pooled.append(out.pooler_output.float())
        return torch.cat(hidden), torch.cat(pooled) if pooled else None

    def _note_truncated(self, prompts: list[str], max_length: int):
        """Say, once per prompt, what the tokenizer's limit cuts off (as diffusers' pipelines warn)."""
        tok = self.tokenizer
        for p in set(prompts) - self._told_truncated:
            ids = tok(p, truncation=False)["input_ids"]
            if len(ids) > max_length:
                cut = tok.decode(ids[max_length - 1:-1])
                print(f"fewstep: note: a prompt is longer than the {self.entry['role']}'s {max_length} tokens; "
                      f"this part of it is cut off: {cut!r}", file=sys.stderr)
            self._told_truncated.add(p)

    @property
    def parts(self) -> list:
        return [self]


class TextEncoderGroup:
    """Several text encoders whose outputs a pipeline combines (`encode` → token embeddings, pooled embedding);
    frozen and shared like every component. `settings` is what the card keeps to rebuild the combination,
    beside each encoder's own entry."""

    def __deepcopy__(self, memo):
        return self

    @property
    def parts(self) -> list:
        raise NotImplementedError

    def to(self, device=None, dtype=None):
        for p in self.parts:
            p.to(device, dtype)
        return self


class SD3TextEncoders(TextEncoderGroup):
    """StableDiffusion3Pipeline's prompt encoding: CLIP-L and CLIP-G (CLIPTextModelWithProjection), each padded to
    the first tokenizer's length, their penultimate hidden states side by side and zero-padded to the joint
    width, followed by T5's last hidden state over `max_sequence_length` tokens (zeros where the pipeline has no
    T5); the two pooled projections side by side."""

    def __init__(self, clip_l: TextEncoder, clip_g: TextEncoder, t5: TextEncoder | None, joint_dim: int,
                 max_sequence_length: int = 256):
        self.clip_l, self.clip_g, self.t5 = clip_l, clip_g, t5
        self.joint_dim, self.max_sequence_length = int(joint_dim), int(max_sequence_length)

    @property
    def parts(self) -> list:
        return [p for p in (self.clip_l, self.clip_g, self.t5) if p is not None]

    @property
    def settings(self) -> dict:
        return {"kind": "sd3", "joint_dim": self.joint_dim, "max_sequence_length": self.max_sequence_length}

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        length = self.clip_l.tokenizer.model_max_length  # the pipeline pads both CLIPs to the first's length
        h1, p1 = self.clip_l.hidden_and_pooled(prompts, length, penultimate=True)
        h2, p2 = self.clip_g.hidden_and_pooled(prompts, length, penultimate=True, note=False)  # cut as the first
        clip = torch.cat([h1, h2], -1)
        if self.t5 is None:
            t5 = torch.zeros(len(prompts), self.max_sequence_length, self.joint_dim, device=clip.device)
        else:
            t5 = self.t5.hidden_and_pooled(prompts, self.max_sequence_length)[0]
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5], -2), torch.cat([p1, p2], -1)


def _read_config(path: Path, what: str) -> dict:
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise FewstepError(f"{path}: missing ({what})") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise FewstepError(f"{path}: not a readable JSON object ({what}: {e})") from None
    if not isinstance(cfg, dict):
        raise FewstepError(f"{path}: expected a JSON object ({what})")
    return cfg


PROMPTS_FILE = Path(__file__).parent / "assets" / "prompts.txt"


def default_prompts() -> list[str]:
    """fewstep's shipped prompts for distilling a text-to-image teacher: everyday scenes, objects, animals,
    people, places and styles, one a line."""
    return [line.strip() for line in PROMPTS_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---- in a checkpoint folder -------------------------------------------------------------------------------

class SDXLTextEncoders(TextEncoderGroup):
    """StableDiffusionXLPipeline's prompt encoding: both CLIP encoders' penultimate hidden states side by side
    (each padded to its own tokenizer's length), the second's projection as the pooled embedding. With
    `zeros_for_empty_prompt` (the pipeline's force_zeros_for_empty_prompt), no negative prompt means zero
    embeddings, not the encoding of ""."""

    def __init__(self, clip_l: TextEncoder, clip_g: TextEncoder, zeros_for_empty_prompt: bool = True):
        self.clip_l, self.clip_g, self.zeros_for_empty_prompt = clip_l, clip_g, bool(zeros_for_empty_prompt)

    @property
    def parts(self) -> list:
        return [self.clip_l, self.clip_g]

    @property
    def settings(self) -> dict:
        return {"kind": "sdxl", "zeros_for_empty_prompt": self.zeros_for_empty_prompt}

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        h1 = self.clip_l.hidden_and_pooled(prompts, penultimate=True)[0]
        h2, pooled = self.clip_g.hidden_and_pooled(prompts, penultimate=True, note=False)
        return torch.cat([h1, h2], -1), pooled


class FluxTextEncoders(TextEncoderGroup):
    """FluxPipeline's prompt encoding: T5's last hidden state over `max_sequence_length` tokens is the sequence
    the transformer attends to, CLIP's pooled output the vector beside it. A guidance-distilled Flux takes the
    guidance scale as an input (`embedded_guidance`) instead of classifier-free guidance."""

    def __init__(self, clip: TextEncoder, t5: TextEncoder, max_sequence_length: int = 512,
                 embedded_guidance: bool = False):
        self.clip, self.t5 = clip, t5
        self.max_sequence_length, self.embedded_guidance = int(max_sequence_length), bool(embedded_guidance)

    @property
    def parts(self) -> list:
        return [self.clip, self.t5]

    @property
    def settings(self) -> dict:
        return {"kind": "flux", "max_sequence_length": self.max_sequence_length,
                "embedded_guidance": self.embedded_guidance}

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.clip.hidden_and_pooled(prompts)[1]
        return self.t5.hidden_and_pooled(prompts, self.max_sequence_length)[0], pooled


def tokenizer_role(role: str) -> str:
    """The tokenizer folder beside a text encoder's: text_encoder_2 → tokenizer_2, as diffusers names them."""
    return role.replace("text_encoder", "tokenizer")


def components_from_card(card: dict, path: Path) -> tuple[LatentCodec | None, object]:
    """The components a card names, from the checkpoint folder `path` (loaded when first used)."""
    entries = card.get("components") or {}
    for name, entry in entries.items():
        if not (path / entry["folder"]).is_dir():
            raise FewstepError(f"{path}: its card names the {name} in {entry['folder']}/, which is missing")
    codec = text = None
    if "vae" in entries:
        codec = LatentCodec(path / entries["vae"]["folder"], entries["vae"])
    encoders = {role: TextEncoder(path / entries[role]["folder"], entries[role],
                                  path / entries[tokenizer_role(role)]["folder"])
                for role in ("text_encoder", "text_encoder_2", "text_encoder_3") if role in entries}
    settings = (card.get("text") or {}).get("encoders")
    if settings is not None and settings.get("kind") == "sd3":
        text = SD3TextEncoders(encoders["text_encoder"], encoders["text_encoder_2"], encoders.get("text_encoder_3"),
                               settings["joint_dim"], settings["max_sequence_length"])
    elif settings is not None and settings.get("kind") == "sdxl":
        text = SDXLTextEncoders(encoders["text_encoder"], encoders["text_encoder_2"], settings["zeros_for_empty_prompt"])
    elif settings is not None and settings.get("kind") == "flux":
        text = FluxTextEncoders(encoders["text_encoder"], encoders["text_encoder_2"], settings["max_sequence_length"],
                                settings["embedded_guidance"])
    elif settings is not None:
        raise FewstepError(f"{path}: its card's text encoders are of kind {settings.get('kind')!r}; this fewstep "
                           "knows 'sd3', 'sdxl' and 'flux' (a newer fewstep wrote it?)")
    elif "text_encoder" in encoders:
        text = encoders["text_encoder"]
    return codec, text


def place_components(out_dir: Path, codec: LatentCodec | None, text) -> dict:
    """Put the components' folders into a checkpoint folder (hard links where the file system allows, else
    copies; a folder already there with the same content is kept) and return the card's `components`."""
    entries = {}
    parts = []
    if codec is not None:
        parts.append(("vae", codec.folder, codec.entry))
    for enc in ([] if text is None else text.parts):
        role = enc.entry.get("role", "text_encoder")
        parts.append((role, enc.folder, enc.entry))
        parts.append((tokenizer_role(role), enc.tokenizer_folder, {}))
    for name, src, entry in parts:
        dst = Path(out_dir) / name  # diffusers' layout: each part in a folder of its name
        digest = entry.get("sha256") or folder_digest(src)
        if src.resolve() != dst.resolve():
            if dst.exists() and not _same_files(src, dst):
                shutil.rmtree(dst)
            if not dst.exists():
                _link_tree(src, dst)
        entries[name] = {**entry, "folder": name, "sha256": digest}
    return entries


def _same_files(a: Path, b: Path) -> bool:
    """The same file names and sizes (a run's later checkpoints find the folders its first one placed)."""
    def listing(folder):
        return sorted((p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob("*") if p.is_file())
    return listing(a) == listing(b)


def _link_tree(src: Path, dst: Path):
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)

    def link_or_copy(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)
    shutil.copytree(src, tmp, copy_function=link_or_copy)
    os.replace(tmp, dst)
