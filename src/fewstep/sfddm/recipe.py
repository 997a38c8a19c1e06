"""SFDDM's recipe as its authors train it: a fifth of the teacher's training samples, batch 64, Adam 2e-4, no
gradient clipping, no EMA; and the bench's SFDDM settings. Loads no torch."""
from __future__ import annotations

from dataclasses import dataclass, field

from fewstep import argtypes as A
from fewstep.method import BenchSettings
from fewstep.recipe import loop_recipe

FALLBACK_ITERATIONS = 4000  # when the teacher's card does not say how long it trained
TEACHER_SAMPLES_FRACTION = 0.2  # the authors' demo trains the student on about a fifth of the teacher's samples

# the authors train without gradient clipping or EMA; iterations: a fifth of the teacher's samples (default_iterations)
SFDDM_LOOP = loop_recipe(iters=None, batch=64, lr=2e-4, grad_clip=0.0, ema=None)



def default_iterations(teacher_card: dict | None, batch: int) -> tuple[int, str]:
    """Training iterations sized like the authors' schedule: the student sees about a fifth of the
    samples the teacher was trained on (its card's training iterations × batch). Returns
    (iterations, how they were derived); FALLBACK_ITERATIONS when the card does not say."""
    tr = (teacher_card or {}).get("training") or {}
    its, tb = tr.get("iterations"), tr.get("batch")
    if not (isinstance(its, int) and isinstance(tb, int) and its > 0 and tb > 0) or batch < 1:
        return FALLBACK_ITERATIONS, f"{FALLBACK_ITERATIONS} (the teacher's card does not record its training)"
    n = max(1, round(TEACHER_SAMPLES_FRACTION * its * tb / batch))
    return n, (f"{n} = a fifth of the teacher's {its} x {tb} training samples at batch {batch} "
               "(the authors' schedule)")


@dataclass
class SFDDMBench(BenchSettings):
    """The bench's SFDDM rows: students at each T' (every index/init variant at the T' in sfddm_variants_at, the
    first variant elsewhere), each beside the teacher's own chain on its phi, and an optional long run."""
    sfddm_steps: list = field(default_factory=lambda: [10])
    sfddm_variants: list = field(default_factory=lambda: ["trailing/random"])  # index/init pairs
    sfddm_variants_at: list | None = None             # T' values that get every variant (default all; others: the first)
    sfddm_iters: int | None = None                    # None: the CLI's default (a fifth of the teacher's samples)
    sfddm_batch: int = 64
    sfddm_lr: float = 2e-4
    sfddm_long_fraction: float = 0.0                  # >0: one more SFDDM run (first T', first variant) of this
                                                      # fraction of the teacher's training iterations
    sfddm_long_curve_points: int = 12                 # ... scored at this many points along it

    FLAGS = {"sfddm_steps": (A.nfe_list, "student step counts T' for SFDDM"),
             "sfddm_iters": (A.positive_int, "SFDDM's iterations (default: the preset's, else a fifth of the "
                                             "teacher's training samples, the authors' schedule)")}
