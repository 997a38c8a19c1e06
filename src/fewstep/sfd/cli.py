"""`fewstep distill sfd`: its options, parsed into the same `SFDConfig` and `distill_sfd` call Python uses."""
from __future__ import annotations

import argparse

from fewstep import argtypes as A
from fewstep.nets import STEP_CONDITIONS
from fewstep.recipe import config_defaults, loop_options_from_args, take_config_options
from fewstep.schedule import GRID_KINDS
from fewstep.sfd.config import (LOSS_REDUCTIONS, PERCEPTUAL_NETS, STAGE2_CONDITIONS, TEACHER_PRECISIONS,
                                TEACHER_SOLVERS, SFDConfig)
from fewstep.sfd.method import distill_sfd
from fewstep.sfd.recipe import (SFD_GRAD_CLIP, SFD_LOOP, SFD_LR, SFD_TRAJECTORIES, SFDV_TRAJECTORY_FACTOR, STAGE2_LR,
                                STAGE2_TRAJECTORY_FACTOR)
from fewstep.solvers import LOWER_ORDER_FINAL
from fewstep.train_config import run_record

PARSER_OPTIONS = dict(
    formatter_class=argparse.RawDescriptionHelpFormatter,
    description="Distil a teacher into a few-step Euler sampler without training data. One NFE gives SFD; a list\n"
                "(e.g. 2,3,4,5) gives SFD-v, one model for all. Every default is the SFD authors' recipe but one:\n"
                "SFD and SFD-v clip gradients at norm 1 (--grad-clip 0 for the authors' none). The default budget\n"
                "is theirs, 200,000 trajectories: 38 min on one CPU thread for the digits teacher; SFD-v runs four\n"
                "times that and --stage2 ten times. --iters N runs a short try.",
    epilog="examples (2 CPU cores, the digits teacher):\n"
           "  fewstep distill sfd --teacher digits-teacher --nfe 2 --iters 20 --out runs/sfd2          # 21 s\n"
           "  fewstep distill sfd --teacher digits-teacher --nfe 2,3,4,5 --iters 20 --out runs/sfdv    # SFD-v, 31 s\n"
           "  fewstep distill sfd --stage2 --teacher runs/sfdv --iters 20 --out runs/sfd1               # 1 NFE, 12 s\n"
           "  fewstep distill sfd --teacher digits-teacher --nfe 2 --out runs/sfd2-full   # the authors' budget")


def add_arguments(p, add_loop_options):
    D = config_defaults(SFDConfig)
    p.add_argument("--teacher", required=True, help="teacher checkpoint or built-in name (e.g. digits-teacher)")
    p.add_argument("--nfe", type=A.nfe_list, default=D["nfe"],
                   help=f"student NFE, or a list for SFD-v (default {','.join(map(str, D['nfe']))})")
    p.add_argument("--afs", action=argparse.BooleanOptionalAction, default=D["afs"],
                   help="analytical first step: saves one network call (default on)")
    p.add_argument("--m", type=A.integer(0, 64), default=D["m"],
                   help=f"teacher points inserted per student interval (default {D['m']})")
    p.add_argument("--teacher-solver", default=D["teacher_solver"], choices=TEACHER_SOLVERS,
                   help=f"the teacher's solver over the refined grid (default {D['teacher_solver']})")
    p.add_argument("--teacher-final-orders", default=D["teacher_final_orders"], choices=LOWER_ORDER_FINAL,
                   help="DPM-Solver++ teacher: orders 2 then 1 on the last two steps of every grid (always, the "
                        "authors'), only on grids under 15 steps (short, diffusers'), or never")
    p.add_argument("--grid", default=D["grid"], choices=GRID_KINDS,
                   help=f"the student's time grid (default {D['grid']})")
    p.add_argument("--rho", type=A.positive, default=D["rho"], help=f"the polynomial grid's rho (default {D['rho']:g})")
    p.add_argument("--sigma-min", type=A.positive, default=D["sigma_min"],
                   help="default: the teacher's (0.006 for EDM teachers and LDMs, 0.1 for Stable Diffusion)")
    p.add_argument("--sigma-max", type=A.positive, default=D["sigma_max"],
                   help="default: the teacher's (80 for EDM teachers)")
    p.add_argument("--trajectories", type=A.integer(1, 10**12), default=None,
                   help=f"teacher trajectories to train on (iterations = trajectories / batch; default "
                        f"{SFD_TRAJECTORIES}, {SFDV_TRAJECTORY_FACTOR}x that for SFD-v and "
                        f"{STAGE2_TRAJECTORY_FACTOR}x for --stage2, the authors' budgets)")
    p.add_argument("--loss-reduction", default=D["loss_reduction"], choices=LOSS_REDUCTIONS,
                   help="L1 summed over pixels (paper) or averaged")
    p.add_argument("--thresholding", action="store_true", default=D["thresholding"],
                   help="clip the teacher's x0 estimate to [-1, 1] (a fixed clip; the authors' dynamic "
                        "thresholding is in effect off, as their fp16 run skips it)")
    p.add_argument("--dropout", type=A.probability, default=D["dropout"],
                   help="student dropout (default: the teacher's)")
    p.add_argument("--step-condition", default=D["step_condition"], choices=STEP_CONDITIONS,
                   help="SFD-v's step condition: authors (N's embedding as a per-block affine beside each block's "
                        "time modulation, xavier init; default) or zero (one zero-initialised embedding added to "
                        "the time embedding, so the student starts as its teacher)")
    p.add_argument("--stage2", action="store_true", default=D["stage2"],
                   help="1-NFE second stage from a first-stage SFD/SFD-v model")
    p.add_argument("--stage2-condition", default=D["stage2_condition"], choices=STAGE2_CONDITIONS,
                   help="--stage2 from SFD-v: the step condition the 1-NFE student takes, its own N = 3 (own, the "
                        "authors') or the first-stage mode it distils (teacher)")
    p.add_argument("--perceptual", default=D["perceptual"], choices=["auto", *PERCEPTUAL_NETS, "none"],
                   help=f"perceptual term on the last step: {', '.join(PERCEPTUAL_NETS)}, none, or auto (default: the "
                        "authors' for --stage2 where no download is needed: LPIPS with --lpips-weights, else the "
                        "shipped classifier of built-in digits/MNIST, else none; none in the first stage)")
    p.add_argument("--perceptual-weight", type=A.non_negative, default=D["perceptual_weight"],
                   help="weight of the perceptual term (default: the authors', the distance added to every pixel's "
                        "L1: C*H*W with --loss-reduction sum, 1 with mean)")
    p.add_argument("--lpips-weights", default=D["lpips_weights"], metavar="FILE",
                   help="LPIPS (VGG16) weights converted once by scripts/convert_lpips.py; never downloaded")
    p.add_argument("--lpips-resolution", type=A.integer(16, 4096), default=D["lpips_resolution"],
                   help=f"LPIPS resizes images (bilinear) to this size (default {D['lpips_resolution']}, the authors')")
    p.add_argument("--teacher-precision", default=D["teacher_precision"], choices=TEACHER_PRECISIONS,
                   help="bf16: the teacher under bf16 autocast (faster on CPUs with bf16 support), kept only if "
                        "its trajectories on the first batch stay within --teacher-precision-tol of fp32's")
    p.add_argument("--teacher-precision-tol", type=A.real(0, 1, lo_open=True, hi_open=True),
                   default=D["teacher_precision_tol"],
                   help="largest relative RMS deviation from the fp32 trajectory that bf16 may show "
                        f"(default {D['teacher_precision_tol']:g})")
    p.add_argument("--lora", type=A.positive_int, default=D["lora"], metavar="RANK",
                   help="train a LoRA adapter of this rank on the teacher's own weights instead of a full copy "
                        "(one set of weights in memory; diffusers teachers; needs peft: pip install 'fewstep[lora]')")
    p.add_argument("--lora-alpha", type=A.positive, default=D["lora_alpha"],
                   help="the adapter's alpha (default: its rank, a scale of 1)")
    p.add_argument("--lora-targets", default=D["lora_targets"], metavar="NAMES",
                   help="comma-separated module names the adapter adapts (default: to_q,to_k,to_v,to_out.0)")
    p.add_argument("--trajectory-cache", type=A.folder, default=None, metavar="DIR",
                   help="store the teacher's trajectories in DIR and reuse those computed before for the same "
                        "teacher, grid and noise (exact): SFD-v after SFD runs at its NFEs with the same seed "
                        "and batch, a rerun with another --lr, a resume (default: no cache)")
    A.add_prompt_args(p, what="a prompt to distil on", many=" to draw each trajectory's prompt from (default: "
                      "fewstep's shipped list)")
    add_loop_options(SFD_LOOP, notes={
        "iters": "default: --trajectories / --batch",
        "lr": f"default: the authors', {SFD_LR:g}, or {STAGE2_LR:g} with --stage2",
        "grad_clip": f"default {SFD_GRAD_CLIP:g}, or none with --stage2 (the authors': none)"})


def run(args):
    config = SFDConfig(**take_config_options(SFDConfig, dict(vars(args))))
    student = distill_sfd(args.teacher, args.out, config, trajectories=args.trajectories,
                          trajectory_cache=args.trajectory_cache, prompts=A.read_prompts(args.prompt, args.prompts),
                          negative_prompt=args.negative_prompt, guidance=args.guidance, resume=args.resume,
                          run_info=run_record(args), **loop_options_from_args(args))
    name = student.card["method"]["name"]
    print(f"{name} student saved to {args.out} "
          f"(sample it with: fewstep sample {args.out}{' --nfe N' if 'grids' in student.sampler else ''})")
