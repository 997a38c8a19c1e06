"""SFDDM in a bench's report: its students against the teacher, DDIM at the same steps and their ceiling (the
teacher's own chain on phi), the long run's closing of that gap, and semantic consistency. Reads results.json's
rows only; loads no torch."""
from __future__ import annotations

from fewstep.distill.ceilings import ceiling_line, ceiling_ratio, ceiling_row, ceilings
from fewstep.show import along_the_run, reference_levels, versus


def long_run_reading(r: dict, rows: list, key: str) -> str:
    """Whether SFDDM's quality keeps improving with training toward the teacher's own chain on phi."""
    K = key.upper()
    curve = r["cost_curve"]
    first, last = curve[0], curve[-1]
    ceil = ceilings(rows, key, r["nfe"], r["variant"].split("/")[0])
    text = (f"- {r['label']}, NFE {r['nfe']}: {K} along the run (first sample seed) "
            + ", ".join(f"{p['quality'][key]:.3g} at iteration {p['step']}" for p in curve) + ".")
    best = ceil.get("ddpm", min(ceil.values())) if ceil else None
    if best is not None:
        gap0, gap1 = first["quality"][key] - best, last["quality"][key] - best
        text += (f" The gap to the teacher's own {r['nfe']}-step chain on phi ({'DDPM' if 'ddpm' in ceil else 'DDIM'} "
                 f"{best:.3g}) went from {gap0:.3g} to {gap1:.3g}"
                 + (f" ({100 * (1 - gap1 / gap0):.0f} % of it closed)." if gap0 > 0 else "."))
    return text


def reading(summary: dict) -> list[str]:
    key, K = summary["quality_key"], summary["quality_key"].upper()
    rows = [r for r in summary["rows"] if not r.get("apart")]
    teacher, floor = reference_levels(rows, key)
    sfddm = [r for r in rows if r["method"] == "sfddm"]
    lines = []
    if teacher is not None:
        rq = teacher["quality"][key]["mean"]
        for r in sfddm:
            if r["nfe"] == min(x["nfe"] for x in sfddm):
                q = r["quality"][key]["mean"]
                ddim = next((x for x in rows if x["method"] == "ddim" and x["nfe"] == r["nfe"]), None)
                msg = (f"- {r['label']}, T'={r['nfe']}: {K} {versus(q, rq, floor)} "
                       f"(target ≤ 1.5×: {'met' if q <= 1.5 * rq else 'not met'})")
                if ddim:
                    dq = ddim["quality"][key]["mean"]
                    msg += f"; teacher DDIM-{r['nfe']} {dq:.3g} ({'beaten' if q < dq else 'not beaten'})"
                lines.append(msg + ".")
    for r in sfddm:  # the SFDDM objective is minimised by copying the teacher at phi: its chain there is the ceiling
        line = ceiling_line(r, rows, key, r["variant"].split("/")[0])
        if line:
            lines.append(line)
            ceiling = ceiling_row(rows, r["nfe"], r["variant"].split("/")[0], "ddpm") or {}
            along = along_the_run(r, (ceiling.get("curve_quality") or {}).get(key), key, factors=(1.2, 1.1))
            if along:
                lines.append(along)
    lines += [long_run_reading(r, rows, key) for r in sfddm if r.get("long") and r.get("cost_curve")]
    c = summary.get("consistency")
    if c:
        lines.append(f"- Semantic consistency ({c['model']} with {c['student_sampler']} against the teacher with "
                     f"{c['teacher_sampler']}, {c['n']} shared noises): PSNR of matched pairs {c['psnr_matched']:.2f} "
                     f"dB vs shuffled pairs {c['psnr_shuffled']:.2f} dB (higher matched PSNR = the same noise gives "
                     "the same sample). The interpolation figure shows slerp (top row) and linear (bottom row) "
                     "between seeds 3 and 7.")
    return lines


def headline(summary: dict) -> list[str]:
    """Each SFDDM student of the main table against its ceiling (the long run's too), with DDPM ancestral
    sampling as the students sample by default."""
    key = summary["quality_key"]
    rows = [r for r in summary["rows"] if not r.get("apart")]
    said = [ceiling_ratio(r, rows, key, r["variant"].split("/")[0], "ddpm") for r in rows if r["method"] == "sfddm"]
    return [s for s in said if s]
