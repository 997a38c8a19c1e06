"""SFDDM's student chain and the pieces of its loss: the student's table is the teacher's read at phi
(ᾱ'_s = ᾱ[φ_s]), the KL weight of the hidden term, the student network, the feature hook, and the per-step ε
error bins."""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from fewstep.checkpoint import read_card
from fewstep.denoiser import Denoiser
from fewstep.distill.step_table import check_teacher
from fewstep.errors import FewstepError, option
from fewstep.nets import FeatureTap, build_net, set_dropout
from fewstep.schedule import Schedule
from fewstep.sfddm.config import INITS

MAX_STEP_BINS = 16  # per-step ε errors: every step up to this T', equal bins of steps beyond


def student_chain(teacher_alpha_bar: torch.Tensor, phi: torch.Tensor) -> dict:
    """ᾱ', α', β' and the posterior variance β̃' of the student chain (float64, index 0 least noisy).

    ᾱ'_s = ᾱ[φ_s]; α'_0 = ᾱ'_0, α'_s = ᾱ'_s / ᾱ'_{s−1}; β' = 1 − α';
    β̃'_s = β'_s·(1 − ᾱ'_{s−1}) / (1 − ᾱ'_s) for s ≥ 1 and β̃'_0 = 0 (the last step has no noise).
    """
    ab = torch.as_tensor(teacher_alpha_bar, dtype=torch.float64)[phi.long()]
    prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    alpha = ab / prev
    beta = 1 - alpha
    beta_tilde = beta * (1 - prev) / (1 - ab)
    return {"alpha_bar": ab, "alpha": alpha, "beta": beta, "beta_tilde": beta_tilde}


def kl_weight(student_alpha_bar: torch.Tensor) -> torch.Tensor:
    """Per-step weight w_s of KL(teacher kernel ‖ student kernel) = w_s·‖ε_T − ε_S‖².

    Both reverse kernels are N(μ(x_s, ε), σ_s² I) with μ = (x_s − β'_s/sqrt(1−ᾱ'_s)·ε)/sqrt(α'_s), so
    w_s = β'_s² / (2·σ_s²·α'_s·(1 − ᾱ'_s)). σ_s² is the posterior variance β̃'_s for s ≥ 1; at
    s = 0 the posterior variance is 0 (infinite weight), so there we use DDPM's other choice
    σ_0² = β'_0, which gives w_0 = 1 / (2·ᾱ'_0).
    """
    ab = torch.as_tensor(student_alpha_bar, dtype=torch.float64)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    alpha = ab / prev
    beta = 1 - alpha
    var = beta * (1 - prev) / (1 - ab)
    var[0] = beta[0]
    return beta**2 / (2 * var * alpha * (1 - ab))


def make_student(teacher: Denoiser, phi: torch.Tensor, init: str = "random", seed: int = 0,
                 dropout: float | None = 0.0, table_name: str | None = None) -> Denoiser:
    """The student Denoiser: the teacher's architecture on the exact table ᾱ[φ].

    init='teacher' copies the teacher's weights and keeps the teacher's time input at φ_s (so the
    time embedding is reused); init='random' builds a fresh network (seeded) whose time input is
    its own index s, as in the authors' code. dropout: the student's rate (default 0, as the
    authors' network has none; None keeps the teacher's).
    """
    check_teacher(teacher)
    if init not in INITS:
        raise FewstepError(f"init {init!r}: expected one of {', '.join(INITS)}")
    phi = torch.as_tensor(phi, dtype=torch.long)
    if init == "teacher":
        net = copy.deepcopy(teacher.net)
        timesteps = teacher.schedule.timesteps[phi]
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = build_net(teacher.net.config)
        timesteps = torch.arange(len(phi), dtype=torch.float64)
    net = net.to(next(teacher.net.parameters()).device)
    for p in net.parameters():
        p.requires_grad_(True)
    if dropout is not None:
        set_dropout(net, dropout)
    name = table_name or f"{teacher.schedule.table_name or 'custom'}[phi]"
    schedule = Schedule.discrete(teacher.schedule.alpha_bar[phi], timesteps=timesteps, table_name=name,
                                 derived_from=teacher.schedule.derived_from, sigma_data=teacher.schedule.sigma_data)
    return Denoiser(net, schedule, teacher.param, exact_table=True).take_components(teacher)


def raw_and_features(den: Denoiser, x: torch.Tensor, sigma, class_labels=None,
                     layer: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The feature hook: (raw network output, hidden feature map) of a Denoiser at (x, σ).

    The features are the network's own choice (its penultimate map, or the `feature_layer` of a
    foreign network's config), or the output of the sub-module named `layer`."""
    if layer is not None:
        with FeatureTap(den.net, layer) as tap:
            raw = den.raw(x, sigma, class_labels=class_labels)
        return raw, tap.value
    out = den.raw(x, sigma, class_labels=class_labels, return_features=True)
    if not isinstance(out, tuple) or len(out) != 2:
        raise FewstepError("the network does not return its penultimate features (return_features=True)")
    return out


def raw_to_eps(den: Denoiser, raw: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    if den.param == "eps":
        return raw
    return (x - den.raw_to_x0(raw, x, sigma)) / den._bcast(sigma, x)


def student_grid(student: Denoiser) -> torch.Tensor:
    """The student's own sampling grid: its table σ's, noisiest first, then 0 (NFE = T')."""
    return torch.cat([student.table_sigmas(), torch.zeros(1, dtype=torch.float64)])


def step_bins(T_student: int) -> list[tuple[int, int]]:
    """Student steps grouped for the per-step ε error: each step alone up to MAX_STEP_BINS steps, else
    MAX_STEP_BINS equal runs of steps. Pairs (first, last) of student indices s (0 = least noisy)."""
    n = min(T_student, MAX_STEP_BINS)
    edges = [round(k * T_student / n) for k in range(n + 1)]
    return [(edges[k], edges[k + 1] - 1) for k in range(n)]


def check_resume_phi(out_dir, phi) -> None:
    """Refuse to resume a run whose saved student was made on another index set (e.g. one made when
    'leading' meant floor(s·T/T'), now 'spread')."""
    try:
        saved = (read_card(Path(out_dir)).get("method") or {}).get("phi")
    except FewstepError:
        return  # nothing saved yet
    now = [int(v) for v in phi]
    if saved is not None and [int(v) for v in saved] != now:
        raise FewstepError(f"{option('resume')}: the run in {out_dir} was made on phi={saved}, these settings give "
                           f"phi={now}. 'leading' now follows the authors' code (s*floor(T/T')); the earlier "
                           f"rule floor(s*T/T') is {option('index', 'spread')}, or pass the saved list as "
                           f"{option('index')}")
