"""Numbers and figures for people: how a quality, an interval, a time or a budget is written, and the
matplotlib setup every figure shares. Used by the report and by the methods' own report sections."""
from __future__ import annotations

import math
from pathlib import Path

from fewstep.files import atomic_write


def fmt(q: dict | None, digits: int = 3) -> str:
    """mean ± std (over sample seeds), or the mean alone when there is no spread."""
    if not q:
        return "–"
    return f"{q['mean']:.{digits}g} ± {q['std']:.1g}" if q["std"] else f"{q['mean']:.{digits}g}"


def interval(quality: dict, key: str) -> tuple[float, float] | None:
    """A metric's 95 % interval where the row has one (Fréchet distances measured with intervals)."""
    lo, hi = quality.get(f"{key}_ci_low"), quality.get(f"{key}_ci_high")
    return (lo["mean"], hi["mean"]) if lo and hi else None


def fmt_quality(quality: dict, key: str, digits: int = 3) -> str:
    """mean ± half its 95 % interval where there is one, else mean ± std over the sample seeds."""
    ci = interval(quality, key)
    if ci is None:
        return fmt(quality.get(key), digits)
    return f"{quality[key]['mean']:.{digits}g} ± {(ci[1] - ci[0]) / 2:.2g}"


def fmt_paired(r: dict, name: str = "rmse") -> str:
    """A row's paired distance to the teacher's samples, mean ± half its 95 % interval."""
    p = (r.get("paired") or {}).get(name)
    if not p:
        return "–"
    return f"{p['mean']:.3g} ± {(p['ci_high'] - p['ci_low']) / 2:.1g}"


def fmt_time(s: float | None) -> str:
    if s is None:
        return "–"
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def budget_label(r: dict) -> str:
    """A distillation's training budget: iterations × batch (per fold where it trains in folds)."""
    b = r.get("budget")
    if not b:
        return "–"
    text = f"{b['iterations']} × {b['batch']}" + (" a fold" if b.get("per_fold") else "")
    if b.get("planned_iterations"):  # measured as reached, on its way
        text += f" of {b['planned_iterations']} (unfinished)"
    return text


def along_the_run(r: dict, level: float | None, key: str, per_step: int | None = None, unit: str = "iterations",
                  factors=(1.5, 1.2)) -> str | None:
    """A distillation row's quality along its run (its snapshots) against a ceiling `level` scored on the same
    samples as the points: where it first comes within each factor of it, and from where it stays there. The
    budget is the iteration, or `per_step` `unit`s an iteration (e.g. 128 trajectories)."""
    curve = [p for p in r.get("cost_curve") or [] if p.get("nfe", r["nfe"]) == r["nfe"] and key in p["quality"]]
    if len(curve) < 2 or level is None:
        return None

    def at(p):
        amount = f"{p['step'] * per_step:,} {unit}" if per_step else f"iteration {p['step']:,}"
        return f"{amount} ({fmt_time(p['wall_s'])})"

    parts = []
    for factor in factors:
        inside = [p["quality"][key] <= factor * level for p in curve]
        if not any(inside):
            parts.append(f"never within {factor:g}×")
            continue
        first = curve[inside.index(True)]
        held = next((i for i in range(len(curve)) if all(inside[i:])), None)
        text = f"within {factor:g}× from {at(first)}"
        if held is None:
            text += ", but not at its last point"
        elif curve[held] is first:
            text += ", and at every point since"
        else:
            text += f", and at every point from {at(curve[held])}"
        parts.append(text)
    n = curve[0].get("n")
    return (f"  - along its run ({len(curve)} snapshots{f', {n:,} samples each' if n else ''}; its ceiling on "
            f"the same samples {level:.3g}): " + "; ".join(parts) + ".")


def lower_beyond(a: tuple, b: tuple) -> int:
    """-1 where interval a lies wholly below b, 1 where wholly above, 0 where they overlap."""
    return -1 if a[1] < b[0] else 1 if a[0] > b[1] else 0


def worse_beyond_noise(lower: dict, higher: dict, key: str) -> str | None:
    """Whether `higher`'s quality number is larger than `lower`'s by more than their intervals (or, without
    intervals, twice the combined spread over seeds): how they were told apart, in words for a reading, or None."""
    a, b = interval(lower["quality"], key), interval(higher["quality"], key)
    if a and b:
        return "beyond their intervals" if lower_beyond(b, a) == 1 else None
    qa, qb = lower["quality"][key], higher["quality"][key]
    apart = qb["mean"] - qa["mean"] > 2 * math.hypot(qa.get("std", 0.0), qb.get("std", 0.0))
    return "by more than twice their spread over seeds" if apart else None


def reference_levels(rows: list, key: str) -> tuple[dict | None, float | None]:
    """(the teacher reference row, the data floor's value) of a bench's rows, where it has them."""
    teacher = next((r for r in rows if r["method"] == "teacher"), None)
    floor = next((r["quality"][key]["mean"] for r in rows if r["method"] == "data"), None)
    return teacher, floor


def versus(q: float, rq: float, floor: float | None) -> str:
    """A quality against the teacher's, also over the data floor where there is one (a small held-out
    reference leaves real data far from 0, and plain ratios of numbers sharing that offset hide gaps)."""
    text = f"{q:.3g} = {q / rq:.2f}× the teacher's"
    if floor is not None and rq > floor:
        text += f"; over the floor {q - floor:.3g} vs the teacher's {rq - floor:.3g} ({(q - floor) / (rq - floor):.1f}×)"
    return text


def plt():
    """matplotlib's pyplot on the Agg backend (chosen at first use, not at import: an importer's own
    backend is left alone until a figure is drawn here)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot
    return pyplot


def savefig(fig, path: Path):
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110, bbox_inches="tight"))
