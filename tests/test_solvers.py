"""Solvers against exact solutions (Gaussian data) and against diffusers' schedulers."""
import math

import pytest
import torch
from torch import nn

from fewstep.denoiser import Denoiser
from fewstep.errors import FewstepError
from fewstep.schedule import Schedule, make_grid
from fewstep.solvers import SOLVERS, afs_direction, dpmpp_orders, solve, steps_for_nfe

MU, S = 0.5, 0.3
SMAX, SMIN = 80.0, 0.05


def exact_denoiser(x, sigma):
    """D(x, σ) for x0 ~ N(MU, S²I)."""
    return (S**2 * x + sigma**2 * MU) / (S**2 + sigma**2)


def exact_solution(x_start, sigma_end):
    return MU + (x_start - MU) * math.sqrt((S**2 + sigma_end**2) / (S**2 + SMAX**2))


@pytest.fixture
def start():
    g = torch.Generator().manual_seed(0)
    return SMAX * torch.randn(512, 2, generator=g, dtype=torch.float64) + MU


def errors(name, start, steps=(8, 16, 32, 64)):
    out = []
    for n in steps:
        grid = make_grid("polynomial", n + 1, SMIN, SMAX)
        r = solve(name, exact_denoiser, start.clone(), grid)
        assert r.nfe == (2 * n if name == "heun" else n)
        out.append((r.x - exact_solution(start, SMIN)).abs().max().item())
    return out


@pytest.mark.parametrize("name,order", [("euler", 1), ("ddim", 1), ("heun", 2), ("dpmpp2m", 2),
                                        ("dpmpp3m", 2), ("ipndm", 2)])
def test_global_error_order_on_exact_gaussian(name, start, order):
    errs = errors(name, start)
    rates = [math.log2(errs[i] / errs[i + 1]) for i in range(len(errs) - 1)]
    # the asymptotic rate (last doubling) must reach the method's order, and errors must shrink
    assert rates[-1] > order - 0.25, (name, errs, rates)
    assert all(e1 < e0 for e0, e1 in zip(errs, errs[1:])), (name, errs)


def test_higher_order_solvers_beat_euler(start):
    e_euler, e_heun, e_3m = errors("euler", start)[-1], errors("heun", start)[-1], errors("dpmpp3m", start)[-1]
    assert e_heun < e_euler / 10 and e_3m < e_euler / 10


def test_ddim_eta0_equals_euler_in_sigma_space(start):
    grid = make_grid("logsnr", 11, SMIN, SMAX)
    a = solve("euler", exact_denoiser, start.clone(), grid).x
    b = solve("ddim", exact_denoiser, start.clone(), grid).x
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_trajectory_and_final_zero(start):
    grid = torch.cat([make_grid("polynomial", 6, SMIN, SMAX), torch.zeros(1, dtype=torch.float64)])
    for name in SOLVERS:
        r = solve(name, exact_denoiser, start.clone(), grid, return_trajectory=True,
                  generator=torch.Generator().manual_seed(0))
        assert len(r.trajectory) == len(grid)
        assert r.trajectory[0] is not None and torch.equal(r.trajectory[-1], r.x)
    # heun: 5 steps of 2 evaluations plus a final Euler denoise
    assert solve("heun", exact_denoiser, start.clone(), grid).nfe == 11
    assert steps_for_nfe("heun", 11, final_zero=True) == 6


def test_afs_direction_and_nfe(start):
    t0 = 80.0
    torch.testing.assert_close(afs_direction(start, t0), start / math.sqrt(1 + t0**2))
    grid = make_grid("polynomial", 5, SMIN, SMAX)
    assert solve("euler", exact_denoiser, start.clone(), grid, afs=True).nfe == 3
    assert solve("euler", exact_denoiser, start.clone(), grid, afs=False).nfe == 4


def test_ddpm_is_seeded_and_stochastic(start):
    grid = make_grid("polynomial", 6, SMIN, SMAX)
    a = solve("ddpm", exact_denoiser, start.clone(), grid, generator=torch.Generator().manual_seed(1)).x
    b = solve("ddpm", exact_denoiser, start.clone(), grid, generator=torch.Generator().manual_seed(1)).x
    c = solve("ddpm", exact_denoiser, start.clone(), grid, generator=torch.Generator().manual_seed(2)).x
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_dpmpp_final_orders(start):
    """The SFD authors' teacher lowers the last two steps to orders 2 and 1 on every grid; diffusers' rule only
    on grids of fewer than 15 steps. Below 15 the two are the same solver; at 16 steps only the last two differ."""
    assert dpmpp_orders(6, 3, "always") == dpmpp_orders(6, 3, "short") == [1, 2, 3, 3, 2, 1]
    assert dpmpp_orders(16, 3, "always") == [1, 2] + [3] * 12 + [2, 1]
    assert dpmpp_orders(16, 3, "short") == dpmpp_orders(16, 3, "never") == [1, 2] + [3] * 14
    assert dpmpp_orders(4, 2, "never") == [1, 2, 2, 2] and dpmpp_orders(4, 2, True) == [1, 2, 2, 1]
    for n, same in ((12, True), (16, False)):
        grid = make_grid("polynomial", n + 1, SMIN, SMAX)
        a = solve("dpmpp3m", exact_denoiser, start.clone(), grid, lower_order_final="always", return_trajectory=True)
        b = solve("dpmpp3m", exact_denoiser, start.clone(), grid, lower_order_final="short", return_trajectory=True)
        assert torch.equal(a.x, b.x) == same
        assert all(torch.equal(u, v) for u, v in zip(a.trajectory[:-2], b.trajectory[:-2]))  # the same until then
    with pytest.raises(FewstepError, match="lower_order_final"):
        dpmpp_orders(4, 3, "sometimes")


def test_bad_grids_and_names_are_refused(start):
    with pytest.raises(FewstepError, match="decreasing"):
        solve("euler", exact_denoiser, start, torch.tensor([1.0, 2.0]))
    with pytest.raises(FewstepError, match="sampler 'rk45'"):
        solve("rk45", exact_denoiser, start, torch.tensor([2.0, 1.0]))
    with pytest.raises(FewstepError, match="nfe=0"):
        steps_for_nfe("euler", 0, final_zero=False)


# ---- diffusers as a reference implementation ------------------------------------------------

class SmoothEps(nn.Module):
    """A fixed nonlinear ε-network of (x_vp, t) so solver differences are visible."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(4, 4, generator=g, dtype=torch.float64) * 0.5)

    def forward(self, x, t, step=None, class_labels=None, return_features=False):
        h = x.reshape(x.shape[0], -1) @ self.w
        return torch.tanh(h + (t[:, None].double() / 1000.0)).reshape(x.shape) + 0.5 * x


def _discrete_pair(ref):
    """Our denoiser on the reference scheduler's own (float32-computed) ᾱ table."""
    torch.testing.assert_close(ref.alphas_cumprod.double(), Schedule.vp("linear", 1000).alpha_bar, rtol=1e-6, atol=0)
    sched = Schedule.discrete(ref.alphas_cumprod.double())
    net = SmoothEps()
    return sched, Denoiser(net, sched, "eps"), net


@pytest.mark.parametrize("steps", [5, 10, 25])
def test_ddim_matches_diffusers(steps):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
                                  set_alpha_to_one=True, timestep_spacing="leading")
    ref.set_timesteps(steps)
    sched, den, net = _discrete_pair(ref)
    g = torch.Generator().manual_seed(0)
    x_vp = torch.randn(8, 1, 2, 2, generator=g, dtype=torch.float64)
    ab = sched.alpha_bar
    y = x_vp.clone()
    for t in ref.timesteps:
        eps = net(y, torch.full((8,), float(t), dtype=torch.float64))
        y = ref.step(eps, t, y, eta=0.0).prev_sample.double()
    ts = ref.timesteps.long()
    grid = torch.cat([sched.sigmas[ts], torch.zeros(1, dtype=torch.float64)])
    x = x_vp / ab[ts[0]].sqrt()
    ours = solve("ddim", den, x, grid).x  # final σ = 0: σ-space equals VP space
    torch.testing.assert_close(ours, y, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("order,steps", [(2, 6), (2, 20), (3, 8), (3, 20)])
def test_dpmpp_matches_diffusers(order, steps):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                                algorithm_type="dpmsolver++", solver_order=order,
                                                solver_type="midpoint", lower_order_final=True,
                                                final_sigmas_type="zero", timestep_spacing="linspace")
    ref.set_timesteps(steps)
    sched, den, net = _discrete_pair(ref)
    g = torch.Generator().manual_seed(0)
    x_vp = torch.randn(8, 1, 2, 2, generator=g, dtype=torch.float64)
    y = x_vp.clone()
    for t in ref.timesteps:
        eps = net(y, torch.full((8,), float(t), dtype=torch.float64))
        y = ref.step(eps, t, y).prev_sample.double()
    ts = ref.timesteps.long()
    grid = torch.cat([sched.sigmas[ts], torch.zeros(1, dtype=torch.float64)])
    x = x_vp / sched.alpha_bar[ts[0]].sqrt()
    ours = solve(f"dpmpp{order}m", den, x, grid).x
    torch.testing.assert_close(ours, y, rtol=1e-5, atol=1e-5)
