"""What a training method declares once, in its own package, for every part of fewstep that shows it:

- the command line: its sub-command, its own options, and how it runs (the training loop's options are
  added by the CLI, with the method's defaults);
- the benchmark: its settings (a dataclass the bench spec holds, its fields also `fewstep bench` flags), the
  rows it adds to a plan (typed `Row`s that distil, sample and time themselves through the services the
  bench passes in), and any extra measurement (figures) it makes;
- the report: its lines in the reading, and any section of its own.

A method's package defines `METHOD` in its `__init__`, which loads no torch: the parts that train are named
by module and imported when first called, so the registry, the report and `fewstep --help` stay light.
`fewstep.registry` lists the packages; nothing outside a method's package names it by string. This module
imports nothing of fewstep's.
"""
from __future__ import annotations

import argparse
import importlib
from dataclasses import asdict, dataclass, fields
from typing import Callable


@dataclass(frozen=True)
class Method:
    """A method's hooks (its name, command and help are its entry in fewstep.registry).

    `command`: the module of its sub-command, with `add_arguments(parser, add_loop_options)` (its own options;
    it calls add_loop_options(its recipe, notes=...) where the training loop's belong), `run(args)` and
    optionally `PARSER_OPTIONS` (description, epilog, formatter). `bench`: the module of its bench rows, with
    `bench_rows(bench)` and optionally `bench_extras(bench, summary, figure folder)` (entries added to the
    summary; an entry's "figures" are shown in the report). Both are imported on first use."""

    command: str
    bench: str | None = None
    bench_methods: tuple = ()                 # the names its rows answer to in a bench's `methods`
    settings: type | None = None              # its part of a bench spec (a `BenchSettings` subclass)
    reading: Callable | None = None           # (summary) -> report lines about its rows
    report_section: Callable | None = None    # (summary, figure folder, file prefix) -> [(title, lines)]
    headline: Callable | None = None          # (summary) -> its findings in a phrase or two (results page)
    across: Callable | None = None            # ({bench title: summary}) -> lines setting its rows of several
                                              # benches side by side (results page)

    def _module(self, name: str | None):
        return importlib.import_module(name) if name else None

    @property
    def parser_options(self) -> dict:
        return dict(getattr(self._module(self.command), "PARSER_OPTIONS", {}))

    def add_arguments(self, parser: argparse.ArgumentParser, add_loop_options: Callable[..., None]) -> None:
        self._module(self.command).add_arguments(parser, add_loop_options)

    def run(self, args: argparse.Namespace) -> None:
        self._module(self.command).run(args)

    def bench_rows(self, bench) -> list:
        return self._module(self.bench).bench_rows(bench) if self.bench else []

    def bench_extras(self, bench, summary: dict, figdir) -> dict:
        extras = getattr(self._module(self.bench), "bench_extras", None) if self.bench else None
        return extras(bench, summary, figdir) if extras is not None else {}


@dataclass
class BenchSettings:
    """A method's part of a bench spec. Its field names are unique across methods and name the same setting
    everywhere: in a preset, in `fewstep.api.run_bench(...)` keywords, as `fewstep bench --FIELD-NAME`
    (those in `FLAGS`) and in results.json's flat `spec` (as every bench has written it)."""

    # field name -> (argparse type, help[, other option strings]) for the fields `fewstep bench` offers as flags
    FLAGS = {}

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def add_bench_arguments(cls, parser: argparse.ArgumentParser) -> None:
        for name, (kind, text, *aliases) in cls.FLAGS.items():
            parser.add_argument("--" + name.replace("_", "-"), *(aliases[0] if aliases else ()), dest=name, type=kind,
                                default=None, help=text)

    @classmethod
    def overrides(cls, args: argparse.Namespace) -> dict:
        """The settings given on `fewstep bench`'s command line (None: not given)."""
        return {name: getattr(args, name) for name in cls.FLAGS if getattr(args, name, None) is not None}


@dataclass
class Row:
    """One line of a bench: a method at one NFE. A row measures itself through the bench it is given
    (sampling, scoring, timing stay the bench's); the subclasses a method defines add how their model is
    distilled, what budget it had and what its distillation cost.

    `method` is the `--methods` name the row belongs to; `panel` the cost figure's panel it is drawn in;
    `reference` rows (real data, the teacher) set levels and are never "best"; `apart` rows vary another
    row (an ablation) and are shown in their method's own report section, not in the main table."""

    key: str
    method: str
    nfe: int
    label: str
    model: str | None = None
    panel: str | None = None
    reference: bool = False
    apart: bool = False

    def record(self) -> dict:
        """The row's description in results.json (every field; the measured numbers are added beside)."""
        return asdict(self)

    # ---- hooks the bench calls (a row without a model is training-free) --------------------------------
    def ensure_model(self, bench):
        """Distil the row's model into bench.model_dir(self.model) unless a finished one is there."""
        raise NotImplementedError(f"row {self.key} has no model to distil")

    def budget(self, bench) -> dict | None:
        return None

    def sampling(self, bench) -> tuple:
        """(checkpoint, sample() keyword arguments, step condition) to sample the row with."""
        return bench.model_sampling(self)

    def made_from(self, bench) -> dict:
        """What, besides the teacher and the model weights, its numbers depend on."""
        return {}

    def distill_seconds(self, bench, card: dict) -> float | None:
        """Wall time that produced the row's model (earlier stages included)."""
        return float((card.get("training") or {}).get("wall_time_s") or 0) if self.model else None

    def distill_profile(self, bench, card: dict) -> dict | None:
        return (card.get("training") or {}).get("profile") if self.model else None

    def cost_curve(self, bench, ckpt, kw: dict) -> list[dict]:
        """Quality along the distillation (the snapshots its training wrote)."""
        return bench.snapshot_curve(self, ckpt, kw)
