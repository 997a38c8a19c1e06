"""Training-free samplers as plain functions over a σ grid.

    result = solve(name, model, x, sigmas, ...)       # model(x, σ) -> x0 estimate
    result.x, result.trajectory, result.nfe

`x` is the initial state at sigmas[0] (σ-space: x = σ_max·ε for pure noise). The grid is
decreasing; it may end in 0, in which case the last step is a plain denoise (first order).
Every solver counts its network evaluations (NFE) and can keep the whole trajectory
(the state at every grid point, including the start).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from fewstep.errors import FewstepError, option
from fewstep.schedule import check_grid

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class SolveResult:
    x: torch.Tensor
    nfe: int
    trajectory: list[torch.Tensor] | None = None


class _Counter:
    """Wraps the model to count calls and optionally clip the x0 estimate (dynamic thresholding); the last
    estimate before clipping stays in `unclipped` (DDIM's direction is the network's own ε)."""

    def __init__(self, model: Model, clip: float | None):
        self.model, self.clip, self.nfe = model, clip, 0
        self.unclipped = None

    def __call__(self, x, sigma):
        self.nfe += 1
        d = self.unclipped = self.model(x, sigma)
        return d.clamp(-self.clip, self.clip) if self.clip is not None else d


def _prepare(model, sigmas, x, clip):
    sigmas = check_grid(sigmas).to(device=x.device)
    return _Counter(model, clip), sigmas


def _sig(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return s.to(x.dtype)


def afs_direction(x: torch.Tensor, t0: float) -> torch.Tensor:
    """SFD's analytical first step: x_T ≈ t0·ε, so the ε direction is about x / sqrt(1 + t0²)."""
    return x / math.sqrt(1 + float(t0) ** 2)


def euler(model: Model, x, sigmas, afs: bool = False, clip=None, return_trajectory=False) -> SolveResult:
    """Euler steps on the PF-ODE dx/dσ = (x − D(x, σ))/σ; with AFS the first step uses no network."""
    m, sigmas = _prepare(model, sigmas, x, clip)
    traj = [x] if return_trajectory else None
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        if afs and i == 0:
            d = afs_direction(x, s)
        else:
            d = (x - m(x, s)) / _sig(s, x)
        x = x + _sig(s_next - s, x) * d
        if traj is not None:
            traj.append(x)
    return SolveResult(x, m.nfe, traj)


def ddim(model: Model, x, sigmas, eta: float = 0.0, generator=None, clip=None, return_trajectory=False,
         targets=None, eps_from: str = "model") -> SolveResult:
    """DDIM(η) in σ-space: η = 0 is exactly Euler; η = 1 is DDPM's ancestral sampler.

    The stochastic part splits σ_next² into a deterministic σ_down² and fresh noise σ_up², with
    σ_up² = η²·σ_next²·(σ² − σ_next²)/σ², which is DDIM's σ_t²/ᾱ_{t-1} written in σ-space.

    With a clip, the x0 estimate is clipped and the direction is the network's own ε (`eps_from="model"`,
    as DDIM schedulers do) or the ε of the clipped estimate (`"clipped"`: DDPM's posterior mean). `targets`
    (one σ per step) lets a step land elsewhere than on the next grid point, as DDIMScheduler's step to
    t − T//n does: the state is then read at the next point's noise level as a VP model reads it (scaled by
    sqrt((1 + σ_next²)/(1 + σ_target²))).
    """
    if eps_from not in ("model", "clipped"):
        raise FewstepError(f"eps_from {eps_from!r}: expected model or clipped")
    m, sigmas = _prepare(model, sigmas, x, clip)
    if targets is not None:
        targets = torch.as_tensor(targets, dtype=torch.float64, device=sigmas.device)
        if targets.shape != (len(sigmas) - 1,):
            raise FewstepError(f"targets: expected one per step ({len(sigmas) - 1}), got {tuple(targets.shape)}")
    traj = [x] if return_trajectory else None
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        if targets is not None and i > 0 and targets[i - 1] != s:
            # the last step landed at targets[i - 1]; the network reads the state as if it were at s
            x = x * _sig(((1 + s**2) / (1 + targets[i - 1] ** 2)).sqrt(), x)
        if targets is not None:
            s_next = targets[i]
        x0 = m(x, s)
        x0_dir = m.unclipped if eps_from == "model" else x0
        s_up = (eta**2 * s_next**2 * (s**2 - s_next**2) / s**2).clamp(min=0).sqrt()
        s_down = (s_next**2 - s_up**2).clamp(min=0).sqrt()
        x = x0 + _sig(s_down / s, x) * (x - x0_dir)
        if eta > 0 and s_next > 0:
            x = x + _sig(s_up, x) * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        if traj is not None:
            traj.append(x)
    return SolveResult(x, m.nfe, traj)


DDPM_VARIANCES = ("fixed_small", "fixed_large")


def ddpm(model: Model, x, sigmas, generator=None, clip=None, return_trajectory=False, variance: str = "fixed_small",
         noise_at_last: bool = False) -> SolveResult:
    """DDPM ancestral sampling: the posterior mean plus noise. `fixed_small` is the posterior's own variance
    (none on a step to σ = 0); `fixed_large` is the forward step's, β_t = 1 − ᾱ_t/ᾱ_{t−1}, which in σ-space
    is (σ² − σ_next²)(1 + σ_next²)/(1 + σ²), added also on the last step when `noise_at_last` (diffusers'
    DDPMScheduler adds it whenever the step starts from a timestep above 0)."""
    if variance == "fixed_small":
        return ddim(model, x, sigmas, eta=1.0, generator=generator, clip=clip, return_trajectory=return_trajectory,
                    eps_from="clipped")
    if variance != "fixed_large":
        raise FewstepError(f"DDPM variance {variance!r}: expected one of {', '.join(DDPM_VARIANCES)}")
    m, sigmas = _prepare(model, sigmas, x, clip)
    traj = [x] if return_trajectory else None
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        x0 = m(x, s)
        mean = x0 + _sig((s_next**2 - s_next**2 * (s**2 - s_next**2) / s**2).clamp(min=0).sqrt() / s, x) * (x - x0)
        if s_next > 0 or noise_at_last:
            std = ((s**2 - s_next**2) * (1 + s_next**2) / (1 + s**2)).clamp(min=0).sqrt()
            mean = mean + _sig(std, x) * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = mean
        if traj is not None:
            traj.append(x)
    return SolveResult(x, m.nfe, traj)


def heun(model: Model, x, sigmas, clip=None, return_trajectory=False) -> SolveResult:
    """EDM's 2nd-order Heun; the step to σ = 0 (if any) is Euler, as in EDM."""
    m, sigmas = _prepare(model, sigmas, x, clip)
    traj = [x] if return_trajectory else None
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = (x - m(x, s)) / _sig(s, x)
        x_euler = x + _sig(s_next - s, x) * d
        if s_next > 0:
            d2 = (x_euler - m(x_euler, s_next)) / _sig(s_next, x)
            x = x + _sig(s_next - s, x) * (d + d2) / 2
        else:
            x = x_euler
        if traj is not None:
            traj.append(x)
    return SolveResult(x, m.nfe, traj)


# When DPM-Solver++ lowers its order on the last steps (each then uses only as many earlier estimates as
# steps remain): "short" on grids of fewer than 15 steps (diffusers' rule), "always" on every grid (the
# SFD authors' teacher), "never".
LOWER_ORDER_FINAL = ("short", "always", "never")


def _lower_order_final_mode(value) -> str:
    """True / False are the historical spellings of "short" / "never"."""
    mode = {True: "short", False: "never"}.get(value, value) if isinstance(value, bool) else value
    if mode not in LOWER_ORDER_FINAL:
        raise FewstepError(f"lower_order_final {value!r}: expected one of {', '.join(LOWER_ORDER_FINAL)}")
    return mode


def dpmpp_orders(n: int, order: int, lower_order_final="short") -> list[int]:
    """The order of each of n DPM-Solver++ steps: warming up from 1 (only as many earlier estimates as
    exist), and where `lower_order_final` applies, no more than the steps left, e.g. 1, 2, 3, ..., 3, 2, 1."""
    mode = _lower_order_final_mode(lower_order_final)
    lower_final = mode == "always" or (mode == "short" and n < 15)
    return [min(order, i + 1, n - i) if lower_final else min(order, i + 1) for i in range(n)]


def _dpmpp(model: Model, x, sigmas, order: int, lower_order_final, clip, return_trajectory) -> SolveResult:
    """DPM-Solver++ multistep (data prediction) in λ = −log σ, orders 1..3, each step's order from
    `dpmpp_orders`; a step to σ = 0 is always first order."""
    m, sigmas = _prepare(model, sigmas, x, clip)
    traj = [x] if return_trajectory else None
    n = len(sigmas) - 1
    orders = dpmpp_orders(n, order, lower_order_final)
    hist: list[tuple[torch.Tensor, torch.Tensor]] = []  # (x0 estimate, λ) of earlier steps, newest first
    for i in range(n):
        s, s_next = sigmas[i], sigmas[i + 1]
        x0 = m(x, s)
        lam = -s.log()
        step_order = orders[i]
        if s_next == 0:
            x = x0
        else:
            lam_next = -s_next.log()
            h = lam_next - lam
            phi1 = -torch.expm1(-h)  # 1 − e^{−h}
            x_new = _sig(s_next / s, x) * x + _sig(phi1, x) * x0
            if step_order >= 2:
                x0_1, lam_1 = hist[0]
                r0 = (lam - lam_1) / h
                d1_0 = (x0 - x0_1) / _sig(r0, x)
                if step_order == 2:
                    x_new = x_new + _sig(phi1 / 2, x) * d1_0  # midpoint form: ½(1 − e^{−h})·D1
                else:
                    x0_2, lam_2 = hist[1]
                    r1 = (lam_1 - lam_2) / h
                    d1_1 = (x0_1 - x0_2) / _sig(r1, x)
                    d1 = d1_0 + _sig(r0 / (r0 + r1), x) * (d1_0 - d1_1)
                    d2 = (d1_0 - d1_1) / _sig(r0 + r1, x)
                    phi2 = phi1 / h - 1  # (1 − e^{−h})/h − 1 = −φ₂ in DPM-Solver's sign convention
                    phi3 = phi2 / h + 0.5
                    x_new = x_new - _sig(phi2, x) * d1 + _sig(phi3, x) * d2
            x = x_new
        hist.insert(0, (x0, lam))
        del hist[2:]
        if traj is not None:
            traj.append(x)
    return SolveResult(x, m.nfe, traj)


def dpmpp2m(model: Model, x, sigmas, lower_order_final="short", clip=None, return_trajectory=False):
    return _dpmpp(model, x, sigmas, 2, lower_order_final, clip, return_trajectory)


def dpmpp3m(model: Model, x, sigmas, lower_order_final="short", clip=None, return_trajectory=False):
    return _dpmpp(model, x, sigmas, 3, lower_order_final, clip, return_trajectory)


_IPNDM_COEFFS = ((1.0,), (1.5, -0.5), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


def ipndm(model: Model, x, sigmas, max_order: int = 4, clip=None, return_trajectory=False) -> SolveResult:
    """Improved PNDM: Adams–Bashforth on the ODE direction with orders warming up to 4."""
    m, sigmas = _prepare(model, sigmas, x, clip)
    traj = [x] if return_trajectory else None
    ds: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        ds.insert(0, (x - m(x, s)) / _sig(s, x))
        del ds[max_order:]
        coeffs = _IPNDM_COEFFS[len(ds) - 1]
        d = sum(c * di for c, di in zip(coeffs, ds))
        x = x + _sig(s_next - s, x) * d
        if traj is not None:
            traj.append(x)
    return SolveResult(x, m.nfe, traj)


SOLVERS = {"euler": euler, "ddim": ddim, "ddpm": ddpm, "heun": heun,
           "dpmpp2m": dpmpp2m, "dpmpp3m": dpmpp3m, "ipndm": ipndm}
STOCHASTIC = {"ddpm"}


def get_solver(name: str):
    if name not in SOLVERS:
        raise FewstepError(f"sampler {name!r}: expected one of {', '.join(SOLVERS)}")
    return SOLVERS[name]


def steps_for_nfe(name: str, nfe: int, final_zero: bool) -> int:
    """Number of grid intervals that give a solver exactly `nfe` network evaluations (or the
    largest count not above it for Heun, whose NFE per step is 2)."""
    get_solver(name)
    if nfe < 1:
        raise FewstepError(f"nfe={nfe}: expected at least 1 network evaluation")
    if name == "heun":
        # each step costs 2 except a final step to σ = 0, which costs 1
        steps = (nfe + 1) // 2 if final_zero else nfe // 2
        if steps < 1:
            raise FewstepError(f"heun needs at least 2 network evaluations (use {option('nfe', 2)} or more)")
        return steps
    return nfe


def solve(name: str, model: Model, x, sigmas, generator=None, return_trajectory=False, **kw) -> SolveResult:
    fn = get_solver(name)
    if name in ("ddim", "ddpm"):
        kw["generator"] = generator
    elif kw.get("targets") is not None:
        raise FewstepError(f"sampler {name!r}: only DDIM steps to targets off its grid")
    return fn(model, x, sigmas, return_trajectory=return_trajectory, **kw)
