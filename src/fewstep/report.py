"""The benchmark's outputs for people: results.md, plots, sample grids and report.md (docs/results.md, several
benches on one page, is fewstep.results_page).

It reads what a bench wrote (results.json and its files) and never runs anything: each row carries its label,
cost-figure panel and role, and each registered method adds its own reading lines and report section.
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from fewstep.benchspec import SOLVER_ROWS
from fewstep.files import atomic_write
from fewstep.registry import methods as registered_methods
from fewstep.show import (budget_label, fmt, fmt_paired, fmt_quality, fmt_time, interval, plt, savefig,
                           worse_beyond_noise)


def main_rows(summary: dict) -> list[dict]:
    """The rows of the main table and plots: every row but those measured apart (a method's ablations)."""
    return [r for r in summary["rows"] if not r.get("apart")]


def results_table(summary: dict) -> str:
    key = summary["quality_key"]
    rows = main_rows(summary)
    toy = key == "swd"
    extra = ["mmd"] if toy else ["kid", "precision", "recall"] if key == "fcd" else ["mmd_pixel", "precision_pixel",
                                                                                   "recall_pixel"]
    best = {}
    for r in rows:
        if r.get("reference"):
            continue
        v = r["quality"][key]["mean"]
        if r["nfe"] not in best or v < best[r["nfe"]]:
            best[r["nfe"]] = v
    # KID in its own unit (not x10^3): in classifier features its values are large and can be negative
    names = {"kid": "KID (raw units)", "precision": "precision", "recall": "recall"}
    paired = any(r.get("paired") for r in rows)
    head = ["method", "NFE", key.upper()] + (["paired RMSE"] if paired else []) + \
        [names.get(e, e.upper()) for e in extra] + \
        ["budget", "distill time", "× teacher training", "distill overhead", "sample s / 1k", "network s / 1k",
         "overhead"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: (r["nfe"], r["quality"][key]["mean"])):
        q = fmt_quality(r["quality"], key)
        if not r.get("reference") and r["quality"][key]["mean"] == best.get(r["nfe"]):
            q = f"**{q}**"
        ratio = r.get("distill_vs_teacher_training")
        seconds = [r.get("sample_s_per_1000"), r.get("forward_s_per_1000")]
        cells = [r["label"], str(r["nfe"]) if r["nfe"] else "–", q] + \
            ([fmt_paired(r)] if paired else []) + \
            [fmt(r["quality"].get(e)) for e in extra] + [
            budget_label(r), fmt_time(r.get("distill_wall_s")), f"{100 * ratio:.1f} %" if ratio else "–",
            f"{prof['overhead']:.2f}×" if (prof := r.get("distill_profile") or {}).get("overhead") else "–",
            *(f"{v:.2f}" if v is not None else "–" for v in seconds),
            f"{r['sampler_overhead']:.2f}×" if r.get("sampler_overhead") else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


PROFILE_NOTE = ("Seconds per iteration (means over the iterations whose floor was measured, one in each "
                "logging interval). Floor: the same network calls timed alone on the same batch; overhead = "
                "iteration wall / floor. The floor's own measurement is not counted as distillation time.")


def profile_table(summary: dict) -> str:
    """Where each distillation's time goes, per iteration: the teacher's calls, the student's forward and
    backward, the optimizer and the rest, next to the floor (the same network calls timed alone on the same
    batch) and overhead = iteration wall / floor. One line per distilled model."""
    head = ["model", "iterations", "teacher s", "student fwd+bwd s", "optimizer s", "rest s", "iteration s",
            "floor s (teacher + student)", "overhead"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    seen = set()
    for r in summary["rows"]:
        prof = r.get("distill_profile")
        model = r.get("model")
        if not prof or model in seen:
            continue
        seen.add(model)
        name = f"{model} ({prof['folds']} folds)" if prof.get("folds") else model
        lines.append("| " + " | ".join([
            name, str(prof.get("iterations_measured")), *(f"{prof[k]:.3f}" for k in ("teacher_s", "student_s",
                                                                                    "optimizer_s", "rest_s",
                                                                                    "iter_s")),
            f"{prof['floor_s']:.3f} ({prof['floor_teacher_s']:.3f} + {prof['floor_student_s']:.3f})",
            f"{prof['overhead']:.2f}×" if prof.get("overhead") else "–"]) + " |")
    if len(lines) == 2:
        return ""
    return "\n".join(lines)


def _reference_lines(ax, summary: dict):
    """The teacher's reference quality (dashed) and the data floor (dotted) as horizontal lines."""
    key = summary["quality_key"]
    for r in summary["rows"]:
        if r["method"] == "teacher":
            ax.axhline(r["quality"][key]["mean"], color="k", ls="--", lw=1, label=f"teacher, NFE {r['nfe']}")
        elif r["method"] == "data":
            ax.axhline(r["quality"][key]["mean"], color="gray", ls=":", lw=1.2, label="data floor")


def plot_quality_vs_nfe(summary: dict, path: Path):
    pyplot = plt()
    key = summary["quality_key"]
    series = defaultdict(list)
    for r in main_rows(summary):
        if r.get("reference"):
            continue
        series[r["label"]].append((r["nfe"], r["quality"][key]["mean"], r["quality"][key]["std"]))
    fig, ax = pyplot.subplots(figsize=(7, 4.5))
    colors = pyplot.get_cmap("tab20").colors  # more series than the default 10-colour cycle holds
    markers = "osD^v<>ph*"
    for k, (label, pts) in enumerate(sorted(series.items())):
        pts.sort()
        x, y, e = zip(*pts)
        ax.errorbar(x, y, yerr=e, marker=markers[k % len(markers)], ms=4, capsize=2, label=label,
                    color=colors[(2 * k) % 20 + (k // 10) % 2], linestyle="-" if len(x) > 1 else "none")
    _reference_lines(ax, summary)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("NFE (network evaluations per sample)")
    ax.set_ylabel(f"{key.upper()} (lower is better)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    savefig(fig, path)
    pyplot.close(fig)


def plot_quality_vs_cost(summary: dict, path: Path):
    """Quality against distillation wall time, one panel per family of methods (each row names its panel), so
    neither crowds the other: each run's curve (its snapshots along the run) in one colour and marker, ending
    in its final score (the larger marker)."""
    pyplot = plt()
    key = summary["quality_key"]
    rows = [r for r in main_rows(summary) if r.get("distill_wall_s")]
    titles = list(dict.fromkeys(r.get("panel") or "distillation" for r in rows)) or ["distillation"]
    panels = [(title, [r for r in rows if (r.get("panel") or "distillation") == title]) for title in titles]
    fig, axes = pyplot.subplots(1, len(panels), figsize=(6 * len(panels), 5), sharey=True, squeeze=False)
    colors = pyplot.get_cmap("tab20").colors
    markers = "osD^v<>ph*"
    t_train = summary["teacher"].get("training_wall_s")
    for ax, (title, panel_rows) in zip(axes[0], panels):
        for k, r in enumerate(panel_rows):
            color, marker = colors[(2 * k) % 20 + (k // 10) % 2], markers[k % len(markers)]
            curve = r.get("cost_curve") or []
            pts = [(p["wall_s"] / 60, p["quality"][key]) for p in curve if p.get("wall_s") and key in p["quality"]]
            if len(pts) > 1:
                ax.plot(*zip(*pts), marker=marker, ms=3, lw=1, alpha=0.7, color=color)
            ax.scatter(r["distill_wall_s"] / 60, r["quality"][key]["mean"], s=45, marker=marker, color=color,
                       edgecolors="k", linewidths=0.6, zorder=3, label=f"{r['label']}, NFE {r['nfe']}")
        _reference_lines(ax, summary)
        if t_train:
            ax.axvline(t_train / 60, color="gray", ls="-.", lw=1, label="teacher training time")
        ax.set_title(title, fontsize=10)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("distillation wall time (minutes, log)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.13))
    axes[0][0].set_ylabel(f"{key.upper()} (lower is better); small markers: along the run")
    savefig(fig, path)
    pyplot.close(fig)


def sample_grids(summary: dict, out: Path, path: Path, per_row: int = 10):
    """Every method's first samples from the same initial noises, one row (or panel) per method."""
    pyplot = plt()
    rows = sorted(main_rows(summary), key=lambda r: (not r.get("reference"), r["nfe"], r["key"]))
    arrays = [(r, np.load(out / "rows" / f"{r['key']}.npy")) for r in rows if (out / "rows" / f"{r['key']}.npy").is_file()]
    if not arrays:
        return
    if arrays[0][1].ndim == 2:  # 2-D points: a scatter panel per method
        cols = min(5, len(arrays))
        nrows = math.ceil(len(arrays) / cols)
        fig, axes = pyplot.subplots(nrows, cols, figsize=(2.6 * cols, 2.7 * nrows), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, (r, x) in zip(axes.flat, arrays):
            ax.axis("on")
            ax.scatter(x[:, 0], x[:, 1], s=3, alpha=0.7)
            ax.set_xlim(-3.5, 3.5)
            ax.set_ylim(-3.5, 3.5)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{r['label']}\nNFE {r['nfe'] or '–'}", fontsize=7)
    else:
        fig, axes = pyplot.subplots(len(arrays), 1, figsize=(per_row * 0.7 + 3, 0.75 * len(arrays) + 0.3), squeeze=False)
        for ax, (r, x) in zip(axes[:, 0], arrays):
            strip = np.concatenate([np.pad(np.clip(img[0], -1, 1), 1, constant_values=1) for img in x[:per_row]], axis=1)
            ax.imshow(strip, cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_ylabel(f"{r['label']}\nNFE {r['nfe'] or '–'}", rotation=0, ha="right", va="center", fontsize=7)
    savefig(fig, path)
    pyplot.close(fig)


def reading(summary: dict) -> list[str]:
    """A short, generated reading of the numbers: the levels the data floor and the teacher set, each
    method's own lines (its targets, its ceilings), when each run reached a level along its way, and the best
    row at each NFE.

    Where a data-floor row exists, each ratio to the teacher is also given over the floor: with a
    small held-out reference the Fréchet distance of real data is far from 0, and plain ratios of
    numbers that share that offset understate every gap.
    """
    key, K = summary["quality_key"], summary["quality_key"].upper()
    rows = main_rows(summary)
    ref = next((r for r in rows if r["method"] == "teacher"), None)
    floor_row = next((r for r in rows if r["method"] == "data"), None)
    lines = []
    if floor_row:
        how = (floor_row.get("floor") or {})
        lines.append(f"- Data floor: real samples disjoint from the reference ({how.get('samples', 'real samples')}) "
                     f"score {K} {fmt(floor_row['quality'][key])} against the same "
                     f"{summary.get('spec', {}).get('reference', 'train')} reference, the level a perfect sampler "
                     "would reach with these sample counts" +
                     (f" (Fréchet distances extrapolated: {how['method']})" if how.get("method") else "") +
                     "; the 'over the floor' figures below subtract it.")
        if ref:
            gap, spread = ref["quality"][key]["mean"] - floor_row["quality"][key]["mean"], floor_row["quality"][key]["std"]
            lines.append(f"- The teacher sits {gap:.3g} above the floor" +
                         (f", {'more' if gap > spread else 'not more'} than the floor's spread over seeds ({spread:.2g})."
                          if spread else "."))
    if ref:
        lines.append(f"- Teacher reference ({ref['sampler']}, NFE {ref['nfe']}): {K} {fmt_quality(ref['quality'], key)}.")
    for method in registered_methods():
        if method.reading is not None:
            lines += method.reading(summary)
    lines += time_to_quality_reading(rows, key)
    lines += solver_order_reading(rows, key)
    for nfe in sorted({r["nfe"] for r in rows if not r.get("reference")}):
        cands = [r for r in rows if r["nfe"] == nfe and not r.get("reference")]
        b = min(cands, key=lambda r: r["quality"][key]["mean"])
        lines.append(f"- NFE {nfe}: best is {b['label']} ({fmt(b['quality'][key])}).")
    if any(interval(r["quality"], key) for r in rows):
        lines.append("- ± is half a 95 % interval: for Fréchet distances the distance ± 1.96 standard errors "
                     "estimated from random halves of the samples, for paired distances the normal interval of "
                     "the mean over the pairs; values whose intervals overlap are not told apart.")
    else:
        lines.append("- Spreads are the standard deviation over the sample seeds; differences smaller than about "
                     "twice the spread are within noise.")
    return lines


# why a training-free solver can get worse with more NFE, where the mechanism is known
# why a solver can get worse with more NFE: mechanisms, not measurements (docs/bench.md has the digits teacher's
# numbers and the commands that measured them)
NOT_MONOTONE_WHY = {
    "heun": "Heun corrects every step with the slope at the step's end, (x − D(x)) / σ, so a last step down to "
            "σ_min multiplies the denoiser's error there by (σ_prev − σ_min) / σ_min, which a ρ = 7 grid of one or "
            "two steps makes large; the SFD authors' Heun takes the same last step. Such rows are both far off, not "
            "ordered.",
    "ipndm": "iPNDM extrapolates the slope with Adams–Bashforth weights for equal steps (order 4: 55, −59, 37, −9 "
             "over 24), but a ρ = 7 grid of a few steps shrinks each step several-fold, so old slopes are weighted "
             "as if they were near. The SFD authors' iPNDM uses the same weights up to order 4.",
}


def solver_order_reading(rows: list, key: str) -> list[str]:
    """Whether each training-free solver gets better with every added NFE, and where it does not, by how much
    and why (where known)."""
    by_solver = defaultdict(list)
    for r in rows:
        if r["method"] in SOLVER_ROWS and not r.get("reference") and not r.get("trailing"):
            by_solver[r["method"]].append(r)
    K, lines, ordered = key.upper(), [], []
    for name, rs in by_solver.items():
        if len(rs) < 2:
            continue
        rs.sort(key=lambda r: r["nfe"])
        worse = [(a, b) for a, b in zip(rs, rs[1:]) if worse_beyond_noise(a, b, key)]
        if not worse:
            ordered.append(rs[0]["label"].split(",")[0])
            continue
        steps = "; ".join(f"NFE {b['nfe']} {fmt_quality(b['quality'], key)} against NFE {a['nfe']} "
                          f"{fmt_quality(a['quality'], key)}" for a, b in worse)
        lines.append(f"- {rs[0]['label']} is not monotone in NFE ({K}: {steps})." +
                     (f" {NOT_MONOTONE_WHY[name]}" if name in NOT_MONOTONE_WHY else ""))
    if ordered:
        lines.insert(0, f"- {', '.join(ordered)}: better at every added NFE, or level within the intervals.")
    return lines


def time_to_quality_reading(rows: list, key: str) -> list[str]:
    """Read off the cost plot: when each distillation's quality along its run first reaches the teacher's
    (or 1.5x the teacher's gap over the data floor, a level few-step students can reach). Runs whose points
    are other step counts (a chain of folds) are left out."""
    ref = next((r for r in rows if r["method"] == "teacher"), None)
    if ref is None:
        return []
    floor_row = next((r for r in rows if r["method"] == "data"), None)
    rq = ref["quality"][key]["mean"]
    levels = [("the teacher's", rq)]
    if floor_row and rq > floor_row["quality"][key]["mean"]:
        floor = floor_row["quality"][key]["mean"]
        levels.append(("1.5× the teacher's gap over the floor", floor + 1.5 * (rq - floor)))
    lines = []
    for r in rows:
        curve = [p for p in r.get("cost_curve") or [] if p.get("wall_s") and key in p["quality"]]
        if not curve or any(p.get("nfe", r["nfe"]) != r["nfe"] for p in curve):
            continue
        parts = []
        for name, level in levels:
            hit = next((p for p in curve if p["quality"][key] <= level), None)
            parts.append(f"{name} {key.upper()} ({level:.3g}) " +
                         (f"reached after {fmt_time(hit['wall_s'])}" if hit else
                          f"not reached within {fmt_time(curve[-1]['wall_s'])}"))
        best = min(curve, key=lambda p: p["quality"][key])
        lines.append(f"- {r['label']}, NFE {r['nfe']}, along its run: " + "; ".join(parts) +
                     f" (best {best['quality'][key]:.3g} at {fmt_time(best['wall_s'])}).")
    return lines


def method_sections(summary: dict, figdir: Path, prefix: str = "") -> list[tuple[str, list[str]]]:
    """(title, lines) of each registered method's own report sections (e.g. SFD's recipe), where it has them."""
    out = []
    for method in registered_methods():
        if method.report_section is not None:
            out += method.report_section(summary, figdir, prefix)
    return out


def quality_note(summary: dict) -> str:
    spec = summary["spec"]
    if spec.get("fd_intervals"):
        return (f"Quality: {spec['n_samples']} samples of seed{'s' if len(spec['seeds']) > 1 else ''} "
                f"{', '.join(map(str, spec['seeds']))}, ± half the 95 % interval (Fréchet distances: from "
                f"{spec['fd_intervals']} random halves of the samples).")
    return f"Quality: mean ± std over seeds {spec['seeds']}, {spec['n_samples']} samples each."


def reached_note(summary: dict) -> str | None:
    """What a bench measured as reached (`--as-reached`) holds: the rows whose runs had not finished, at
    the iterations measured, and the rows not started."""
    if "not_started" not in summary:
        return None
    going = {}
    for r in summary["rows"]:
        b = r.get("budget") or {}
        if b.get("planned_iterations"):
            going.setdefault(r["model"], f"`{r['model']}` at {b['iterations']:,} of {b['planned_iterations']:,} "
                                         "iterations")
    parts = [f"unfinished when measured: {', '.join(going.values())}" if going
             else "every run it measured had finished"]
    if summary["not_started"]:
        parts.append(f"no checkpoint yet, so not in the table: {', '.join(summary['not_started'])}")
    return ("Measured as reached (`--as-reached`): each distillation as far as it had trained, from its latest "
            "snapshot; " + "; ".join(parts) + ".")


def extra_figures(summary: dict) -> list[str]:
    """Figures a method's bench extras drew (each extra lists its own under "figures")."""
    return [name for extra in summary.values() if isinstance(extra, dict) for name in extra.get("figures") or []]


def write_report(out: Path, summary: dict) -> Path:
    out = Path(out)
    fig = out / "figures"
    fig.mkdir(exist_ok=True)
    table = results_table(summary)
    profile = profile_table(summary)
    profile_text = ("\n\n## Distillation time against its network floor (per iteration)\n\n" + profile) if profile else ""
    atomic_write(out / "results.md", lambda p: Path(p).write_text(table + profile_text + "\n"))
    plot_quality_vs_nfe(summary, fig / "quality-vs-nfe.png")
    plot_quality_vs_cost(summary, fig / "quality-vs-cost.png")
    sample_grids(summary, out, fig / "samples.png")
    env = summary["environment"]
    t = summary["teacher"]
    lines = [f"# fewstep benchmark: {Path(t['path']).name} on {summary['spec']['data']}", "",
             f"fewstep {env['fewstep_version']}, torch {env['torch']}, device {env['device']} "
             f"({env['device_name']}), {env['threads']} threads. Teacher training time: "
             f"{fmt_time(t.get('training_wall_s'))}. {quality_note(summary)}", ""]
    if summary["spec"].get("note"):
        lines += [f"**{summary['spec']['note']}**", ""]
    reached = reached_note(summary)
    if reached:
        lines += [reached, ""]
    lines += ["## Results", "", table, ""]
    for title, section in method_sections(summary, fig):
        lines += [f"## {title}", "", *section, ""]
    lines += [*(["## Distillation time against its network floor", "", PROFILE_NOTE, "", profile, ""] if profile else []),
              "## Reading", "", *reading(summary), "", "## Figures", "",
              "![quality vs NFE](figures/quality-vs-nfe.png)", "",
              "![quality vs distillation cost](figures/quality-vs-cost.png)", "",
              "![samples from the same noises](figures/samples.png)", ""]
    for name in extra_figures(summary):
        if (fig / name).is_file():
            lines += [f"![{name[:-4]}](figures/{name})", ""]
    lines += ["Raw numbers: `results.json`; the table alone: `results.md`; models: `models/`."]
    atomic_write(out / "report.md", lambda p: Path(p).write_text("\n".join(lines) + "\n"))
    return out / "report.md"
