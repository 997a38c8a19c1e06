"""`fewstep distill progressive`: its options, parsed into the `distill_progressive` call Python uses."""
from __future__ import annotations

import argparse

from fewstep import argtypes as A
from fewstep.progressive.fold import HEADS
from fewstep.progressive.method import distill_progressive
from fewstep.progressive.recipe import ITERS_PER_FOLD, PROGRESSIVE_LOOP
from fewstep.recipe import loop_options_from_args
from fewstep.train_config import run_record

PARSER_OPTIONS = dict(
    conflict_handler="resolve", formatter_class=argparse.RawDescriptionHelpFormatter,
    description="Each fold trains a copy of its teacher to do two teacher DDIM steps in one, halving the\n"
                "steps, until --steps remain. Every fold is kept in OUT/fold-<steps>/; OUT holds the final\n"
                "student with the summed cost. Note: --steps is the final step count; --iters is per fold.",
    epilog="example:\n"
           "  fewstep distill progressive --teacher digits-teacher --data digits --steps 8 --out runs/pd8")


def add_arguments(p, add_loop_options):
    p.add_argument("--teacher", required=True, help="teacher checkpoint or built-in name")
    p.add_argument("--data", required=True, help="training data (built-in name or path)")
    p.add_argument("--resolution", type=A.resolution, default=None, help="image size (default: the teacher's)")
    p.add_argument("--data-seed", type=A.seed, default=None, help="train/held-out split seed (default: the teacher's)")
    add_loop_options(PROGRESSIVE_LOOP, notes={"iters": f"per fold; default {ITERS_PER_FOLD}"})
    p.add_argument("--steps", type=A.positive_int, default=8, help="the final student's DDIM steps (= NFE; default 8)")
    p.add_argument("--start-steps", type=A.integer(2, 10**6), default=None,
                   help="the first teacher's DDIM steps (default: its T; e.g. 256 starts from a 256-step "
                        "DDIM teacher); start/steps must be a power of two")
    p.add_argument("--head", default="x0", choices=list(HEADS),
                   help="the output the student is compared in, with the paper's weight: x0 with max(SNR,1) "
                        "('truncated SNR', default), v (SNR+1), or eps (SNR, the epsilon-MSE the paper shows "
                        "failing at few steps). The student starts as the teacher's exact copy either way")
    p.add_argument("--clip", type=A.clip_bound, default="auto",
                   help="clip x0 when sampling: a bound or 'none' (default: 1 for images, none for 2-D)")
    p.add_argument("--clip-targets", action="store_true",
                   help="also clip the teacher's x0 inside the training targets (fewstep's earlier behaviour; "
                        "the paper's targets are unclipped)")
    p.add_argument("--dropout", type=A.probability, default=None, help="student dropout (default: the teacher's)")


def run(args):
    student = distill_progressive(args.teacher, args.data, args.out, steps=args.steps, start_steps=args.start_steps,
                                  head=args.head, clip=args.clip, clip_targets=args.clip_targets,
                                  dropout=args.dropout, resolution=args.resolution, data_seed=args.data_seed,
                                  resume=args.resume, run_info=run_record(args), **loop_options_from_args(args))
    m = student.card["method"]
    print(f"progressive student ({m['teacher_steps']} → {m['student_steps']} steps in {len(m['folds'])} folds, "
          f"{m['total_iterations']} iterations, {m['total_wall_time_s']:.1f} s) saved to {args.out} "
          f"(sample it with: fewstep sample {args.out}; NFE {m['student_steps']})")
