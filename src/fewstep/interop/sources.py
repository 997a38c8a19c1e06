"""Foreign sources: what kind a path is, where imported copies are cached, a source's content hash, and how
a diffusers folder's JSON files and weights (one file or shards) are read."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from safetensors.torch import load_file

from fewstep.errors import FewstepError
from fewstep.hashing import folder_digest, sha256_file

WEIGHTS = "diffusion_pytorch_model.safetensors"
# the sampler block of a pipeline folder `fewstep export` wrote (model_index.json's "sampler")
EXPORT_FORMAT = "fewstep-diffusers-export"

EDM_SUFFIXES = (".pkl",)


def foreign_kind(path: str | Path) -> str | None:
    """'edm' for an NVlabs/edm snapshot, 'diffusers' for a diffusers folder, None otherwise."""
    p = Path(path)
    if p.is_file() and p.suffix in EDM_SUFFIXES:
        return "edm"
    if p.is_dir() and not (p / "fewstep.json").exists() and (
            (p / "model_index.json").is_file() or ((p / "unet").is_dir() and (p / "scheduler").is_dir())
            # any weights file, so that pickled .bin weights reach the importer's clear refusal
            or ((p / "config.json").is_file() and any(p.glob("diffusion_pytorch_model*")))
            # LoRA weights alone, so that they reach the importer's refusal
            or any(p.glob("*lora*.safetensors"))):
        return "diffusers"
    return None


def cache_dir() -> Path:
    return Path(os.environ.get("FEWSTEP_CACHE") or Path.home() / ".cache" / "fewstep")


def source_digest(src: Path) -> str:
    """sha256 of a file, or of a folder's files (fewstep.hashing.folder_digest)."""
    return sha256_file(src) if src.is_file() else folder_digest(src)


def read_json(path: Path, what: str) -> dict:
    """A JSON object from a foreign folder, or one line naming the file and what is wrong with it."""
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise FewstepError(f"{path}: missing ({what})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FewstepError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise FewstepError(f"{path}: JSON nested too deeply to read") from None
    if not isinstance(d, dict):
        raise FewstepError(f"{path}: expected a JSON object ({what})")
    return d


def refuse_fewstep_export(src: Path) -> None:
    """A pipeline folder `fewstep export` wrote is refused with where its model came from: it is that
    checkpoint's copy for other tools, its card left behind."""
    index = Path(src) / "model_index.json"
    if not index.is_file():
        return
    sampler = read_json(index, "the pipeline's component list").get("sampler")
    if not (isinstance(sampler, dict) and sampler.get("format") == EXPORT_FORMAT):
        return
    model = sampler.get("model") if isinstance(sampler.get("model"), dict) else {}
    origin = f" (a {model['method']} model exported from {model['source_path']})" \
        if model.get("method") and model.get("source_path") else ""
    raise FewstepError(f"{str(src)!r} is a pipeline folder `fewstep export` wrote{origin}: fewstep does not read "
                       "its exports back; use the fewstep checkpoint it was exported from")


# a model saved in several files (diffusers' max_shard_size): an index names the file of every tensor
SHARD_INDEX = WEIGHTS + ".index.json"


def weights_file(folder: Path) -> Path:
    """A diffusers model folder's weights: its safetensors file, or the index of its shards."""
    for name in (WEIGHTS, SHARD_INDEX):
        if (folder / name).is_file():
            return folder / name
    found = sorted(p.name for p in folder.glob("diffusion_pytorch_model*"))
    raise FewstepError(f"{folder}: no {WEIGHTS} nor {SHARD_INDEX} (found: {', '.join(found) or 'nothing'}); fewstep "
                       "reads float32/float16/bfloat16 safetensors weights only (pickled .bin files are never loaded; "
                       "re-save with save_pretrained(..., safe_serialization=True))")


def _shards(index: Path) -> list[Path]:
    data = read_json(index, "the index of the weights' shards")
    names = sorted(set((data.get("weight_map") or {}).values()))
    if not names or not all(isinstance(n, str) and "/" not in n and "\\" not in n for n in names):
        raise FewstepError(f"{index}: expected a weight_map from tensor names to shard files in its folder")
    return [index.parent / n for n in names]


def read_weights(path: Path) -> dict:
    """The tensors of a weights file or of every shard an index names, on the CPU."""
    files = _shards(path) if path.name == SHARD_INDEX else [path]
    sd = {}
    for f in files:
        try:
            sd.update(load_file(str(f), device="cpu"))
        except Exception as e:  # safetensors raises its own error types for malformed files
            raise FewstepError(f"{f}: not a readable safetensors file ({e})") from None
    return sd


def weights_digest(path: Path) -> str:
    """sha256 of a weights file, or of the index and every shard (their hashes in order)."""
    if path.name != SHARD_INDEX:
        return sha256_file(path)
    return hashlib.sha256("".join(sha256_file(f) for f in [path, *_shards(path)]).encode()).hexdigest()
