"""docs/results.md: several finished benches on one page, each section written from the bench's results.json
(kept beside the page, without the machine's paths), the methods' own sections gathered first, and an opening
with what each bench says. Loads no torch."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from fewstep.benchspec import PRESETS, preset
from fewstep.files import atomic_write, write_json
from fewstep.registry import methods as registered_methods
from fewstep.report import (PROFILE_NOTE, method_sections, plot_quality_vs_cost, plot_quality_vs_nfe, profile_table,
                            quality_note, reached_note, reading, results_table)
from fewstep.show import fmt_time

RESULT_FIGURES = ("quality-vs-nfe.png", "quality-vs-cost.png", "samples.png")
# the page's sections in order: the SFD family at the authors' budgets first (runs that take days, trained apart
# and measured as far as they have got), then the presets' shorter budgets
RESULT_PRESETS = ("digits-authors", "mnist-authors", "toy", "digits", "digits-defaults", "mnist")
AS_REACHED = ("digits-authors", "mnist-authors")


def bench_command(name: str, root: str | Path = "bench") -> str:
    """The command that measures a section of the page."""
    return f"fewstep bench --preset {name}{' --as-reached' if name in AS_REACHED else ''} --out {Path(root) / name}"


def _differs_from_preset(name: str, spec: dict) -> str:
    """The settings where a bench's spec differs from the preset of that name ('' when none, or no preset)."""
    if name not in PRESETS:
        return ""
    full = preset(name).record()
    return "; ".join(f"{k} {spec.get(k)} where the preset has {v}" for k, v in full.items()
                     if k in spec and spec[k] != v)


def portable_paths(obj, bench_dir: Path):
    """A bench's results with no path of the machine that ran it: paths inside the bench folder (or beside it)
    relative to it, a built-in model by its name."""
    root = Path(bench_dir).resolve()

    def fix(v):
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, list):
            return [fix(x) for x in v]
        if isinstance(v, str) and v.startswith("/"):
            path = Path(v)
            if path.parent.name == "assets" and path.parent.parent.name == "fewstep":
                return path.name
            if path.is_relative_to(root.parent):
                return os.path.relpath(path, root)
        return v
    return fix(obj)


def write_results_doc(benches: dict, out: Path, commands: dict | None = None) -> Path:
    """One page with each bench's table, profile, reading and figures: ``benches`` maps a title (e.g. the
    preset's name) to a bench output folder. The figures are copied next to the page as
    ``figures/<title>-<name>.png`` and the bench's results.json as ``data/<title>.json``, so the page stands
    alone, and a bench whose folder is gone keeps the section it had (rendered again from that copy, the
    plots drawn again from its numbers, the sample grid kept). The methods' own sections (SFD's recipe) come
    first, gathered over the benches that have them. A bench measured neither now nor before says how to
    run it."""
    out = Path(out)
    figdir, datadir = out / "figures", out / "data"
    figdir.mkdir(parents=True, exist_ok=True)
    commands = commands or {}
    head = ["# fewstep results", "",
            "Every number below was measured by `fewstep bench` on the machine named in each section; "
            "regenerate this page (and rerun whatever is missing: finished rows are reused) with "
            "`make results`. Lower is better for FCD, KID, SWD, MMD and the paired distances; each section says "
            "what its ± is. Each section's raw numbers are in `data/<section>.json` (the bench's results.json); "
            "a section whose bench is not rerun is written again from that file.", ""]
    sections, gathered, found, measured = [], {}, [], {}
    for title, bench_dir in benches.items():
        bench_dir = Path(bench_dir)
        lines = [f"## {title}", ""]
        sections.append(lines)
        slug = "".join(c if c.isalnum() else "-" for c in title.lower())
        results, kept = bench_dir / "results.json", datadir / f"{slug}.json"
        command = commands.get(title, f"fewstep bench --preset {title} --out {bench_dir}")
        if results.is_file():
            write_json(kept, portable_paths(json.loads(results.read_text()), bench_dir))
            samples = bench_dir / "figures" / "samples.png"  # drawn from the bench's sample files
            if samples.is_file():
                atomic_write(figdir / f"{slug}-samples.png", lambda p, src=samples: shutil.copyfile(src, p))
        elif not kept.is_file():
            lines += [f"Not measured yet. Run: `{command}`", ""]
            continue
        summary = json.loads(kept.read_text())
        measured[title] = summary
        if not all("label" in r for r in summary["rows"]):  # rows of an older format, kept but not drawn again
            lines += [f"Measured by an older fewstep whose rows this page no longer reads (`{kept.relative_to(out)}` "
                      "keeps them; its solver rows counted a final denoise as one NFE). Run: "
                      f"`{command}`", ""]
            continue
        # the plots are drawn again from the numbers, so they follow the current figure code
        plot_quality_vs_nfe(summary, figdir / f"{slug}-quality-vs-nfe.png")
        plot_quality_vs_cost(summary, figdir / f"{slug}-quality-vs-cost.png")
        for name, section in method_sections(summary, figdir, prefix=f"{slug}-"):
            gathered.setdefault(name, []).append((title, summary, section))
        said = [line for method in registered_methods() if method.headline for line in method.headline(summary)]
        if said:
            found.append(f"- **{title}** ({summary['quality_key'].upper()}): " + "; ".join(said) + ".")
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
        if spec.get("note"):
            lines += ["", spec["note"]]
        partial = _differs_from_preset(title, spec)
        if partial:
            lines += ["", f"**Not the whole `{title}` preset**: {partial}. The preset's command runs the rest "
                          "and reuses the rows measured with the same settings."]
        reached = reached_note(summary)
        if reached:
            lines += ["", reached]
        lines += ["", results_table(summary), ""]
        profile = profile_table(summary)
        if profile:
            lines += ["Distillation time per iteration against its network floor:", "", PROFILE_NOTE, "", profile, ""]
        lines += ["Reading:", "", *reading(summary), ""]
        for name in RESULT_FIGURES:
            if (figdir / f"{slug}-{name}").is_file():
                lines += [f"![{title}: {name[:-4].replace('-', ' ')}](figures/{slug}-{name})", ""]
    if found:
        head += ["## What the benches say", "",
                 "Each method against the teacher and against its ceiling (what a student that matched its own "
                 "targets exactly would score; for progressive distillation, the teacher's own DDIM on the same "
                 "grid), in each bench's quality metric and at that bench's budgets (lower is better). The "
                 "`-authors` benches train the SFD family at its authors' budgets (a run measured before its end is "
                 "named with the budget it had reached); the others at the presets' shorter ones. The sections below "
                 "have every row.", "", *found, ""]
        side_by_side = [ln for method in registered_methods() if method.across for ln in method.across(measured)]
        if side_by_side:
            head += [*side_by_side, ""]
    for name, parts in gathered.items():  # e.g. "SFD recipe", with a sub-section per bench
        head += [f"## {name}", ""]
        for title, summary, section in parts:
            head += [f"### {title}", "", quality_note(summary), "", *section, ""]
    page = out / "results.md"
    atomic_write(page, lambda p: Path(p).write_text("\n".join(head + [ln for sec in sections for ln in sec])))
    return page
