"""SFD's objective (Zhou et al., NeurIPS 2024, sections 3 and 4) on one batch of noises.

The student walks its own few-step Euler grid t_0 > t_1 > … > t_{N−1} in σ-space. The teacher's trajectory from
the same noise, solved over a refined grid that contains every t_i, gives its states y_i there
(fewstep.sfd.trajectory). Each student step is a plain Euler step

    x_{i+1} = x_i + (t_{i+1} − t_i) · d_i,        d_i = (x_i − D_θ(x_i, t_i)) / t_i,

where the first one, with the analytical first step (AFS), is d_0 = x_0 / sqrt(1 + t_0²) and calls no network.
The loss of step i is the L1 distance to the teacher's state, summed over pixels as in the paper (or averaged):

    L_i = ‖x_{i+1} − y_{i+1}‖₁   (+ w · P(x_N, y_N) on the last step, P a perceptual distance)

Every network-using step takes its own optimizer step, and the student goes on from its own state x_{i+1} with
the gradient stopped: it learns to correct its own accumulated error (global trajectory matching), never a
step started from the teacher's state.
"""
from __future__ import annotations

import math
import sys
from dataclasses import replace

import torch

from fewstep.errors import option
from fewstep.featnet import available_classifiers
from fewstep.perceptual import perceptual_distance
from fewstep.sfd.config import SFDConfig
from fewstep.solvers import afs_direction


class TrajectoryLoss:
    """L_i above: L1 to the teacher's state, summed over pixels (the paper's) or averaged, with the perceptual
    term on the last step where the run has one."""

    def __init__(self, reduction: str, perceptual_net=None, perceptual_weight: float = 0.0):
        self.reduction, self.perceptual_net, self.perceptual_weight = reduction, perceptual_net, perceptual_weight

    def __call__(self, x_next: torch.Tensor, target: torch.Tensor, last: bool) -> torch.Tensor:
        diff = (x_next - target).abs().reshape(x_next.shape[0], -1)
        loss = diff.sum(1).mean() if self.reduction == "sum" else diff.mean()
        if last and self.perceptual_net is not None:
            loss = loss + self.perceptual_weight * self.perceptual_net(x_next, target).mean()
        return loss


def trajectory_loss(cfg: SFDConfig, shape: tuple, data: dict, device) -> tuple[TrajectoryLoss, SFDConfig]:
    """The run's loss, and its config with the perceptual term resolved ("auto": the authors' for the 1-NFE
    stage where it needs no download: LPIPS with given weights, else the shipped classifier of built-in data;
    none in the first stage). The authors add the perceptual distance to every pixel's L1, so its default
    weight is C·H·W against the summed L1 (1 against the mean)."""
    kind = cfg.perceptual
    if kind == "auto":
        kind = None
        if cfg.stage2 and cfg.lpips_weights:
            kind = "lpips"
        elif cfg.stage2 and (data.get("name"), (data.get("shape") or [0])[-1]) in available_classifiers():
            kind = "classifier"
        elif cfg.stage2 and len(shape) > 1:  # points have no perceptual distance to miss
            print("fewstep: note: the 1-NFE stage runs without the authors' perceptual term: give "
                  f"{option('lpips_weights', shown='FILE')} (see scripts/convert_lpips.py) to add "
                  "LPIPS", file=sys.stderr)
    cfg = replace(cfg, perceptual=kind)
    if kind is None:
        return TrajectoryLoss(cfg.loss_reduction), cfg
    net = perceptual_distance(kind, data, device, cfg.lpips_weights, cfg.lpips_resolution)
    weight = cfg.perceptual_weight
    if weight is None:
        weight = float(math.prod(shape)) if cfg.loss_reduction == "sum" else 1.0
    return TrajectoryLoss(cfg.loss_reduction, net, weight), cfg


def match_trajectory(model, x: torch.Tensor, s_grid: torch.Tensor, targets: list, afs: bool, loss: TrajectoryLoss,
                     ctx) -> list[float]:
    """The student's Euler steps from x along s_grid against the teacher's states (targets[i] at s_grid[i]), one
    optimizer step per network-using step (`ctx.step`), the gradient stopped between steps. Returns each
    step's loss."""
    losses = []
    for i in range(len(s_grid) - 1):
        t, t_next = s_grid[i], s_grid[i + 1]
        use_net = not (afs and i == 0)
        if use_net:
            with ctx.timed("student"), ctx.autocast():
                d = (x - model(x, t)) / t.to(x.dtype)
        else:
            d = afs_direction(x, float(t))
        x_next = x + (t_next - t).to(x.dtype) * d.float()
        step_loss = loss(x_next, targets[i + 1], last=(i == len(s_grid) - 2))
        if use_net:
            ctx.step(step_loss)
        losses.append(float(step_loss.detach()))
        x = x_next.detach()
    return losses
