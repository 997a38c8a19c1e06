"""What the command groups share: each command's one-line help and the training loop's options.
Imports nothing heavy (the top-level parser reads it to list the commands)."""
from __future__ import annotations

import argparse
import sys

from fewstep import argtypes as A
from fewstep.registry import METHODS
from fewstep.recipe import AMP_MODES, LOG_KINDS, LR_SCHEDULES

COMMAND_HELP = {
    **{e.name: e.help for e in METHODS if e.command == "train"},
    "distill": "distil a teacher into a few-step student",
    "sample": "draw samples from a model",
    "info": "print a model's card",
    "eval": "quality metrics of samples against a data set (any image folder or array)",
    "classifier": "the feature classifier of `fewstep eval --classifier`",
    "compare": "semantic consistency: the same noises through two models (PSNR of pairs)",
    "interpolate": "frames between two seeds' noises (slerp or linear) as one strip",
    "bench": "every method side by side on one teacher: table, plots, report",
    "demo": "the quick tour on the shipped digits teacher at short budgets (4-5 min on 2 CPU cores): SFD and "
            "SFDDM against the teacher and two solvers",
    "import": "convert a diffusers folder or an NVlabs/edm snapshot into a fewstep checkpoint",
    "export": "write a student (or teacher) as a folder other tools load",
}


class DeprecatedAlias(argparse.Action):
    """An old spelling of an option: still accepted for one release, with a note on stderr."""

    def __call__(self, parser, namespace, values, option_string=None):
        new = "--" + self.dest.replace("_", "-")
        print(f"fewstep: note: {option_string} is deprecated here, use {new} (the old spelling goes away in the "
              "next release)", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_train_args(p: argparse.ArgumentParser, recipe: dict, notes: dict | None = None):
    """The training loop's options (read back by `fewstep.recipe.loop_options_from_args`), their defaults the
    method's recipe (`fewstep.train.loop_recipe`). A default of None is the method's to decide: `notes` says how,
    by option (iters, lr, grad_clip, ema)."""
    notes = notes or {}

    def default(key, fmt=str):
        value = recipe[key]
        return notes[key] if key in notes else f"default {'none' if value is None else fmt(value)}"

    g = p.add_argument_group("training loop")
    g.add_argument("--out", required=True, type=A.folder,
                   help="run directory (checkpoint, metrics.jsonl, sample pictures)")
    g.add_argument("--iters", type=A.iterations, default=recipe["iters"],
                   help=f"training iterations ({default('iters')})")
    g.add_argument("--steps", dest="iters", type=A.iterations, action=DeprecatedAlias, help=argparse.SUPPRESS)
    g.add_argument("--batch", type=A.batch, default=recipe["batch"], help=f"global batch size ({default('batch')})")
    g.add_argument("--lr", type=A.positive, default=recipe["lr"],
                   help=f"Adam learning rate ({default('lr', lambda v: format(v, 'g'))})")
    g.add_argument("--lr-schedule", default=recipe["lr_schedule"], choices=list(LR_SCHEDULES),
                   help=f"'step' divides the rate by 10 at half the run ({default('lr_schedule')})")
    g.add_argument("--warmup", type=A.count, default=recipe["warmup"], help="linear warm-up iterations")
    g.add_argument("--ema", type=A.decay, default=recipe["ema"], help=f"EMA decay of the weights ({default('ema')})")
    g.add_argument("--grad-clip", type=A.non_negative, default=recipe["grad_clip"],
                   help=f"gradient norm clip, 0 for none ({default('grad_clip', lambda v: format(v, 'g'))})")
    g.add_argument("--amp", default=recipe["amp"], choices=list(AMP_MODES),
                   help="mixed precision: bf16 or fp16 on a GPU, bf16 on a CPU")
    g.add_argument("--grad-checkpoint", action="store_true", default=recipe["grad_checkpoint"],
                   help="recompute the trained network's blocks in the backward pass instead of keeping their "
                        "activations (less memory, more time; diffusers networks such as Stable Diffusion's UNet)")
    g.add_argument("--seed", type=A.seed, default=recipe["seed"], help=f"seed of the run ({default('seed')})")
    g.add_argument("--device", type=A.device, default=recipe["device"],
                   help="auto, cpu, cuda, cuda:N (default auto: cuda if present)")
    g.add_argument("--log-every", type=A.positive_int, default=recipe["log_every"],
                   help=f"metrics.jsonl cadence in iterations ({default('log_every')})")
    g.add_argument("--log", default=recipe["log"], choices=list(LOG_KINDS),
                   help="also write the scalars and preview grids for TensorBoard in OUT/tensorboard "
                        "(needs pip install 'fewstep[tensorboard]'); metrics.jsonl is always written")
    g.add_argument("--sample-every", type=A.count, default=recipe["sample_every"],
                   help="sample picture cadence (0: at the end only)")
    g.add_argument("--ckpt-every", type=A.count, default=recipe["ckpt_every"],
                   help=f"checkpoint cadence (0: at the end only; {default('ckpt_every')})")
    g.add_argument("--ckpt-minutes", type=A.non_negative, default=recipe["ckpt_minutes"],
                   help="also a checkpoint after this many minutes of training since the last one, so a killed "
                        f"run loses at most that much (0: off; {default('ckpt_minutes')})")
    g.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
