"""A step-table student's row beside the teacher's own chain on the same phi (the ceiling rows of
fewstep.distill.step_table), as report lines. Reads results.json's rows only; loads no torch."""
from __future__ import annotations


def ceilings(rows: list, key: str, nfe: int, index: str) -> dict:
    """{sampler: quality} of the teacher's own nfe-step chain on the index set (the ceiling rows)."""
    return {x["sampler"]: x["quality"][key]["mean"] for x in rows
            if x["method"] == "teacher-on-phi" and x["nfe"] == nfe and x["index"] == index}


def ceiling_row(rows: list, nfe: int, index: str, sampler: str) -> dict | None:
    """The teacher's own nfe-step chain on the index set with `sampler`, as a row (None without it)."""
    return next((x for x in rows if x["method"] == "teacher-on-phi" and x["nfe"] == nfe and x["index"] == index
                 and x["sampler"] == sampler), None)


def ceiling_line(r: dict, rows: list, key: str, index: str) -> str | None:
    """A student row next to the teacher's own chain on the same phi."""
    ceil = ceilings(rows, key, r["nfe"], index)
    if not ceil:
        return None
    return (f"- {r['label']}, NFE {r['nfe']}: {key.upper()} {r['quality'][key]['mean']:.3g}; the teacher's own "
            f"{r['nfe']}-step chain on the same phi scores " +
            ", ".join(f"{n.upper()} {v:.3g}" for n, v in sorted(ceil.items())) + ".")


def ceiling_ratio(r: dict, rows: list, key: str, index: str, sampler: str, name: str = "its ceiling") -> str | None:
    """"<label> at T' = n: 1.23× its ceiling": the row against the teacher's own chain on the same phi with the
    sampler the student samples with (None without that row). For SFDDM that chain is a ceiling (its loss is
    minimised by copying the teacher there); for progressive distillation only a reference, so it names it."""
    ceil = ceilings(rows, key, r["nfe"], index).get(sampler)
    if ceil is None:
        return None
    return f"{r['label']} at T' = {r['nfe']}: {r['quality'][key]['mean'] / ceil:.2f}× {name}"
