"""UNet and MLP: shapes, penultimate features, the SFD-v step condition, rebuilding from config."""
import json

import pytest
import torch

from fewstep.errors import FewstepError
from fewstep.nets import MLP, ResBlock, UNet, build_net, count_parameters


def _randomize(net, std=0.2, seed=0):
    """Random weights everywhere: the output layers start at zero, which would hide most bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return net


def _unet(**kw):
    cfg = dict(resolution=8, in_channels=1, channels=16, channel_mult=(1, 2), num_res_blocks=1,
               attn_resolutions=(), dropout=0.0)
    cfg.update(kw)
    return UNet(**cfg)


@pytest.mark.parametrize("kw", [dict(), dict(in_channels=3, channel_mult=(1, 2, 2), resolution=16, attn_resolutions=(8,)),
                                dict(num_res_blocks=2, channels=8, attn_resolutions=(4,))])
def test_unet_output_and_feature_shapes(kw):
    torch.manual_seed(0)
    net = _unet(**kw).eval()
    c, r = net.config["in_channels"], net.config["resolution"]
    x, t = torch.randn(3, c, r, r), torch.tensor([0.0, 10.0, 999.0])
    out = net(x, t)
    assert out.shape == x.shape
    out2, feats = net(x, t, return_features=True)
    assert torch.equal(out, out2)
    assert feats.shape == (3, net.config["channels"] * net.config["channel_mult"][0], r, r)


def test_unet_features_are_the_last_residual_block_output():
    torch.manual_seed(0)
    net = _randomize(_unet()).eval()
    last_res = [m for m in net.up.modules() if isinstance(m, ResBlock)][-1]
    captured = {}
    last_res.register_forward_hook(lambda m, i, o: captured.setdefault("h", o))
    x = torch.randn(2, 1, 8, 8)
    out, feats = net(x, torch.tensor([3.0, 400.0]), return_features=True)
    assert feats.shape[1] == 16  # base channels at the top level
    assert torch.equal(feats, captured["h"])
    # …and the output is computed from exactly these features
    assert torch.allclose(out, net.conv_out(torch.nn.functional.silu(net.norm_out(feats))), atol=1e-6)


def test_mlp_output_and_feature_shapes():
    net = MLP(dim=2, hidden=32, depth=3)
    x = torch.randn(5, 2)
    out, feats = net(x, torch.arange(5.0), return_features=True)
    assert out.shape == (5, 2) and feats.shape == (5, 32)
    assert MLP(dim=7, hidden=16, depth=1)(torch.randn(4, 7), 3.0).shape == (4, 7)  # scalar t broadcasts


def test_time_input_changes_the_output():
    net = _randomize(_unet()).eval()
    x = torch.randn(2, 1, 8, 8)
    assert not torch.allclose(net(x, torch.tensor([1.0, 1.0])), net(x, torch.tensor([500.0, 500.0])))


@pytest.mark.parametrize("make", [lambda: _unet(attn_resolutions=(4,)), lambda: MLP(dim=2, hidden=32, depth=2)],
                         ids=["unet", "mlp"])
def test_add_step_condition_leaves_outputs_bitwise_unchanged(make):
    torch.manual_seed(0)
    net = _randomize(make()).eval()
    shape = (3, 1, 8, 8) if net.config["type"] == "unet" else (3, 2)
    x, t = torch.randn(shape), torch.tensor([2.0, 50.0, 900.0])
    before, feats_before = net(x, t, return_features=True)
    n_before = count_parameters(net)
    net.add_step_condition()
    assert net.config["step_condition"] is True and count_parameters(net) > n_before
    for step in (2, 7):
        after, feats_after = net(x, t, step=torch.full((3,), step), return_features=True)
        assert torch.equal(before, after) and torch.equal(feats_before, feats_after)
    with pytest.raises(FewstepError, match="step count"):
        net(x, t)
    # once trained (non-zero output layer) the condition does change the output
    with torch.no_grad():
        net.step_cond.fc2.weight.normal_(0, 0.5)
    assert not torch.allclose(net(x, t, step=2), net(x, t, step=7))
    assert net.add_step_condition().step_cond is net.step_cond  # idempotent


@pytest.mark.parametrize("make", [
    lambda: _unet(attn_resolutions=(4,), num_classes=3, step_condition=True),
    lambda: _unet(channel_mult=(1, 2, 2), resolution=16, num_res_blocks=2),
    lambda: MLP(dim=2, hidden=32, depth=2, step_condition=True),
], ids=["unet-cond", "unet-3level", "mlp"])
def test_build_net_from_config_round_trip(make):
    torch.manual_seed(0)
    net = _randomize(make()).eval()
    cfg = json.loads(json.dumps(net.config))  # as stored in a model card
    twin = build_net(cfg).eval()
    twin.load_state_dict(net.state_dict())  # strict: same parameter names and shapes
    assert twin.config == net.config
    if net.config["type"] == "unet":
        r = net.config["resolution"]
        x = torch.randn(2, 1, r, r)
    else:
        x = torch.randn(2, 2)
    kw = {"step": torch.tensor([3, 4])} if net.config["step_condition"] else {}
    if net.config.get("num_classes"):
        kw["class_labels"] = torch.tensor([0, 2])
    t = torch.tensor([5.0, 700.0])
    assert torch.equal(net(x, t, **kw), twin(x, t, **kw))


def test_class_conditional_net_needs_labels():
    net = _unet(num_classes=4)
    with pytest.raises(FewstepError, match="class_labels"):
        net(torch.randn(1, 1, 8, 8), 1.0)


def test_build_net_rejects_bad_configs():
    with pytest.raises(FewstepError, match="network type"):
        build_net({"type": "transformer"})
    with pytest.raises(FewstepError, match="not valid"):
        build_net({"type": "mlp", "dim": 2, "widht": 3})


def test_bad_input_shapes_raise():
    unet = _unet()
    with pytest.raises(FewstepError, match=r"expected \(N, 1, H, W\)"):
        unet(torch.randn(2, 3, 8, 8), 1.0)
    with pytest.raises(FewstepError):
        unet(torch.randn(2, 64), 1.0)
    mlp = MLP(dim=2, hidden=16, depth=1)
    with pytest.raises(FewstepError, match=r"expected \(N, 2\)"):
        mlp(torch.randn(2, 3), 1.0)
    with pytest.raises(FewstepError):
        mlp(torch.randn(2, 1, 8, 8), 1.0)


def test_set_dropout_reaches_every_layer_and_the_config():
    from torch import nn

    from fewstep.denoiser import Denoiser
    from fewstep.nets import UNet, set_dropout
    from fewstep.schedule import Schedule

    den = Denoiser(UNet(resolution=8, channels=16, channel_mult=(1, 2), num_res_blocks=1, dropout=0.1),
                   Schedule.vp("linear", 64), "eps")
    set_dropout(den, 0.0)
    rates = [m.p for m in den.modules() if isinstance(m, nn.Dropout)]
    assert rates and all(p == 0.0 for p in rates)
    assert den.net.config["dropout"] == 0.0
