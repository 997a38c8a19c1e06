"""Interop with the checkpoints people already have: diffusers pipeline folders (flow-matching SD3 ones
through fewstep.interop.flow_io) and NVlabs/edm network snapshots come in as fewstep checkpoints (`fewstep
import`), students go back out (`fewstep export --format diffusers`).

Foreign networks are rebuilt by fewstep's own implementations and keep their original parameter
names, so weights load key for key; nothing from a foreign file is ever executed.
"""
from __future__ import annotations

from pathlib import Path

from fewstep.checkpoint import CARD_NAME, read_card
from fewstep.errors import FewstepError, option
from fewstep.interop.diffusers_io import import_diffusers
from fewstep.interop.edm import import_edm_snapshot
from fewstep.interop.flow_io import import_flow_pipeline, is_flow_pipeline
from fewstep.interop.sources import cache_dir, foreign_kind, refuse_fewstep_export, source_digest

__all__ = ["cache_dir", "foreign_kind", "import_model", "imported_on_the_fly", "source_digest"]


def import_model(src: str | Path, out: str | Path, **options) -> Path:
    """Convert a foreign teacher into a fewstep checkpoint folder `out` (its card names the source
    and the source's sha256). Options go to the format's importer (e.g. `feature_layer`)."""
    kind = foreign_kind(src)
    if kind == "diffusers":
        refuse_fewstep_export(Path(src))
    if kind == "edm":
        return import_edm_snapshot(Path(src), Path(out), **options)
    if kind == "diffusers" and is_flow_pipeline(Path(src)):
        if options.get("feature_layer") is not None:
            raise FewstepError(f"{option('feature_layer')}: a flow-matching transformer gives no features "
                               "(SFDDM's feature loss)")
        return import_flow_pipeline(Path(src), Path(out), resolution=options.get("resolution"))
    if options.get("resolution") is not None:
        raise FewstepError(f"{option('resolution')}: only a flow-matching pipeline's size is chosen at import; other "
                           "models keep their own")
    if kind == "diffusers":
        return import_diffusers(Path(src), Path(out), **options)
    raise FewstepError(f"import {str(src)!r}: expected an NVlabs/edm network snapshot (.pkl) or a diffusers "
                       "folder (model_index.json, or unet/ + scheduler/, or a UNet2DModel folder)")


def imported_on_the_fly(src: str | Path) -> Path:
    """A fewstep checkpoint of a foreign teacher named directly (e.g. `--teacher model.pkl`),
    imported once into the cache, keyed by the source's content hash."""
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
