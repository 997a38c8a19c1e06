"""The benchmark's outputs for people: results.md, plots, sample grids, SFDDM figures, report.md."""
from __future__ import annotations

import json
import math
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from fewstep.checkpoint import atomic_write

LOWER_IS_BETTER = {"fcd", "kid", "swd", "mmd", "swd_pixel", "mmd_pixel"}
LABELS = {"data": "data floor (real samples)", "teacher": "teacher (reference)", "ddim": "DDIM", "dpmpp2m": "DPM-Solver++(2M)",
          "dpmpp3m": "DPM-Solver++(3M)", "heun": "Heun", "ipndm": "iPNDM", "sfd": "SFD", "sfd-v": "SFD-v",
          "sfd-stage2": "SFD 2nd stage", "sfddm": "SFDDM", "progressive": "progressive distillation",
          "teacher-on-phi": "teacher on phi (ceiling)"}


GRID_NAMES = {"uniform": "time-uniform", "logsnr": "logSNR", "polynomial": "EDM ρ=7", "discrete": "the table's steps"}


def row_label(r: dict) -> str:
    label = LABELS.get(r["method"], r["method"])
    if r["method"] == "sfddm":
        label += f" ({r['variant']}{', long run' if r.get('long') else ''})"
    if r.get("trailing"):
        label += " (trailing steps)"
    if r.get("grid"):
        label += f", {GRID_NAMES.get(r['grid'], r['grid'])} grid"
    if r["method"] == "teacher":
        label += f", {r['sampler']}"
    if r["method"] == "teacher-on-phi":
        label += f" ({r['index']}, {r['sampler']})"
    if r.get("recipe"):
        label += f" ~ {r['recipe']}"
    return label


def budget_label(r: dict) -> str:
    """A distillation's training budget: iterations × batch (per fold for progressive distillation)."""
    b = r.get("budget")
    if not b:
        return "–"
    text = f"{b['iterations']} × {b['batch']}"
    return text + " a fold" if r["method"] == "progressive" else text


REFERENCE_ROWS = ("data", "teacher")  # rows that set a level to compare with, not candidates for "best"


def fmt(q: dict | None, digits: int = 3) -> str:
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
    p = (r.get("paired") or {}).get(name)
    if not p:
        return "–"
    return f"{p['mean']:.3g} ± {(p['ci_high'] - p['ci_low']) / 2:.1g}"


def fmt_time(s: float | None) -> str:
    if s is None:
        return "–"
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def main_rows(summary: dict) -> list[dict]:
    """The rows of the main table and plots: every row but the SFD recipe's other values (see recipe_table)."""
    return [r for r in summary["rows"] if not r.get("recipe")]


def results_table(summary: dict) -> str:
    key = summary["quality_key"]
    rows = main_rows(summary)
    toy = key == "swd"
    extra = ["mmd"] if toy else ["kid", "precision", "recall"] if key == "fcd" else ["mmd_pixel", "precision_pixel",
                                                                                   "recall_pixel"]
    best = {}
    for r in rows:
        if r["method"] in REFERENCE_ROWS:
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
        if r["method"] not in REFERENCE_ROWS and r["quality"][key]["mean"] == best.get(r["nfe"]):
            q = f"**{q}**"
        ratio = r.get("distill_vs_teacher_training")
        seconds = [r.get("sample_s_per_1000"), r.get("forward_s_per_1000")]
        cells = [row_label(r), str(r["nfe"]) if r["method"] != "data" else "–", q] + \
            ([fmt_paired(r)] if paired else []) + \
            [fmt(r["quality"].get(e)) for e in extra] + [
            budget_label(r), fmt_time(r.get("distill_wall_s")), f"{100 * ratio:.1f} %" if ratio else "–",
            f"{prof['overhead']:.2f}×" if (prof := r.get("distill_profile") or {}).get("overhead") else "–",
            *(f"{v:.2f}" if v is not None else "–" for v in seconds),
            f"{r['sampler_overhead']:.2f}×" if r.get("sampler_overhead") else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _better(a: tuple, b: tuple) -> int:
    """-1 where interval a lies wholly below b, 1 where wholly above, 0 where they overlap."""
    return -1 if a[1] < b[0] else 1 if a[0] > b[1] else 0


def recipe_table(summary: dict) -> str:
    """Each SFD recipe setting measured both ways, one line per NFE: the run with the authors' value (the
    bench's own row) against the run with the other value, in the paired distance to the teacher's samples
    and the quality metric, each with its 95 % interval, and which is lower beyond both intervals."""
    settings = summary.get("sfd_recipe") or {}
    key = summary["quality_key"]
    rows = summary["rows"]
    own = {(r["method"], r["nfe"]): r for r in rows if r["method"] in ("sfd", "sfd-v", "sfd-stage2")
           and not r.get("recipe")}
    head = ["setting", "authors' value", "other value", "NFE", "paired RMSE: authors'", "other",
            f"{key.upper()}: authors'", "other", "distill time: authors'", "other", "lower beyond the intervals"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        setting = settings.get(r.get("recipe"))
        base = own.get((r["method"], r["nfe"]))
        if setting is None or base is None:
            continue
        verdicts = []
        pa, pb = (base.get("paired") or {}).get("rmse"), (r.get("paired") or {}).get("rmse")
        if pa and pb:
            verdicts.append(("paired RMSE", _better((pa["ci_low"], pa["ci_high"]), (pb["ci_low"], pb["ci_high"]))))
        qa, qb = interval(base["quality"], key), interval(r["quality"], key)
        if qa and qb:
            verdicts.append((key.upper(), _better(qa, qb)))
        said = [f"{'authors' if v < 0 else 'other'} ({m})" for m, v in verdicts if v]
        lines.append("| " + " | ".join([
            setting["label"], setting["authors"], setting["other"], str(r["nfe"]), fmt_paired(base), fmt_paired(r),
            fmt_quality(base["quality"], key), fmt_quality(r["quality"], key), fmt_time(base.get("distill_wall_s")),
            fmt_time(r.get("distill_wall_s")), "; ".join(said) if said else "neither"]) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def sfd_family_table(summary: dict) -> str:
    """The SFD family with the authors' recipe at each NFE, beside the teacher and the data floor."""
    key = summary["quality_key"]
    rows = [r for r in main_rows(summary) if r["method"] in ("data", "teacher", "sfd", "sfd-v", "sfd-stage2")]
    if not any(r["method"].startswith("sfd") for r in rows):
        return ""
    head = ["method", "NFE", key.upper(), "paired RMSE", "budget", "distill time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: (r["method"] not in REFERENCE_ROWS, r["nfe"], r["method"])):
        lines.append("| " + " | ".join([row_label(r), str(r["nfe"]) if r["method"] != "data" else "–",
                                        fmt_quality(r["quality"], key), fmt_paired(r), budget_label(r),
                                        fmt_time(r.get("distill_wall_s"))]) + " |")
    return "\n".join(lines)


def plot_recipe(summary: dict, path: Path) -> bool:
    """Each recipe line as two points with their 95 % intervals: the authors' value and the other, in the
    paired RMSE (left) and the quality metric (right)."""
    table = recipe_table(summary)
    if not table:
        return False
    settings, key = summary["sfd_recipe"], summary["quality_key"]
    own = {(r["method"], r["nfe"]): r for r in summary["rows"] if not r.get("recipe")}
    lines = [(r, own[(r["method"], r["nfe"])]) for r in summary["rows"]
             if r.get("recipe") in settings and (r["method"], r["nfe"]) in own]
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.32 * len(lines) + 1.4), sharey=True)
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
    _savefig(fig, path)
    plt.close(fig)
    return True


RECIPE_NOTE = ("Each line trains one run twice, with the SFD authors' value of one setting (the bench's own row; "
               "every default is the authors') and with the other value, everything else equal (same seeds, "
               "same teacher trajectories). Paired RMSE: the RMS pixel difference between a student's sample and "
               "the teacher reference's sample from the same noise, mean over the pairs with half its 95 % "
               "interval; the quality metric with half its 95 % interval. The last column names the value whose "
               "interval lies wholly below the other's.")


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
        name = model if r["method"] != "progressive" else f"{model} ({prof.get('folds', 1)} folds)"
        lines.append("| " + " | ".join([
            name, str(prof.get("iterations_measured")), *(f"{prof[k]:.3f}" for k in ("teacher_s", "student_s",
                                                                                    "optimizer_s", "rest_s",
                                                                                    "iter_s")),
            f"{prof['floor_s']:.3f} ({prof['floor_teacher_s']:.3f} + {prof['floor_student_s']:.3f})",
            f"{prof['overhead']:.2f}×" if prof.get("overhead") else "–"]) + " |")
    if len(lines) == 2:
        return ""
    return "\n".join(lines)


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _savefig(fig, path: Path):
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110, bbox_inches="tight"))


def _reference_lines(ax, summary: dict):
    """The teacher's reference quality (dashed) and the data floor (dotted) as horizontal lines."""
    key = summary["quality_key"]
    for r in summary["rows"]:
        if r["method"] == "teacher":
            ax.axhline(r["quality"][key]["mean"], color="k", ls="--", lw=1, label=f"teacher, NFE {r['nfe']}")
        elif r["method"] == "data":
            ax.axhline(r["quality"][key]["mean"], color="gray", ls=":", lw=1.2, label="data floor")


def plot_quality_vs_nfe(summary: dict, path: Path):
    plt = _plt()
    key = summary["quality_key"]
    series = defaultdict(list)
    for r in main_rows(summary):
        if r["method"] in REFERENCE_ROWS:
            continue
        series[row_label(r)].append((r["nfe"], r["quality"][key]["mean"], r["quality"][key]["std"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.get_cmap("tab20").colors  # more series than the default 10-colour cycle holds
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
    _savefig(fig, path)
    plt.close(fig)


# the cost figure's panels: the trajectory methods apart from the chain methods, so neither crowds the other
COST_PANELS = (("SFD, SFD-v and the 1-NFE stage", ("sfd", "sfd-v", "sfd-stage2")),
               ("SFDDM and progressive distillation", ("sfddm", "progressive")))


def plot_quality_vs_cost(summary: dict, path: Path):
    """Quality against distillation wall time: each run's curve (its snapshots along the run) in one colour
    and marker, ending in its final score (the larger marker)."""
    plt = _plt()
    key = summary["quality_key"]
    rows = [r for r in main_rows(summary) if r.get("distill_wall_s")]
    panels = [(title, [r for r in rows if r["method"] in methods]) for title, methods in COST_PANELS]
    panels = [p for p in panels if p[1]] or [("distillation", rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5), sharey=True, squeeze=False)
    colors = plt.get_cmap("tab20").colors
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
                       edgecolors="k", linewidths=0.6, zorder=3, label=f"{row_label(r)}, NFE {r['nfe']}")
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
    _savefig(fig, path)
    plt.close(fig)


def sample_grids(summary: dict, out: Path, path: Path, per_row: int = 10):
    """Every method's first samples from the same initial noises, one row (or panel) per method."""
    plt = _plt()
    rows = sorted(main_rows(summary), key=lambda r: (r["method"] not in REFERENCE_ROWS, r["nfe"], r["key"]))
    arrays = [(r, np.load(out / "rows" / f"{r['key']}.npy")) for r in rows if (out / "rows" / f"{r['key']}.npy").is_file()]
    if not arrays:
        return
    if arrays[0][1].ndim == 2:  # 2-D points: a scatter panel per method
        cols = min(5, len(arrays))
        nrows = math.ceil(len(arrays) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(2.6 * cols, 2.7 * nrows), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, (r, x) in zip(axes.flat, arrays):
            ax.axis("on")
            ax.scatter(x[:, 0], x[:, 1], s=3, alpha=0.7)
            ax.set_xlim(-3.5, 3.5)
            ax.set_ylim(-3.5, 3.5)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{row_label(r)}\nNFE {r['nfe'] or '–'}", fontsize=7)
    else:
        fig, axes = plt.subplots(len(arrays), 1, figsize=(per_row * 0.7 + 3, 0.75 * len(arrays) + 0.3), squeeze=False)
        for ax, (r, x) in zip(axes[:, 0], arrays):
            strip = np.concatenate([np.pad(np.clip(img[0], -1, 1), 1, constant_values=1) for img in x[:per_row]], axis=1)
            ax.imshow(strip, cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_ylabel(f"{row_label(r)}\nNFE {r['nfe'] or '–'}", rotation=0, ha="right", va="center", fontsize=7)
    _savefig(fig, path)
    plt.close(fig)


def sfddm_figures(summary: dict, bench, figdir: Path) -> dict:
    """Semantic consistency (teacher vs SFDDM student on the same noises, each with its default
    deterministic sampler) and interpolation strips (slerp and linear) of the student."""
    from fewstep.checkpoint import load_checkpoint
    from fewstep.distill.sfddm import compare_models, interpolation_noises, sample_same_noise
    from fewstep.viz import image_grid, pairs_picture, save_png

    rows = [r for r in summary["rows"] if r["method"] == "sfddm"]
    if not rows:
        return {}
    r = min(rows, key=lambda r: (r["nfe"], r["quality"][summary["quality_key"]]["mean"]))
    student = load_checkpoint(bench.model_dir(r["model"]), device=bench.device)
    n = 256
    xa, xb, st = compare_models(bench.teacher, student, n=n, seed=0)
    pairs_picture(xa[:32], xb[:32], figdir / "sfddm-consistency.png", "teacher", r["key"])
    out = {"model": r["key"], "n": n, "teacher_sampler": f"{st['a']['sampler']} NFE {st['a']['nfe']}",
           "student_sampler": f"{st['b']['sampler']} NFE {st['b']['nfe']}",
           **{k: v for k, v in st.items() if k.startswith(("psnr", "mse"))}}
    if not bench.is_toy:
        strips = [sample_same_noise(student, interpolation_noises(bench.shape, (3, 7), 9, mode))[0]
                  for mode in ("slerp", "linear")]
        save_png(image_grid(torch.cat(strips), nrow=9), figdir / "sfddm-interpolation.png")
    return out


def reading(summary: dict, consistency: dict) -> list[str]:
    """A short, generated reading of the numbers, including the targets the issues set.

    Where a data-floor row exists, each ratio to the teacher is also given over the floor: with a
    small held-out reference the Fréchet distance of real data is far from 0, and plain ratios of
    numbers that share that offset understate every gap.
    """
    key, K = summary["quality_key"], summary["quality_key"].upper()
    rows = main_rows(summary)
    ref = next((r for r in rows if r["method"] == "teacher"), None)
    floor_row = next((r for r in rows if r["method"] == "data"), None)
    floor = floor_row["quality"][key]["mean"] if floor_row else None
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

    def versus(q: float, rq: float) -> str:
        text = f"{q:.3g} = {q / rq:.2f}× the teacher's"
        if floor is not None and rq > floor:
            text += f"; over the floor {q - floor:.3g} vs the teacher's {rq - floor:.3g} ({(q - floor) / (rq - floor):.1f}×)"
        return text

    by = {(r["method"], r["nfe"]): r for r in rows if r["method"] != "sfddm"}
    if ref:
        rq = ref["quality"][key]["mean"]
        lines.append(f"- Teacher reference ({ref['sampler']}, NFE {ref['nfe']}): {K} {fmt_quality(ref['quality'], key)}.")
        lines += sfd_targets_reading(rows, key)
        for nfe, factor in ((2, 2.0), (4, 1.5)):
            r = by.get(("sfd", nfe))
            if r:
                q = r["quality"][key]["mean"]
                cost = r.get("distill_vs_teacher_training")
                lines.append(f"- SFD at NFE {nfe}: {K} {versus(q, rq)} (target ≤ {factor:g}×: "
                             f"{'met' if q <= factor * rq else 'not met'}); distillation cost "
                             f"{100 * (cost or float('nan')):.1f} % of teacher training "
                             f"(target ≤ 2 %: {'met' if cost is not None and cost <= 0.02 else 'not met'}).")
        sfddm = [r for r in rows if r["method"] == "sfddm"]
        for r in sfddm:
            if r["nfe"] == min(x["nfe"] for x in sfddm):
                q = r["quality"][key]["mean"]
                ddim = next((x for x in rows if x["method"] == "ddim" and x["nfe"] == r["nfe"]), None)
                msg = (f"- {row_label(r)}, T'={r['nfe']}: {K} {versus(q, rq)} "
                       f"(target ≤ 1.5×: {'met' if q <= 1.5 * rq else 'not met'})")
                if ddim:
                    dq = ddim["quality"][key]["mean"]
                    msg += f"; teacher DDIM-{r['nfe']} {dq:.3g} ({'beaten' if q < dq else 'not beaten'})"
                lines.append(msg + ".")
    for r in rows:  # the SFDDM objective is minimised by copying the teacher at phi: its chain there is the ceiling
        if r["method"] in ("sfddm", "progressive"):
            index = r["variant"].split("/")[0] if r["method"] == "sfddm" else "trailing"
            ceil = ceilings(rows, key, r["nfe"], index)
            if ceil:
                lines.append(f"- {row_label(r)}, NFE {r['nfe']}: {K} {r['quality'][key]['mean']:.3g}; the teacher's own "
                             f"{r['nfe']}-step chain on the same phi scores " +
                             ", ".join(f"{n.upper()} {v:.3g}" for n, v in sorted(ceil.items())) + ".")
    for r in rows:
        if r.get("long") and r.get("cost_curve"):
            lines.append(long_run_reading(r, rows, key))
    seen = set()
    for r in rows:  # one line per model: SFD-v's rows share theirs
        cache = r.get("trajectory_cache")
        if cache and cache.get("hits") and r["model"] not in seen:
            seen.add(r["model"])
            total = cache["hits"] + cache["misses"]
            lines.append(f"- {row_label(r)}: {cache['hits']} of its {total} iterations read their teacher "
                         "trajectories from the bench's trajectory cache (computed by the SFD rows with the same "
                         "noise; exact), so its distill time has no teacher part for those.")
    lines += time_to_quality_reading(rows, key)
    separation = separation_reading(rows, key)
    if separation:
        lines.append(separation)
    for nfe in sorted({r["nfe"] for r in rows if r["method"] not in REFERENCE_ROWS}):
        cands = [r for r in rows if r["nfe"] == nfe and r["method"] not in REFERENCE_ROWS]
        b = min(cands, key=lambda r: r["quality"][key]["mean"])
        lines.append(f"- NFE {nfe}: best is {row_label(b)} ({fmt(b['quality'][key])}).")
    if consistency:
        lines.append(f"- Semantic consistency ({consistency['model']} with {consistency['student_sampler']} against the "
                     f"teacher with {consistency['teacher_sampler']}, {consistency['n']} shared noises): PSNR of "
                     f"matched pairs {consistency['psnr_matched']:.2f} dB vs shuffled pairs "
                     f"{consistency['psnr_shuffled']:.2f} dB (higher matched PSNR = the same noise gives the same sample). "
                     "The interpolation figure shows slerp (top row) and linear (bottom row) between seeds 3 and 7.")
    if any(interval(r["quality"], key) for r in rows):
        lines.append("- ± is half a 95 % interval: for Fréchet distances the distance ± 1.96 standard errors "
                     "estimated from random halves of the samples, for paired distances the normal interval of "
                     "the mean over the pairs; values whose intervals overlap are not told apart.")
    else:
        lines.append("- Spreads are the standard deviation over the sample seeds; differences smaller than about "
                     "twice the spread are within noise.")
    return lines


def sfd_targets_reading(rows: list, key: str) -> list[str]:
    """The SFD family against the paper's own ratios (CIFAR-10, FID): SFD-v within 10 % of SFD at each NFE it
    shares (the paper's SFD-v is better), the 1-NFE stage at most 1.3x SFD at NFE 2, SFD at NFE 2 at most
    2.3x the teacher."""
    K = key.upper()
    q = {(r["method"], r["nfe"]): r["quality"][key]["mean"] for r in rows}
    teacher = next((r["quality"][key]["mean"] for r in rows if r["method"] == "teacher"), None)
    lines = []
    shared = sorted(n for (m, n) in q if m == "sfd-v" and ("sfd", n) in q)
    if shared:
        ratios = [(n, q[("sfd-v", n)] / q[("sfd", n)]) for n in shared]
        lines.append(f"- SFD-v / SFD ({K}; target ≤ 1.10 at every NFE, the paper's 0.94–0.97): " +
                     ", ".join(f"NFE {n} {v:.2f}" for n, v in ratios) +
                     f" ({'met' if all(v <= 1.10 for _, v in ratios) else 'not met'}).")
    if ("sfd-stage2", 1) in q and ("sfd", 2) in q:
        v = q[("sfd-stage2", 1)] / q[("sfd", 2)]
        lines.append(f"- 1-NFE stage / SFD at NFE 2 ({K}; target ≤ 1.3, the paper's 1.29): {v:.2f} "
                     f"({'met' if v <= 1.3 else 'not met'}).")
    if teacher and ("sfd", 2) in q:
        v = q[("sfd", 2)] / teacher
        lines.append(f"- SFD at NFE 2 / teacher ({K}; target ≤ 2.3, the paper's 2.3): {v:.2f} "
                     f"({'met' if v <= 2.3 else 'not met'}).")
    return lines


def ceilings(rows: list, key: str, nfe: int, index: str) -> dict:
    """{sampler: quality} of the teacher's own nfe-step chain on the index set (the teacher-on-phi rows)."""
    return {x["sampler"]: x["quality"][key]["mean"] for x in rows
            if x["method"] == "teacher-on-phi" and x["nfe"] == nfe and x["index"] == index}


def long_run_reading(r: dict, rows: list, key: str) -> str:
    """Whether SFDDM's quality keeps improving with training toward the teacher's own chain on phi."""
    K = key.upper()
    curve = r["cost_curve"]
    first, last = curve[0], curve[-1]
    ceil = ceilings(rows, key, r["nfe"], r["variant"].split("/")[0])
    text = (f"- {row_label(r)}, NFE {r['nfe']}: {K} along the run (first sample seed) "
            + ", ".join(f"{p['quality'][key]:.3g} at iteration {p['step']}" for p in curve) + ".")
    best = ceil.get("ddpm", min(ceil.values())) if ceil else None
    if best is not None:
        gap0, gap1 = first["quality"][key] - best, last["quality"][key] - best
        text += (f" The gap to the teacher's own {r['nfe']}-step chain on phi ({'DDPM' if 'ddpm' in ceil else 'DDIM'} "
                 f"{best:.3g}) went from {gap0:.3g} to {gap1:.3g}"
                 + (f" ({100 * (1 - gap1 / gap0):.0f} % of it closed)." if gap0 > 0 else "."))
    return text


def time_to_quality_reading(rows: list, key: str) -> list[str]:
    """Read off the cost plot: when each distillation's quality along its run first reaches the teacher's
    (or 1.5x the teacher's gap over the data floor, a level few-step students can reach)."""
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
        if r["method"] == "progressive" or not curve:  # progressive's points are other step counts
            continue
        parts = []
        for name, level in levels:
            hit = next((p for p in curve if p["quality"][key] <= level), None)
            parts.append(f"{name} {key.upper()} ({level:.3g}) " +
                         (f"reached after {fmt_time(hit['wall_s'])}" if hit else
                          f"not reached within {fmt_time(curve[-1]['wall_s'])}"))
        best = min(curve, key=lambda p: p["quality"][key])
        lines.append(f"- {row_label(r)}, NFE {r['nfe']}, along its run: " + "; ".join(parts) +
                     f" (best {best['quality'][key]:.3g} at {fmt_time(best['wall_s'])}).")
    return lines


def separation_reading(rows: list, key: str) -> str | None:
    """Whether the rows that matter most are told apart: teacher, SFD at NFE 2, DPM-Solver++(3M) at NFE 5."""
    wanted = [("teacher", None), ("sfd", 2), ("dpmpp3m", 5)]
    found = [next((r for r in rows if r["method"] == m and (n is None or r["nfe"] == n)), None) for m, n in wanted]
    if any(f is None for f in found):
        return None
    pairs, ok = [], True
    for i in range(len(found)):
        for j in range(i + 1, len(found)):
            a, b = found[i]["quality"][key], found[j]["quality"][key]
            gap = abs(a["mean"] - b["mean"])
            ia, ib = interval(found[i]["quality"], key), interval(found[j]["quality"], key)
            if ia and ib:
                apart = _better(ia, ib) != 0
                how = "intervals apart" if apart else "intervals overlap"
            else:
                spread = max(a["std"], b["std"])
                apart = gap > spread
                how = f"{'>' if apart else '≤'} the larger spread {spread:.2g}"
            ok &= apart
            pairs.append(f"{row_label(found[i])} vs {row_label(found[j])} {gap:.3g} apart ({how})")
    return (f"- Separation ({key.upper()}, teacher / SFD NFE 2 / DPM-Solver++(3M) NFE 5): " + "; ".join(pairs) +
            f". {'All three told apart.' if ok else 'Not all told apart.'}")


def quality_note(summary: dict) -> str:
    spec = summary["spec"]
    if spec.get("fd_intervals"):
        return (f"Quality: {spec['n_samples']} samples of seed{'s' if len(spec['seeds']) > 1 else ''} "
                f"{', '.join(map(str, spec['seeds']))}, ± half the 95 % interval (Fréchet distances: from "
                f"{spec['fd_intervals']} random halves of the samples).")
    return f"Quality: mean ± std over seeds {spec['seeds']}, {spec['n_samples']} samples each."


def write_report(out: Path, summary: dict, bench=None) -> Path:
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
    recipe = recipe_table(summary)
    if recipe:
        plot_recipe(summary, fig / "sfd-recipe.png")
    consistency = sfddm_figures(summary, bench, fig) if bench is not None else {}
    env = summary["environment"]
    t = summary["teacher"]
    lines = [f"# fewstep benchmark: {Path(t['path']).name} on {summary['spec']['data']}", "",
             f"fewstep {env['fewstep_version']}, torch {env['torch']}, device {env['device']} "
             f"({env['device_name']}), {env['threads']} threads. Teacher training time: "
             f"{fmt_time(t.get('training_wall_s'))}. {quality_note(summary)}", "", "## Results", "", table, "",
             *(["## SFD recipe: the authors' value of each setting against the other", "", RECIPE_NOTE, "",
                recipe, "", "![SFD recipe](figures/sfd-recipe.png)", ""] if recipe else []),
             *(["## Distillation time against its network floor", "", PROFILE_NOTE, "", profile, ""] if profile else []),
             "## Reading", "", *reading(summary, consistency), "", "## Figures", "",
             "![quality vs NFE](figures/quality-vs-nfe.png)", "",
             "![quality vs distillation cost](figures/quality-vs-cost.png)", "",
             "![samples from the same noises](figures/samples.png)", ""]
    for name in ("sfddm-consistency.png", "sfddm-interpolation.png"):
        if (fig / name).is_file():
            lines += [f"![{name[:-4]}](figures/{name})", ""]
    lines += ["Raw numbers: `results.json`; the table alone: `results.md`; models: `models/`."]
    if consistency:
        summary["consistency"] = consistency
    atomic_write(out / "report.md", lambda p: Path(p).write_text("\n".join(lines) + "\n"))
    return out / "report.md"


# ---- docs/results.md: several finished benches on one page ---------------------------------------------

RESULT_FIGURES = ("quality-vs-nfe.png", "quality-vs-cost.png", "samples.png")


def _differs_from_preset(name: str, spec: dict) -> str:
    """The settings where a bench's spec differs from the preset of that name ('' when none, or no preset)."""
    from dataclasses import asdict

    from fewstep.bench import PRESETS, preset
    if name not in PRESETS:
        return ""
    full = asdict(preset(name))
    return "; ".join(f"{k} {spec.get(k)} where the preset has {v}" for k, v in full.items()
                     if k in spec and spec[k] != v)


def recipe_section(recipes: list) -> list[str]:
    """docs/results.md's "SFD recipe" section: for each bench with recipe rows, the ablation table and figure,
    the SFD family beside the teacher, and the paper's ratios."""
    if not recipes:
        return []
    lines = ["## SFD recipe", "",
             "SFD runs its authors' recipe by default (zju-pi/diff-sampler, `sfd-main`): no gradient clipping, "
             "SFD-v on four times one SFD run's trajectories with the step condition as a per-block affine, the "
             "1-NFE stage on ten times at learning rate 5e-4 with a perceptual term on its last step, and a "
             "DPM-Solver++(3M) teacher whose last two steps drop to orders 2 and 1. Each setting was trained both "
             "ways on the same seeds and teacher trajectories; the tables below are measured by the presets "
             "named, whose budgets keep the authors' ratios at a scale a CPU can hold.", "", RECIPE_NOTE, ""]
    for title, slug, summary in recipes:
        lines += [f"### {title}", "", f"{quality_note(summary)}", "", recipe_table(summary), "",
                  f"![{title}: SFD recipe](figures/{slug}-sfd-recipe.png)", "",
                  "The SFD family with the authors' recipe:", "", sfd_family_table(summary), "",
                  *sfd_targets_reading(main_rows(summary), summary["quality_key"]), ""]
    return lines


def write_results_doc(benches: dict, out: Path, commands: dict | None = None) -> Path:
    """One page with each bench's table, profile, reading and figures: ``benches`` maps a title (e.g. the
    preset's name) to a bench output folder. The figures are copied next to the page as
    ``figures/<title>-<name>.png`` and the bench's results.json as ``data/<title>.json``, so the page stands
    alone, and a bench whose folder is gone keeps the section it had (rendered again from that copy, the
    plots drawn again from its numbers, the sample grid kept).
    A bench measured neither now nor before says how to run it."""
    out = Path(out)
    figdir, datadir = out / "figures", out / "data"
    figdir.mkdir(parents=True, exist_ok=True)
    commands = commands or {}
    head = ["# fewstep results", "",
             "Every number below was measured by `fewstep bench` on the machine named in each section; "
             "regenerate this page (and rerun whatever is missing: finished rows are reused) with "
             "`make results`. Quality is the mean ± std over the sample seeds; lower is better for FCD, "
             "KID, SWD and MMD. Each section's raw numbers are in `data/<section>.json` (the bench's "
             "results.json); a section whose bench is not rerun is written again from that file.", ""]
    sections, recipes = [], []
    for title, bench_dir in benches.items():
        bench_dir = Path(bench_dir)
        lines = []
        sections.append(lines)
        lines += [f"## {title}", ""]
        slug = "".join(c if c.isalnum() else "-" for c in title.lower())
        results, kept = bench_dir / "results.json", datadir / f"{slug}.json"
        if results.is_file():
            atomic_write(kept, lambda p, src=results: shutil.copyfile(src, p))
            samples = bench_dir / "figures" / "samples.png"  # drawn from the bench's sample files
            if samples.is_file():
                atomic_write(figdir / f"{slug}-samples.png", lambda p, src=samples: shutil.copyfile(src, p))
        elif not kept.is_file():
            lines += [f"Not measured yet. Run: `{commands.get(title, f'fewstep bench --preset {title} --out {bench_dir}')}`", ""]
            continue
        summary = json.loads(kept.read_text())
        # the plots are drawn again from the numbers, so they follow the current figure code
        plot_quality_vs_nfe(summary, figdir / f"{slug}-quality-vs-nfe.png")
        plot_quality_vs_cost(summary, figdir / f"{slug}-quality-vs-cost.png")
        if plot_recipe(summary, figdir / f"{slug}-sfd-recipe.png"):
            recipes.append((title, slug, summary))
        spec, env, t = summary["spec"], summary["environment"], summary["teacher"]
        lines += [f"Teacher `{Path(t['path']).name}` on {spec['data']}"
                  + (f" at {spec['resolution']}×{spec['resolution']}" if spec.get("resolution") else "")
                  + f"; fewstep {env['fewstep_version']}, torch {env['torch']}, {env['device']} "
                  f"({env['device_name']}, {env['threads']} threads); {quality_note(summary)} Reference: the "
                  f"{spec.get('reference', 'train')} split. Wall time of the "
                  f"{len(summary['rows'])} rows: {fmt_time(sum(r.get('row_wall_s') or 0 for r in summary['rows']))} "
                  f"(distillations included, each counted once); teacher training "
                  f"{fmt_time(t.get('training_wall_s'))}."]
        if commands.get(title):
            lines += ["", f"Command: `{commands[title]}`"]
        partial = _differs_from_preset(title, spec)
        if partial:
            lines += ["", f"**Not the whole `{title}` preset**: {partial}. The preset's command runs the rest "
                          "and reuses the rows measured with the same settings."]
        lines += ["", results_table(summary), ""]
        profile = profile_table(summary)
        if profile:
            lines += ["Distillation time per iteration against its network floor:", "", PROFILE_NOTE, "", profile, ""]
        lines += ["Reading:", "", *reading(summary, summary.get("consistency") or {}), ""]
        for name in RESULT_FIGURES:
            if (figdir / f"{slug}-{name}").is_file():
                lines += [f"![{title}: {name[:-4].replace('-', ' ')}](figures/{slug}-{name})", ""]
    head += recipe_section(recipes)
    page = out / "results.md"
    atomic_write(page, lambda p: Path(p).write_text("\n".join(head + [ln for sec in sections for ln in sec])))
    return page
