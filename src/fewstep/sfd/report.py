"""SFD in a bench's report: its reading lines (the family against the paper's ratios, the trajectory cache's
use, whether the main rows are told apart) and the "SFD recipe" section (each recipe setting measured both ways,
with its figure). Reads results.json's rows only; loads no torch."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fewstep.sfd.recipe import SFD_RECIPE, SFD_TRAJECTORIES, SFDV_TRAJECTORY_FACTOR, STAGE2_TRAJECTORY_FACTOR
from fewstep.show import (along_the_run, budget_label, fmt_paired, fmt_quality, fmt_time, interval, lower_beyond, plt,
                          reference_levels, savefig, versus, worse_beyond_noise)

PANEL = "SFD, SFD-v and the 1-NFE stage"
LABELS = {"sfd": "SFD", "sfd-v": "SFD-v", "sfd-stage2": "SFD 2nd stage"}
CEILING = "sfd-ceiling"   # the teacher's trajectory an SFD row learns (fewstep.sfd.bench.SFDCeilingRow)


def _own_rows(summary: dict) -> dict:
    return {(r["method"], r["nfe"]): r for r in summary["rows"] if r["method"] in LABELS and not r.get("recipe")}


def recipe_table(summary: dict) -> str:
    """Each SFD recipe setting measured both ways, one line per NFE: the run with the authors' value (the
    bench's own row) against the run with the other value, in the paired distance to the teacher's samples
    and the quality metric, each with its 95 % interval, and which is lower beyond both intervals."""
    settings = summary.get("sfd_recipe") or {}
    key = summary["quality_key"]
    own = _own_rows(summary)
    head = ["setting", "authors' value", "other value", "NFE", "paired RMSE: authors'", "other",
            f"{key.upper()}: authors'", "other", "distill time: authors'", "other", "lower beyond the intervals",
            "fewstep's default"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary["rows"]:
        setting = settings.get(r.get("recipe"))
        base = own.get((r["method"], r["nfe"]))
        if setting is None or base is None:
            continue
        verdicts = []
        pa, pb = (base.get("paired") or {}).get("rmse"), (r.get("paired") or {}).get("rmse")
        if pa and pb:
            verdicts.append(("paired RMSE", lower_beyond((pa["ci_low"], pa["ci_high"]), (pb["ci_low"], pb["ci_high"]))))
        qa, qb = interval(base["quality"], key), interval(r["quality"], key)
        if qa and qb:
            verdicts.append((key.upper(), lower_beyond(qa, qb)))
        said = [f"{'authors' if v < 0 else 'other'} ({m})" for m, v in verdicts if v]
        lines.append("| " + " | ".join([
            setting["label"], setting["authors"], setting["other"], str(r["nfe"]), fmt_paired(base), fmt_paired(r),
            fmt_quality(base["quality"], key), fmt_quality(r["quality"], key), fmt_time(base.get("distill_wall_s")),
            fmt_time(r.get("distill_wall_s")), "; ".join(said) if said else "neither",
            setting[SFD_RECIPE[r["recipe"]].default] if r["recipe"] in SFD_RECIPE else "–"]) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def plot_recipe(summary: dict, path: Path) -> bool:
    """Each recipe line as two points with their 95 % intervals: the authors' value and the other, in the
    paired RMSE (left) and the quality metric (right)."""
    if not recipe_table(summary):
        return False
    settings, key = summary["sfd_recipe"], summary["quality_key"]
    own = _own_rows(summary)
    lines = [(r, own[(r["method"], r["nfe"])]) for r in summary["rows"]
             if r.get("recipe") in settings and (r["method"], r["nfe"]) in own]
    pyplot = plt()
    fig, axes = pyplot.subplots(1, 2, figsize=(11, 0.32 * len(lines) + 1.4), sharey=True)
    labels = [f"{settings[r['recipe']]['label']}, NFE {r['nfe']}" for r, _ in lines]
    y = np.arange(len(lines))[::-1]
    for ax, metric in zip(axes, ("paired RMSE", key.upper())):
        for which, offset, color, name in ((1, 0.15, "tab:blue", "authors' value"), (0, -0.15, "tab:orange", "other value")):
            vals, errs = [], []
            for pair in lines:
                r = pair[which]
                if metric == "paired RMSE":
                    p = (r.get("paired") or {}).get("rmse") or {"mean": np.nan, "ci_low": np.nan, "ci_high": np.nan}
                    lo, mid, hi = p["ci_low"], p["mean"], p["ci_high"]
                else:
                    ci = interval(r["quality"], key) or (np.nan, np.nan)
                    lo, mid, hi = ci[0], r["quality"][key]["mean"], ci[1]
                vals.append(mid)
                errs.append((mid - lo, hi - mid))
            ax.errorbar(vals, y + offset, xerr=np.array(errs).T, fmt="o", ms=4, capsize=2, color=color, label=name)
        ax.set_xlabel(f"{metric} (lower is better; bars: 95 % intervals)")
        ax.grid(alpha=0.3)
    axes[0].set_yticks(y)
    axes[0].set_yticklabels(labels, fontsize=8)
    axes[0].legend(fontsize=8)
    savefig(fig, path)
    pyplot.close(fig)
    return True


def family_table(summary: dict) -> str:
    """The SFD family with the authors' recipe at each NFE, beside the teacher and the data floor."""
    key = summary["quality_key"]
    rows = [r for r in summary["rows"] if (r.get("reference") or r["method"] in LABELS) and not r.get("recipe")]
    if not any(r["method"] in LABELS for r in rows):
        return ""
    head = ["method", "NFE", key.upper(), "paired RMSE", "budget", "distill time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: (not r.get("reference"), r["nfe"], r["method"])):
        lines.append("| " + " | ".join([r["label"], str(r["nfe"]) if r["nfe"] else "–", fmt_quality(r["quality"], key),
                                        fmt_paired(r), budget_label(r), fmt_time(r.get("distill_wall_s"))]) + " |")
    return "\n".join(lines)


RECIPE_INTRO = ("fewstep's SFD follows its authors' recipe (zju-pi/diff-sampler, `sfd-main`) in every setting but "
                "one: SFD-v on four times one SFD run's trajectories with the step condition as a per-block affine, "
                "the 1-NFE stage on ten times at learning rate 5e-4 with a perceptual term on its last step, a "
                "DPM-Solver++(3M) teacher whose last two steps drop to orders 2 and 1; but SFD and SFD-v clip their "
                "gradients at norm 1, where the authors clip none. Here every SFD row runs the authors' whole recipe, "
                "and each setting below was also trained with its other value, on the same seeds and teacher "
                "trajectories, at budgets that keep the authors' ratios.")
RECIPE_NOTE = ("Each line trains one run twice, with the SFD authors' value of one setting (the bench's own row) "
               "and with the other value, everything else equal (same seeds, same teacher trajectories). Paired "
               "RMSE: the RMS pixel difference between a student's sample and the teacher reference's sample from "
               "the same noise, mean over the pairs with half its 95 % interval; the quality metric with half its "
               "95 % interval. \"Lower beyond the intervals\" names the value whose interval lies wholly below the "
               "other's; the last column, the value fewstep uses by default: the authors' unless the other was lower "
               "beyond the intervals on both the digits and the MNIST teacher.")


def targets_reading(summary: dict) -> list[str]:
    """The SFD family against the paper's own ratios (CIFAR-10, FID): SFD-v within 10 % of SFD at each NFE it
    shares (the paper's SFD-v is better), the 1-NFE stage at most 1.3x SFD at NFE 2, SFD at NFE 2 at most
    2.3x the teacher."""
    key = summary["quality_key"]
    K = key.upper()
    own = _own_rows(summary)
    q = {k: r["quality"][key]["mean"] for k, r in own.items()}
    teacher = reference_levels(summary["rows"], key)[0]
    lines = []
    shared = sorted(n for (m, n) in q if m == "sfd-v" and ("sfd", n) in q)
    if shared:
        ratios = [(n, q[("sfd-v", n)] / q[("sfd", n)]) for n in shared]
        compared = [own[(m, n)] for n in shared for m in ("sfd", "sfd-v")]
        lines.append(f"- SFD-v / SFD ({K}; target ≤ 1.10 at every NFE, the paper's 0.94–0.97): " +
                     ", ".join(f"NFE {n} {v:.2f}" for n, v in ratios) +
                     f" ({_verdict(all(v <= 1.10 for _, v in ratios), compared)}"
                     f"{_said('; SFD-v ', budget_words(own[('sfd-v', shared[0])]))}).")
    if ("sfd-stage2", 1) in q and ("sfd", 2) in q:
        v = q[("sfd-stage2", 1)] / q[("sfd", 2)]
        lines.append(f"- 1-NFE stage / SFD at NFE 2 ({K}; target ≤ 1.3, the paper's 1.29): {v:.2f} "
                     f"({_verdict(v <= 1.3, [own[('sfd-stage2', 1)], own[('sfd', 2)]])}"
                     f"{_said('; the 1-NFE stage ', budget_words(own[('sfd-stage2', 1)]))}).")
    if teacher is not None and ("sfd", 2) in q:
        v = q[("sfd", 2)] / teacher["quality"][key]["mean"]
        lines.append(f"- SFD at NFE 2 / teacher ({K}; target ≤ 2.3, the paper's 2.3): {v:.2f} "
                     f"({_verdict(v <= 2.3, [own[('sfd', 2)]])}{_said('; ', budget_words(own[('sfd', 2)]))}).")
    # fewstep's defaults differ from the authors' recipe in the clip alone: those runs are the clip settings' rows
    clipped = {(r["method"], r["nfe"]): r["quality"][key]["mean"] for r in summary["rows"]
               if r.get("recipe") in ("grad-clip", "grad-clip-sfdv")}
    shared = sorted(n for (m, n) in clipped if m == "sfd-v" and ("sfd", n) in clipped)
    for n in shared:
        sfd = clipped[("sfd", n)]
        said = f"SFD-v / SFD at NFE {n} {clipped[('sfd-v', n)] / sfd:.2f}"
        if teacher is not None:
            said += f", SFD at NFE {n} / teacher {sfd / teacher['quality'][key]['mean']:.2f}"
        lines.append(f"- With fewstep's defaults (SFD and SFD-v clipped at norm 1: the clip settings' other rows), "
                     f"{K}: {said}.")
    return lines


def ceiling_reading(summary: dict) -> list[str]:
    """Each SFD and SFD-v row against its ceiling (the teacher's own trajectory it learns, at the same NFE)
    and against the teacher reference."""
    key, K = summary["quality_key"], summary["quality_key"].upper()
    ceilings = _ceilings(summary)
    teacher = reference_levels(summary["rows"], key)[0]
    lines = []
    for (method, nfe), r in sorted(_own_rows(summary).items(), key=lambda item: (item[0][1], item[0][0])):
        ceiling = ceilings.get(nfe)
        if ceiling is None or method == "sfd-stage2":
            continue
        q, c = r["quality"][key]["mean"], ceiling["quality"][key]["mean"]
        text = (f"- {LABELS[method]} at NFE {nfe}: {K} {fmt_quality(r['quality'], key)} = {q / c:.2f}× its ceiling "
                f"(the teacher's {ceiling['nfe']}-NFE trajectory it learns: {fmt_quality(ceiling['quality'], key)})")
        if teacher is not None:
            text += f" and {q / teacher['quality'][key]['mean']:.2f}× the teacher"
        lines.append(text + _said("; ", budget_words(r)) + ".")
        level = (ceiling.get("curve_quality") or {}).get(key)
        along = along_the_run(r, level, key, per_step=(r.get("budget") or {}).get("batch"), unit="trajectories")
        if along:
            lines.append(along)
    better = {nfe: how for nfe, c in sorted(ceilings.items())
              if teacher and (how := worse_beyond_noise(c, teacher, key))}
    if better:
        lines.append(f"- The teacher's own trajectory at student NFE {', '.join(map(str, better))} (the ceiling) "
                     f"scores better than the teacher reference ({K} {fmt_quality(teacher['quality'], key)}) "
                     f"{next(iter(better.values()))}: on this teacher a coarse trajectory "
                     "scores better than many steps, so the ratios to the teacher flatter the students; the ratios to "
                     "the ceiling compare like with like.")
    return lines


def headline(summary: dict) -> list[str]:
    """SFD and SFD-v at NFE 2 and the 1-NFE stage against the teacher (and their ceiling, where measured), each
    with its budget."""
    key = summary["quality_key"]
    own = _own_rows(summary)
    teacher = reference_levels(summary["rows"], key)[0]
    if teacher is None:
        return []
    out = []
    for method, nfe in (("sfd", 2), ("sfd-v", 2), ("sfd-stage2", 1)):
        r = own.get((method, nfe))
        if r is None:
            continue
        q = r["quality"][key]["mean"]
        text = f"{LABELS[method]} at NFE {nfe}: {q / teacher['quality'][key]['mean']:.2f}× the teacher"
        ceiling = _ceilings(summary).get(nfe)
        if ceiling is not None:
            text += f", {q / ceiling['quality'][key]['mean']:.2f}× its ceiling"
        share = _share(r)
        if share:
            text += f" ({share[0]} the authors' budget{share[1]})"
        out.append(text)
    return out


def across(summaries: dict) -> list[str]:
    """SFD at NFE 2 in every bench that has it, by budget: what more trajectories buy, against the teacher and
    the ceiling of each bench."""
    lines = []
    for title, summary in summaries.items():
        key = summary["quality_key"]
        r = _own_rows(summary).get(("sfd", 2))
        teacher = reference_levels(summary["rows"], key)[0]
        if r is None or teacher is None:
            continue
        q = r["quality"][key]["mean"]
        ceiling = _ceilings(summary).get(2)
        to_ceiling = f"{q / ceiling['quality'][key]['mean']:.2f}×" if ceiling else "–"
        share = _share(r)
        spent = f"{_budget(r)[0]:,} ({share[0]}{share[1]})" if share else "–"
        clip = (r.get("budget") or {}).get("grad_clip")
        lines.append(f"| {title} | {Path(summary['teacher']['path']).name} | {spent} | "
                     f"{f'norm {clip:g}' if clip else 'none'} | {key.upper()} {fmt_quality(r['quality'], key)} | "
                     f"{q / teacher['quality'][key]['mean']:.2f}× | {to_ceiling} | "
                     f"{fmt_time(r.get('distill_wall_s'))} |")
    if len(lines) < 2:
        return []
    return ["SFD at NFE 2 in each bench, by the trajectories it trained on (the authors' budget: 200,000):", "",
            "| bench | teacher | trajectories (× the authors') | gradient clip | quality | × teacher | × ceiling | "
            "distill time |", "|---|---|---|---|---|---|---|---|", *lines]


def _ceilings(summary: dict) -> dict:
    """{student NFE: its ceiling row}."""
    return {r["student_nfe"]: r for r in summary["rows"] if r["method"] == CEILING}


def _verdict(ok: bool, rows: list) -> str:
    """"met" / "not met" where every row compared trained on the authors' budget (the paper's ratios are for
    those); at a shorter budget the comparison is named as not like for like (a row without a recorded budget
    is taken at its word)."""
    budgets = [b for b in map(_budget, rows) if b is not None]
    if all(_at_authors(*b) for b in budgets):
        return "met" if ok else "not met"
    how = "a shorter" if any(seen < authors for seen, authors in budgets) else "a larger"
    return f"{'within' if ok else 'outside'} the target at {how} budget than the paper's, so not a test of it"


def _said(prefix: str, words: str) -> str:
    return prefix + words if words else ""


def _at_authors(seen: int, authors: int) -> bool:
    """Whether a run's trajectories are the authors' budget (1,563 iterations of 128 is 200,064 of 200,000)."""
    return abs(seen - authors) <= 0.01 * authors


def _budget(r: dict) -> tuple[int, int] | None:
    """(trajectories the row trained on, the authors' budget for its mode), or None where it is not recorded."""
    b = r.get("budget") or {}
    if not b.get("iterations") or not b.get("batch"):
        return None
    return b["iterations"] * b["batch"], SFD_TRAJECTORIES * {"sfd": 1, "sfd-v": SFDV_TRAJECTORY_FACTOR,
                                                             "sfd-stage2": STAGE2_TRAJECTORY_FACTOR}[r["method"]]


def _share(r: dict) -> tuple[str, str] | None:
    """("0.48×", ", unfinished"): the row's trajectories as a share of the authors' budget, and whether its
    run was measured on the way (None where its budget is not recorded)."""
    budget = _budget(r)
    if budget is None:
        return None
    return f"{budget[0] / budget[1]:.2g}×", ", unfinished" if r["budget"].get("planned_iterations") else ""


def budget_words(r: dict) -> str:
    """The row's training budget against the authors' for its mode (trajectories seen)."""
    budget = _budget(r)
    if budget is None:
        return ""
    seen, authors = budget
    so_far = " (unfinished)" if (r.get("budget") or {}).get("planned_iterations") else ""
    if _at_authors(seen, authors):
        return f"trained on {seen:,} trajectories, the authors' budget"
    return f"trained on {seen:,} trajectories{so_far}, {seen / authors:.2g}× the authors' {authors:,}"


def reading(summary: dict) -> list[str]:
    key, K = summary["quality_key"], summary["quality_key"].upper()
    rows = [r for r in summary["rows"] if not r.get("recipe")]
    teacher, floor = reference_levels(rows, key)
    lines = targets_reading(summary) + ceiling_reading(summary)
    own = _own_rows(summary)
    if teacher is not None:
        rq = teacher["quality"][key]["mean"]
        for nfe, factor in ((2, 2.0), (4, 1.5)):
            r = own.get(("sfd", nfe))
            if r:
                q = r["quality"][key]["mean"]
                cost = r.get("distill_vs_teacher_training")
                # fewstep's own targets, not the paper's ratios (targets_reading has those): named as such,
                # with the budget the row trained on
                lines.append(f"- SFD at NFE {nfe}: {K} {versus(q, rq, floor)} (fewstep's target ≤ {factor:g}×: "
                             f"{'met' if q <= factor * rq else 'not met'}{_said('; ', budget_words(r))}); "
                             f"distillation cost {100 * (cost or float('nan')):.1f} % of teacher training "
                             f"(fewstep's target ≤ 2 %: {'met' if cost is not None and cost <= 0.02 else 'not met'}).")
    seen = set()
    for r in rows:  # one line per model: SFD-v's rows share theirs
        cache = r.get("trajectory_cache")
        if r["method"] in LABELS and cache and cache.get("hits") and r["model"] not in seen:
            seen.add(r["model"])
            total = cache["hits"] + cache["misses"]
            name = f"SFD at NFE {r['nfe']}" if r["method"] == "sfd" else r["label"]  # one SFD model per NFE
            # the counts are the checkpoint's; a run measured as reached may be scored from a later snapshot
            reached = (r.get("budget") or {}).get("iterations")
            of = (f"the {total} iterations to its last checkpoint" if reached and total < reached
                  else f"its {total} iterations")
            lines.append(f"- {name}: {cache['hits']} of {of} read their teacher "
                         "trajectories from the bench's trajectory cache (computed by an earlier run with the same "
                         "teacher, grid and noise; exact), so its distill time has no teacher part for those.")
    separation = separation_reading(rows, key)
    return lines + ([separation] if separation else [])


def separation_reading(rows: list, key: str) -> str | None:
    """Whether the rows that matter most are told apart: the teacher, SFD at NFE 2 and DPM-Solver++(3M) at NFE 5."""
    teacher = next((r for r in rows if r["method"] == "teacher"), None)
    sfd2 = next((r for r in rows if r["method"] == "sfd" and r["nfe"] == 2), None)
    solver = next((r for r in rows if r["method"] == "dpmpp3m" and r["nfe"] == 5), None)
    found = [teacher, sfd2, solver]
    if any(f is None for f in found):
        return None
    pairs, ok = [], True
    for i in range(len(found)):
        for j in range(i + 1, len(found)):
            a, b = found[i]["quality"][key], found[j]["quality"][key]
            gap = abs(a["mean"] - b["mean"])
            ia, ib = interval(found[i]["quality"], key), interval(found[j]["quality"], key)
            if ia and ib:
                apart = lower_beyond(ia, ib) != 0
                how = "intervals apart" if apart else "intervals overlap"
            else:
                spread = max(a["std"], b["std"])
                apart = gap > spread
                how = f"{'>' if apart else '≤'} the larger spread {spread:.2g}"
            ok &= apart
            pairs.append(f"{found[i]['label']} vs {found[j]['label']} {gap:.3g} apart ({how})")
    return (f"- Separation ({key.upper()}, teacher / SFD NFE 2 / DPM-Solver++(3M) NFE 5): " + "; ".join(pairs) +
            f". {'All three told apart.' if ok else 'Not all told apart.'}")


def _curves_to_ceiling(summary: dict) -> list[tuple[dict, list, float]]:
    """(row, [(trajectories, quality / ceiling)] along its run, final quality / ceiling) for each SFD and SFD-v
    row whose run was scored along the way and whose ceiling was scored on the same samples."""
    key, ceilings, out = summary["quality_key"], _ceilings(summary), []
    for (method, nfe), r in sorted(_own_rows(summary).items()):  # by method, then NFE (the keys are unique)
        ceiling = ceilings.get(nfe)
        level = ((ceiling or {}).get("curve_quality") or {}).get(key)
        batch = (r.get("budget") or {}).get("batch")
        if method == "sfd-stage2" or not level or not batch:
            continue
        pts = [(p["step"] * batch, p["quality"][key] / level) for p in r.get("cost_curve") or []
               if p.get("nfe", nfe) == nfe and key in p["quality"]]
        if len(pts) > 1:
            out.append((r, pts, r["quality"][key]["mean"] / ceiling["quality"][key]["mean"]))
    return out


def plot_curves_to_ceiling(summary: dict, path: Path) -> bool:
    """Each SFD and SFD-v run's quality along its run as a multiple of its ceiling on the same samples, against
    the trajectories it had trained on; 1.5x and 1.2x drawn across, each run's final score as its large
    marker, and the authors' budget of each mode as a vertical line."""
    curves = _curves_to_ceiling(summary)
    if not curves:
        return False
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(7, 5.2))
    colors = pyplot.get_cmap("tab10").colors
    markers = "osD^v<>ph*"
    for k, (r, pts, final) in enumerate(curves):
        color, marker = colors[k % 10], markers[k % len(markers)]
        ax.plot(*zip(*pts), marker=marker, ms=3, lw=1, alpha=0.8, color=color,
                label=f"{LABELS[r['method']]}, NFE {r['nfe']}")
        ax.scatter(pts[-1][0], final, s=50, marker=marker, color=color, edgecolors="k", linewidths=0.6, zorder=3)
    for factor, style in ((1.5, "--"), (1.2, ":")):
        ax.axhline(factor, color="gray", ls=style, lw=1, label=f"{factor:g}× the ceiling")
    ax.axhline(1, color="k", lw=0.8)
    authors = {LABELS[r["method"]]: _budget(r)[1] for r, _, _ in curves}
    for k, budget in enumerate(sorted(set(authors.values()))):
        ax.axvline(budget, color="tab:gray", ls="-.", lw=0.8, alpha=0.7, label=None if k else (
            "the authors' budget (" + ", ".join(f"{name} {b:,}" for name, b in authors.items()) + ")"))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("teacher trajectories trained on (log)")
    ax.set_ylabel(f"{summary['quality_key'].upper()} ÷ its ceiling's (lower is better)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=3, title="small markers: along the run; large: the final row", title_fontsize=7,
              loc="upper center", bbox_to_anchor=(0.5, -0.13))
    savefig(fig, path)
    pyplot.close(fig)
    return True


CURVE_NOTE = ("Each SFD and SFD-v run scored at its snapshots along the run, on fewer samples than its final row, "
              "each point divided by its ceiling (the teacher's trajectory the row learns) scored on those same "
              "samples, since a Fréchet distance moves with the sample count; the large markers are the final "
              "rows over their ceilings on the bench's full sample count. An SFD-v run's trajectories are those of "
              "all its NFEs together. The reading says where each run first comes within 1.5× and 1.2× of its "
              "ceiling and from where it stays there.")


def report_section(summary: dict, figdir: Path, prefix: str = "") -> list[tuple[str, list[str]]]:
    """SFD's sections of a report: "SFD recipe" (the recipe table and figure, the family beside the teacher,
    the ratios) where the bench measured recipe settings, and "SFD against its ceiling along the run" (the
    figure) where its runs were scored along the way."""
    sections = []
    table = recipe_table(summary)
    if table:
        figure = f"{prefix}sfd-recipe.png"
        plot_recipe(summary, figdir / figure)
        sections.append(("SFD recipe", [RECIPE_INTRO, "", RECIPE_NOTE, "", table, "",
                                        f"![SFD recipe](figures/{figure})", "",
                                        "The SFD family with the authors' recipe:", "",
                                        family_table(summary), "", *targets_reading(summary)]))
    figure = f"{prefix}sfd-along-the-run.png"
    if plot_curves_to_ceiling(summary, figdir / figure):
        sections.append(("SFD against its ceiling along the run",
                         [CURVE_NOTE, "", f"![SFD against its ceiling along the run](figures/{figure})"]))
    return sections
