"""Interop with the checkpoints people already have: diffusers pipeline folders and NVlabs/edm
network snapshots come in as fewstep checkpoints (`fewstep import`), students go back out
(`fewstep export --format diffusers`).

Foreign networks are rebuilt by fewstep's own implementations and keep their original parameter
names, so weights load key for key; nothing from a foreign file is ever executed.
"""
from __future__ import annotations

import os
from pathlib import Path

from fewstep.errors import FewstepError

EDM_SUFFIXES = (".pkl",)


def foreign_kind(path: str | Path) -> str | None:
    """'edm' for an NVlabs/edm snapshot, 'diffusers' for a diffusers folder, None otherwise."""
    p = Path(path)
    if p.is_file() and p.suffix in EDM_SUFFIXES:
        return "edm"
    if p.is_dir() and not (p / "fewstep.json").exists() and (
            (p / "model_index.json").is_file() or ((p / "unet").is_dir() and (p / "scheduler").is_dir())
            # any weights file, so that pickled .bin weights reach the importer's clear refusal
            or ((p / "config.json").is_file() and any(p.glob("diffusion_pytorch_model*")))):
        return "diffusers"
    return None


def import_model(src: str | Path, out: str | Path, **options) -> Path:
    """Convert a foreign teacher into a fewstep checkpoint folder `out` (its card names the source
    and the source's sha256). Options go to the format's importer (e.g. `feature_layer`)."""
    kind = foreign_kind(src)
    if kind == "edm":
        from fewstep.interop.edm import import_edm_snapshot
        return import_edm_snapshot(Path(src), Path(out), **options)
    if kind == "diffusers":
        from fewstep.interop.diffusers_io import import_diffusers
        return import_diffusers(Path(src), Path(out), **options)
    raise FewstepError(f"import {str(src)!r}: expected an NVlabs/edm network snapshot (.pkl) or a diffusers "
                       "folder (model_index.json, or unet/ + scheduler/, or a UNet2DModel folder)")


def cache_dir() -> Path:
    return Path(os.environ.get("FEWSTEP_CACHE") or Path.home() / ".cache" / "fewstep")


def imported_on_the_fly(src: str | Path) -> Path:
    """A fewstep checkpoint of a foreign teacher named directly (e.g. `--teacher model.pkl`),
    imported once into the cache, keyed by the source's content hash."""
    from fewstep.checkpoint import CARD_NAME, read_card

    src = Path(src).resolve()
    key = source_digest(src)[:16]
    out = cache_dir() / "imported" / f"{src.name}-{key}"
    if (out / CARD_NAME).is_file():
        try:
            read_card(out)
            return out
        except FewstepError:
            pass  # a broken cache entry is rebuilt below
    return import_model(src, out)


def source_digest(src: Path) -> str:
    """sha256 of a file, or of a folder's files (relative names and contents, in sorted order)."""
    import hashlib

    from fewstep.checkpoint import sha256_file

    if src.is_file():
        return sha256_file(src)
    h = hashlib.sha256()
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(src)).encode() + b"\0" + sha256_file(f).encode())
    return h.hexdigest()
