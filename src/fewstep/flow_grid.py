"""A rectified flow's noise levels as diffusers' FlowMatchEulerDiscreteScheduler spaces them, in σ-space.

x_t = (1 − t)·x0 + t·ε is x = x_t / (1 − t) = x0 + σ·ε with σ = t / (1 − t) (fewstep.schedule.Schedule.flow).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from fewstep.errors import FewstepError

# the pure-noise end t = 1 (σ = ∞) is taken at this t, which float32 rounds to 1 (the network sees t = 1 exactly)
# and whose σ is finite
FLOW_T_TOP = 1 - 2.0**-26


def flow_shift(t, shift: float):
    """SD3's static time shift t ↦ s·t / (1 + (s − 1)·t) (numpy or torch, in the input's precision)."""
    return shift * t / (1 + (shift - 1) * t)


FLOW_GRIDS = ("scheduler", "pipeline")


def flow_scheduler_grid(n: int, T: int = 1000, shift: float = 1.0, mu: float | None = None,
                        rule: str = "scheduler") -> tuple[torch.Tensor, list]:
    """(σ grid of n + 1 points, the scheduler's n float32 t values): FlowMatchEulerDiscreteScheduler's
    set_timesteps as diffusers computes it. Rule "scheduler" (SD3's pipeline): n points linear between the
    ends of the training table, which is shifted by `shift` (static shifting) or not (`mu` given), in float64.
    Rule "pipeline" (FluxPipeline): the pipeline's own n points linspace(1, 1/n) in float32. Then shifted by
    `shift` or by exp(mu)/(exp(mu) + 1/t − 1) (Flux's resolution-dependent shifting); float32; then σ = 0. The
    first point, t = 1, is taken at FLOW_T_TOP."""
    if not isinstance(n, int) or n < 1:
        raise FewstepError(f"{n} steps: expected at least 1")
    if rule not in FLOW_GRIDS:
        raise FewstepError(f"flow grid rule {rule!r}: expected one of {', '.join(FLOW_GRIDS)}")
    if rule == "pipeline":
        t = np.linspace(1.0, 1 / n, n).astype(np.float32)
    else:
        table = torch.from_numpy(np.linspace(1, T, T, dtype=np.float32)[::-1].copy()) / T
        if mu is None:
            table = flow_shift(table, shift)
        s_max, s_min = table[0].item(), table[-1].item()
        t = np.linspace(s_max * T, s_min * T, n) / T
    t = flow_shift(t, shift) if mu is None else math.exp(mu) / (math.exp(mu) + (1 / t - 1))
    t32 = torch.from_numpy(t).to(torch.float32)
    t64 = t32.double().clamp(max=FLOW_T_TOP)
    return torch.cat([t64 / (1 - t64), torch.zeros(1, dtype=torch.float64)]), t32.tolist()


def flux_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
            max_shift: float = 1.15) -> float:
    """Flux's resolution-dependent shift: mu linear in the number of latent patches (diffusers' calculate_shift)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)
