"""Noise schedules and time grids, all expressed in σ-space (x = x0 + σ·ε).

A discrete VP model is trained on a table ᾱ[0..T-1] (index 0 least noisy); it is seen in σ-space
through σ[i] = sqrt((1-ᾱ[i])/ᾱ[i]). A continuous (EDM) model takes any σ in [σ_min, σ_max].
Grids are decreasing 1-D float64 tensors of σ values; a grid may end in 0 (a final denoise).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from fewstep.errors import FewstepError, option
from fewstep.flow_grid import flow_shift

# families of σ grids between two noise levels (make_grid)
GRID_KINDS = ("polynomial", "logsnr", "uniform", "discrete")
# diffusers schedulers' timestep spacings (scheduler_timesteps): every point an entry of a table model's steps
SCHEDULER_SPACINGS = ("leading", "trailing", "linspace")
# where the last step of a scheduler-spaced grid lands: σ = 0, or the table's least noisy entry
# (diffusers' set_alpha_to_one=False for DDIM, final_sigmas_type="sigma_min" for DPM-Solver)
FINAL_SIGMAS = ("zero", "table-min")
# a continuous model's time input for σ and the parameters it needs (Schedule.continuous_time_input)
TIME_CODES = {"edm": (), "vp": ("beta_d", "beta_min", "M"), "ve": (), "flow": ("T", "shift")}


def alpha_bar_to_sigma(alpha_bar: torch.Tensor) -> torch.Tensor:
    return ((1 - alpha_bar) / alpha_bar).sqrt()


def sigma_to_alpha_bar(sigma: torch.Tensor) -> torch.Tensor:
    return 1 / (1 + sigma**2)


def vp_table(kind: str = "linear", T: int = 1024, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """ᾱ table (float64, length T) of a discrete VP schedule.

    `linear` scales DDPM's betas (1e-4..0.02 at T=1000) to T so the end points stay comparable;
    `cosine` is Nichol & Dhariwal's; `sigmoid` is Jabri et al.'s (start -3, end 3, tau 1).
    """
    if T < 2:
        raise FewstepError(f"schedule T={T}: expected at least 2 steps")
    if kind == "linear":
        scale = 1000.0 / T
        if beta_end * scale >= 1:  # the scaled betas would drive ᾱ to 0 or below
            raise FewstepError(f"linear schedule with T={T}: its scaled betas reach {beta_end * scale:g} >= 1; "
                               f"use T > {int(beta_end * 1000)} or the cosine schedule")
        betas = torch.linspace(beta_start * scale, beta_end * scale, T, dtype=torch.float64)
        return torch.cumprod(1 - betas, 0)
    if kind == "cosine":
        s = 0.008
        t = torch.linspace(0, 1, T + 1, dtype=torch.float64)
        f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        return torch.cumprod(1 - betas, 0)
    if kind == "sigmoid":
        start, end, tau = -3.0, 3.0, 1.0
        t = torch.linspace(0, 1, T + 1, dtype=torch.float64)
        v_start, v_end = torch.sigmoid(torch.tensor(start / tau)), torch.sigmoid(torch.tensor(end / tau))
        f = (-torch.sigmoid((t * (end - start) + start) / tau) + v_end) / (v_end - v_start)
        betas = (1 - f[1:] / f[:-1]).clamp(min=1e-8, max=0.999)
        return torch.cumprod(1 - betas, 0)
    raise FewstepError(f"schedule kind {kind!r}: expected one of linear, cosine, sigmoid")


@dataclass
class Schedule:
    """What a model knows about noise levels.

    kind="discrete": a VP table; `alpha_bar` holds ᾱ for each of the model's steps and `timesteps`
    the value the network takes as time input at each step (default 0..T-1; an SFDDM student
    initialised from its teacher uses the teacher's indices φ_s instead).
    kind="continuous": any σ in [sigma_min, sigma_max]; `sigma_data` for preconditioning;
    `time_code` names the network's time input for σ (see TIME_CODES) with its `time_params`.
    """

    kind: str
    alpha_bar: torch.Tensor | None = None
    timesteps: torch.Tensor | None = None
    sigma_min_: float | None = None
    sigma_max_: float | None = None
    sigma_data: float = 0.5
    table_name: str | None = None  # how the table was made (e.g. "linear"), for the model card
    time_code: str = "edm"
    time_params: dict | None = None
    # a discrete table read off a continuous model ("edm", "ve" or "vp", its time code): its timesteps
    # are that model's own time inputs and `sigma_data` its preconditioning (see continuous_table)
    derived_from: str | None = None

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def discrete(cls, alpha_bar: torch.Tensor, timesteps: torch.Tensor | None = None, table_name: str | None = None,
                 derived_from: str | None = None, sigma_data: float = 0.5):
        if derived_from is not None and derived_from not in TIME_CODES:
            raise FewstepError(f"table derived from {derived_from!r}: expected one of {', '.join(TIME_CODES)}")
        alpha_bar = torch.as_tensor(alpha_bar, dtype=torch.float64)
        if alpha_bar.ndim != 1 or len(alpha_bar) < 1:
            raise FewstepError(f"alpha_bar: expected a non-empty 1-D table, got shape {tuple(alpha_bar.shape)}")
        if not ((alpha_bar > 0) & (alpha_bar < 1)).all():
            raise FewstepError("alpha_bar: every entry must lie strictly between 0 and 1")
        if len(alpha_bar) > 1 and not (alpha_bar[1:] < alpha_bar[:-1]).all():
            raise FewstepError("alpha_bar: expected a strictly decreasing table (index 0 least noisy)")
        if timesteps is None:
            timesteps = torch.arange(len(alpha_bar), dtype=torch.float64)
        timesteps = torch.as_tensor(timesteps, dtype=torch.float64)
        if timesteps.shape != alpha_bar.shape:
            raise FewstepError(f"timesteps: expected {len(alpha_bar)} entries, got {len(timesteps)}")
        return cls(kind="discrete", alpha_bar=alpha_bar, timesteps=timesteps, table_name=table_name,
                   derived_from=derived_from, sigma_data=float(sigma_data))

    @classmethod
    def vp(cls, kind: str = "linear", T: int = 1024):
        return cls.discrete(vp_table(kind, T), table_name=kind)

    @classmethod
    def edm(cls, sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5):
        return cls.continuous(sigma_min, sigma_max, sigma_data)

    @classmethod
    def flow(cls, shift: float = 1.0, T: int = 1000):
        """A rectified-flow model trained on t ∈ (0, 1] (diffusers' FlowMatchEulerDiscreteScheduler with T
        training steps and a static `shift`): its noise levels run from the table's least noisy shifted step to
        its noisiest below t = 1; its time input is T·t (see continuous_time_input)."""
        if not shift > 0:
            raise FewstepError(f"flow shift {shift!r}: expected a positive number")
        if not isinstance(T, int) or T < 2:
            raise FewstepError(f"flow training steps T={T!r}: expected an integer >= 2")
        t_lo, t_hi = (flow_shift(torch.tensor([1 / T, (T - 1) / T], dtype=torch.float64), shift)).tolist()
        return cls.continuous(t_lo / (1 - t_lo), t_hi / (1 - t_hi), 1.0, "flow", {"T": T, "shift": shift})

    @classmethod
    def continuous(cls, sigma_min: float, sigma_max: float, sigma_data: float = 0.5, time_code: str = "edm",
                   time_params: dict | None = None):
        if not 0 < sigma_min < sigma_max:
            raise FewstepError(f"EDM sigma range: expected 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        if time_code not in TIME_CODES:
            raise FewstepError(f"time code {time_code!r}: expected one of {', '.join(TIME_CODES)}")
        params = {k: float(v) for k, v in (time_params or {}).items()}
        missing = [k for k in TIME_CODES[time_code] if k not in params]
        if missing or len(params) != len(TIME_CODES[time_code]):
            raise FewstepError(f"time code {time_code!r}: expected the parameters {list(TIME_CODES[time_code])}, "
                               f"got {sorted(params)}")
        return cls(kind="continuous", sigma_min_=float(sigma_min), sigma_max_=float(sigma_max),
                   sigma_data=float(sigma_data), time_code=time_code, time_params=params or None)

    # ---- properties ---------------------------------------------------------------------
    @property
    def is_discrete(self) -> bool:
        return self.kind == "discrete"

    @property
    def T(self) -> int:
        return len(self.alpha_bar) if self.is_discrete else 0

    @property
    def sigmas(self) -> torch.Tensor:
        """σ of each table step, increasing with the index (discrete only)."""
        return alpha_bar_to_sigma(self.alpha_bar)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0]) if self.is_discrete else self.sigma_min_

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1]) if self.is_discrete else self.sigma_max_

    # ---- index <-> sigma for discrete tables ---------------------------------------------
    def sigma_to_index(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional table index of σ, linear in log σ between entries (clamped to the table's range)."""
        log_table = self.sigmas.log()
        log_s = torch.as_tensor(sigma, dtype=torch.float64).clamp(min=1e-30).log()
        log_s = log_s.clamp(log_table[0], log_table[-1])
        hi = torch.searchsorted(log_table, log_s).clamp(1, len(log_table) - 1)
        lo = hi - 1
        w = (log_s - log_table[lo]) / (log_table[hi] - log_table[lo])
        return lo.to(torch.float64) + w

    def exact_index(self, sigma: torch.Tensor, rtol: float = 1e-4) -> torch.Tensor:
        """Integer table index of σ; raises if σ is not (within rtol) one of the table's entries."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
        table = self.sigmas
        idx = (sigma[:, None].log() - table[None].log()).abs().argmin(1)
        bad = ((table[idx] - sigma).abs() > rtol * sigma)
        if bad.any():
            s = float(sigma[bad][0])
            raise FewstepError(
                f"sigma={s:.6g} is not one of this model's {len(table)} trained noise levels; "
                "a model with an exact step table can only be evaluated on its own steps "
                "(sample it with its own grid, e.g. `fewstep sample CKPT` without --nfe/--grid)")
        return idx

    def time_input(self, sigma: torch.Tensor, exact: bool = False) -> torch.Tensor:
        """Value the network takes as time input for σ: the table's timestep (interpolated if not exact)."""
        if exact:
            return self.timesteps[self.exact_index(sigma)]
        idx = self.sigma_to_index(sigma)
        lo = idx.floor().long().clamp(0, self.T - 1)
        hi = (lo + 1).clamp(max=self.T - 1)
        w = idx - lo
        return self.timesteps[lo] * (1 - w) + self.timesteps[hi] * w

    def continuous_time_input(self, sigma: torch.Tensor) -> torch.Tensor:
        """A continuous model's time input for σ (float64): EDM's log(σ)/4, the VP-SDE's (M−1)·t(σ)
        with σ(t) = sqrt(exp(β_d·t²/2 + β_min·t) − 1), the VE-SDE's log(σ/2), or a flow's T·t with
        t = σ/(1 + σ); in σ's precision (float32 reproduces EDM's own numbers, as the Denoiser uses it; a flow's
        t is computed in float64, whose T·t rounds to the scheduler's float32 timestep)."""
        sigma = torch.as_tensor(sigma)
        if not sigma.is_floating_point():
            sigma = sigma.double()
        if self.time_code == "flow":
            return self.time_params["T"] * (sigma / (1 + sigma))
        if self.time_code == "vp":
            p = self.time_params
            t = ((p["beta_min"] ** 2 + 2 * p["beta_d"] * (1 + sigma**2).log()).sqrt() - p["beta_min"]) / p["beta_d"]
            return (p["M"] - 1) * t
        if self.time_code == "ve":
            return (sigma / 2).log()
        return sigma.log() / 4

    # ---- serialization --------------------------------------------------------------------
    def to_dict(self) -> dict:
        if self.is_discrete:
            d = {"kind": "discrete", "T": self.T, "table_name": self.table_name,
                 "alpha_bar": [float(a) for a in self.alpha_bar]}
            if not torch.equal(self.timesteps, torch.arange(self.T, dtype=torch.float64)):
                d["timesteps"] = [float(t) for t in self.timesteps]
            if self.derived_from is not None:
                d["derived_from"], d["sigma_data"] = self.derived_from, self.sigma_data
            return d
        d = {"kind": "continuous", "sigma_min": self.sigma_min_, "sigma_max": self.sigma_max_,
             "sigma_data": self.sigma_data}
        if self.time_code != "edm":  # cards without it are EDM's log(σ)/4
            d["time_code"], d["time_params"] = self.time_code, dict(self.time_params or {})
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Schedule":
        if d.get("kind") == "discrete":
            ts = d.get("timesteps")
            return cls.discrete(torch.tensor(d["alpha_bar"], dtype=torch.float64),
                                None if ts is None else torch.tensor(ts, dtype=torch.float64),
                                table_name=d.get("table_name"), derived_from=d.get("derived_from"),
                                sigma_data=d.get("sigma_data", 0.5))
        if d.get("kind") == "continuous":
            return cls.continuous(d["sigma_min"], d["sigma_max"], d.get("sigma_data", 0.5),
                                  d.get("time_code", "edm"), d.get("time_params"))
        raise FewstepError(f"schedule: unknown kind {d.get('kind')!r} (expected discrete or continuous)")


DERIVED_TABLE_STEPS = 1000  # steps of the σ table read off an EDM / VE model


def continuous_table(schedule: Schedule, T: int | None = None) -> tuple[Schedule, dict]:
    """A discrete table read off a continuous model, for the methods that need a teacher table
    (SFDDM), and how it was made (for the student's card).

    VP-SDE models (time code vp): the SDE's own discretisation into T = M steps (M as trained,
    normally 1000), t_j = (j+1)/T, ᾱ_j = exp(−β_d·t_j²/2 − β_min·t_j), time input (M−1)·t_j — DDPM's
    table in the continuous limit, evaluated exactly where the network was trained.
    EDM / VE models: T = 1000 σ's on EDM's ρ = 7 spacing over the model's σ range, ᾱ = 1/(1+σ²),
    time input the model's own code at each σ. Either way the table's denoiser equals the continuous
    one at every entry."""
    if schedule.is_discrete:
        raise FewstepError("continuous_table: the schedule is already a discrete table")
    code = schedule.time_code
    if code == "flow":
        raise FewstepError("a flow-matching teacher has no VP step table: its noisiest state is pure noise (t = 1, "
                           "σ = ∞), which a table of ᾱ > 0 cannot hold; SFDDM and progressive distillation need one, "
                           "SFD does not (fewstep distill sfd)")
    if code == "vp":
        p = schedule.time_params
        T = int(T or round(p["M"]))
        if T < 2:
            raise FewstepError(f"table steps {T}: expected at least 2")
        t = torch.arange(1, T + 1, dtype=torch.float64) / T
        alpha_bar = torch.exp(-(0.5 * p["beta_d"] * t**2 + p["beta_min"] * t))
        sigmas = alpha_bar_to_sigma(alpha_bar)
        rule = f"VP-SDE discretised: t_j = (j+1)/{T}, alpha_bar_j = exp(-beta_d*t^2/2 - beta_min*t), time input (M-1)*t_j"
        name = f"vp-sde[{T}]"
    else:
        T = int(T or DERIVED_TABLE_STEPS)
        if T < 2:
            raise FewstepError(f"table steps {T}: expected at least 2")
        sigmas = make_grid("polynomial", T, schedule.sigma_min, schedule.sigma_max, 7.0).flip(0)
        alpha_bar = 1 / (1 + sigmas**2)
        rule = (f"{T} sigmas on EDM's rho=7 spacing over [{schedule.sigma_min:g}, {schedule.sigma_max:g}], "
                "alpha_bar = 1/(1+sigma^2), time input the model's own code")
        name = f"{code}-rho7[{T}]"
    timesteps = schedule.continuous_time_input(sigmas)
    table = Schedule.discrete(alpha_bar, timesteps, table_name=name, derived_from=code, sigma_data=schedule.sigma_data)
    info = {"from": f"continuous ({code} time code)", "table_name": name, "T": T, "rule": rule,
            "sigma_min": float(table.sigma_min), "sigma_max": float(table.sigma_max)}
    return table, info


# ---- grids ------------------------------------------------------------------------------------

def check_grid(sigmas: torch.Tensor, name: str = "sigma grid") -> torch.Tensor:
    """A valid grid: 1-D, at least 2 points, strictly decreasing, positive except a final 0."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise FewstepError(f"{name}: expected a 1-D grid of at least 2 noise levels, got shape {tuple(sigmas.shape)}")
    if not torch.isfinite(sigmas).all():
        raise FewstepError(f"{name}: contains a non-finite value")
    if not (sigmas[1:] < sigmas[:-1]).all():
        raise FewstepError(f"{name}: expected strictly decreasing noise levels, got {[round(float(s), 5) for s in sigmas]}")
    if not (sigmas[:-1] > 0).all() or sigmas[-1] < 0:
        raise FewstepError(f"{name}: noise levels must be positive (only the last may be 0)")
    return sigmas


def _fractions(n: int) -> torch.Tensor:
    return torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)


def make_grid(kind: str, n: int, sigma_min: float, sigma_max: float, rho: float = 7.0,
              schedule: Schedule | None = None) -> torch.Tensor:
    """n decreasing noise levels from sigma_max to sigma_min in one grid family.

    polynomial: EDM's ρ-grid; logsnr: uniform in log σ (= uniform logSNR); uniform: uniform in σ
    for continuous models and uniform in the teacher's table index for discrete ones;
    discrete: uniform in the table index, rounded to table entries (the model's own steps).
    """
    if n < 2:
        raise FewstepError(f"grid size n={n}: expected at least 2 noise levels")
    if not 0 < sigma_min < sigma_max:
        raise FewstepError(f"grid range: expected 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    f = _fractions(n)
    if kind == "polynomial":
        a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
        g = (a + f * (b - a)) ** rho
    elif kind == "logsnr":
        g = torch.exp(math.log(sigma_max) + f * (math.log(sigma_min) - math.log(sigma_max)))
    elif kind in ("uniform", "discrete"):
        if schedule is not None and schedule.is_discrete:
            i_max = float(schedule.sigma_to_index(torch.tensor(sigma_max)))
            i_min = float(schedule.sigma_to_index(torch.tensor(sigma_min)))
            idx = i_max + f * (i_min - i_max)
            if kind == "discrete":
                idx = idx.round()
                if len(idx.unique()) != n:
                    raise FewstepError(f"discrete grid: {n} points do not fit in the table between the given sigmas")
                return schedule.sigmas[idx.long()]
            g = _index_to_sigma(schedule, idx)
            g[0], g[-1] = sigma_max, sigma_min  # exp(log σ) is not always σ to the last bit
            return g
        if kind == "discrete":
            raise FewstepError("grid 'discrete' needs a discrete (table) model; use polynomial, logsnr or uniform")
        g = sigma_max + f * (sigma_min - sigma_max)
    else:
        raise FewstepError(f"grid kind {kind!r}: expected one of {', '.join(GRID_KINDS)}")
    g[0], g[-1] = sigma_max, sigma_min  # exact end points despite the pow round trip
    return g


def scheduler_timesteps(spacing: str, n: int, T: int, steps_offset: int = 0, family: str = "ddim") -> list[int]:
    """The n table indices (noisiest first) a diffusers scheduler evaluates a T-step model at, with its
    `timestep_spacing` and `steps_offset`, exactly as its set_timesteps computes them. `family` "ddim" is
    DDIMScheduler's and DDPMScheduler's rule; "dpm" DPMSolverMultistepScheduler's, which spaces n + 1 points
    and drops the last (so its linspace grid for 10 steps on T = 1000 is 999, 899, ..., 100)."""
    if spacing not in SCHEDULER_SPACINGS:
        raise FewstepError(f"timestep spacing {spacing!r}: expected one of {', '.join(SCHEDULER_SPACINGS)}")
    if not 1 <= n <= T:
        raise FewstepError(f"{n} steps on a {T}-step table: expected 1 to {T}")
    if family not in ("ddim", "dpm"):
        raise FewstepError(f"scheduler family {family!r}: expected ddim or dpm")
    extra = 1 if family == "dpm" else 0  # DPM-Solver spaces one more point and drops the last
    # numpy, as the schedulers compute it: its arange accumulates the step, and rounding a point like
    # 811.5000000000001 differs from torch's value of the same expression
    if spacing == "linspace":
        t = np.linspace(0, T - 1, n + extra).round()[::-1]
    elif spacing == "leading":
        ratio = T // (n + extra)
        t = (np.arange(0, n + extra) * ratio).round()[::-1] + steps_offset
    else:
        t = np.round(np.arange(T, 0, -T / n)) - 1
    t = torch.from_numpy(t[:n].astype(np.int64))
    if (t < 0).any() or (t >= T).any() or len(t.unique()) != n:
        raise FewstepError(f"{spacing} spacing of {n} steps on a {T}-step table (steps_offset {steps_offset}) "
                           f"gives timesteps {t.tolist()}: not {n} distinct entries of the table")
    return t.tolist()


def scheduler_grid(schedule: Schedule, spacing: str, n: int, steps_offset: int = 0, final_sigma: str = "zero",
                   family: str = "ddim") -> tuple[torch.Tensor, list[int]]:
    """(σ grid of n + 1 points: the table's σ at the scheduler's timesteps, then where the last step lands;
    the timesteps). Every step of it costs one evaluation: the final point is a target, not a denoise."""
    if not schedule.is_discrete:
        raise FewstepError(f"grid {spacing!r} spaces a discrete model's table steps; this model is continuous "
                           "(use polynomial, logsnr or uniform)")
    if final_sigma not in FINAL_SIGMAS:
        raise FewstepError(f"final sigma {final_sigma!r}: expected one of {', '.join(FINAL_SIGMAS)}")
    t = scheduler_timesteps(spacing, n, schedule.T, steps_offset, family)
    # a grid ending on entry 0 cannot land there again: its last point is 0, and DDIM's targets
    # (ddim_targets) carry where DDIMScheduler's last step really lands
    on_table = final_sigma == "table-min" and t[-1] != 0
    last = schedule.sigmas[:1] if on_table else torch.zeros(1, dtype=torch.float64)
    return torch.cat([schedule.sigmas[torch.tensor(t)], last]), t


def ddim_targets(schedule: Schedule, timesteps: list[int], final: float) -> torch.Tensor | None:
    """DDIMScheduler steps from timestep t to t − T//n whatever the next timestep is; where that target
    differs from the next evaluation point (linspace and trailing spacings), the σ each step lands on, with
    `final` for targets below the table. None when every step lands on the next point."""
    step = schedule.T // len(timesteps)
    targets = [schedule.sigmas[t - step] if t - step >= 0 else torch.tensor(final, dtype=torch.float64)
               for t in timesteps]
    nxt = [schedule.sigmas[t] for t in timesteps[1:]] + [torch.tensor(final, dtype=torch.float64)]
    if all(float(a) == float(b) for a, b in zip(targets, nxt)):
        return None
    return torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in targets])


def _index_to_sigma(schedule: Schedule, idx: torch.Tensor) -> torch.Tensor:
    """Inverse of sigma_to_index: log-linear interpolation of the table at fractional indices."""
    log_table = schedule.sigmas.log()
    lo = idx.floor().long().clamp(0, schedule.T - 2)
    w = idx - lo
    return torch.exp(log_table[lo] * (1 - w) + log_table[lo + 1] * w)


def nested_grids(kind: str, n: int, m: int, sigma_min: float, sigma_max: float, rho: float = 7.0,
                 schedule: Schedule | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(student grid of n points, teacher grid with m points inserted between neighbours).

    Both come from the same family, so student[i] == teacher[i*(m+1)] exactly; asserted.
    """
    if m < 0:
        raise FewstepError(f"m={m}: expected m >= 0 teacher points per student interval")
    fine = make_grid(kind, (n - 1) * (m + 1) + 1, sigma_min, sigma_max, rho, schedule)
    coarse = fine[:: m + 1].clone()
    check_nested(coarse, fine)
    return coarse, fine


def check_nested(student: torch.Tensor, teacher: torch.Tensor) -> list[int]:
    """Positions in the teacher grid of every student timestamp; a clear error if one is missing."""
    positions = []
    for s in student.tolist():
        hits = (teacher - s).abs() <= 1e-9 * max(abs(s), 1e-12)
        if not hits.any():
            raise FewstepError(
                f"student timestamp sigma={s:.6g} is not a teacher timestamp: every student step must "
                "span whole teacher steps (build the teacher grid by refining the student grid)")
        positions.append(int(hits.nonzero()[0]))
    return positions


def index_subsequence(T: int, steps: int | None, mode: str | Sequence[int] = "trailing",
                      allow_full: bool = False) -> torch.Tensor:
    """Strictly increasing teacher indices φ_0 < … < φ_{T'-1} for a T'-step student of a T-step teacher.

    trailing: φ_s = round((s+1)·T/T') − 1 (the student's noisiest step is the teacher's noisiest);
    leading:  φ_s = floor(s·T/T') (φ_0 = 0); or an explicit list, validated.
    allow_full admits T' = T (φ = 0..T-1), the identity student used to check invariants.
    """
    limit = T if allow_full else T - 1
    if isinstance(mode, str) and mode not in ("trailing", "leading"):
        try:
            mode = [int(v) for v in mode.split(",") if v.strip()]
        except ValueError:
            raise FewstepError(f"{option('index', mode)}: expected 'trailing', 'leading' or a comma-separated "
                               "list of integers")
    if isinstance(mode, str):
        if steps is None or not 1 <= steps <= limit:
            raise FewstepError(f"{option('steps', steps)}: expected a student step count 1 <= T' < T = {T}")
        s = torch.arange(steps, dtype=torch.float64)
        if mode == "trailing":
            phi = torch.round((s + 1) * T / steps).long() - 1
        else:
            phi = torch.floor(s * T / steps).long()
        return phi
    phi = torch.as_tensor(list(mode), dtype=torch.long)
    if phi.ndim != 1 or len(phi) < 1:
        raise FewstepError(f"{option('index')}: expected at least one teacher index")
    if steps is not None and steps != len(phi):
        raise FewstepError(f"{option('index')} has {len(phi)} entries but T'={steps} steps were asked for")
    if len(phi) > limit:
        raise FewstepError(f"{option('index')}: T'={len(phi)} must be smaller than the teacher's T={T}")
    if (phi < 0).any() or (phi >= T).any():
        raise FewstepError(f"{option('index')}: every index must lie in [0, {T - 1}], got {phi.tolist()}")
    if len(phi) > 1 and not (phi[1:] > phi[:-1]).all():
        raise FewstepError(f"{option('index')}: expected strictly increasing, unique indices, got {phi.tolist()}")
    return phi
