"""Progressive distillation's rows in a bench: one chain of folds, a row at each fold the SFDDM step counts
name, each beside the teacher's own chain on the trailing phi (its grids)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fewstep.checkpoint import load_checkpoint, read_card
from fewstep.distill.step_table import PANEL, ceiling_rows
from fewstep.errors import FewstepError
from fewstep.method import Row
from fewstep.progressive.method import progressive_distill
from fewstep.progressive.recipe import FOLD_LR_SCHEDULE, ITERS_PER_FOLD
from fewstep.sampling import sample
from fewstep.train import TrainConfig


def targets(spec) -> list[int]:
    """The step counts of the folds with rows (the chain runs down to the smallest)."""
    return sorted(set(spec.pd_steps))


def chain_name(spec) -> str:
    return f"progressive-from-{spec.pd_start_steps}"


@dataclass
class ProgressiveRow(Row):
    """The fold of one chain (start steps → … → the smallest target) that samples in nfe steps; its cost is the
    folds up to it."""

    def budget(self, bench) -> dict:
        s = bench.spec
        iters = s.pd_iters_per_fold if s.pd_iters_per_fold is not None else ITERS_PER_FOLD
        return {"iterations": iters, "batch": s.pd_batch, "lr": s.pd_lr, "per_fold": True}

    def ensure_model(self, bench):
        path, budget = bench.model_dir(self.model), self.budget(bench)
        if bench.finished(path, budget):
            return path
        s = bench.spec
        ds = bench.data()
        info = {**ds.info, "name": ds.name, "kind": ds.kind, "shape": list(ds.shape)}
        chain = bench.model_dir(chain_name(s))
        train = TrainConfig(steps=budget["iterations"], batch=budget["batch"], lr=budget["lr"],
                            lr_schedule=FOLD_LR_SCHEDULE, seed=s.seed, device=str(bench.device),
                            progress=bench.progress, n_preview=0, log_every=max(10, budget["iterations"] // 20))
        # finished folds are reused and an interrupted one continues
        progressive_distill(bench.teacher, ds.x, s.pd_start_steps, min(targets(s)), chain, train, data_info=info,
                            resume=chain.exists(), run_info={"command": "fewstep bench (progressive)"},
                            log=lambda msg: None)
        return path

    def _folds(self, bench) -> tuple[Path, list]:
        chain = bench.model_dir(chain_name(bench.spec))
        return chain, read_card(chain)["method"]["folds"]

    def distill_seconds(self, bench, card: dict) -> float:
        return float(sum(f["wall_time_s"] or 0 for f in self._folds(bench)[1] if f["student_steps"] >= self.nfe))

    def distill_profile(self, bench, card: dict) -> dict | None:
        """The folds down to the row's, iteration-weighted."""
        chain, folds = self._folds(bench)
        profs = []
        for f in (f for f in folds if f["student_steps"] >= self.nfe):
            try:
                fc = read_card(chain / f.get("dir", f"fold-{f['student_steps']}"))
            except FewstepError:
                return None
            prof = (fc.get("training") or {}).get("profile")
            if prof is None:
                return None
            profs.append((int(fc["training"]["iterations"]), prof))
        if not profs:
            return None
        n = sum(it for it, _ in profs)
        out = {k: sum(it * p[k] for it, p in profs) / n for k in profs[0][1]
               if k not in ("iterations_measured", "overhead")}
        out["iterations_measured"] = sum(p["iterations_measured"] for _, p in profs)
        out["overhead"] = out["iter_s"] / out["floor_s"] if out.get("floor_s") else None
        out["folds"] = len(profs)
        return out

    def cost_curve(self, bench, ckpt, kw: dict) -> list[dict]:
        """Each fold's final student at its own step count, down to the row's, against the wall time so far."""
        seed, noise = bench.curve_noise()
        chain, folds = self._folds(bench)
        points, wall = [], 0.0
        for f in folds:
            wall += float(f.get("wall_time_s") or 0)
            if f["student_steps"] < self.nfe:
                break
            fold = load_checkpoint(chain / f.get("dir", f"fold-{f['student_steps']}"), device=bench.device)
            x = sample(fold, len(noise), seed=seed, noise=noise, progress=False)
            points.append({"wall_s": wall, "nfe": f["student_steps"], "n": len(noise),
                           "quality": bench.score_curve_point(x, seed)})
        return points


def bench_rows(bench) -> list[Row]:
    if "progressive" not in bench.spec.methods:
        return []
    rows, chain = [], chain_name(bench.spec)
    for T in targets(bench.spec):
        rows.append(ProgressiveRow(f"progressive-{T}", "progressive", T, "progressive distillation",
                                   model=f"{chain}/fold-{T}", panel=PANEL))
        rows += ceiling_rows(bench, T, ["trailing"])  # its grids are the trailing phi
    return rows
