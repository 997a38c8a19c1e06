"""SFDDM's rows in a bench: students at each T' and index/init variant, DDIM on the teacher's trailing steps
beside them, the teacher's own chain on each phi (the ceiling), and the optional long run; and its extra
measurements (semantic consistency, interpolation strips)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fewstep.checkpoint import load_checkpoint, teacher_reference
from fewstep.compare import compare_models, interpolation_noises, sample_same_noise
from fewstep.distill.step_table import PANEL, ceiling_rows
from fewstep.errors import FewstepError
from fewstep.method import Row
from fewstep.sfddm.config import SFDDMConfig
from fewstep.sfddm.method import SFDDM
from fewstep.sfddm.recipe import default_iterations
from fewstep.viz import image_grid, pairs_picture, save_png


@dataclass
class SFDDMRow(Row):
    """An SFDDM student at T' = nfe with one index/init variant; `long`: the run of a fraction of the teacher's
    training iterations, scored at more points along the way."""

    variant: str = "trailing/random"
    long: bool = False

    def budget(self, bench) -> dict:
        s = bench.spec
        if self.long:
            return {"iterations": long_iterations(bench), "batch": s.sfddm_batch, "lr": s.sfddm_lr}
        iters = s.sfddm_iters if s.sfddm_iters is not None else default_iterations(bench.teacher_card, s.sfddm_batch)[0]
        return {"iterations": iters, "batch": s.sfddm_batch, "lr": s.sfddm_lr}

    def ensure_model(self, bench):
        path, budget = bench.model_dir(self.model), self.budget(bench)
        if bench.finished(path, budget):
            return path
        s = bench.spec
        index, init = self.variant.split("/")
        ds = bench.data()
        info = {**ds.info, "name": ds.name, "kind": ds.kind, "shape": list(ds.shape)}
        method = SFDDM(bench.teacher.denoiser, SFDDMConfig(steps=self.nfe, index=index, init=init, seed=s.seed),
                       data_info=info, teacher_ref=teacher_reference(bench.teacher.path))
        bench.train(method, path, budget, data=ds.x,  # the authors clip no gradients
                    curve_points=s.sfddm_long_curve_points if self.long else None)
        return path


@dataclass
class TrailingDDIMRow(Row):
    """DDIM on the teacher's own steps at T' trailing points: the training-free row beside an SFDDM T'."""

    sampler: str = "ddim"
    trailing: bool = True

    def sampling(self, bench) -> tuple:
        return bench.teacher, {"nfe": self.nfe, "sampler": "ddim", "grid": "discrete"}, None


def long_iterations(bench) -> int:
    """The long SFDDM run's length: its fraction of the iterations the teacher's card says it trained."""
    done = (bench.teacher_card.get("training") or {}).get("iterations")
    if not done:
        raise FewstepError(f"sfddm_long_fraction: the teacher {bench.spec.teacher} has no training iterations "
                           "on its card to take a fraction of")
    return max(1, round(bench.spec.sfddm_long_fraction * int(done)))


def bench_rows(bench) -> list[Row]:
    s, rows = bench.spec, []
    for T in s.sfddm_steps:
        every = s.sfddm_variants_at is None or T in s.sfddm_variants_at
        variants = s.sfddm_variants if every else s.sfddm_variants[:1]
        if "sfddm" in s.methods:
            for variant in variants:
                index, init = variant.split("/")
                rows.append(SFDDMRow(f"sfddm-{T}-{index}-{init}", "sfddm", T, f"SFDDM ({variant})",
                                     model=f"sfddm-{T}-{index}-{init}", panel=PANEL, variant=variant))
        if "ddim" in s.methods and "sfddm" in s.methods and bench.teacher.denoiser.schedule.is_discrete and T not in s.nfe:
            rows.append(TrailingDDIMRow(f"ddim-trailing-{T}", "ddim", T, "DDIM (trailing steps)"))
        if "sfddm" in s.methods:
            rows += ceiling_rows(bench, T, [v.split("/")[0] for v in variants])
    if "sfddm" in s.methods and s.sfddm_long_fraction:
        # does longer training close the gap to the teacher's own chain on phi? (that row is the ceiling)
        T, variant = s.sfddm_steps[0], s.sfddm_variants[0]
        index, init = variant.split("/")
        key = f"sfddm-{T}-{index}-{init}-long"
        rows.append(SFDDMRow(key, "sfddm", T, f"SFDDM ({variant}, long run)", model=key, panel=PANEL, variant=variant,
                             long=True))
    return rows


def bench_extras(bench, summary: dict, figdir: Path) -> dict:
    """Semantic consistency (the teacher and the best SFDDM student at the smallest T' on the same noises, each
    with its default deterministic sampler) and interpolation strips (slerp and linear) of that student."""
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
    out["figures"] = ["sfddm-consistency.png"] + ([] if bench.is_toy else ["sfddm-interpolation.png"])
    return {"consistency": out}
