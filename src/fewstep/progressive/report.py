"""Progressive distillation in a bench's report: each fold's row beside the teacher's own chain on the same
phi. Reads results.json's rows only; loads no torch."""
from __future__ import annotations

from fewstep.distill.ceilings import ceiling_line, ceiling_ratio


def reading(summary: dict) -> list[str]:
    key = summary["quality_key"]
    rows = [r for r in summary["rows"] if not r.get("apart")]
    return [line for r in rows if r["method"] == "progressive"
            for line in [ceiling_line(r, rows, key, "trailing")] if line]


def headline(summary: dict) -> list[str]:
    """Each fold's row against the teacher's own DDIM chain on the same grid (the trailing phi): not a ceiling,
    as a fold is trained to step further than one teacher step."""
    key = summary["quality_key"]
    rows = [r for r in summary["rows"] if not r.get("apart")]
    said = [ceiling_ratio(r, rows, key, "trailing", "ddim", "the teacher's DDIM on its grid") for r in rows if r["method"] == "progressive"]
    return [s for s in said if s]
