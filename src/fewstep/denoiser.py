"""The Denoiser: the one place that knows a network's own conventions.

    D(x, σ) -> x0 estimate,  with x = x0 + σ·ε  (σ-space, DESIGN.md)

It owns the parameterization (eps / x0 / v / EDM preconditioning), the input scaling and the time
input (a discrete model's table index, interpolated between entries or refused outside them when
the table is exact; or EDM's continuous noise code). Samplers and losses only ever see D.
"""
from __future__ import annotations

import torch
from torch import nn

from fewstep.errors import FewstepError
from fewstep.schedule import Schedule, continuous_table

PARAMETERIZATIONS = ("eps", "x0", "v", "edm", "ve")
# what each parameterization's network predicts (for error messages and cards):
#   eps: ε, input scaled by 1/sqrt(σ²+1) (VP); x0, v: likewise; edm: EDM's F with c_skip/c_out/c_in;
#   ve: the VE-SDE's F with D = x + σ·F, input unscaled (NVlabs/edm's VEPrecond)


class Denoiser(nn.Module):
    def __init__(self, net: nn.Module, schedule: Schedule, param: str = "eps", exact_table: bool = False):
        super().__init__()
        if param not in PARAMETERIZATIONS:
            raise FewstepError(f"parameterization {param!r}: expected one of {', '.join(PARAMETERIZATIONS)}")
        if param in ("edm", "ve") and schedule.is_discrete and schedule.derived_from != param:
            # a table read off such a model keeps its preconditioning (schedule.continuous_table)
            raise FewstepError(f"parameterization {param!r} needs a continuous schedule, got a discrete table")
        # continuous ε-prediction is the VP-SDE's (NVlabs/edm's VPPrecond), with its own time code
        if param in ("x0", "v", "eps") and not schedule.is_discrete and not (param == "eps" and schedule.time_code == "vp"):
            raise FewstepError(f"parameterization {param!r} needs a discrete VP table; continuous models use "
                               "'edm', 've', or 'eps' with the VP-SDE's time code")
        self.net = net
        self.schedule = schedule
        self.param = param
        self.exact_table = exact_table

    # ---- conventions ------------------------------------------------------------------------
    @property
    def sigma_min(self) -> float:
        return self.schedule.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.schedule.sigma_max

    @property
    def has_step_condition(self) -> bool:
        return getattr(self.net, "step_cond", None) is not None

    def time_input(self, sigma: torch.Tensor) -> torch.Tensor:
        """The network's time input for each σ (float64 in, float32 out)."""
        if self.schedule.is_discrete:
            return self.schedule.time_input(sigma.double().cpu(), exact=self.exact_table).float().to(sigma.device)
        # in float32, as NVlabs/edm computes its c_noise
        return self.schedule.continuous_time_input(sigma.float())

    def _sigma_batch(self, x: torch.Tensor, sigma) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float64).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(x.shape[0])
        if sigma.shape[0] != x.shape[0]:
            raise FewstepError(f"sigma: expected one value or one per sample ({x.shape[0]}), got {sigma.shape[0]}")
        return sigma

    def _bcast(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return v.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))

    # ---- raw network call -------------------------------------------------------------------
    def raw(self, x: torch.Tensor, sigma, step=None, class_labels=None, return_features=False):
        """The network's own output (ε, x0, v or EDM's F) for a σ-space input, plus optional features."""
        sigma = self._sigma_batch(x, sigma)
        if self.param == "ve":
            c_in = torch.ones_like(sigma)
        else:
            c_in = 1 / (sigma**2 + (self.schedule.sigma_data**2 if self.param == "edm" else 1.0)).sqrt()
        if class_labels is not None:
            class_labels = torch.as_tensor(class_labels, dtype=torch.long, device=x.device).reshape(-1)
        return self.net(x * self._bcast(c_in, x), self.time_input(sigma), step=step,
                        class_labels=class_labels, return_features=return_features)

    def raw_to_x0(self, raw: torch.Tensor, x: torch.Tensor, sigma) -> torch.Tensor:
        """Convert a raw network output at (x, σ) into the x0 estimate."""
        sigma = self._bcast(self._sigma_batch(x, sigma), x)
        if self.param == "eps":
            return x - sigma * raw
        if self.param == "x0":
            return raw
        if self.param == "ve":
            return x + sigma * raw
        if self.param == "v":
            # VP: x_vp = a·x0 + b·ε, v = a·ε − b·x0, with a = 1/sqrt(1+σ²), b = σ·a  ⇒  x0 = a·x_vp − b·v
            a = 1 / (1 + sigma**2).sqrt()
            return a * (a * x) - sigma * a * raw
        sd = self.schedule.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        return c_skip * x + c_out * raw

    def forward(self, x: torch.Tensor, sigma, step=None, class_labels=None, return_features=False):
        out = self.raw(x, sigma, step=step, class_labels=class_labels, return_features=return_features)
        if return_features:
            raw, feats = out
            return self.raw_to_x0(raw, x, sigma), feats
        return self.raw_to_x0(out, x, sigma)

    def eps(self, x: torch.Tensor, sigma, **kw) -> torch.Tensor:
        s = self._bcast(self._sigma_batch(x, sigma), x)
        return (x - self(x, sigma, **kw)) / s

    # ---- sampler-facing helpers --------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """Number of class labels a class-conditional network takes (0: unconditional)."""
        return int(getattr(self.net, "config", {}).get("num_classes") or 0)

    def check_labels(self, class_labels: torch.Tensor | None, n: int | None = None) -> torch.Tensor | None:
        """Class labels for this model: required (and in range) for a conditional one, refused otherwise."""
        if not self.num_classes:
            if class_labels is not None:
                raise FewstepError("class labels were given, but this model is not class-conditional")
            return None
        if class_labels is None:
            raise FewstepError(f"this model is class-conditional ({self.num_classes} classes): give class labels")
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        if n is not None and len(labels) != n:
            raise FewstepError(f"class labels: expected {n}, got {len(labels)}")
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise FewstepError(f"class label {int(labels.max() if labels.max() >= self.num_classes else labels.min())}"
                               f": expected 0..{self.num_classes - 1}")
        return labels

    def with_step(self, step: int | None, class_labels: torch.Tensor | None = None):
        """A plain callable D(x, σ) with the step condition (SFD-v) and class labels bound, for the solvers."""
        if step is None and self.has_step_condition:
            raise FewstepError("this model is step-conditioned (SFD-v): choose one of its trained NFEs")
        if not self.has_step_condition:
            step = None
        if step is None and class_labels is None:
            return self
        return lambda x, sigma: self(x, sigma, step=step, class_labels=class_labels)

    def table_sigmas(self) -> torch.Tensor:
        """The model's own noise levels, noisiest first (discrete only)."""
        if not self.schedule.is_discrete:
            raise FewstepError("a continuous model has no step table")
        return self.schedule.sigmas.flip(0)

    def discrete_view(self, T: int | None = None) -> tuple["Denoiser", dict]:
        """This continuous model seen through a discrete table read off it (same network, same
        outputs at every table entry), and how the table was made: see schedule.continuous_table."""

        table, info = continuous_table(self.schedule, T)
        return Denoiser(self.net, table, self.param, exact_table=False), info

    def describe(self) -> dict:
        return {"param": self.param, "exact_table": self.exact_table, "schedule": self.schedule.to_dict()}
