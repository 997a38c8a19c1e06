"""What a training method declares once, in its own module, for every part of fewstep that shows it:

- the command line: its sub-command, its own options, and how it runs (the training loop's options are
  added by the CLI, with the method's defaults);
- the benchmark: the rows it adds to a plan (typed `Row`s that distil, sample and time themselves
  through the services the bench passes in), and any extra measurement (figures) it makes;
- the report: its lines in the reading, and any section of its own.

`fewstep.registry` lists the methods; nothing outside a method's module names it by string. This
module imports nothing of fewstep's, so the registry and the command line can read it without loading
torch.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Method:
    """A method's hooks (its name, command and help are its entry in fewstep.registry)."""

    # (parser, add_loop_options): its own options; it calls add_loop_options(**its defaults) where the
    # training loop's options belong (steps, batch, lr, lr_schedule, ema, grad_clip, lr_note, clip_note)
    add_arguments: Callable[[argparse.ArgumentParser, Callable[..., None]], None]
    run: Callable[[argparse.Namespace], None]                 # the command, from its parsed arguments
    parser_options: dict = field(default_factory=dict)        # description, epilog, formatter of its parser
    bench_methods: tuple = ()                    # the names its rows answer to in a bench's `methods`
    bench_rows: Callable | None = None           # (bench) -> the rows it adds to the plan, in order
    # (bench, summary, figure folder) -> entries added to the summary; an entry's "figures" (file names in the
    # figure folder) are shown in the report
    bench_extras: Callable | None = None
    reading: Callable | None = None              # (summary) -> report lines about its rows
    report_section: Callable | None = None       # (summary, figure folder, file prefix) -> (title, lines) or None


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
