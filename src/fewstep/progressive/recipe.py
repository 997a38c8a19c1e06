"""Progressive distillation's recipe: each fold's training (the command line's and the bench's), and the
bench's settings. Loads no torch."""
from __future__ import annotations

from dataclasses import dataclass, field

from fewstep import argtypes as A

from fewstep.method import BenchSettings
from fewstep.recipe import loop_recipe

# each fold's default training: iterations, batch, learning rate and its schedule (the CLI's and the bench's)
ITERS_PER_FOLD, FOLD_BATCH, FOLD_LR, FOLD_LR_SCHEDULE = 1000, 64, 1e-4, "cosine"
PROGRESSIVE_LOOP = loop_recipe(iters=ITERS_PER_FOLD, batch=FOLD_BATCH, lr=FOLD_LR, lr_schedule=FOLD_LR_SCHEDULE)


@dataclass
class ProgressiveBench(BenchSettings):
    """The bench's chain of folds from pd_start_steps teacher steps, with a row at each of pd_steps (powers of
    two below the start; the presets pick SFDDM's T' rounded so, to set the two step-table methods side by
    side)."""
    pd_steps: list = field(default_factory=lambda: [8])
    pd_start_steps: int = 256
    pd_iters_per_fold: int | None = None              # None: the CLI's default
    pd_batch: int = 64
    pd_lr: float = 1e-4

    FLAGS = {"pd_steps": (A.nfe_list, "the progressive folds to measure, each a power of two below the start "
                                      "(default: the preset's)")}
