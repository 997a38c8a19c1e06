"""`fewstep distill {sfd, sfddm, progressive}`, `compare` and `interpolate`: wiring of the distillation
methods to the command line. Each method's section registers its own sub-command."""
from __future__ import annotations

import argparse

from fewstep import argtypes as A


def register(sub):
    d = sub.add_parser("distill", help="distil a teacher into a few-step student")
    methods = d.add_subparsers(dest="method", required=True, metavar="METHOD")
    for add in (add_sfd, add_sfddm, add_progressive):
        add(methods)
    add_compare(sub)
    add_interpolate(sub)


# ---- SFD ------------------------------------------------------------------------------------------
def add_sfd(methods):
    from fewstep.cli import _nfe_list, add_train_args
    from fewstep.distill.sfd import (PERCEPTUAL_NETS, SFD_LR, SFD_TRAJECTORIES, SFDV_TRAJECTORY_FACTOR,
                                     STAGE2_CONDITIONS, STAGE2_LR, STAGE2_TRAJECTORY_FACTOR, TEACHER_SOLVERS)
    from fewstep.nets import STEP_CONDITIONS
    from fewstep.solvers import LOWER_ORDER_FINAL

    p = methods.add_parser("sfd", help="Simple and Fast Distillation (data-free; SFD, SFD-v, 1-NFE stage)",
                           description="Distil a teacher into a few-step Euler sampler without training data. "
                                       "One NFE gives SFD; a list (e.g. 2,3,4,5) gives SFD-v, one model for all. "
                                       "Every default is the SFD authors' recipe.")
    p.add_argument("--teacher", required=True, help="teacher checkpoint or built-in name (e.g. digits-teacher)")
    p.add_argument("--nfe", type=_nfe_list, default=[2], help="student NFE, or a list for SFD-v (default 2)")
    p.add_argument("--afs", action=argparse.BooleanOptionalAction, default=True,
                   help="analytical first step: saves one network call (default on)")
    p.add_argument("--m", type=A.integer(0, 64), default=3, help="teacher points inserted per student interval (default 3)")
    p.add_argument("--teacher-solver", default="dpmpp3m", choices=TEACHER_SOLVERS)
    p.add_argument("--teacher-final-orders", default="always", choices=LOWER_ORDER_FINAL,
                   help="DPM-Solver++ teacher: orders 2 then 1 on the last two steps of every grid (always, the "
                        "authors'), only on grids under 15 steps (short, diffusers'), or never")
    p.add_argument("--grid", default="polynomial", choices=["polynomial", "logsnr", "uniform", "discrete"])
    p.add_argument("--rho", type=A.positive, default=7.0)
    p.add_argument("--sigma-min", type=A.positive, default=None, help="default: the teacher's (0.006 for EDM teachers)")
    p.add_argument("--sigma-max", type=A.positive, default=None, help="default: the teacher's (80 for EDM teachers)")
    p.add_argument("--trajectories", type=A.integer(1, 10**12), default=None,
                   help=f"teacher trajectories to train on (iterations = trajectories / batch; default "
                        f"{SFD_TRAJECTORIES}, {SFDV_TRAJECTORY_FACTOR}x that for SFD-v and "
                        f"{STAGE2_TRAJECTORY_FACTOR}x for --stage2, the authors' budgets)")
    p.add_argument("--loss-reduction", default="sum", choices=["sum", "mean"],
                   help="L1 summed over pixels (paper) or averaged")
    p.add_argument("--thresholding", action="store_true",
                   help="clip the teacher's x0 estimate to [-1, 1] (a fixed clip; the authors' dynamic "
                        "thresholding is in effect off, as their fp16 run skips it)")
    p.add_argument("--dropout", type=A.probability, default=None, help="student dropout (default: the teacher's)")
    p.add_argument("--step-condition", default="authors", choices=STEP_CONDITIONS,
                   help="SFD-v's step condition: authors (N's embedding as a per-block affine beside each block's "
                        "time modulation, xavier init; default) or zero (one zero-initialised embedding added to "
                        "the time embedding, so the student starts as its teacher)")
    p.add_argument("--stage2", action="store_true", help="1-NFE second stage from a first-stage SFD/SFD-v model")
    p.add_argument("--stage2-condition", default="own", choices=STAGE2_CONDITIONS,
                   help="--stage2 from SFD-v: the step condition the 1-NFE student takes, its own N = 3 (own, the "
                        "authors') or the first-stage mode it distils (teacher)")
    p.add_argument("--perceptual", default="auto", choices=["auto", *PERCEPTUAL_NETS, "none"],
                   help=f"perceptual term on the last step: {', '.join(PERCEPTUAL_NETS)}, none, or auto (default: the "
                        "authors' for --stage2 where no download is needed: LPIPS with --lpips-weights, else the "
                        "shipped classifier of built-in digits/MNIST, else none; none in the first stage)")
    p.add_argument("--perceptual-weight", type=A.non_negative, default=None,
                   help="weight of the perceptual term (default: the authors', the distance added to every pixel's "
                        "L1: C*H*W with --loss-reduction sum, 1 with mean)")
    p.add_argument("--lpips-weights", default=None, metavar="FILE",
                   help="LPIPS (VGG16) weights converted once by scripts/convert_lpips.py; never downloaded")
    p.add_argument("--lpips-resolution", type=A.integer(16, 4096), default=224,
                   help="LPIPS resizes images (bilinear) to this size (default 224, the authors')")
    p.add_argument("--teacher-precision", default="fp32", choices=["fp32", "bf16"],
                   help="bf16: the teacher under bf16 autocast (faster on CPUs with bf16 support), kept only if "
                        "its trajectories on the first batch stay within --teacher-precision-tol of fp32's")
    p.add_argument("--teacher-precision-tol", type=A.real(0, 1, lo_open=True, hi_open=True), default=0.02,
                   help="largest relative RMS deviation from the fp32 trajectory that bf16 may show (default 0.02)")
    p.add_argument("--trajectory-cache", type=A.folder, default=None, metavar="DIR",
                   help="store the teacher's trajectories in DIR and reuse those computed before for the same "
                        "teacher, grid and noise (exact): SFD-v after SFD runs at its NFEs with the same seed "
                        "and batch, a rerun with another --lr, a resume (default: no cache)")
    add_train_args(p, steps=0, batch=128, lr=None, lr_schedule="step", grad_clip=None,
                   lr_note=f": the authors', {SFD_LR:g}, or {STAGE2_LR:g} with --stage2", clip_note=": the authors', none")
    p.set_defaults(func=cmd_sfd)


def cmd_sfd(args):
    from fewstep.checkpoint import teacher_reference
    from fewstep.cli import run_info, train_config
    from fewstep.distill.sfd import SFD, SFDConfig, iterations_for, recipe
    from fewstep.models import load_model
    from fewstep.train import Trainer, pick_device

    device = pick_device(args.device)
    teacher = load_model(args.teacher, device=device)
    cfg = SFDConfig(nfe=args.nfe, afs=args.afs, m=args.m, teacher_solver=args.teacher_solver,
                    teacher_final_orders=args.teacher_final_orders, grid=args.grid,
                    rho=args.rho, sigma_min=args.sigma_min, sigma_max=args.sigma_max,
                    loss_reduction=args.loss_reduction, thresholding=args.thresholding, dropout=args.dropout,
                    step_condition=args.step_condition, stage2=args.stage2, stage2_condition=args.stage2_condition,
                    perceptual=None if args.perceptual == "none" else args.perceptual,
                    perceptual_weight=args.perceptual_weight,
                    lpips_weights=args.lpips_weights, lpips_resolution=args.lpips_resolution,
                    teacher_precision=args.teacher_precision, teacher_precision_tol=args.teacher_precision_tol)
    defaults = recipe(args.nfe, args.stage2)
    if args.lr is None:
        args.lr = defaults["lr"]
    if args.grad_clip is None:
        args.grad_clip = defaults["grad_clip"]
    method = SFD(teacher, cfg, teacher_ref=teacher_reference(teacher.path.resolve()),
                 trajectory_cache=args.trajectory_cache)
    if args.iters == 0:  # iterations follow from the trajectory budget, as in the paper
        args.iters = iterations_for(args.trajectories or defaults["trajectories"], args.batch)
    Trainer(method, train_config(args), args.out, resume=args.resume, run_info=run_info(args)).run()
    print(f"{method.name} student saved to {args.out} "
          f"(sample it with: fewstep sample {args.out}{' --nfe N' if len(method.grids) > 1 else ''})")


# ---- SFDDM ----------------------------------------------------------------------------------------
def add_sfddm(methods):
    from fewstep.cli import add_train_args

    p = methods.add_parser(
        "sfddm", conflict_handler="resolve", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="Single-fold distillation into a T'-step model (needs training data)",
        description="Distil a discrete T-step teacher into a T'-step diffusion model in one fold. The student's\n"
                    "chain is the teacher's read at an index set phi; it samples with its own T' steps (NFE = T').\n"
                    "Note: here --steps is the student's step count T'; training iterations are --iters.",
        epilog="examples:\n"
               "  fewstep distill sfddm --teacher digits-teacher --data digits --steps 10 --out runs/sfddm10\n"
               "  fewstep distill sfddm --teacher T --data D --index 0,99,511,1023 --out runs/sfddm4")
    p.add_argument("--teacher", required=True, help="discrete VP teacher checkpoint or built-in name")
    p.add_argument("--data", required=True, help="training data the teacher was trained on (built-in name or path)")
    p.add_argument("--resolution", type=A.resolution, default=None, help="image size (default: the teacher's)")
    p.add_argument("--data-seed", type=A.seed, default=None, help="train/held-out split seed (default: the teacher's)")
    add_train_args(p, steps=4000, batch=64, lr=2e-4)
    # --steps is the student's step count here (as in the paper's T'); iterations move to --iters
    p.add_argument("--steps", type=A.positive_int, default=None,
                   help="student steps T' (= NFE); may be left out with an explicit --index list")
    p.add_argument("--iters", type=A.iterations, default=None,
                   help="training iterations (default: the authors' schedule, a fifth of the teacher's training "
                        "samples: its card's iterations x batch / 5 / --batch; 4000 if the card does not say)")
    # the authors train the student without gradient clipping and without EMA
    p.add_argument("--grad-clip", type=A.non_negative, default=0.0,
                   help="gradient norm clip (default 0: none, as the authors; the other commands clip at 1)")
    p.add_argument("--ema", type=A.decay, default=None,
                   help="EMA decay of the student's weights, e.g. 0.999 (our deviation: the authors use none; "
                        "default none)")
    p.add_argument("--index", default="trailing",
                   help="index set phi: trailing (default; round((s+1)T/T')-1, the student's noisiest step is the "
                        "teacher's), leading (the authors' code: s*floor(T/T'), ends short of the noisiest step), "
                        "spread (floor(s*T/T'), fewstep's 'leading' before), or increasing teacher indices i,j,...")
    p.add_argument("--init", default="random", choices=["random", "teacher"],
                   help="student weights: random (authors' choice; time input = own index s) or a copy of "
                        "the teacher (time input = phi_s). With 'teacher' the loss starts at exactly 0")
    p.add_argument("--hidden", default="l1", choices=["l1", "kl", "none"],
                   help="hidden-variable term: l1 on the penultimate feature map (default), kl (closed-form "
                        "KL of the reverse kernels, a time-weighted eps-MSE) or none")
    p.add_argument("--loss", default="l1", choices=["l1", "l2"], help="output term (default l1)")
    p.add_argument("--lam", type=A.non_negative, default=1.0, help="weight of the hidden term (default 1)")
    p.add_argument("--feature-layer", default=None,
                   help="sub-module whose output is the hidden variable, e.g. up.3 (default: the network's "
                        "penultimate map; for imported networks the layer recorded at import)")
    p.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim"],
                   help="the student's default sampler: ddpm ancestral (default) or ddim eta=0")
    p.add_argument("--clip", type=_clip_value, default="auto",
                   help="x0 clipping when sampling: a bound, or 'none' (default: 1 for images, none for 2-D)")
    p.add_argument("--dropout", type=A.probability, default=0.0,
                   help="student dropout rate (default 0: the authors' network has none, and a teacher-initialised "
                        "student then starts at exactly zero loss)")
    p.set_defaults(func=cmd_sfddm)


def _clip_value(text: str):
    if text in ("auto", "none"):
        return None if text == "none" else "auto"
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, 'none' or 'auto', got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a positive clipping bound, got {text!r}")
    return v


def _distill_data(args, teacher):
    """The training data of a data-based distillation, at the teacher's resolution and split."""
    from fewstep.data import load_dataset
    from fewstep.sampling import sample_shape

    net = teacher.card["net"]
    tdata = teacher.card.get("data") or {}
    resolution = args.resolution
    is_image = "resolution" in net
    if resolution is None and is_image:
        resolution = net["resolution"]
    seed = args.data_seed if args.data_seed is not None else int(tdata.get("split_seed") or 0)
    ds = load_dataset(args.data, resolution=resolution if is_image or args.resolution else None,
                      split="train", seed=seed)
    want = list(sample_shape(teacher.card))
    if list(ds.shape) != want:
        from fewstep.errors import FewstepError
        hint = f"; pass --resolution {want[-1]}" if len(want) == 3 and len(ds.shape) == 3 else ""
        raise FewstepError(f"--data {args.data}: samples of shape {list(ds.shape)}, but the teacher draws "
                           f"{want}{hint}")
    info = {**ds.info, "name": ds.name, "kind": ds.kind, "shape": list(ds.shape), "split_seed": seed}
    return ds, info


def _distill_labels(teacher, ds):
    """The data's class labels when the teacher is class-conditional (else None)."""
    k = teacher.denoiser.num_classes
    if not k:
        return None
    if ds.labels is None:
        from fewstep.errors import FewstepError
        raise FewstepError(f"--data {ds.name}: the teacher is class-conditional ({k} classes) but this data set "
                           "has no class labels (an image folder needs one sub-folder per class)")
    return teacher.denoiser.check_labels(ds.labels)


def _iters_config(args):
    from fewstep.cli import train_config

    if args.iters < 1:
        from fewstep.errors import FewstepError
        raise FewstepError(f"--iters {args.iters}: expected at least 1 training iteration")
    return train_config(args)


def cmd_sfddm(args):
    from fewstep.checkpoint import teacher_reference
    from fewstep.models import load_model
    from fewstep.cli import run_info
    from fewstep.distill.sfddm import SFDDM, SFDDMConfig, check_resume_phi, default_iterations
    from fewstep.train import Trainer, pick_device

    teacher = load_model(args.teacher, device=pick_device(args.device))
    if args.iters is None:
        args.iters, how = default_iterations(teacher.card, args.batch)
        print(f"training iterations: {how}")
    cfg = SFDDMConfig(steps=args.steps, index=args.index, init=args.init, hidden=args.hidden, loss=args.loss,
                      lam=args.lam, sampler=args.sampler, clip=args.clip, dropout=args.dropout, seed=args.seed,
                      feature_layer=args.feature_layer)
    ds, info = _distill_data(args, teacher)
    method = SFDDM(teacher.denoiser, cfg, info, teacher_ref=teacher_reference(teacher.path.resolve()))
    if args.resume:
        check_resume_phi(args.out, method.phi)
    Trainer(method, _iters_config(args), args.out, data=ds.x, resume=args.resume, run_info=run_info(args),
            labels=_distill_labels(teacher, ds)).run()
    phi = [int(v) for v in method.phi]
    shown = phi if len(phi) <= 12 else phi[:5] + ["..."] + phi[-5:]
    print(f"SFDDM student (T'={len(phi)} of T={method.teacher.schedule.T}, phi={shown}) saved to {args.out} "
          f"(sample it with: fewstep sample {args.out}; NFE {len(phi)})")
    summary = method.eps_error_summary()
    if summary:
        print(summary)


# ---- progressive distillation -----------------------------------------------------------------------
def add_progressive(methods):
    from fewstep.cli import add_train_args
    from fewstep.distill.progressive import FOLD_BATCH, FOLD_LR, FOLD_LR_SCHEDULE, ITERS_PER_FOLD

    p = methods.add_parser(
        "progressive", conflict_handler="resolve", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="progressive distillation (Salimans & Ho): folds that halve the steps (needs data)",
        description="Each fold trains a copy of its teacher to do two teacher DDIM steps in one, halving the\n"
                    "steps, until --steps remain. Every fold is kept in OUT/fold-<steps>/; OUT holds the final\n"
                    "student with the summed cost. Note: --steps is the final step count; --iters is per fold.",
        epilog="example:\n"
               "  fewstep distill progressive --teacher digits-teacher --data digits --steps 8 --out runs/pd8")
    p.add_argument("--teacher", required=True, help="teacher checkpoint or built-in name")
    p.add_argument("--data", required=True, help="training data (built-in name or path)")
    p.add_argument("--resolution", type=A.resolution, default=None, help="image size (default: the teacher's)")
    p.add_argument("--data-seed", type=A.seed, default=None, help="train/held-out split seed (default: the teacher's)")
    add_train_args(p, steps=ITERS_PER_FOLD, batch=FOLD_BATCH, lr=FOLD_LR, lr_schedule=FOLD_LR_SCHEDULE)
    p.add_argument("--steps", type=A.positive_int, default=8, help="the final student's DDIM steps (= NFE; default 8)")
    p.add_argument("--start-steps", type=A.integer(2, 10**6), default=None,
                   help="the first teacher's DDIM steps (default: its T; e.g. 256 starts from a 256-step "
                        "DDIM teacher); start/steps must be a power of two")
    p.add_argument("--iters", type=A.iterations, default=ITERS_PER_FOLD,
                   help=f"training iterations per fold (default {ITERS_PER_FOLD})")
    p.add_argument("--head", default="x0", choices=["x0", "v", "eps"],
                   help="the output the student is compared in, with the paper's weight: x0 with max(SNR,1) "
                        "('truncated SNR', default), v (SNR+1), or eps (SNR, the epsilon-MSE the paper shows "
                        "failing at few steps). The student starts as the teacher's exact copy either way")
    p.add_argument("--clip", type=_clip_value, default="auto",
                   help="clip x0 when sampling: a bound or 'none' (default: 1 for images, none for 2-D)")
    p.add_argument("--clip-targets", action="store_true",
                   help="also clip the teacher's x0 inside the training targets (fewstep's earlier behaviour; "
                        "the paper's targets are unclipped)")
    p.add_argument("--dropout", type=A.probability, default=None, help="student dropout (default: the teacher's)")
    p.set_defaults(func=cmd_progressive)


def cmd_progressive(args):
    from fewstep.checkpoint import read_card
    from fewstep.models import load_model
    from fewstep.cli import run_info
    from fewstep.distill.progressive import progressive_distill
    from fewstep.train import pick_device

    teacher = load_model(args.teacher, device=pick_device(args.device))
    ds, info = _distill_data(args, teacher)
    out = progressive_distill(teacher, ds.x, args.start_steps, args.steps, args.out, _iters_config(args),
                              data_info=info, clip=args.clip, dropout=args.dropout, resume=args.resume,
                              run_info=run_info(args), labels=_distill_labels(teacher, ds), head=args.head,
                              clip_targets=args.clip_targets)
    m = read_card(out)["method"]
    print(f"progressive student ({m['teacher_steps']} → {m['student_steps']} steps in {len(m['folds'])} folds, "
          f"{m['total_iterations']} iterations, {m['total_wall_time_s']:.1f} s) saved to {out} "
          f"(sample it with: fewstep sample {out}; NFE {m['student_steps']})")


# ---- compare / interpolate ------------------------------------------------------------------------
def add_compare(sub):
    p = sub.add_parser("compare", help="semantic consistency: the same noises through two models (PSNR of pairs)",
                       description="Feed the same initial noises to models A and B, each with its default "
                                   "deterministic sampler (DDIM eta=0 on the same grid where the default is DDPM), "
                                   "and report the PSNR of matched pairs against shuffled pairs.")
    p.add_argument("a", help="first model (e.g. the teacher)")
    p.add_argument("b", help="second model (e.g. its student)")
    p.add_argument("--n", type=A.integer(2), default=256, help="number of noises (default 256)")
    p.add_argument("--seed", type=A.seed, default=0)
    p.add_argument("--sampler-a", default=None, help="override A's sampler")
    p.add_argument("--nfe-a", type=A.nfe, default=None, help="override A's NFE")
    p.add_argument("--sampler-b", default=None, help="override B's sampler")
    p.add_argument("--nfe-b", type=A.nfe, default=None, help="override B's NFE")
    p.add_argument("--png", default=None, help="side-by-side picture (images: A's row above B's row)")
    p.add_argument("--png-n", type=A.positive_int, default=32, help="pairs shown in the picture (default 32)")
    p.add_argument("--out-json", default=None, help="write the numbers to this JSON file")
    p.add_argument("--batch", type=A.batch, default=500)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args):
    from pathlib import Path

    from fewstep.checkpoint import write_json
    from fewstep.models import load_model
    from fewstep.distill.sfddm import compare_models
    from fewstep.train import pick_device
    from fewstep.viz import pairs_picture

    device = pick_device(args.device)
    a, b = load_model(args.a, device=device), load_model(args.b, device=device)
    xa, xb, st = compare_models(a, b, args.n, args.seed, args.sampler_a, args.nfe_a, args.sampler_b, args.nfe_b,
                                batch_size=args.batch)
    print(f"A {args.a}: {st['a']['sampler']} NFE {st['a']['nfe']}")
    print(f"B {args.b}: {st['b']['sampler']} NFE {st['b']['nfe']}")
    print(f"PSNR matched  {st['psnr_matched']:.2f} dB (± {st['psnr_matched_std']:.2f})   MSE {st['mse_matched']:.4g}")
    print(f"PSNR shuffled {st['psnr_shuffled']:.2f} dB (± {st['psnr_shuffled_std']:.2f})   MSE {st['mse_shuffled']:.4g}")
    print(f"n = {st['n']}, seed {args.seed}")
    if args.png:
        pairs_picture(xa[:args.png_n], xb[:args.png_n], args.png, Path(args.a).name, Path(args.b).name)
        print(f"picture → {args.png}")
    if args.out_json:
        write_json(Path(args.out_json), st)


def add_interpolate(sub):
    p = sub.add_parser("interpolate", help="frames between two seeds' noises (slerp or linear) as one strip",
                       description="Interpolate between the initial noises of two seeds (each the first noise "
                                   "`fewstep sample --seed S` draws) and sample every frame with the model's "
                                   "deterministic sampler.")
    p.add_argument("model")
    p.add_argument("--seeds", default="3,7", help="two seeds a,b (default 3,7)")
    p.add_argument("--frames", type=A.integer(2, 1000), default=9, help="frames including both ends (default 9)")
    p.add_argument("--mode", default="slerp", choices=["slerp", "linear", "both"],
                   help="slerp (default), linear, or both (two rows: slerp above linear)")
    p.add_argument("--sampler", default=None, help="override the sampler")
    p.add_argument("--nfe", type=A.nfe, default=None, help="override the NFE")
    p.add_argument("--out", required=True, type=A.output_path, help="PNG strip")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_interpolate)


def cmd_interpolate(args):
    import torch

    from fewstep.models import load_model
    from fewstep.distill.sfddm import interpolation_noises, sample_same_noise
    from fewstep.errors import FewstepError
    from fewstep.sampling import sample_shape
    from fewstep.train import pick_device
    from fewstep.viz import image_grid, save_png, scatter_png

    try:
        seeds = tuple(int(s) for s in args.seeds.split(","))
    except ValueError:
        seeds = ()
    if len(seeds) != 2:
        raise FewstepError(f"--seeds {args.seeds!r}: expected two integers a,b")
    ckpt = load_model(args.model, device=pick_device(args.device))
    shape = tuple(sample_shape(ckpt.card))
    modes = ["slerp", "linear"] if args.mode == "both" else [args.mode]
    outs, info = {}, None
    for m in modes:
        noise = interpolation_noises(shape, seeds, args.frames, m)
        outs[m], info = sample_same_noise(ckpt, noise, seed=seeds[0], sampler=args.sampler, nfe=args.nfe)
    if len(shape) == 3:
        save_png(image_grid(torch.cat(list(outs.values())), nrow=args.frames), args.out)
    else:
        scatter_png({f"{m} ({args.frames} frames)": x for m, x in outs.items()}, args.out,
                    title=f"seeds {seeds[0]} → {seeds[1]}")
    print(f"{'/'.join(modes)} interpolation, seeds {seeds[0]} → {seeds[1]}, {args.frames} frames, "
          f"{info['sampler']} NFE {info['nfe']} → {args.out}")
