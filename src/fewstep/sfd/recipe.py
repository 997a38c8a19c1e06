"""SFD's recipe, as its authors train it (zju-pi/diff-sampler, `sfd-main`): the budgets and optimizer of each
mode, the training loop's recipe, the recipe settings a bench measures both ways, and the bench's SFD settings.
Loads no torch (the report and the command line read it)."""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field

from fewstep import argtypes as A
from fewstep.errors import FewstepError
from fewstep.method import BenchSettings
from fewstep.recipe import loop_recipe

# The authors' budgets and optimizer (zju-pi/diff-sampler sfd-main, launch.sh and training_loop.py), the
# defaults of every mode: trajectories of one SFD run, SFD-v four times that, the 1-NFE stage ten times;
# Adam 5e-5 (5e-4 for the 1-NFE stage), divided by 10 at half the run. One default is not theirs: their
# loop clips no gradient (it only replaces NaNs); fewstep clips SFD and SFD-v at norm 1, which distilled
# better beyond the 95 % intervals on the digits and MNIST teachers (docs/results.md, "SFD recipe"). The
# 1-NFE stage keeps their unclipped default: clipping it was not measured.
SFD_TRAJECTORIES = 200_000
SFDV_TRAJECTORY_FACTOR = 4
STAGE2_TRAJECTORY_FACTOR = 10
SFD_LR, STAGE2_LR = 5e-5, 5e-4
AUTHORS_GRAD_CLIP = None
SFD_GRAD_CLIP, STAGE2_GRAD_CLIP = 1.0, AUTHORS_GRAD_CLIP


def recipe(nfe: list, stage2: bool, trajectories_of_one_run: int = SFD_TRAJECTORIES) -> dict:
    """A mode's default budget and optimizer: {"trajectories", "lr", "grad_clip"} (see above)."""
    factor = STAGE2_TRAJECTORY_FACTOR if stage2 else SFDV_TRAJECTORY_FACTOR if len(nfe) > 1 else 1
    return {"trajectories": trajectories_of_one_run * factor, "lr": STAGE2_LR if stage2 else SFD_LR,
            "grad_clip": default_grad_clip(stage2)}


def default_grad_clip(stage2: bool) -> float | None:
    """fewstep's gradient clip: SFD and SFD-v at norm 1, the 1-NFE stage none (see above)."""
    return STAGE2_GRAD_CLIP if stage2 else SFD_GRAD_CLIP


def iterations_for(trajectories: int, batch: int) -> int:
    return max(1, math.ceil(trajectories / batch))


# the loop's recipe: batch 128 and the authors' step decay; iterations, lr and clip follow from the mode (`recipe`)
SFD_LOOP = loop_recipe(iters=None, batch=128, lr=None, lr_schedule="step", grad_clip=None)


@dataclass(frozen=True)
class RecipeSetting:
    """One setting of SFD's recipe measured both ways: the run with the authors' value is the bench's own
    row (a bench that measures recipe settings runs the authors' whole recipe), and an ablation row trains the
    same run again with the other value."""
    name: str
    label: str
    method: str               # the rows it changes: "sfd", "sfd-v" or "sfd-stage2"
    authors: str              # the authors' value, in words
    other: str                # the value it is measured against
    default: str = "authors"  # fewstep's default: "authors" or "other" (where the other won beyond the intervals)
    config: tuple = ()        # SFDConfig fields of the other value, as (name, value) pairs
    grad_clip: float | None = None   # the other value's gradient clip, where that is the setting
    lr: float | None = None          # ... learning rate
    factor: float | None = None      # ... budget, in trajectories of one SFD run
    nfe: int | None = None           # SFD rows: the NFE it is measured at (the smallest where it matters)


SFD_RECIPE = {r.name: r for r in (
    RecipeSetting("grad-clip", "gradient clipping (SFD)", "sfd", "none", "norm 1", "other", grad_clip=SFD_GRAD_CLIP,
                  nfe=2),
    RecipeSetting("grad-clip-sfdv", "gradient clipping (SFD-v)", "sfd-v", "none", "norm 1", "other",
                  grad_clip=SFD_GRAD_CLIP),
    RecipeSetting("final-orders", "teacher's last steps", "sfd", "orders 2 then 1 on every grid",
                  "lowered on grids under 15 steps only", config=(("teacher_final_orders", "short"),), nfe=3),
    RecipeSetting("sfdv-budget", "SFD-v budget", "sfd-v", f"{SFDV_TRAJECTORY_FACTOR}x one SFD run", "1x one SFD run",
                  factor=1),
    RecipeSetting("step-condition", "SFD-v step condition", "sfd-v", "per-block affine, xavier init",
                  "one zero-initialised embedding", config=(("step_condition", "zero"),)),
    RecipeSetting("stage2-lr", "1-NFE stage learning rate", "sfd-stage2", f"{STAGE2_LR:g}", f"{SFD_LR:g}", lr=SFD_LR),
    RecipeSetting("stage2-budget", "1-NFE stage budget", "sfd-stage2", f"{STAGE2_TRAJECTORY_FACTOR}x one SFD run",
                  "1x one SFD run", factor=1),
    RecipeSetting("stage2-perceptual", "1-NFE stage perceptual term", "sfd-stage2",
                  "on, added to every pixel (weight C·H·W)", "off", config=(("perceptual", None),)),
    RecipeSetting("stage2-condition", "1-NFE stage step condition", "sfd-stage2", "its own N = 3",
                  "the first stage's mode, N = 7", config=(("stage2_condition", "teacher"),)),
)}


def sfd_nfe_for(nfe: list) -> list:
    """The NFEs SFD distils at when none are named: the bench's NFEs up to 10 (a few-step method)."""
    return [n for n in nfe if n <= 10]



def recipe_list(text: str) -> list[str]:
    """`--recipe`: a comma list of SFD_RECIPE's settings, or none."""
    names = [] if text.strip() == "none" else [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SFD_RECIPE]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown setting(s) {', '.join(unknown)}; expected some of "
                                         f"{', '.join(SFD_RECIPE)}, or none")
    return names


@dataclass
class SFDBench(BenchSettings):
    """The bench's SFD, SFD-v and 1-NFE stage rows. Budgets keep the authors' ratios (SFD-v 4x one SFD run, the
    1-NFE stage 10x) at a scale a CPU can hold."""
    sfd_nfe: list | None = None                       # NFEs to distil SFD at (default: the bench's NFEs up to 10)
    sfdv_nfe: list = field(default_factory=lambda: [2, 3, 4, 5])
    sfd_trajectories: int = 25_600                    # one SFD run's budget; the others are multiples (the authors')
    sfd_batch: int = 128
    sfd_lr: float = SFD_LR
    sfdv_trajectory_factor: float = SFDV_TRAJECTORY_FACTOR        # SFD-v sees this many times SFD's trajectories
    sfd_stage2_trajectory_factor: float = STAGE2_TRAJECTORY_FACTOR  # ... and the 1-NFE stage this many
    sfd_stage2_lr: float = STAGE2_LR
    # SFD_RECIPE settings measured against the authors' value; with any, every SFD row runs the authors' whole
    # recipe (no gradient clipping), without, fewstep's defaults
    sfd_recipe: list = field(default_factory=list)

    FLAGS = {
        "sfd_batch": (A.batch, "SFD / SFD-v / stage-2 batch (default: the preset's)"),
        "sfd_lr": (A.positive, "SFD / SFD-v learning rate (default: the preset's)"),
        "sfd_trajectories": (A.integer(1, 10**12),
                             "SFD's trajectory budget; iterations = trajectories / batch (default: the preset's)"),
        "sfd_recipe": (recipe_list, f"SFD recipe settings to train both ways, a comma list of {', '.join(SFD_RECIPE)}, "
                                    "or none (default: the preset's)", ("--recipe",)),
    }

    @classmethod
    def overrides(cls, args: argparse.Namespace) -> dict:
        given = super().overrides(args)
        if getattr(args, "nfe", None) and "sfd_nfe" not in given:  # --nfe sets SFD's too, or a preset keeps its own
            given["sfd_nfe"] = sfd_nfe_for(args.nfe)
        return given

    def __post_init__(self):
        unknown = [n for n in self.sfd_recipe if n not in SFD_RECIPE]
        if unknown:
            raise FewstepError(f"sfd_recipe: unknown setting {unknown[0]!r}; expected some of {', '.join(SFD_RECIPE)}")
