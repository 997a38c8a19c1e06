"""`fewstep train`: its options, parsed into the `train_teacher` call Python uses."""
from __future__ import annotations

import os

from fewstep import argtypes as A
from fewstep.recipe import loop_options_from_args
from fewstep.teacher.method import PARAMS, SCHEDULES, TEACHER_LOOP, train_teacher
from fewstep.train_config import run_record


def add_arguments(p, add_loop_options):
    p.add_argument("--data", required=True, help="built-in (digits, mnist, moons, gmm8, swissroll, gaussian), "
                                                 "an image folder, or a .npz/.npy array")
    p.add_argument("--resolution", type=A.resolution, default=None, help="resize images to this size")
    p.add_argument("--data-seed", type=A.seed, default=0, help="seed of the train/held-out split")
    p.add_argument("--param", default="eps", choices=PARAMS,
                   help="parameterization; 'edm' trains a continuous EDM model (default eps)")
    p.add_argument("--schedule", default="linear", choices=SCHEDULES,
                   help="the discrete table's betas (default linear)")
    p.add_argument("--T", type=A.integer(2, 100_000), default=1024, help="steps of the discrete table (default 1024)")
    p.add_argument("--channels", type=A.integer(1, 4096), default=None, help="base width of the network")
    p.add_argument("--dropout", type=A.probability, default=None)
    add_loop_options(TEACHER_LOOP)


def run(args):
    train_teacher(args.data, args.out, resolution=args.resolution, data_seed=args.data_seed, param=args.param,
                  schedule=args.schedule, T=args.T, channels=args.channels, dropout=args.dropout, resume=args.resume,
                  run_info=run_record(args), **loop_options_from_args(args))
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every process gets here; one line is enough
        print(f"teacher saved to {args.out}")
