"""`fewstep distill sfddm`: its options, parsed into the same `SFDDMConfig` and `distill_sfddm` call Python uses."""
from __future__ import annotations

import argparse

from fewstep import argtypes as A
from fewstep.recipe import config_defaults, loop_options_from_args, take_config_options
from fewstep.sfddm.config import HIDDEN, INITS, LOSSES, SAMPLERS, SFDDMConfig
from fewstep.sfddm.method import distill_sfddm
from fewstep.sfddm.recipe import FALLBACK_ITERATIONS, SFDDM_LOOP
from fewstep.train_config import run_record

PARSER_OPTIONS = dict(
    conflict_handler="resolve", formatter_class=argparse.RawDescriptionHelpFormatter,
    description="Distil a discrete T-step teacher into a T'-step diffusion model in one fold. The student's\n"
                "chain is the teacher's read at an index set phi; it samples with its own T' steps (NFE = T').\n"
                "Note: here --steps is the student's step count T'; training iterations are --iters.",
    epilog="examples:\n"
           "  fewstep distill sfddm --teacher digits-teacher --data digits --steps 10 --out runs/sfddm10\n"
           "  fewstep distill sfddm --teacher T --data D --index 0,99,511,1023 --out runs/sfddm4")


def add_arguments(p, add_loop_options):
    D = config_defaults(SFDDMConfig)
    p.add_argument("--teacher", required=True, help="discrete VP teacher checkpoint or built-in name")
    p.add_argument("--data", required=True, help="training data the teacher was trained on (built-in name or path)")
    p.add_argument("--resolution", type=A.resolution, default=None, help="image size (default: the teacher's)")
    p.add_argument("--data-seed", type=A.seed, default=None, help="train/held-out split seed (default: the teacher's)")
    add_loop_options(SFDDM_LOOP, notes={
        "iters": "default: the authors' schedule, a fifth of the teacher's training samples: its card's "
                 f"iterations x batch / 5 / --batch; {FALLBACK_ITERATIONS} if the card does not say",
        "grad_clip": "default 0: none, as the authors; the other commands clip at 1",
        "ema": "e.g. 0.999, our deviation: the authors use none; default none"})
    # --steps is the student's step count here (as in the paper's T'); iterations move to --iters
    p.add_argument("--steps", type=A.positive_int, default=D["steps"],
                   help="student steps T' (= NFE); may be left out with an explicit --index list")
    p.add_argument("--index", default=D["index"],
                   help="index set phi: trailing (default; round((s+1)T/T')-1, the student's noisiest step is the "
                        "teacher's), leading (the authors' code: s*floor(T/T'), ends short of the noisiest step), "
                        "spread (floor(s*T/T'), fewstep's 'leading' before), or increasing teacher indices i,j,...")
    p.add_argument("--init", default=D["init"], choices=INITS,
                   help="student weights: random (authors' choice; time input = own index s) or a copy of "
                        "the teacher (time input = phi_s). With 'teacher' the loss starts at exactly 0")
    p.add_argument("--hidden", default=D["hidden"], choices=HIDDEN,
                   help="hidden-variable term: l1 on the penultimate feature map (default), kl (closed-form "
                        "KL of the reverse kernels, a time-weighted eps-MSE) or none")
    p.add_argument("--loss", default=D["loss"], choices=LOSSES, help=f"output term (default {D['loss']})")
    p.add_argument("--lam", type=A.non_negative, default=D["lam"],
                   help=f"weight of the hidden term (default {D['lam']:g})")
    p.add_argument("--feature-layer", default=D["feature_layer"],
                   help="sub-module whose output is the hidden variable, e.g. up.3 (default: the network's "
                        "penultimate map; for imported networks the layer recorded at import)")
    p.add_argument("--sampler", default=D["sampler"], choices=SAMPLERS,
                   help="the student's default sampler: ddpm ancestral (default) or ddim eta=0")
    p.add_argument("--clip", type=A.clip_bound, default=D["clip"],
                   help="x0 clipping when sampling: a bound, or 'none' (default: 1 for images, none for 2-D)")
    p.add_argument("--dropout", type=A.probability, default=D["dropout"],
                   help="student dropout rate (default 0: the authors' network has none, and a teacher-initialised "
                        "student then starts at exactly zero loss)")


def run(args):
    # the config's seed is the loop's (--seed)
    config = SFDDMConfig(**take_config_options(SFDDMConfig, dict(vars(args)), exclude=("seed",)), seed=args.seed)
    student = distill_sfddm(args.teacher, args.data, args.out, config, resolution=args.resolution,
                            data_seed=args.data_seed, resume=args.resume, run_info=run_record(args),
                            **loop_options_from_args(args))
    phi = student.card["method"]["phi"]
    shown = phi if len(phi) <= 12 else phi[:5] + ["..."] + phi[-5:]
    print(f"SFDDM student (T'={len(phi)} of T={student.card['method']['teacher_steps']}, phi={shown}) saved to "
          f"{args.out} (sample it with: fewstep sample {args.out}; NFE {len(phi)})")
    if student.extra["eps_error_summary"]:
        print(student.extra["eps_error_summary"])
