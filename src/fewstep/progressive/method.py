"""Progressive distillation (Salimans & Ho, ICLR 2022): the multi-fold baseline. Every fold (fewstep.progressive.fold)
halves the student's DDIM steps; `progressive_distill` runs the chain of folds and `distill_progressive` is the
one call the command line and `import fewstep` share."""
from __future__ import annotations

import copy
import os
from dataclasses import replace
from pathlib import Path

import torch

from fewstep import argtypes as A
from fewstep.checkpoint import (CARD_NAME, Checkpoint, finished_run, load_checkpoint, read_card,
                                remove_stale_temp_files, save_checkpoint, teacher_reference)
from fewstep.distill.common import distill_data, distill_labels
from fewstep.errors import FewstepError, option
from fewstep.models import as_model
from fewstep.progressive.fold import HEADS, ProgressiveFold, fold_plan, halve_grid, teacher_grid
from fewstep.progressive.recipe import PROGRESSIVE_LOOP
from fewstep.recipe import check_loop_options
from fewstep.recipe import run_info as api_run_info
from fewstep.devices import pick_device
from fewstep.train import TrainConfig, Trainer


def progressive_distill(teacher_ckpt, data: torch.Tensor, start_steps: int | None, target_steps: int,
                        out_dir, config: TrainConfig, data_info: dict | None = None, clip="auto",
                        dropout: float | None = None, resume: bool = False, run_info: dict | None = None,
                        log=print, labels: torch.Tensor | None = None, head: str = "x0",
                        clip_targets: bool = False) -> Path:
    """Run folds start → start/2 → … → target into out_dir/fold-<steps>/, then put the final student in
    out_dir itself with the summed cost of all folds. `teacher_ckpt` is a path / built-in name or a
    loaded Checkpoint. With resume, finished folds are reused and an interrupted one continues.
    A class-conditional teacher needs the data's class `labels`. `head` and `clip_targets`: see the
    module's docstring (defaults: x0 with truncated-SNR weight, unclipped targets)."""
    out_dir = Path(out_dir)
    device = pick_device(config.device)
    root = teacher_ckpt if isinstance(teacher_ckpt, Checkpoint) else load_checkpoint(teacher_ckpt, device=device)
    teacher = root.denoiser.to(device)
    if start_steps is None:
        if not teacher.schedule.is_discrete:
            raise FewstepError("a continuous teacher (EDM, VE or VP-SDE) has no step table: give "
                               f"{option('start_steps')}, the first teacher's DDIM steps on EDM's rho=7 grid over its "
                               f"sigma range [{teacher.sigma_min:g}, {teacher.sigma_max:g}] (e.g. "
                               f"{option('start_steps', 64)} and {option('steps', 4)})")
        start_steps = teacher.schedule.T
    plan = fold_plan(start_steps, target_steps)
    data_info = data_info or {}
    if clip == "auto":
        clip = 1.0 if data_info.get("kind") == "image" else None
    root_ref = teacher_reference(root.path) if root.path is not None else None
    if not resume and (out_dir / CARD_NAME).exists():
        raise FewstepError(f"{out_dir} already holds a model; pass {option('resume', True)} to continue it or choose "
                           f"another folder for {option('out')}")
    grid = teacher_grid(teacher, start_steps)
    teacher_ref, folds = root_ref, []
    for k, steps in enumerate(plan, start=1):
        fold_dir = out_dir / f"fold-{steps}"
        info = {"fold": k, "folds": len(plan), "start_steps": start_steps, "target_steps": target_steps,
                "root_teacher": root_ref}
        if resume and finished_run(fold_dir):
            remove_stale_temp_files(fold_dir)  # a kill may have cut the finished fold's last state write
            ck = load_checkpoint(fold_dir, device=device)
            log(f"fold {k}/{len(plan)}: {len(grid) - 1} → {steps} steps already done ({fold_dir})")
            student = ck.denoiser
            card = ck.card
        else:
            method = ProgressiveFold(teacher, grid, data_info, clip, teacher_ref, info, dropout, head, clip_targets)
            cont = resume and (fold_dir / "train_state.pt").exists()
            log(f"fold {k}/{len(plan)}: {len(grid) - 1} → {steps} steps{' (resuming)' if cont else ''}")
            # only the last fold draws the end-of-run preview: an early fold samples at hundreds of steps
            fold_config = config if k == len(plan) else replace(config, n_preview=0)
            trainer = Trainer(method, fold_config, fold_dir, data=data, resume=cont, run_info=run_info, labels=labels)
            trainer.run()
            student = copy.deepcopy(trainer.eval_model()).eval()
            for p in student.parameters():
                p.requires_grad_(False)
            card = read_card(fold_dir) if trainer.is_main else method.card()
        tr = card.get("training", {})
        folds.append({"fold": k, "teacher_steps": len(grid) - 1, "student_steps": steps,
                      "iterations": tr.get("iterations"), "wall_time_s": tr.get("wall_time_s"),
                      "dir": fold_dir.name})
        teacher, grid = student, halve_grid(grid)
        teacher_ref = teacher_reference(fold_dir) if (fold_dir / CARD_NAME).exists() else None
    if int(os.environ.get("RANK", "0")) != 0:
        return out_dir
    total_wall = round(sum(f["wall_time_s"] or 0.0 for f in folds), 2)
    total_its = sum(f["iterations"] or 0 for f in folds)
    final = {k: v for k, v in card.items()
             if k not in ("format", "format_version", "fewstep_version", "saved_at", "net", "denoiser",
                          "weights_sha256")}
    final["method"] = {"name": "progressive", "teacher_steps": start_steps, "student_steps": target_steps,
                       "head": head, "weight": HEADS[head], "target": "two teacher DDIM steps", "clip": clip,
                       "clip_targets": clip_targets,
                       "dropout": dropout, "folds": folds, "total_iterations": total_its,
                       "total_wall_time_s": total_wall}
    final["teacher"] = root_ref
    final["training"] = {**final.get("training", {}), "iterations": total_its, "wall_time_s": total_wall,
                         "per_fold_iterations": config.steps, "finished": True}
    if out_dir.is_dir():
        remove_stale_temp_files(out_dir)
    save_checkpoint(out_dir, teacher, final)
    return out_dir


def distill_progressive(teacher, data, out, *, steps: int = 8, start_steps: int | None = None, head: str = "x0",
                        clip="auto", clip_targets: bool = False, dropout: float | None = None,
                        resolution: int | None = None, data_seed: int | None = None, resume: bool = False,
                        run_info: dict | None = None, **options) -> Checkpoint:
    """Progressive distillation (Salimans & Ho) of `teacher` (a loaded model, a built-in name or a checkpoint
    folder) on `data`, in folds that halve the DDIM steps from `start_steps` (default: the teacher's T) down to
    `steps`; every fold is kept in out/fold-<steps>/ and the final student, returned, in `out`.

    `head`: the output compared, with the paper's weight (x0 with max(SNR, 1), v or eps); `clip`: x0 clipping
    when sampling (auto: 1 for images); `clip_targets` also clips the teacher inside the targets. Training-loop
    keywords (`fewstep.recipe.LOOP_OPTIONS`) apply to each fold: 1,000 iterations at batch 64, Adam 1e-4 with a
    cosine decay, gradients clipped at norm 1."""
    loop = check_loop_options(options, "distill_progressive")
    steps = A.check("steps", steps, A.positive_int)
    start_steps = None if start_steps is None else A.check("start_steps", start_steps, A.integer(2, 10**6))
    head = A.check("head", head, A.choice(tuple(HEADS)))
    resolution = None if resolution is None else A.check("resolution", resolution, A.resolution)
    data_seed = None if data_seed is None else A.check("data_seed", data_seed, A.seed)
    dropout = None if dropout is None else A.check("dropout", dropout, A.probability)
    resolved = {**PROGRESSIVE_LOOP, **loop}
    teacher = as_model(teacher, device=pick_device(resolved["device"]), what="teacher")
    if run_info is None:
        run_info = api_run_info("distill_progressive", {
            "teacher": teacher, "data": data, "out": str(out), "steps": steps, "start_steps": start_steps,
            "head": head, "clip": clip, "clip_targets": clip_targets, "dropout": dropout, "resolution": resolution,
            "data_seed": data_seed, **loop})
    ds, info = distill_data(data, resolution, data_seed, teacher)
    out = progressive_distill(teacher, ds.x, start_steps, steps, out, TrainConfig.from_options(resolved),
                              data_info=info, clip=clip, dropout=dropout, resume=resume, run_info=run_info,
                              labels=distill_labels(teacher, ds), head=head, clip_targets=clip_targets)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun the final card is process 0's to write
        return None
    return load_checkpoint(out, device=next(teacher.denoiser.parameters()).device)
