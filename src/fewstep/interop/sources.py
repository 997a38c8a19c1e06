"""Foreign sources: what kind a path is, where imported copies are cached, and a source's content hash."""
from __future__ import annotations

import os
from pathlib import Path

from fewstep.hashing import folder_digest, sha256_file

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
