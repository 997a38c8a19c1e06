"""Progressive distillation's recipe: each fold's training (the command line's and the bench's), and the
bench's settings. Loads no torch."""
from __future__ import annotations

from dataclasses import dataclass

from fewstep.method import BenchSettings
from fewstep.recipe import loop_recipe

# each fold's default training: iterations, batch, learning rate and its schedule (the CLI's and the bench's)
ITERS_PER_FOLD, FOLD_BATCH, FOLD_LR, FOLD_LR_SCHEDULE = 1000, 64, 1e-4, "cosine"
PROGRESSIVE_LOOP = loop_recipe(iters=ITERS_PER_FOLD, batch=FOLD_BATCH, lr=FOLD_LR, lr_schedule=FOLD_LR_SCHEDULE)


@dataclass
class ProgressiveBench(BenchSettings):
    """The bench's chain of folds from pd_start_steps teacher steps; a row at each SFDDM T' rounded to a power of
    two, so the two step-table methods sit side by side."""
    pd_start_steps: int = 256
    pd_iters_per_fold: int | None = None              # None: the CLI's default
    pd_batch: int = 64
    pd_lr: float = 1e-4
