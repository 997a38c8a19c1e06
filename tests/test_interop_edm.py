"""NVlabs/edm snapshots: read without running anything in them, rebuilt by fewstep's own networks,
equal to the same weights in fewstep's architecture, and distillable by every method.

The snapshots are written here in the layout EDM's training loop writes: a dict with 'ema' etc.,
where every persistent object reduces to torch_utils.persistence._reconstruct_persistent_obj(meta)
with meta = dict(type='class', version, module_src, class_name, state) and the state holding
_init_args, _init_kwargs and the module's __dict__ (torch containers pickle normally)."""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch

from fewstep.checkpoint import load_checkpoint, read_card
from fewstep.cli import main
from fewstep.errors import FewstepError
from fewstep.interop import edm_nets
from fewstep.interop.edm import import_edm_snapshot
from fewstep.interop.edm_pickle import load_snapshot

K = 10  # classes of the conditional models (the built-in digits have 10)


# ---- writing EDM-layout pickles ---------------------------------------------------------------------

def _reconstruct_persistent_obj(meta):
    """What EDM's own hook does first when a plain pickle.load meets a persistent object: run the
    stored module source. (Here only to show what fewstep's loader never does.)"""
    exec(meta["module_src"], {})  # noqa: S102
    return meta["class_name"]


_reconstruct_persistent_obj.__module__ = "torch_utils.persistence"


@contextlib.contextmanager
def edm_modules():
    """`torch_utils.persistence` as pickle must find it to write (and, plainly, to read) a snapshot."""
    pkg, mod = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")
    mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
    pkg.persistence = mod
    saved = {k: sys.modules.get(k) for k in ("torch_utils", "torch_utils.persistence")}
    sys.modules.update({"torch_utils": pkg, "torch_utils.persistence": mod})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


class Precond(torch.nn.Module):
    """An EDM preconditioner's pickled layout: its attributes and the network under `model`."""

    def __init__(self, edm_name, model, init_kwargs, **attrs):
        super().__init__()
        self.edm_name, self.model = edm_name, model
        self._init_args, self._init_kwargs = (), dict(init_kwargs)
        for k, v in attrs.items():
            setattr(self, k, v)


class Loss:
    """EDM's loss object (persistent, not a module)."""

    edm_name = "EDMLoss"

    def __init__(self):
        self.P_mean, self.P_std, self.sigma_data = -1.2, 1.2, 0.5
        self._init_args, self._init_kwargs = (), {}


EDM_SRC = "import numpy as np\nimport torch\nclass SongUNet(torch.nn.Module):\n    pass\n"


class EDMPickler(pickle.Pickler):
    def __init__(self, f, module_src=EDM_SRC, rename=None, extra_state=None):
        super().__init__(f, protocol=4)
        self.module_src, self.rename, self.extra_state = module_src, rename or {}, extra_state or {}

    def reducer_override(self, obj):
        persistent = type(obj).__module__ == edm_nets.__name__ or hasattr(obj, "edm_name")
        if not persistent or isinstance(obj, type):
            return NotImplemented
        name = getattr(obj, "edm_name", type(obj).__name__)
        state = {k: v for k, v in obj.__dict__.items() if k not in ("edm_name", "config", "step_cond")}
        state.setdefault("_init_args", ())
        state.setdefault("_init_kwargs", {})
        if name == "UNetBlock" and state["skip_scale"] != 1:
            state["skip_scale"] = np.sqrt(0.5)  # EDM keeps a numpy float here
        state.update(self.extra_state.get(name, {}))
        meta = dict(type="class", version=6, module_src=self.module_src, class_name=self.rename.get(name, name),
                    state=state)
        return _reconstruct_persistent_obj, (meta,)


def _randomise(net, seed):
    """Non-zero weights everywhere (EDM zero-initialises output layers, which would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("weight") and p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            else:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return net


SONG_DDPMPP = dict(model_channels=16, channel_mult=[1, 2], channel_mult_emb=2, num_blocks=1, attn_resolutions=[4],
                   dropout=0.0, embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
                   decoder_type="standard", resample_filter=[1, 1])
SONG_NCSNPP = dict(SONG_DDPMPP, embedding_type="fourier", channel_mult_noise=2, encoder_type="residual",
                   resample_filter=[1, 3, 3, 1])
SONG_SKIP = dict(SONG_DDPMPP, encoder_type="skip", decoder_type="skip")
ADM = dict(model_channels=32, channel_mult=[1, 2], channel_mult_emb=2, num_blocks=1, attn_resolutions=[4],
           dropout=0.0)

PRECONDS = {  # name: (constructor defaults EDM uses, attributes the object keeps)
    "EDMPrecond": dict(sigma_min=0, sigma_max=float("inf"), sigma_data=0.5),
    "VPPrecond": dict(beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5),
    "VEPrecond": dict(sigma_min=0.02, sigma_max=100),
}


def vp_sigma(t, beta_d=19.9, beta_min=0.1):
    return math.sqrt(math.expm1(0.5 * beta_d * t**2 + beta_min * t))


def build_edm(precond="EDMPrecond", model_type="SongUNet", label_dim=0, seed=0, resolution=8, channels=1,
              augment_dim=0, **model_kwargs):
    """(preconditioner object in EDM's layout, the same network built directly by fewstep)."""
    kwargs = model_kwargs or (SONG_DDPMPP if model_type == "SongUNet" else ADM)
    edm_kwargs = dict(img_resolution=resolution, in_channels=channels, out_channels=channels, label_dim=label_dim,
                      augment_dim=augment_dim, **kwargs)
    cls = getattr(edm_nets, model_type)
    torch.manual_seed(seed)
    net = cls(resolution=resolution, in_channels=channels, out_channels=channels, num_classes=label_dim,
              augment_dim=augment_dim, **kwargs)
    _randomise(net, seed)
    net._init_args, net._init_kwargs = (), edm_kwargs
    attrs = dict(img_resolution=resolution, img_channels=channels, label_dim=label_dim, use_fp16=False,
                 **PRECONDS[precond])
    if precond == "VPPrecond":
        attrs.update(sigma_min=vp_sigma(1e-5), sigma_max=vp_sigma(1.0))
    init = dict(img_resolution=resolution, img_channels=channels, label_dim=label_dim, model_type=model_type,
                augment_dim=augment_dim, **kwargs)
    return Precond(precond, net, init, **attrs), net


def write_snapshot(path, ema, **pickler_kw):
    data = dict(ema=ema, loss_fn=Loss(), augment_pipe=None,
                dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path="cifar10.zip"))
    with edm_modules(), open(path, "wb") as f:
        EDMPickler(f, **pickler_kw).dump(data)
    return path


def edm_reference(precond, net, x, sigma, labels=None, sigma_data=0.5):
    """EDM's preconditioning formulas, applied to the directly built network."""
    s = sigma.reshape(-1, 1, 1, 1)
    if precond == "EDMPrecond":
        c_skip, c_out = sigma_data**2 / (s**2 + sigma_data**2), s * sigma_data / (s**2 + sigma_data**2).sqrt()
        c_in, c_noise = 1 / (sigma_data**2 + s**2).sqrt(), sigma.log() / 4
    elif precond == "VPPrecond":
        bd, bm, M = 19.9, 0.1, 1000
        c_skip, c_out, c_in = 1.0, -s, 1 / (s**2 + 1).sqrt()
        c_noise = (M - 1) * ((bm**2 + 2 * bd * (1 + sigma**2).log()).sqrt() - bm) / bd
    else:
        c_skip, c_out, c_in, c_noise = 1.0, s, 1.0, (0.5 * sigma).log()
    return c_skip * x + c_out * net(c_in * x, c_noise, class_labels=labels)


# ---- import: equivalence, card, structure -----------------------------------------------------------

CASES = [("EDMPrecond", "SongUNet", K, SONG_DDPMPP), ("VPPrecond", "SongUNet", 0, SONG_SKIP),
         ("VEPrecond", "SongUNet", 0, SONG_NCSNPP), ("EDMPrecond", "DhariwalUNet", K, ADM)]


@pytest.mark.parametrize("precond,model_type,label_dim,kwargs", CASES,
                         ids=["edm-ddpmpp-cond", "vp-skip", "ve-ncsnpp", "edm-adm-cond"])
def test_import_equals_the_same_weights_in_fewsteps_architecture(tmp_path, precond, model_type, label_dim, kwargs):
    ema, net = build_edm(precond, model_type, label_dim, augment_dim=9 if precond == "EDMPrecond" else 0, **kwargs)
    pkl = write_snapshot(tmp_path / "network-snapshot-000000.pkl", ema)
    out = import_edm_snapshot(pkl, tmp_path / "ckpt")
    ck = load_checkpoint(out)
    # key for key, value for value
    ours, theirs = ck.denoiser.net.state_dict(), net.state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    # outputs: fewstep's Denoiser against EDM's formulas on the directly built network
    net.eval()
    g = torch.Generator().manual_seed(1)
    sigma = torch.tensor([0.002, 0.02, 0.3, 1.0, 5.0, 80.0])
    x = torch.randn((6, 1, 8, 8), generator=g) * (1 + sigma.reshape(-1, 1, 1, 1))
    labels = torch.arange(6) % K if label_dim else None
    with torch.no_grad():
        # the network takes class indices (fewstep's interface) and one-hot encodes them as EDM's samplers do
        want = edm_reference(precond, net, x, sigma, labels)
        got = ck.denoiser(x, sigma.double(), class_labels=labels)
    diff = float((got - want).abs().max())
    print(f"{precond}/{model_type}: max |D_import - D_edm| = {diff:.3g} (max |D| {float(want.abs().max()):.3g})")
    assert diff < 1e-4 * float(want.abs().max())
    card = read_card(out)
    src = card["source"]
    assert src["format"] == "edm-snapshot" and src["precond"] == precond and src["model_type"] == model_type
    assert len(src["sha256"]) == 64 and src["path"].endswith(pkl.name)
    assert src["init_kwargs"]["num_classes"] == label_dim and "resolution" in src["init_kwargs"]
    lo = {"EDMPrecond": 0.002, "VPPrecond": 0.002, "VEPrecond": 0.02}[precond]  # EDM's sampler: max(0.002, own)
    assert src["sigma_range"] == pytest.approx([lo, 80.0])
    assert card["net"]["type"] == {"SongUNet": "edm-songunet", "DhariwalUNet": "edm-dhariwalunet"}[model_type]


def test_edm_parameter_names(tmp_path):
    """Names as EDM's training/networks.py makes them (read off its constructors by hand)."""
    def keys(model_type, **kw):
        return set(build_edm("EDMPrecond", model_type, **kw)[1].state_dict())

    ddpm = keys("SongUNet", label_dim=K, augment_dim=9, **SONG_DDPMPP)
    for k in ("map_label.weight", "map_label.bias", "map_augment.weight", "map_layer0.weight", "map_layer1.bias",
              "enc.8x8_conv.weight", "enc.4x4_down.conv0.resample_filter", "enc.4x4_down.skip.weight",
              "enc.4x4_down.skip.resample_filter", "enc.4x4_block0.qkv.weight", "enc.4x4_block0.proj.bias",
              "enc.4x4_block0.norm2.weight", "dec.4x4_in0.qkv.weight", "dec.4x4_block1.qkv.weight",
              "dec.8x8_up.skip.weight", "dec.8x8_block1.skip.weight", "dec.8x8_aux_norm.weight",
              "dec.8x8_aux_conv.weight", "enc.8x8_block0.affine.weight"):
        assert k in ddpm, k
    assert "map_augment.bias" not in ddpm and "dec.4x4_block0.qkv.weight" not in ddpm  # attention: last block only
    assert "dec.4x4_in1.qkv.weight" not in ddpm and not any(k.startswith("map_noise") for k in ddpm)
    ncsn = keys("SongUNet", **SONG_NCSNPP)
    assert {"map_noise.freqs", "enc.4x4_aux_residual.weight", "enc.4x4_aux_residual.resample_filter"} <= ncsn
    assert tuple(build_edm("EDMPrecond", **SONG_NCSNPP)[1].map_layer0.weight.shape) == (32, 32)  # noise ch ×2
    skip = keys("SongUNet", **SONG_SKIP)
    assert {"enc.4x4_aux_skip.weight", "enc.4x4_aux_down.resample_filter", "dec.4x4_aux_conv.weight",
            "dec.8x8_aux_up.resample_filter"} <= skip
    adm = keys("DhariwalUNet", label_dim=K, **ADM)
    assert {"map_label.weight", "out_norm.weight", "out_conv.weight", "enc.4x4_down.skip.resample_filter",
            "enc.4x4_block0.qkv.weight", "dec.4x4_block1.qkv.weight", "dec.8x8_up.conv0.resample_filter"} <= adm
    assert "map_label.bias" not in adm and "enc.8x8_block0.qkv.weight" not in adm  # 32 channels: 0 heads of 64
    assert "enc.4x4_down.skip.weight" not in adm  # ADM's resampling skip has no projection
    assert tuple(build_edm("EDMPrecond", "DhariwalUNet", label_dim=K, **ADM)[1].enc["4x4_block0"].affine
                 .weight.shape) == (128, 64)  # scale and shift


def test_cli_import_info_and_conditional_sampling(tmp_path, capsys):
    pkl = write_snapshot(tmp_path / "edm.pkl", build_edm("EDMPrecond", label_dim=K)[0])
    out = tmp_path / "runs" / "edm"
    main(["import", str(pkl), "--out", str(out)])
    main(["info", str(out)])
    text = capsys.readouterr().out
    assert "edm-snapshot" in text and "EDMPrecond" in text and "edm-songunet" in text
    assert "sigma in [0.002, 80]" in text and read_card(out)["source"]["sha256"] in text
    with pytest.raises(SystemExit):
        main(["import", str(pkl), "--out", str(out)])
    assert "already holds a fewstep model" in capsys.readouterr().err
    png = tmp_path / "edm.png"
    main(["sample", str(out), "--nfe", "17", "--sampler", "heun", "--class", "3", "--n", "4", "--png", str(png)])
    assert png.is_file()
    ck = load_checkpoint(out)
    from fewstep.sampling import sample
    a, info = sample(ck, 3, seed=0, nfe=17, sampler="heun", class_label=3, progress=False, return_info=True)
    b = sample(ck, 3, seed=0, nfe=17, sampler="heun", class_label=4, progress=False)
    assert info["labels"] == [3, 3, 3] and (a - b).abs().max() > 1e-3, "the class does not reach the network"
    assert ck.card["sampler"]["name"] == "heun" and ck.card["sampler"]["nfe"] == 35  # EDM's 18 steps
    with pytest.raises(FewstepError, match="heun uses 2 evaluations per step"):
        sample(ck, 1, nfe=18, sampler="heun", class_label=3, progress=False)


def test_feature_layer_default_and_named(tmp_path):
    pkl = write_snapshot(tmp_path / "edm.pkl", build_edm("EDMPrecond", "DhariwalUNet", label_dim=K)[0])
    ck = load_checkpoint(import_edm_snapshot(pkl, tmp_path / "a"))
    assert ck.card["net"]["feature_layer"] == "dec.8x8_block1"
    x = torch.randn(2, 1, 8, 8)
    _, h = ck.denoiser.raw(x, 1.0, class_labels=torch.tensor([0, 1]), return_features=True)
    assert h.shape == (2, 32, 8, 8)
    ck2 = load_checkpoint(import_edm_snapshot(pkl, tmp_path / "b", feature_layer="enc.4x4_block0"))
    assert ck2.denoiser.raw(x, 1.0, class_labels=torch.tensor([0, 1]), return_features=True)[1].shape == (2, 64, 4, 4)
    with pytest.raises(FewstepError, match="feature layer 'dec.nope'"):
        import_edm_snapshot(pkl, tmp_path / "c", feature_layer="dec.nope")
    assert not (tmp_path / "c").exists()


# ---- refusals: nothing in the file runs ---------------------------------------------------------------

class RunsCommand:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


@pytest.mark.parametrize("how", ["os.system", "builtins.exec"])
def test_a_pickle_that_would_run_a_command_is_refused(tmp_path, how, capsys):
    marker = tmp_path / "ran"
    cmd = f"touch {marker}" if how == "os.system" else f"open({str(marker)!r}, 'w').close()"
    payload = RunsCommand(os.system if how == "os.system" else exec, cmd)
    ema = build_edm()[0]
    pkl = write_snapshot(tmp_path / "evil.pkl", ema, extra_state={"SongUNet": {"_init_args": (payload,)}})
    name = {"os.system": f"{os.system.__module__}.system", "builtins.exec": "builtins.exec"}[how]
    with pytest.raises(SystemExit):
        main(["import", str(pkl), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert f"refused to load '{name}'" in err and "nothing from the file was run" in err, err
    with pytest.raises(FewstepError, match=f"refused to load '{name}'"):
        load_snapshot(pkl)
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_embedded_module_source_is_never_run(tmp_path):
    marker = tmp_path / "ran"
    src = f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n" + EDM_SRC
    pkl = write_snapshot(tmp_path / "snap.pkl", build_edm("VEPrecond", **SONG_NCSNPP)[0], module_src=src)
    with edm_modules(), open(pkl, "rb") as f:
        pickle.load(f)  # a plain load runs the stored source (as EDM's persistence hook does)
    assert marker.exists()
    marker.unlink()
    snap = load_snapshot(pkl)
    assert snap["ema"].class_name == "VEPrecond" and snap["loss_fn"].class_name == "EDMLoss"
    card = load_checkpoint(import_edm_snapshot(pkl, tmp_path / "ok")).card
    assert not marker.exists()
    # the stored code is recorded by its hash, so a snapshot whose code was changed is told apart
    stored = card["source"]["stored_source_sha256"]
    assert stored["VEPrecond"] == hashlib.sha256(src.encode()).hexdigest() and set(stored) == {"VEPrecond", "SongUNet"}
    plain = write_snapshot(tmp_path / "plain.pkl", build_edm("VEPrecond", **SONG_NCSNPP)[0])
    other = load_checkpoint(import_edm_snapshot(plain, tmp_path / "plain")).card["source"]["stored_source_sha256"]
    assert other["VEPrecond"] != stored["VEPrecond"]


def test_a_pickle_cannot_modify_the_functions_it_may_call(tmp_path):
    import torch._utils
    before = torch._utils._rebuild_parameter.__defaults__
    # GLOBAL torch._utils._rebuild_parameter, then BUILD with slot state {'__defaults__': (1,)}
    evil = (b"\x80\x04ctorch._utils\n_rebuild_parameter\nN}\x8c\x0c__defaults__K\x01\x85s\x86b.")
    (tmp_path / "evil.pkl").write_bytes(evil)
    with pytest.raises(FewstepError, match="tries to modify torch._utils._rebuild_parameter"):
        load_snapshot(tmp_path / "evil.pkl")
    assert torch._utils._rebuild_parameter.__defaults__ == before


def test_classes_outside_the_allow_list_are_named(tmp_path):
    def refused(match, **kw):
        pkl = write_snapshot(tmp_path / "x.pkl", kw.pop("ema", None) or build_edm()[0], **kw)
        with pytest.raises(FewstepError, match=match):
            import_edm_snapshot(pkl, tmp_path / "out")
        assert not (tmp_path / "out").exists()

    refused(r"'torch\.nn\.modules\.linear\.Identity'", extra_state={"SongUNet": {"extra": torch.nn.Identity()}})
    refused(r"'numpy\.ndarray'|'numpy\.core\.multiarray\._reconstruct'|'numpy\._core\.multiarray\._reconstruct'",
            extra_state={"GroupNorm": {"table": np.zeros(3)}})
    refused("preconditioner 'MyPrecond' is not supported", rename={"EDMPrecond": "MyPrecond"})
    refused("iDDPMPrecond is not supported", rename={"EDMPrecond": "iDDPMPrecond"})
    refused("network 'MyUNet' is not supported", rename={"SongUNet": "MyUNet"})
    refused("is a 'FancyBlock', where EDM's architecture has a 'UNetBlock'", rename={"UNetBlock": "FancyBlock"})
    refused(r"num_heads is 4 in the snapshot", extra_state={"UNetBlock": {"num_heads": 4}})
    with open(tmp_path / "plain.pkl", "wb") as f:
        pickle.dump({"state_dict": {"w": 1}}, f)
    with pytest.raises(FewstepError, match="without an 'ema' entry"):
        import_edm_snapshot(tmp_path / "plain.pkl", tmp_path / "out")
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle")
    with pytest.raises(FewstepError, match="not a readable EDM network snapshot"):
        import_edm_snapshot(tmp_path / "junk.pkl", tmp_path / "out")


# ---- the methods on an imported EDM teacher ---------------------------------------------------------

@pytest.fixture(scope="module")
def edm_teacher(tmp_path_factory):
    """A class-conditional EDMPrecond DDPM++ teacher on 1×8×8 images (the digits' shape)."""
    d = tmp_path_factory.mktemp("edm-teacher")
    pkl = write_snapshot(d / "network-snapshot-000100.pkl", build_edm("EDMPrecond", label_dim=K)[0])
    return pkl, import_edm_snapshot(pkl, d / "ckpt")


TRAIN = ["--iters", "2", "--batch", "2", "--device", "cpu", "--no-progress", "--log-every", "1"]


def _samples(model, n=2, **kw):
    from fewstep.sampling import sample
    x = sample(load_checkpoint(model), n, seed=0, class_label=1, progress=False, **kw)
    assert x.shape == (n, 1, 8, 8) and torch.isfinite(x).all()
    return x


def test_sfd_sfdv_and_stage2_on_an_edm_teacher(edm_teacher, tmp_path, monkeypatch):
    from fewstep.sfd.config import SFDConfig
    from fewstep.sfd.method import SFD
    pkl, ckpt = edm_teacher
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))
    main(["distill", "sfd", "--teacher", str(pkl), "--nfe", "2", "--out", str(tmp_path / "sfd"), *TRAIN])
    card = read_card(tmp_path / "sfd")
    assert card["net"]["type"] == "edm-songunet" and card["method"]["name"] == "sfd"
    assert card["sampler"]["sigmas"][0] == 80.0 and card["sampler"]["sigmas"][-1] == pytest.approx(0.006)
    _samples(tmp_path / "sfd")
    # SFD-v: the step condition reaches the EDM network; the zero kind starts as its teacher
    teacher = load_checkpoint(ckpt)
    m = SFD(teacher, SFDConfig(nfe=[2, 3], step_condition="zero"))
    x, lab = torch.randn(3, 1, 8, 8), torch.tensor([0, 4, 9])
    with torch.no_grad():
        for n in (4, 5):
            assert torch.equal(m.student(x, 2.5, step=n, class_labels=lab), teacher.denoiser(x, 2.5, class_labels=lab))
        with torch.no_grad():
            m.student.net.step_cond.fc2.weight.normal_(0, 0.5)  # once trained, N changes the output
        assert not torch.equal(m.student(x, 2.5, step=4, class_labels=lab), m.student(x, 2.5, step=5, class_labels=lab))
    authors = SFD(teacher, SFDConfig(nfe=[2, 3]))  # the authors' kind: a per-block affine of N on each UNetBlock
    assert len(authors.student.net.step_cond.blocks) == sum(1 for _ in authors.student.net._step_block_layers())
    with torch.no_grad():
        assert not torch.equal(authors.student(x, 2.5, step=4, class_labels=lab),
                               authors.student(x, 2.5, step=5, class_labels=lab))
    main(["distill", "sfd", "--teacher", str(ckpt), "--nfe", "2,3", "--out", str(tmp_path / "sfdv"), *TRAIN])
    assert read_card(tmp_path / "sfdv")["net"]["step_condition"] == "authors"
    _samples(tmp_path / "sfdv", nfe=2)
    _samples(tmp_path / "sfdv", nfe=3)
    main(["distill", "sfd", "--teacher", str(tmp_path / "sfdv"), "--stage2", "--out", str(tmp_path / "s2"), *TRAIN])
    assert read_card(tmp_path / "s2")["sampler"]["nfe"] == 1
    _samples(tmp_path / "s2")


def test_sfdv_on_adm_starts_equal_to_the_teacher(tmp_path):
    from fewstep.sfd.config import SFDConfig
    from fewstep.sfd.method import SFD
    pkl = write_snapshot(tmp_path / "adm.pkl", build_edm("EDMPrecond", "DhariwalUNet", label_dim=K)[0])
    teacher = load_checkpoint(import_edm_snapshot(pkl, tmp_path / "ckpt"))
    m = SFD(teacher, SFDConfig(nfe=[2, 3], step_condition="zero"))
    x, lab = torch.randn(2, 1, 8, 8), torch.tensor([2, 7])
    with torch.no_grad():
        assert torch.equal(m.student(x, 0.7, step=4, class_labels=lab), teacher.denoiser(x, 0.7, class_labels=lab))


def test_tables_read_off_continuous_teachers_are_exact(tmp_path):
    for precond, kw in (("VPPrecond", SONG_DDPMPP), ("VEPrecond", SONG_NCSNPP), ("EDMPrecond", SONG_DDPMPP)):
        pkl = write_snapshot(tmp_path / f"{precond}.pkl", build_edm(precond, **kw)[0])
        den = load_checkpoint(import_edm_snapshot(pkl, tmp_path / precond)).denoiser
        tab, info = den.discrete_view()
        assert tab.schedule.T == 1000 and tab.net is den.net
        if precond == "VPPrecond":  # the VP-SDE's own 1000 steps: t_j = (j+1)/1000, time input 999·t_j
            t = torch.tensor([1e-3, 0.5, 1.0], dtype=torch.float64)
            assert torch.allclose(tab.schedule.sigmas[[0, 499, 999]], torch.tensor([vp_sigma(v) for v in t.tolist()],
                                                                                    dtype=torch.float64))
            assert torch.allclose(tab.schedule.timesteps[[0, 499, 999]], 999 * t)
        else:
            assert tab.schedule.sigma_min == pytest.approx(den.sigma_min) and tab.schedule.sigma_max == pytest.approx(80)
        sig = tab.schedule.sigmas[[0, 250, 999]]
        x = torch.randn(3, 1, 8, 8)
        with torch.no_grad():
            assert torch.allclose(tab(x, sig), den(x, sig), atol=1e-5, rtol=1e-5), precond
        assert info["table_name"] in tab.schedule.table_name
        # an SFDDM student copied from the teacher starts at exactly zero loss on the table
        from fewstep.sfddm.config import SFDDMConfig
        from fewstep.sfddm.method import SFDDM
        m = SFDDM(den, SFDDMConfig(steps=4, init="teacher"), {"kind": "image", "shape": [1, 8, 8]})
        assert m.student.param == den.param and m.card()["method"]["teacher_table"] == info
        loss, _ = m.losses(torch.rand(4, 1, 8, 8) * 2 - 1, torch.arange(4), torch.randn(4, 1, 8, 8))
        assert float(loss.detach()) == 0.0, precond


def test_sfddm_and_progressive_on_an_edm_teacher(edm_teacher, tmp_path):
    _, ckpt = edm_teacher
    main(["distill", "sfddm", "--teacher", str(ckpt), "--data", "digits", "--steps", "4", "--init", "teacher",
          "--out", str(tmp_path / "sfddm"), *TRAIN])
    card = read_card(tmp_path / "sfddm")
    assert card["net"]["type"] == "edm-songunet" and card["denoiser"]["param"] == "edm"
    assert card["method"]["teacher_table"]["table_name"] == "edm-rho7[1000]"
    assert card["method"]["phi"] == [249, 499, 749, 999]
    assert card["method"]["feature_layer"] == "dec.8x8_block1"
    assert card["denoiser"]["schedule"]["derived_from"] == "edm" and card["denoiser"]["exact_table"]
    _samples(tmp_path / "sfddm")
    main(["distill", "sfddm", "--teacher", str(ckpt), "--data", "digits", "--steps", "2", "--feature-layer",
          "enc.4x4_block0", "--out", str(tmp_path / "sfddm-f"), *TRAIN])
    assert read_card(tmp_path / "sfddm-f")["method"]["feature_layer"] == "enc.4x4_block0"
    _samples(tmp_path / "sfddm-f")
    with pytest.raises(SystemExit):
        main(["distill", "progressive", "--teacher", str(ckpt), "--data", "digits", "--steps", "2",
              "--out", str(tmp_path / "pd-x"), *TRAIN])
    main(["distill", "progressive", "--teacher", str(ckpt), "--data", "digits", "--start-steps", "8", "--steps", "4",
          "--out", str(tmp_path / "pd"), *TRAIN])
    card = read_card(tmp_path / "pd")
    assert card["net"]["type"] == "edm-songunet" and card["sampler"]["nfe"] == 4
    assert card["sampler"]["sigmas"][0] == 80.0
    _samples(tmp_path / "pd")


def test_edm_nets_runs_without_fewstep(monkeypatch):
    """An export copies edm_nets.py beside the weights: with only torch and numpy it builds the same
    networks and loads fewstep's weights key for key; an SFD-v step condition (either kind) arrives
    folded into the biases, so the copy computes what fewstep's network computes for that N."""
    import importlib.util
    from fewstep.nets import fold_step_condition
    for name in ("fewstep", "fewstep.errors", "fewstep.nets"):
        monkeypatch.setitem(sys.modules, name, None)  # `import fewstep...` now fails
    spec = importlib.util.spec_from_file_location("edm_nets_copy", edm_nets.__file__)
    alone = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(alone)
    assert alone.StepConditioned is not edm_nets.StepConditioned
    monkeypatch.undo()
    for cls, kw in (("SongUNet", SONG_NCSNPP), ("DhariwalUNet", ADM)):
        for kind in ("zero", "authors"):
            ours = getattr(edm_nets, cls)(resolution=8, in_channels=1, num_classes=K, step_condition=kind, **kw)
            _randomise(ours, 3)
            theirs = getattr(alone, cls)(resolution=8, in_channels=1, num_classes=K, **kw)
            theirs.load_state_dict(fold_step_condition(ours, 6).state_dict(), strict=True)
            x, t, lab = torch.randn(2, 1, 8, 8), torch.tensor([0.1, -0.7]), torch.tensor([1, 8])
            with torch.no_grad():
                a, fa = ours.eval()(x, t, step=6, class_labels=lab, return_features=True)
                b, fb = theirs.eval()(x, t, class_labels=lab, return_features=True)
                other = ours(x, t, step=4, class_labels=lab)
            scale = a.abs().max()
            assert (a - b).abs().max() <= 1e-5 * scale and (fa - fb).abs().max() <= 1e-5 * fa.abs().max(), (cls, kind)
            assert (other - a).abs().max() > 1e-3 * scale  # the condition matters: N = 4 is another function
