"""Noise schedules, σ grids, nesting and SFDDM index subsequences."""
import json
import math

import pytest
import torch

from fewstep.errors import FewstepError
from fewstep.schedule import (GRID_KINDS, Schedule, alpha_bar_to_sigma, check_grid, check_nested, index_subsequence,
                              make_grid, nested_grids, sigma_to_alpha_bar, vp_table)

VP = Schedule.vp("linear", 1024)


@pytest.mark.parametrize("kind", ["linear", "cosine", "sigmoid"])
@pytest.mark.parametrize("T", [25, 1024])
def test_vp_table_strictly_decreasing_inside_unit_interval(kind, T):
    a = vp_table(kind, T)
    assert a.dtype == torch.float64 and a.shape == (T,)
    assert ((a > 0) & (a < 1)).all()
    assert (a[1:] < a[:-1]).all()
    s = Schedule.vp(kind, T).sigmas
    assert (s[1:] > s[:-1]).all(), "σ must increase with the table index"


def test_linear_table_matches_ddpm_betas_at_T1000():
    a = vp_table("linear", 1000)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    assert torch.allclose(a, torch.cumprod(1 - betas, 0), rtol=0, atol=1e-15)


def test_vp_table_rejects_bad_input():
    with pytest.raises(FewstepError, match="linear, cosine, sigmoid"):
        vp_table("quadratic", 100)
    with pytest.raises(FewstepError, match="at least 2"):
        vp_table("linear", 1)
    # DDPM's betas scaled to a short table would exceed 1 and make ᾱ negative
    with pytest.raises(FewstepError, match="T=10"):
        vp_table("linear", 10)
    assert ((vp_table("cosine", 10) > 0) & (vp_table("sigmoid", 10) > 0)).all()


def test_alpha_bar_sigma_round_trip():
    a = vp_table("cosine", 1024)
    s = alpha_bar_to_sigma(a)
    assert torch.allclose(sigma_to_alpha_bar(s), a, rtol=1e-12, atol=0)
    sig = torch.logspace(-3, 2, 50, dtype=torch.float64)
    assert torch.allclose(alpha_bar_to_sigma(sigma_to_alpha_bar(sig)), sig, rtol=1e-9)
    # σ-space and VP agree: x_vp = sqrt(ᾱ)·x0 + sqrt(1-ᾱ)·ε  ⇔  x = x_vp/sqrt(ᾱ) = x0 + σ·ε
    assert torch.allclose((1 - a).sqrt() / a.sqrt(), s, rtol=1e-12)


def test_discrete_schedule_validation():
    with pytest.raises(FewstepError, match="strictly decreasing"):
        Schedule.discrete(torch.tensor([0.5, 0.9]))
    with pytest.raises(FewstepError, match="between 0 and 1"):
        Schedule.discrete(torch.tensor([1.0, 0.5]))
    with pytest.raises(FewstepError, match="entries"):
        Schedule.discrete(torch.tensor([0.9, 0.5]), timesteps=torch.tensor([0.0]))
    with pytest.raises(FewstepError):
        Schedule.edm(1.0, 0.5)


# ---- grids -------------------------------------------------------------------------------------

def _grid_cases():
    cases = []
    for kind in ("polynomial", "logsnr", "uniform"):
        cases.append((kind, None, 0.002, 80.0))
    for kind in GRID_KINDS:
        cases.append((kind, VP, VP.sigma_min, VP.sigma_max))
    return cases


@pytest.mark.parametrize("kind,schedule,smin,smax", _grid_cases(),
                         ids=lambda v: v if isinstance(v, str) else ("vp" if isinstance(v, Schedule) else None))
@pytest.mark.parametrize("n", [2, 5, 18])
def test_grid_decreasing_with_exact_end_points(kind, schedule, smin, smax, n):
    g = make_grid(kind, n, smin, smax, schedule=schedule)
    assert g.dtype == torch.float64 and g.shape == (n,)
    assert (g[1:] < g[:-1]).all()
    assert g[0].item() == smax and g[-1].item() == smin
    check_grid(g)


def test_polynomial_grid_matches_edm_formula():
    n, rho, smin, smax = 7, 7.0, 0.002, 80.0
    g = make_grid("polynomial", n, smin, smax, rho)
    i = torch.arange(n, dtype=torch.float64)
    ref = (smax ** (1 / rho) + i / (n - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    assert torch.allclose(g, ref, rtol=1e-12)
    ls = make_grid("logsnr", n, smin, smax).log()
    assert torch.allclose(ls[1:] - ls[:-1], (ls[1] - ls[0]).expand(n - 1), rtol=1e-9)


def test_discrete_grid_lands_on_table_entries():
    g = make_grid("discrete", 11, VP.sigma_min, VP.sigma_max, schedule=VP)
    idx = VP.exact_index(g)
    assert torch.equal(VP.sigmas[idx], g)
    with pytest.raises(FewstepError, match="discrete"):
        make_grid("discrete", 5, 0.01, 10.0)  # no table to land on


def test_grid_errors():
    with pytest.raises(FewstepError, match="at least 2"):
        make_grid("polynomial", 1, 0.1, 1.0)
    with pytest.raises(FewstepError, match="sigma_min < sigma_max"):
        make_grid("polynomial", 5, 1.0, 0.1)
    with pytest.raises(FewstepError, match="expected one of"):
        make_grid("cubic", 5, 0.1, 1.0)
    with pytest.raises(FewstepError, match="decreasing"):
        check_grid(torch.tensor([1.0, 2.0, 0.0]))
    with pytest.raises(FewstepError, match="only the last may be 0"):
        check_grid(torch.tensor([2.0, 0.0, -1.0]))
    with pytest.raises(FewstepError, match="non-finite"):
        check_grid(torch.tensor([float("nan"), 1.0]))
    assert check_grid([5.0, 1.0, 0.0]).tolist() == [5.0, 1.0, 0.0]  # a final 0 is allowed


@pytest.mark.parametrize("kind,schedule", [("polynomial", None), ("logsnr", None), ("uniform", None),
                                           ("polynomial", VP), ("logsnr", VP), ("uniform", VP),
                                           ("discrete", VP)])
@pytest.mark.parametrize("n,m", [(3, 0), (4, 3), (6, 2)])
def test_nested_grids_student_is_every_m_plus_1th_teacher_point(kind, schedule, n, m):
    smin, smax = (VP.sigma_min, VP.sigma_max) if schedule is not None else (0.006, 80.0)
    student, teacher = nested_grids(kind, n, m, smin, smax, schedule=schedule)
    assert len(student) == n and len(teacher) == (n - 1) * (m + 1) + 1
    assert torch.equal(student, teacher[:: m + 1])
    assert check_nested(student, teacher) == list(range(0, len(teacher), m + 1))
    assert student[0].item() == smax and student[-1].item() == smin
    assert (teacher[1:] < teacher[:-1]).all()


def test_check_nested_refuses_a_student_point_missing_from_the_teacher():
    student, teacher = nested_grids("polynomial", 4, 3, 0.006, 80.0)
    broken = student.clone()
    broken[1] *= 1.001
    with pytest.raises(FewstepError, match="not a teacher timestamp"):
        check_nested(broken, teacher)
    # an independently built student grid of the same family is not nested in general
    with pytest.raises(FewstepError):
        check_nested(make_grid("polynomial", 4, 0.006, 80.0), make_grid("polynomial", 9, 0.006, 80.0))
    with pytest.raises(FewstepError, match="m=-1"):
        nested_grids("polynomial", 4, -1, 0.006, 80.0)


# ---- discrete tables: σ ↔ index ------------------------------------------------------------------

def test_sigma_to_index_exact_at_table_entries_and_monotone_between():
    idx = VP.sigma_to_index(VP.sigmas)
    assert torch.allclose(idx, torch.arange(VP.T, dtype=torch.float64), rtol=0, atol=1e-9)
    fine = torch.exp(torch.linspace(math.log(VP.sigma_min), math.log(VP.sigma_max), 5000, dtype=torch.float64))
    fi = VP.sigma_to_index(fine)
    assert (fi[1:] >= fi[:-1]).all()
    assert fi[0].item() == pytest.approx(0) and fi[-1].item() == pytest.approx(VP.T - 1)
    # halfway in log σ between entries 10 and 11 is index 10.5
    mid = (VP.sigmas[10] * VP.sigmas[11]).sqrt()
    assert VP.sigma_to_index(mid).item() == pytest.approx(10.5, abs=1e-9)
    # outside the table: clamped to its ends
    assert VP.sigma_to_index(torch.tensor([1e-6, 1e6])).tolist() == pytest.approx([0, VP.T - 1])


def test_exact_index_accepts_entries_and_refuses_between():
    i = torch.tensor([0, 5, 511, 1023])
    assert torch.equal(VP.exact_index(VP.sigmas[i]), i)
    between = (VP.sigmas[5] * VP.sigmas[6]).sqrt()
    with pytest.raises(FewstepError, match="not one of this model's 1024 trained noise levels"):
        VP.exact_index(between)
    with pytest.raises(FewstepError):
        VP.time_input(between, exact=True)


def test_time_input_uses_the_timesteps_table():
    phi = index_subsequence(1024, 8, "trailing")
    sub = Schedule.discrete(VP.alpha_bar[phi], timesteps=phi.double())
    assert torch.equal(sub.time_input(sub.sigmas, exact=True), phi.double())
    assert torch.allclose(sub.time_input(sub.sigmas), phi.double(), atol=1e-9)
    mid = (sub.sigmas[2] * sub.sigmas[3]).sqrt()
    assert sub.time_input(mid).item() == pytest.approx((phi[2] + phi[3]).item() / 2)


# ---- index subsequences (SFDDM) ------------------------------------------------------------------

@pytest.mark.parametrize("Tp", [10, 128])
def test_trailing_and_leading_follow_methods_md(Tp):
    T = 1024
    trailing = index_subsequence(T, Tp, "trailing").tolist()
    leading = index_subsequence(T, Tp, "leading").tolist()
    # Python's round() is half-to-even like torch.round; no ties occur for these sizes
    assert trailing == [round((s + 1) * T / Tp) - 1 for s in range(Tp)]
    assert leading == [math.floor(s * T / Tp) for s in range(Tp)]
    assert trailing[-1] == T - 1 and leading[0] == 0
    for phi in (trailing, leading):
        assert len(phi) == Tp and all(b > a for a, b in zip(phi, phi[1:]))


def test_trailing_at_10_of_1024_known_values():
    assert index_subsequence(1024, 10).tolist() == [101, 204, 306, 409, 511, 613, 716, 818, 921, 1023]
    assert index_subsequence(1024, 10, "leading").tolist() == [0, 102, 204, 307, 409, 512, 614, 716, 819, 921]


def test_explicit_index_lists():
    assert index_subsequence(100, None, [3, 50, 99]).tolist() == [3, 50, 99]
    assert index_subsequence(100, 3, "3,50,99").tolist() == [3, 50, 99]
    with pytest.raises(FewstepError, match="strictly increasing"):
        index_subsequence(100, None, [50, 3, 99])
    with pytest.raises(FewstepError, match="strictly increasing"):
        index_subsequence(100, None, [3, 50, 50])
    with pytest.raises(FewstepError, match=r"\[0, 99\]"):
        index_subsequence(100, None, [3, 50, 100])
    with pytest.raises(FewstepError, match=r"\[0, 99\]"):
        index_subsequence(100, None, [-1, 50])
    with pytest.raises(FewstepError, match="smaller than the teacher"):
        index_subsequence(4, None, [0, 1, 2, 3])
    assert index_subsequence(4, None, [0, 1, 2, 3], allow_full=True).tolist() == [0, 1, 2, 3]
    with pytest.raises(FewstepError, match="at least one"):
        index_subsequence(100, None, [])
    with pytest.raises(FewstepError, match="3 entries"):
        index_subsequence(100, 4, [3, 50, 99])
    with pytest.raises(FewstepError, match="comma-separated"):
        index_subsequence(100, 3, "middle")


@pytest.mark.parametrize("mode", ["trailing", "leading"])
def test_student_step_count_bounds(mode):
    with pytest.raises(FewstepError, match="steps=1024: expected"):
        index_subsequence(1024, 1024, mode)
    with pytest.raises(FewstepError, match="steps=0: expected"):
        index_subsequence(1024, 0, mode)
    with pytest.raises(FewstepError):
        index_subsequence(1024, None, mode)
    assert index_subsequence(1024, 1024, mode, allow_full=True).tolist() == list(range(1024))
    assert len(index_subsequence(1024, 1, mode)) == 1


# ---- serialization --------------------------------------------------------------------------------

def test_schedule_dict_round_trip_through_json():
    phi = index_subsequence(1024, 10)
    cases = [VP, Schedule.vp("cosine", 50), Schedule.discrete(VP.alpha_bar[phi], timesteps=phi.double()),
             Schedule.edm(0.002, 80.0, 0.5)]
    for sch in cases:
        back = Schedule.from_dict(json.loads(json.dumps(sch.to_dict())))
        assert back.kind == sch.kind and back.is_discrete == sch.is_discrete
        if sch.is_discrete:
            assert torch.equal(back.alpha_bar, sch.alpha_bar)
            assert torch.equal(back.timesteps, sch.timesteps)
            assert back.table_name == sch.table_name
        else:
            assert (back.sigma_min, back.sigma_max, back.sigma_data) == (sch.sigma_min, sch.sigma_max, sch.sigma_data)
    assert "timesteps" not in VP.to_dict()  # default 0..T-1 is implied
    with pytest.raises(FewstepError, match="unknown kind"):
        Schedule.from_dict({"kind": "weird"})


@pytest.mark.parametrize("family,cls", [("ddim", "DDIMScheduler"), ("ddim", "DDPMScheduler"),
                                        ("dpm", "DPMSolverMultistepScheduler")])
def test_scheduler_timesteps_are_diffusers_own(family, cls):
    """Every spacing, offset and step count a diffusers scheduler accepts gives its timesteps; the ones that
    would repeat or leave the table are refused instead."""
    diffusers = pytest.importorskip("diffusers")
    from fewstep.schedule import scheduler_timesteps
    checked = 0
    for T in (1000, 1024, 97):
        for n in (1, 2, 3, 7, 10, 25, 50, 96):
            for spacing in ("leading", "trailing", "linspace"):
                for offset in (0, 1):
                    ref = getattr(diffusers, cls)(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset)
                    ref.set_timesteps(n)
                    want = ref.timesteps.tolist()
                    if len(set(want)) == n and min(want) >= 0 and max(want) < T:
                        assert scheduler_timesteps(spacing, n, T, offset, family) == want, (T, n, spacing, offset)
                        checked += 1
                    else:
                        with pytest.raises(FewstepError, match="not .* distinct entries"):
                            scheduler_timesteps(spacing, n, T, offset, family)
    assert checked > 100
