"""Every training method fewstep runs, in one list. Adding a method is one package whose `__init__` defines
`METHOD` (a `fewstep.method.Method`) and one line here.

Each entry names its command and help (all `fewstep --help` needs) and the package that holds the method,
imported when the method is used; a package's `__init__` loads no torch (its training parts are imported when
they run), so the command line and the report start light.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from fewstep.method import Method


@dataclass(frozen=True)
class Entry:
    name: str
    command: str       # "train" or "distill"
    help: str
    package: str

    def load(self) -> Method:
        return importlib.import_module(self.package).METHOD


METHODS = (
    Entry("train", "train", "train a teacher diffusion model", "fewstep.teacher"),
    Entry("sfd", "distill", "Simple and Fast Distillation (data-free; SFD, SFD-v, 1-NFE stage)", "fewstep.sfd"),
    Entry("sfddm", "distill", "Single-fold distillation into a T'-step model (needs training data)", "fewstep.sfddm"),
    Entry("progressive", "distill", "progressive distillation (Salimans & Ho): folds that halve the steps (needs data)",
          "fewstep.progressive"),
)


def methods() -> list[Method]:
    """Every method, loaded, in registry order (the order of a bench plan's rows)."""
    return [e.load() for e in METHODS]
