"""What the command groups share: each command's one-line help and the training loop's options.
Imports nothing heavy (the top-level parser reads it to list the commands)."""
from __future__ import annotations

import argparse
import sys

from fewstep import argtypes as A
from fewstep.registry import METHODS

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
    "demo": "the quick tour on the shipped digits teacher (about 10 min on 2 CPU cores)",
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


def add_train_args(p: argparse.ArgumentParser, steps: int, batch: int, lr: float | None, lr_schedule: str = "constant",
                   ema: float | None = None, grad_clip: float | None = 1.0, lr_note: str = "", clip_note: str = ""):
    """The training loop's options (read back by `TrainConfig.from_args`). lr / grad_clip None: the method
    picks them (the notes say how)."""
    g = p.add_argument_group("training loop")
    g.add_argument("--out", required=True, type=A.folder,
                   help="run directory (checkpoint, metrics.jsonl, sample pictures)")
    g.add_argument("--iters", type=A.iterations, default=steps, help=f"training iterations (default {steps})" if steps
                   else "training iterations (default: --trajectories / --batch)")
    g.add_argument("--steps", dest="iters", type=A.iterations, action=DeprecatedAlias, help=argparse.SUPPRESS)
    g.add_argument("--batch", type=A.batch, default=batch, help=f"global batch size (default {batch})")
    g.add_argument("--lr", type=A.positive, default=lr,
                   help=f"Adam learning rate (default{lr_note if lr is None else ' ' + format(lr, 'g')})")
    g.add_argument("--lr-schedule", default=lr_schedule, choices=["constant", "step", "cosine"],
                   help=f"'step' divides the rate by 10 at half the run (default {lr_schedule})")
    g.add_argument("--warmup", type=A.integer(0, 10**9), default=0, help="linear warm-up iterations")
    g.add_argument("--ema", type=A.decay, default=ema, help="EMA decay (default: %s)" % ("none" if ema is None else ema))
    g.add_argument("--grad-clip", type=A.non_negative, default=grad_clip,
                   help=f"gradient norm clip (0 for none; default{clip_note if grad_clip is None else f' {grad_clip:g}'})")
    g.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"], help="mixed precision (GPU only)")
    g.add_argument("--grad-checkpoint", action="store_true",
                   help="recompute the trained network's blocks in the backward pass instead of keeping their "
                        "activations (less memory, more time; diffusers networks such as Stable Diffusion's UNet)")
    g.add_argument("--seed", type=A.seed, default=0)
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda if present)")
    g.add_argument("--log-every", type=A.positive_int, default=50)
    g.add_argument("--log", default="jsonl", choices=["jsonl", "tensorboard"],
                   help="also write the scalars and preview grids for TensorBoard in OUT/tensorboard "
                        "(needs pip install 'fewstep[tensorboard]'); metrics.jsonl is always written")
    g.add_argument("--sample-every", type=A.count, default=0, help="sample picture cadence (0: at the end only)")
    g.add_argument("--ckpt-every", type=A.count, default=500, help="checkpoint cadence (0: at the end only)")
    g.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
