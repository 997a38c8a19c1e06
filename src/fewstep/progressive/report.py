"""Progressive distillation in a bench's report: each fold's row beside the teacher's own chain on the same
phi. Reads results.json's rows only; loads no torch."""
from __future__ import annotations

from fewstep.distill.ceilings import ceiling_line


def reading(summary: dict) -> list[str]:
    key = summary["quality_key"]
    rows = [r for r in summary["rows"] if not r.get("apart")]
    return [line for r in rows if r["method"] == "progressive"
            for line in [ceiling_line(r, rows, key, "trailing")] if line]
