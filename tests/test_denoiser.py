"""The Denoiser wrapper: parameterizations, input scaling and time input, checked with oracle nets
that return the true ε / x0 / v / EDM F for inputs built from known x0 and ε."""
import math

import pytest
import torch
from torch import nn

from fewstep.denoiser import Denoiser
from fewstep.errors import FewstepError
from fewstep.nets import MLP
from fewstep.schedule import Schedule, index_subsequence

VP = Schedule.vp("linear", 1024)
EDM = Schedule.edm(0.002, 80.0, 0.5)


class Oracle(nn.Module):
    """Returns a preset output and records what the Denoiser fed it."""

    def __init__(self, out, features=None):
        super().__init__()
        self.out, self.features = out, features
        self.w = nn.Parameter(torch.zeros(()))  # so the wrapper has a device to report
        self.seen = {}

    def forward(self, x, t, step=None, class_labels=None, return_features=False):
        self.seen = {"x": x, "t": t, "step": step, "class_labels": class_labels}
        return (self.out, self.features) if return_features else self.out


def _problem(B=64, dim=3, sigmas=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(B, dim, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(B, dim, generator=g, dtype=torch.float64)
    if sigmas is None:
        sigmas = VP.sigmas[torch.randint(0, VP.T, (B,), generator=g)]
    return x0, eps, sigmas, x0 + sigmas[:, None] * eps


@pytest.mark.parametrize("param", ["eps", "x0", "v"])
def test_true_raw_output_gives_x0(param):
    x0, eps, sigma, x = _problem()
    ab = 1 / (1 + sigma**2)  # ᾱ of each sample's table step
    a, b = ab.sqrt()[:, None], (1 - ab).sqrt()[:, None]
    true = {"eps": eps, "x0": x0, "v": a * eps - b * x0}[param]  # v = sqrt(ᾱ)·ε − sqrt(1−ᾱ)·x0
    den = Denoiser(Oracle(true), VP, param)
    assert torch.allclose(den(x, sigma), x0, atol=1e-5, rtol=0)
    assert torch.allclose(den.eps(x, sigma), eps, atol=1e-5, rtol=0)
    assert torch.allclose(den.raw_to_x0(true, x, sigma), x0, atol=1e-5, rtol=0)


def test_vp_input_scaling_gives_the_net_x_vp():
    x0, eps, sigma, x = _problem()
    ab = VP.alpha_bar[VP.exact_index(sigma)]
    x_vp = ab.sqrt()[:, None] * x0 + (1 - ab).sqrt()[:, None] * eps
    net = Oracle(eps)
    Denoiser(net, VP, "eps")(x, sigma)
    assert torch.allclose(net.seen["x"], x_vp, atol=1e-6, rtol=0)


def test_edm_preconditioning():
    sd = 0.5
    sigma = torch.exp(torch.linspace(math.log(0.002), math.log(80.0), 64, dtype=torch.float64))
    x0, eps, _, x = _problem(sigmas=sigma)
    # EDM (Karras et al. 2022, Table 1)
    c_skip = (sd**2 / (sigma**2 + sd**2))[:, None]
    c_out = (sigma * sd / (sigma**2 + sd**2).sqrt())[:, None]
    c_in = (1 / (sigma**2 + sd**2).sqrt())[:, None]
    net = Oracle((x0 - c_skip * x) / c_out)
    den = Denoiser(net, EDM, "edm")
    assert torch.allclose(den(x, sigma), x0, atol=1e-5, rtol=0)
    assert torch.allclose(net.seen["x"], c_in * x, rtol=1e-6)
    assert torch.allclose(net.seen["t"], (sigma.log() / 4).float(), rtol=1e-6)


def test_time_input_is_the_table_index_and_interpolates_between():
    i = torch.tensor([0, 1, 17, 500, 1022, 1023])
    den = Denoiser(Oracle(None), VP, "eps")
    t = den.time_input(VP.sigmas[i])
    assert t.dtype == torch.float32 and torch.equal(t, i.float())
    mid = (VP.sigmas[17] * VP.sigmas[18]).sqrt()  # halfway in log σ
    assert den.time_input(mid.reshape(1)).item() == pytest.approx(17.5, abs=1e-4)
    quarter = torch.exp(0.75 * VP.sigmas[500].log() + 0.25 * VP.sigmas[501].log())
    assert den.time_input(quarter.reshape(1)).item() == pytest.approx(500.25, abs=1e-3)
    # the value the net receives is the same
    net = Oracle(torch.zeros(6, 2))
    Denoiser(net, VP, "eps")(torch.zeros(6, 2), VP.sigmas[i])
    assert torch.equal(net.seen["t"], i.float())


def test_exact_table_refuses_sigmas_off_the_table():
    phi = index_subsequence(1024, 10)
    student = Schedule.discrete(VP.alpha_bar[phi], timesteps=phi.double())
    net = Oracle(torch.zeros(4, 2))
    den = Denoiser(net, student, "eps", exact_table=True)
    den(torch.zeros(4, 2), student.sigmas[3])
    assert torch.equal(net.seen["t"], torch.full((4,), float(phi[3])))
    off = (student.sigmas[3] * student.sigmas[4]).sqrt()
    with pytest.raises(FewstepError, match="trained noise levels"):
        den(torch.zeros(4, 2), off)
    # the same table without exact_table interpolates instead
    Denoiser(net, student, "eps")(torch.zeros(4, 2), off)
    assert phi[3] < net.seen["t"][0] < phi[4]
    assert torch.equal(den.table_sigmas(), student.sigmas.flip(0))


def test_sigma_batch_broadcast_and_shape_errors():
    net = Oracle(torch.zeros(5, 1, 4, 4))
    den = Denoiser(net, VP, "eps")
    x = torch.ones(5, 1, 4, 4)
    out = den(x, VP.sigmas[10])  # one σ for the whole batch
    assert out.shape == x.shape
    assert torch.equal(net.seen["t"], torch.full((5,), 10.0))
    with pytest.raises(FewstepError, match="one per sample"):
        den(x, VP.sigmas[:3])
    assert den._bcast(torch.arange(5.0), x).shape == (5, 1, 1, 1)


def test_constructor_validation():
    with pytest.raises(FewstepError, match="expected one of"):
        Denoiser(Oracle(None), VP, "score")
    with pytest.raises(FewstepError, match="continuous schedule"):
        Denoiser(Oracle(None), VP, "edm")
    with pytest.raises(FewstepError, match="discrete VP table"):
        Denoiser(Oracle(None), EDM, "eps")
    with pytest.raises(FewstepError, match="no step table"):
        Denoiser(Oracle(None), EDM, "edm").table_sigmas()


def test_return_features_passes_the_nets_features_through():
    x0, eps, sigma, x = _problem(B=8)
    feats = torch.randn(8, 7)
    den = Denoiser(Oracle(eps, feats), VP, "eps")
    out, f = den(x, sigma, return_features=True)
    assert torch.allclose(out, x0, atol=1e-5) and f is feats
    raw, f2 = den.raw(x, sigma, return_features=True)
    assert raw is eps and f2 is feats


def test_with_step_binds_the_step_condition():
    torch.manual_seed(0)
    net = MLP(dim=2, hidden=32, depth=1).add_step_condition()
    with torch.no_grad():  # make every layer matter (the output layers start at zero)
        for p in net.parameters():
            p.normal_(0, 0.3)
    den = Denoiser(net, VP, "eps")
    assert den.has_step_condition
    x, s = torch.randn(6, 2), VP.sigmas[300]
    with pytest.raises(FewstepError, match="step-conditioned"):
        den.with_step(None)
    d3, d5 = den.with_step(3), den.with_step(5)
    assert torch.equal(d3(x, s), den(x, s, step=3))
    assert not torch.allclose(d3(x, s), d5(x, s))
    with pytest.raises(FewstepError, match="step count"):
        den(x, s)
    plain = Denoiser(MLP(dim=2, hidden=32, depth=1), VP, "eps")
    assert plain.with_step(None) is plain and plain.with_step(4) is plain
