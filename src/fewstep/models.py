"""What a model argument names, resolved in one place for every command: a model shipped with fewstep (by
name, e.g. `digits-teacher`), a fewstep checkpoint folder, or a foreign teacher — an NVlabs/edm snapshot
(.pkl) or a diffusers folder — imported once into the cache and used as the fewstep folder it became.

Below this module, `checkpoint` reads and writes fewstep folders only and `interop` converts foreign formats;
neither resolves names.
"""
from __future__ import annotations

from pathlib import Path

import torch

from fewstep.checkpoint import CARD_NAME, WEIGHTS_NAME, Checkpoint, load_checkpoint, read_card
from fewstep.errors import FewstepError
from fewstep.interop import foreign_kind, imported_on_the_fly

ASSETS = Path(__file__).parent / "assets"


def builtin_models() -> dict[str, Path]:
    """Models shipped inside the package, by name (e.g. `digits-teacher`)."""
    if not ASSETS.is_dir():
        return {}
    return {p.name: p for p in sorted(ASSETS.iterdir()) if (p / CARD_NAME).is_file()}


def resolve_model(name_or_path: str | Path) -> Path:
    """The fewstep checkpoint folder a model argument names (a foreign teacher is imported on the fly)."""
    p = Path(name_or_path)
    if foreign_kind(p):
        return imported_on_the_fly(p)
    if p.is_dir():
        return p
    builtins = builtin_models()
    if str(name_or_path) in builtins:
        return builtins[str(name_or_path)]
    if p.exists():
        raise FewstepError(f"model {str(name_or_path)!r}: expected a checkpoint directory "
                           f"(with {CARD_NAME} and {WEIGHTS_NAME}), got a file")
    names = ", ".join(builtins) or "none installed"
    raise FewstepError(f"model {str(name_or_path)!r}: no such checkpoint directory, and not a built-in model "
                       f"(built-ins: {names})")


def load_model(name_or_path: str | Path, device: str | torch.device = "cpu", verify: bool = True) -> Checkpoint:
    """The checkpoint a model argument names, loaded (see `resolve_model`)."""
    return load_checkpoint(resolve_model(name_or_path), device=device, verify=verify)


def model_card(name_or_path: str | Path) -> dict:
    return read_card(resolve_model(name_or_path))


def as_model(model, device: str | torch.device = "cpu", what: str = "model") -> Checkpoint:
    """A model argument of the Python API: a loaded model (used as it is) or anything `load_model` takes."""
    if isinstance(model, Checkpoint):
        return model
    if not isinstance(model, (str, Path)):
        raise FewstepError(f"{what}={model!r}: expected a loaded model (fewstep.load), a built-in model name or a "
                           "checkpoint folder")
    return load_model(model, device=device)
