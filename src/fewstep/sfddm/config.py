"""What an SFDDM run distils: `SFDDMConfig` (its budget and optimizer are the loop's options, `SFDDM_LOOP` in
fewstep.sfddm.recipe)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from fewstep import argtypes as A
from fewstep.distill.step_table import CHAIN_SAMPLERS as SAMPLERS
from fewstep.errors import FewstepError, option

INITS = ("random", "teacher")
HIDDEN = ("l1", "kl", "none")
LOSSES = ("l1", "l2")


@dataclass(frozen=True)
class SFDDMConfig:
    """What an SFDDM run distils (its budget and optimizer are the loop's options, `SFDDM_LOOP`); checked when
    made, never changed by a run."""
    steps: int | None = None          # T'; None with an explicit index list
    index: object = "trailing"        # trailing | leading | "i,j,..." | list of ints
    init: str = "random"
    hidden: str = "l1"                # l1 on the penultimate map | kl (time-weighted ε-MSE) | none
    loss: str = "l1"                  # output term: l1 | l2
    lam: float = 1.0
    sampler: str = "ddpm"             # the card's default: ddpm ancestral | ddim (η = 0)
    clip: object = "auto"             # x̂0 clipping when sampling: a float, None, or auto (1 for images)
    dropout: float | None = 0.0       # the authors' student has none; None: the teacher's
    feature_layer: str | None = None  # sub-module whose output is the hidden variable (None: the net's default)
    seed: int = 0                     # random init
    allow_full: bool = False          # admit T' = T (invariant checks only)

    def __post_init__(self):
        if self.steps is not None:
            object.__setattr__(self, "steps", A.check("steps", self.steps, A.positive_int))
        self.validate()

    def validate(self):
        if self.init not in INITS:
            raise FewstepError(f"{option('init', self.init)}: expected one of {', '.join(INITS)}")
        if self.hidden not in HIDDEN:
            raise FewstepError(f"{option('hidden', self.hidden)}: expected one of {', '.join(HIDDEN)}")
        if self.loss not in LOSSES:
            raise FewstepError(f"{option('loss', self.loss)}: expected one of {', '.join(LOSSES)}")
        if not (self.lam >= 0 and math.isfinite(self.lam)):
            raise FewstepError(f"{option('lam', self.lam)}: expected a finite weight >= 0")
        if self.sampler not in SAMPLERS:
            raise FewstepError(f"{option('sampler', self.sampler)}: expected one of {', '.join(SAMPLERS)}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise FewstepError(f"{option('dropout', self.dropout)}: expected a probability in [0, 1)")
