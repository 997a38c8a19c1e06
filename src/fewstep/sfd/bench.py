"""SFD's rows in a bench: SFD at each of its NFEs, SFD-v at each of its, the 1-NFE stage, and each recipe
setting's other value (an ablation row drawn apart, in the recipe table)."""
from __future__ import annotations

from dataclasses import dataclass

from fewstep.checkpoint import Checkpoint, load_checkpoint, read_card, teacher_reference
from fewstep.method import Row
from fewstep.sfd.config import SFDConfig
from fewstep.sfd.method import SFD
from fewstep.sfd.recipe import (AUTHORS_GRAD_CLIP, SFD_RECIPE, RecipeSetting, default_grad_clip, iterations_for,
                                sfd_nfe_for)
from fewstep.sfd.report import CEILING, LABELS, PANEL
from fewstep.sfd.trajectory import sfd_grids, teacher_evaluations


def sfdv_model(spec) -> str:
    """The SFD-v model's folder name; the 1-NFE second stage starts from it."""
    return "sfdv-" + "_".join(map(str, spec.sfdv_nfe))


@dataclass
class SFDRow(Row):
    """A row of SFD (method "sfd"), SFD-v ("sfd-v") or the 1-NFE stage ("sfd-stage2"); with `recipe`, the same
    run with that recipe setting's other value (drawn apart, in the recipe table)."""

    recipe: str | None = None

    @property
    def setting(self) -> RecipeSetting | None:
        return SFD_RECIPE.get(self.recipe)

    def budget(self, bench) -> dict:
        s, setting = bench.spec, self.setting
        factor = {"sfd": 1, "sfd-v": s.sfdv_trajectory_factor, "sfd-stage2": s.sfd_stage2_trajectory_factor}[self.method]
        lr = s.sfd_stage2_lr if self.method == "sfd-stage2" else s.sfd_lr
        if setting is not None:
            factor = setting.factor if setting.factor is not None else factor
            lr = setting.lr if setting.lr is not None else lr
        return {"iterations": iterations_for(round(s.sfd_trajectories * factor), s.sfd_batch), "batch": s.sfd_batch,
                "lr": lr, "grad_clip": self.grad_clip(bench)}

    def grad_clip(self, bench) -> float | None:
        """The setting's other value where it is the clip; else the authors' (no clipping) when the bench measures
        recipe settings, which are all measured from the authors' whole recipe; else fewstep's default."""
        setting = self.setting
        if setting is not None and setting.grad_clip is not None:
            return setting.grad_clip
        if bench.spec.sfd_recipe:
            return AUTHORS_GRAD_CLIP
        return default_grad_clip(self.method == "sfd-stage2")

    def config(self, **fields) -> SFDConfig:
        """The authors' recipe (SFDConfig's defaults), with the setting's other value if the row has one."""
        return SFDConfig(**fields, **dict(self.setting.config if self.setting else ()))

    def ensure_model(self, bench):
        path, budget = bench.model_dir(self.model), self.budget(bench)
        if bench.finished(path, budget):
            return path
        s = bench.spec
        if self.method == "sfd-stage2":
            first_path = first_stage_row(bench).ensure_model(bench)
            first = load_checkpoint(first_path, device=bench.device)
            method = SFD(first, self.config(stage2=True), teacher_ref=teacher_reference(first_path),
                         trajectory_cache=bench.trajectory_cache)
        else:
            nfe = [self.nfe] if self.method == "sfd" else list(s.sfdv_nfe)
            method = SFD(bench.teacher, self.config(nfe=nfe), teacher_ref=teacher_reference(bench.teacher.path),
                         trajectory_cache=bench.trajectory_cache)
        bench.train(method, path, budget, "step", grad_clip=budget["grad_clip"])
        return path

    def distill_seconds(self, bench, card: dict) -> float:
        own = float((card.get("training") or {}).get("wall_time_s") or 0)
        if self.method == "sfd-stage2":  # the first stage it starts from
            return own + float(read_card(bench.model_dir(sfdv_model(bench.spec)))["training"]["wall_time_s"])
        return own


def _row(method: str, nfe: int, model: str, key: str | None = None, recipe: str | None = None) -> SFDRow:
    label = LABELS[method] + (f" ~ {recipe}" if recipe else "")
    return SFDRow(key or model, method, nfe, label, model=model, panel=PANEL, recipe=recipe, apart=recipe is not None)


def first_stage_row(bench) -> SFDRow:
    """The SFD-v run the 1-NFE stage starts from (at its largest NFE)."""
    return _row("sfd-v", max(bench.spec.sfdv_nfe), sfdv_model(bench.spec))


def bench_rows(bench) -> list[SFDRow]:
    """SFD at each of its NFEs, SFD-v at each of its, the 1-NFE stage, the ceiling at each of their NFEs, then
    each recipe setting's other value (after the authors' runs, so they read those runs' teacher trajectories
    from the cache)."""
    s, rows = bench.spec, []
    tag = sfdv_model(s)
    if "sfd" in s.methods:
        rows += [_row("sfd", n, f"sfd-{n}") for n in (s.sfd_nfe if s.sfd_nfe is not None else sfd_nfe_for(s.nfe))]
    if "sfd-v" in s.methods:
        rows += [_row("sfd-v", n, tag, key=f"{tag}-{n}") for n in s.sfdv_nfe]
    if "sfd-stage2" in s.methods:
        rows.append(_row("sfd-stage2", 1, "sfd-stage2", key="sfd-stage2-1"))
    rows += ceiling_rows(bench, [r.nfe for r in rows if r.method in ("sfd", "sfd-v")])
    for name in s.sfd_recipe:  # each known: SFDBench refuses others when the spec is made
        setting = SFD_RECIPE[name]
        if setting.method not in s.methods:
            continue
        if setting.method == "sfd":
            rows.append(_row("sfd", setting.nfe, f"sfd-{setting.nfe}~{name}", recipe=name))
        elif setting.method == "sfd-v":
            rows += [_row("sfd-v", n, f"{tag}~{name}", key=f"{tag}~{name}-{n}", recipe=name) for n in s.sfdv_nfe]
        else:
            rows.append(_row("sfd-stage2", 1, f"sfd-stage2~{name}", key=f"sfd-stage2~{name}-1", recipe=name))
    return rows


@dataclass
class SFDCeilingRow(Row):
    """The teacher's own trajectory that SFD and SFD-v rows at `student_nfe` learn to match: the teacher's solver
    over SFD's refined grid (the student's timestamps with m points inserted per interval, the final orders the
    runs used), its last state, from the rows' noises. A student matching its targets exactly would score this,
    so it is SFD's ceiling; a reference row, at the NFE the teacher spends on that grid."""

    student_nfe: int = 0

    def sampling(self, bench) -> tuple:
        cfg = SFDConfig(nfe=self.student_nfe)  # the bench's own SFD rows run the config's defaults
        _, t_grid = sfd_grids(bench.teacher.denoiser, cfg, self.student_nfe)
        sampler = {"name": cfg.teacher_solver, "nfe": self.nfe, "sigmas": [float(s) for s in t_grid],
                   "clip": 1.0 if cfg.thresholding else None, "lower_order_final": cfg.teacher_final_orders}
        teacher = bench.teacher
        return Checkpoint(teacher.denoiser, {**teacher.card, "sampler": sampler}, teacher.path), {}, None


def ceiling_rows(bench, nfes) -> list[SFDCeilingRow]:
    """A ceiling row for each NFE an SFD or SFD-v row has, at the NFE the teacher spends on that grid."""
    cfg = SFDConfig()
    return [SFDCeilingRow(f"sfd-ceiling-{n}", CEILING,
                          teacher_evaluations(cfg.teacher_solver, sfd_grids(bench.teacher.denoiser, cfg, n)[1]),
                          f"teacher on SFD's NFE-{n} grid (ceiling)", reference=True, student_nfe=n)
            for n in sorted(set(nfes))]


def bench_extras(bench, summary: dict, figdir) -> dict:
    """The recipe settings the bench measured, described for the report."""
    return {"sfd_recipe": {n: {"label": SFD_RECIPE[n].label, "method": SFD_RECIPE[n].method,
                               "authors": SFD_RECIPE[n].authors, "other": SFD_RECIPE[n].other}
                           for n in bench.spec.sfd_recipe}}
