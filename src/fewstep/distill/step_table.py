"""What the step-table students (SFDDM, progressive distillation) share: a discrete teacher, read on an index set
phi of its table, and its own T'-step chain there, the ceiling each such student is measured against (the
bench's "teacher on phi" rows)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fewstep.checkpoint import Checkpoint
from fewstep.denoiser import Denoiser
from fewstep.errors import FewstepError, option
from fewstep.method import Row
from fewstep.schedule import index_subsequence

INDEX_RULES = {"trailing": "round((s+1)*T/T') - 1", "leading": "s*floor(T/T')", "spread": "floor(s*T/T')"}
CHAIN_SAMPLERS = ("ddpm", "ddim")
PANEL = "SFDDM and progressive distillation"   # the cost figure's panel of both methods' rows


def check_teacher(teacher: Denoiser, method: str = "SFDDM") -> None:
    """A distillable teacher: a discrete VP table, not step-conditioned."""
    if not teacher.schedule.is_discrete:
        raise FewstepError(f"{method} needs a discrete teacher table (T steps); this teacher is continuous: "
                           "use its table teacher.discrete_view() (SFDDM does so by itself)")
    if teacher.has_step_condition:
        raise FewstepError(f"{method}: the teacher is step-conditioned (an SFD-v student); distil a plain teacher")


def teacher_table(teacher: Denoiser) -> tuple[Denoiser, dict | None]:
    """The teacher SFDDM distils: itself when it has a table; a continuous (EDM, VE or VP-SDE) model
    through the discrete table read off it (schedule.continuous_table), with how it was made."""
    if teacher.schedule.is_discrete:
        return teacher, None
    return teacher.discrete_view()


def index_set(teacher: Denoiser, steps: int | None, index="trailing", allow_full: bool = False) -> torch.Tensor:
    """The teacher indices φ (long, strictly increasing) of a T'-step student.

    `index` is one of INDEX_RULES ('trailing', 'leading' = the authors' s·⌊T/T'⌋, 'spread' =
    ⌊s·T/T'⌋), a comma-separated string or a sequence of ints. With an explicit list `steps` may be
    None (T' = its length). allow_full admits T' = T (φ = 0..T-1), the identity student used to
    check invariants; users never get it.
    """
    check_teacher(teacher)
    T = teacher.schedule.T
    named = isinstance(index, str) and index in INDEX_RULES
    if named and steps is None:
        raise FewstepError(f"index set {index!r}: give the student's step count T' ({option('steps')})")
    if steps is not None and steps < 1:
        raise FewstepError(f"student steps T'={steps}: expected T' >= 1")
    if named and not 1 <= steps <= (T if allow_full else T - 1):
        raise FewstepError(f"student steps T'={steps}: expected 1 <= T' < T = {T}")
    if index == "leading":  # the authors' code: the teacher index c·s with c = ⌊T/T'⌋
        return index_subsequence(T, steps, [s * (T // steps) for s in range(steps)], allow_full=allow_full)
    if index == "spread":  # schedule.index_subsequence's floor rule
        return index_subsequence(T, steps, "leading", allow_full=allow_full)
    if isinstance(index, str) and index not in INDEX_RULES:
        try:
            [int(v) for v in index.split(",") if v.strip()]
        except ValueError:
            raise FewstepError(f"index set {index!r}: expected {', '.join(INDEX_RULES)} or a comma-separated "
                               "list of increasing teacher indices") from None
    return index_subsequence(T, steps, index, allow_full=allow_full)


def phi_grid(teacher: Denoiser, phi) -> torch.Tensor:
    """The teacher's σ at φ, noisiest first, then 0: the grid of its own T'-step chain on φ."""
    sig = teacher.schedule.sigmas[torch.as_tensor(phi, dtype=torch.long)].flip(0)
    return torch.cat([sig, torch.zeros(1, dtype=torch.float64)])


def teacher_on_phi(teacher_ckpt, phi, sampler: str = "ddpm", clip: float | None = 1.0):
    """SFDDM's ceiling: the teacher itself sampled on its T'-step chain at φ (DDPM ancestral or DDIM
    η = 0, x̂0 clipped like the student), as a Checkpoint that `sampling.sample` draws from. The
    SFDDM loss is minimised by copying the teacher at φ, so no student can beat this on average."""
    if sampler not in CHAIN_SAMPLERS:
        raise FewstepError(f"sampler {sampler!r}: expected one of {', '.join(CHAIN_SAMPLERS)}")
    table = teacher_table(teacher_ckpt.denoiser)[0]
    check_teacher(table)
    phi = index_subsequence(table.schedule.T, None, [int(v) for v in phi])
    card = {**teacher_ckpt.card, "sampler": {"name": sampler, "nfe": len(phi), "clip": clip,
                                             "sigmas": [float(v) for v in phi_grid(table, phi)]}}
    return Checkpoint(teacher_ckpt.denoiser, card, teacher_ckpt.path)


@dataclass
class CeilingRow(Row):
    """The teacher's own T'-step chain on phi (DDPM ancestral or DDIM): the best an SFDDM student can score,
    whose loss is minimised by copying the teacher there. Discrete teachers only."""

    sampler: str = "ddpm"
    index: str = "trailing"

    def sampling(self, bench) -> tuple:
        phi = index_set(bench.teacher.denoiser, self.nfe, self.index)
        return teacher_on_phi(bench.teacher, phi, self.sampler, None if bench.is_toy else 1.0), {}, None


def ceiling_rows(bench, T: int, indices: list) -> list[CeilingRow]:
    """The teacher on its own T'-step chain at each index set (DDPM ancestral and DDIM); progressive
    distillation's grids are the trailing phi. None for a continuous teacher."""
    if not bench.teacher.denoiser.schedule.is_discrete:
        return []
    return [CeilingRow(f"teacher-on-phi-{T}-{index}-{name}", "teacher-on-phi", T,
                       f"teacher on phi (ceiling) ({index}, {name})", panel=None, sampler=name, index=index)
            for index in dict.fromkeys(indices) for name in ("ddpm", "ddim")]
