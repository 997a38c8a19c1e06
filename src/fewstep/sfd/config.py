"""What an SFD run distils: `SFDConfig` (its training budget and optimizer are the loop's options, `SFD_LOOP` in
fewstep.sfd.recipe), and how many student timestamps an NFE takes."""
from __future__ import annotations

from dataclasses import dataclass, field

from fewstep.errors import FewstepError, option, options
from fewstep.lora import lora_spec
from fewstep.nets import STEP_CONDITIONS
from fewstep.schedule import GRID_KINDS
from fewstep.solvers import LOWER_ORDER_FINAL

TEACHER_SOLVERS = ("dpmpp3m", "dpmpp2m", "heun", "euler", "ipndm")
TEACHER_PRECISIONS = ("fp32", "bf16")
STAGE2_CONDITIONS = ("own", "teacher")
PERCEPTUAL_NETS = ("classifier", "lpips")
LOSS_REDUCTIONS = ("sum", "mean")
# The paper's grid ends for EDM (continuous) teachers: σ_min = 0.006 rather than EDM's 0.002.
EDM_SIGMA_MIN, EDM_SIGMA_MAX = 0.006, 80.0
LATENT_SIGMA_MIN, LATENT_TEXT_SIGMA_MIN = 0.006, 0.1


@dataclass(frozen=True)
class SFDConfig:
    """What an SFD run distils (its training budget and optimizer are the loop's options, `SFD_LOOP`). Checked
    when made; `nfe` may be one int (SFD) or a list (SFD-v). Never changed by a run: what a run resolves
    ("auto", the 1-NFE stage's NFE) goes into its own copy, the one its card records."""
    nfe: list = field(default_factory=lambda: [2])   # one value: SFD; several: SFD-v
    afs: bool = True
    m: int = 3                                        # teacher points inserted per student interval
    teacher_solver: str = "dpmpp3m"
    # DPM-Solver++ teachers: orders 2 then 1 on the last two steps of every grid ("always", the authors'),
    # only on grids under 15 steps ("short", diffusers'), or "never"
    teacher_final_orders: str = "always"
    grid: str = "polynomial"
    rho: float = 7.0
    sigma_min: float | None = None
    sigma_max: float | None = None
    loss_reduction: str = "sum"                      # sum over pixels (paper) or mean
    thresholding: bool = False                        # clip the teacher's x0 to [-1, 1] (a fixed clip)
    dropout: float | None = None                      # None: keep the teacher's
    step_condition: str = "authors"                   # SFD-v: "authors" (per-block affine) or "zero"
    stage2: bool = False
    # the 1-NFE student's step condition: "own" (its own N = 3, as the authors train it) or "teacher" (the N of
    # the first-stage mode it distils)
    stage2_condition: str = "own"
    # a perceptual term on the last step: None, "classifier", "lpips", or "auto" (the authors' for the 1-NFE
    # stage where it needs no download: LPIPS with --lpips-weights, else the shipped classifier of built-in
    # data, else none; nothing in the first stage)
    perceptual: str | None = "auto"
    perceptual_weight: float | None = None            # None: the authors' (the distance added to every pixel)
    lpips_weights: str | None = None                  # perceptual "lpips": the converted weight file
    lpips_resolution: int = 224                       # ... and the size images are resized to (the authors')
    # bf16: the teacher's trajectories under bf16 autocast, kept only if on the first batch every kept state
    # is within this relative RMS deviation of the fp32 trajectory (else the run stays fp32 and says so)
    teacher_precision: str = "fp32"
    teacher_precision_tol: float = 0.02
    # a LoRA student (fewstep.lora): the adapter's rank (None: a full copy of the teacher), its alpha (None: the
    # rank) and the modules it adapts (None: the attention projections)
    lora: int | None = None
    lora_alpha: float | None = None
    lora_targets: tuple | None = None

    def __post_init__(self):
        # one NFE may come as an int, several as any sequence of ints; the values are checked in validate()
        nfe = [self.nfe] if isinstance(self.nfe, int) and not isinstance(self.nfe, bool) else self.nfe
        if not isinstance(nfe, (list, tuple)) or not all(isinstance(n, int) and not isinstance(n, bool) for n in nfe):
            raise FewstepError(f"{option('nfe', self.nfe)}: expected an integer or a list of integers")
        object.__setattr__(self, "nfe", list(nfe))
        if isinstance(self.lora_targets, str):  # the command line's comma-separated list
            object.__setattr__(self, "lora_targets", tuple(t.strip() for t in self.lora_targets.split(",") if t.strip()))
        elif self.lora_targets is not None:
            object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        if self.perceptual == "none":  # the command line's spelling of no perceptual term
            object.__setattr__(self, "perceptual", None)
        self.validate()

    def validate(self):
        if not self.nfe or min(self.nfe) < 1:
            raise FewstepError(f"{option('nfe', self.nfe)}: expected NFE values >= 1")
        if len(set(self.nfe)) != len(self.nfe):
            raise FewstepError(f"{option('nfe', self.nfe)}: values must be distinct")
        if self.m < 0:
            raise FewstepError(f"{option('m', self.m)}: expected m >= 0 teacher points per student interval")
        if self.teacher_solver not in TEACHER_SOLVERS:
            raise FewstepError(f"{option('teacher_solver', self.teacher_solver)}: expected one of "
                               f"{', '.join(TEACHER_SOLVERS)}")
        if self.grid not in GRID_KINDS:
            raise FewstepError(f"{option('grid', self.grid)}: expected one of {', '.join(GRID_KINDS)}")
        if self.loss_reduction not in LOSS_REDUCTIONS:
            raise FewstepError(f"{option('loss_reduction', self.loss_reduction)}: expected sum or mean")
        if self.perceptual not in (None, "auto", *PERCEPTUAL_NETS):
            raise FewstepError(f"{option('perceptual', self.perceptual)}: expected auto, "
                               f"{', '.join(PERCEPTUAL_NETS)} or none")
        if self.perceptual == "lpips" and not self.lpips_weights:
            raise FewstepError(f"{option('perceptual', 'lpips')} needs {option('lpips_weights', shown='FILE')} "
                               "(convert VGG16 and LPIPS weights once with scripts/convert_lpips.py)")
        if self.perceptual_weight is not None and self.perceptual_weight < 0:
            raise FewstepError(f"{option('perceptual_weight', self.perceptual_weight)}: expected a weight >= 0")
        if self.teacher_final_orders not in LOWER_ORDER_FINAL:
            raise FewstepError(f"{option('teacher_final_orders', self.teacher_final_orders)}: expected one of "
                               f"{', '.join(LOWER_ORDER_FINAL)}")
        if self.step_condition not in STEP_CONDITIONS:
            raise FewstepError(f"{option('step_condition', self.step_condition)}: expected one of "
                               f"{', '.join(STEP_CONDITIONS)}")
        if self.stage2_condition not in STAGE2_CONDITIONS:
            raise FewstepError(f"{option('stage2_condition', self.stage2_condition)}: expected one of "
                               f"{', '.join(STAGE2_CONDITIONS)}")
        if self.teacher_precision not in TEACHER_PRECISIONS:
            raise FewstepError(f"{option('teacher_precision', self.teacher_precision)}: expected one of "
                               f"{', '.join(TEACHER_PRECISIONS)}")
        if self.lora is not None:
            lora_spec(self.lora, self.lora_alpha, self.lora_targets)
            if self.stage2:
                raise FewstepError(f"{option('lora', self.lora)} with {option('stage2', True)}: the 1-NFE stage "
                                   "trains a full copy of its first-stage student (a LoRA first stage included); "
                                   f"leave {option('lora')} out")
        elif self.lora_alpha is not None or self.lora_targets:
            raise FewstepError(f"{options('lora_alpha', 'lora_targets')}: give the adapter's rank with "
                               f"{option('lora', shown='RANK')}")
        if not 0 < self.teacher_precision_tol < 1:
            raise FewstepError(f"{option('teacher_precision_tol', self.teacher_precision_tol)}: expected a relative "
                               "deviation in (0, 1)")


def timestamps_for_nfe(nfe: int, afs: bool) -> int:
    """N student timestamps: N−1 Euler steps, one of which is free with AFS."""
    return nfe + 1 + (1 if afs else 0)


def student_nfe(n_timestamps: int, afs: bool) -> int:
    return n_timestamps - 1 - (1 if afs else 0)
