"""Checkpoint format: round trips, integrity checks, clear errors, atomic writes, no unpickling."""
import errno
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

import fewstep
from fewstep.checkpoint import (CARD_NAME, STATE_NAME, WEIGHTS_NAME, Checkpoint, atomic_write, load_checkpoint,
                                load_train_state, read_card, save_checkpoint, sha256_file, teacher_reference,
                                write_json)
from fewstep.denoiser import Denoiser
from fewstep.errors import FewstepError
from fewstep.models import builtin_models, load_model
from fewstep.nets import MLP
from fewstep.sampling import sample
from fewstep.schedule import Schedule

SECTIONS = ("method", "sampler", "teacher", "data", "training")


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_save_load_gives_identical_samples(tmp_path):
    torch.manual_seed(0)
    net = MLP(dim=2, hidden=32, depth=2)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    den = Denoiser(net, Schedule.vp("linear", 1024), "eps").eval()
    card = {"method": {"name": "teacher"}, "sampler": {"name": "dpmpp2m", "nfe": 12, "grid": "logsnr", "rho": 7.0,
                                                       "final_zero": True, "clip": None},
            "teacher": None, "data": {"name": "gmm8", "shape": [2]}}
    save_checkpoint(tmp_path / "ck", den, card)
    loaded = load_checkpoint(tmp_path / "ck")
    in_memory = Checkpoint(den, read_card(tmp_path / "ck"))
    a = sample(in_memory, 200, seed=11, progress=False)
    b = sample(loaded, 200, seed=11, progress=False)
    assert a.shape == (200, 2) and torch.equal(a, b)
    assert not torch.equal(b, sample(loaded, 200, seed=12, progress=False))
    # the loaded model is ready for inference and frozen
    assert not loaded.denoiser.training
    assert not any(p.requires_grad for p in loaded.denoiser.parameters())
    assert loaded.path == tmp_path / "ck"


@pytest.mark.parametrize("fixture", ["tiny_gmm8_teacher", "tiny_digits_teacher"])
def test_trained_teacher_round_trip(request, tmp_path, fixture):
    src = request.getfixturevalue(fixture)
    ck = load_checkpoint(src)
    card = ck.card
    assert card["format"] == "fewstep-checkpoint" and card["fewstep_version"] == fewstep.__version__
    assert card["denoiser"]["param"] == "eps" and card["denoiser"]["schedule"]["T"] == 1024
    assert card["weights_sha256"] == sha256_file(Path(src) / WEIGHTS_NAME)
    assert card["training"]["finished"] is True
    # save the loaded model again → same weights, same samples (discrete teacher, dpmpp2m)
    save_checkpoint(tmp_path / "again", ck.denoiser, {k: card[k] for k in SECTIONS if k in card})
    again = load_checkpoint(tmp_path / "again")
    assert again.card["net"] == card["net"] and again.card["denoiser"] == card["denoiser"]
    kw = dict(n=16, seed=3, nfe=6, sampler="dpmpp2m", progress=False)
    x1, x2 = sample(ck, **kw), sample(again, **kw)
    assert torch.isfinite(x1).all() and torch.equal(x1, x2)
    ref = teacher_reference(src)
    assert ref["sha256"] == card["weights_sha256"] and ref["path"] == str(src)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupted_weights_are_refused_by_hash(tiny_gmm8_teacher, tmp_path, damage):
    ck = _copy(tiny_gmm8_teacher, tmp_path / "ck")
    w = ck / WEIGHTS_NAME
    data = bytearray(w.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    w.write_bytes(bytes(data))
    with pytest.raises(FewstepError, match="hash"):
        load_checkpoint(ck)
    if damage == "truncate":  # without the hash check, the reader itself refuses
        with pytest.raises(FewstepError, match="not a readable safetensors"):
            load_checkpoint(ck, verify=False)


def test_weights_of_another_network_are_refused(tiny_gmm8_teacher, tmp_path):
    ck = _copy(tiny_gmm8_teacher, tmp_path / "ck")
    card = json.loads((ck / CARD_NAME).read_text())
    card["net"]["hidden"] = 32
    (ck / CARD_NAME).write_text(json.dumps(card))
    with pytest.raises(FewstepError, match="do not fit the network"):
        load_checkpoint(ck)
    card["net"]["hidden"], card["net"]["depth"] = 64, 3  # same widths, one block more
    (ck / CARD_NAME).write_text(json.dumps(card))
    with pytest.raises(FewstepError, match="missing"):
        load_checkpoint(ck)


def test_missing_foreign_and_invalid_checkpoints(tiny_gmm8_teacher, tmp_path):
    with pytest.raises(FewstepError, match="no such checkpoint directory"):
        load_model(tmp_path / "nope")  # a model argument: resolved by fewstep.models
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "model.safetensors").write_bytes(b"x")
    with pytest.raises(FewstepError, match="not a fewstep checkpoint"):
        load_checkpoint(foreign)
    a_file = tmp_path / "file.txt"
    a_file.write_text("hi")
    with pytest.raises(FewstepError, match="got a file"):
        load_model(a_file)

    ck = _copy(tiny_gmm8_teacher, tmp_path / "ck")
    (ck / CARD_NAME).write_text('{"format": "fewstep-checkpoint", ')
    with pytest.raises(FewstepError, match="not valid JSON"):
        load_checkpoint(ck)
    (ck / CARD_NAME).write_text(json.dumps({"hello": 1}))
    with pytest.raises(FewstepError, match="not a fewstep model card"):
        load_checkpoint(ck)
    (ck / CARD_NAME).write_text(json.dumps({"format": "fewstep-checkpoint", "format_version": 99}))
    with pytest.raises(FewstepError, match="newer fewstep"):
        load_checkpoint(ck)
    card = json.loads((Path(tiny_gmm8_teacher) / CARD_NAME).read_text())
    del card["denoiser"]["schedule"]
    card.pop("weights_sha256")
    (ck / CARD_NAME).write_text(json.dumps(card))
    with pytest.raises(FewstepError, match="'schedule'"):
        load_checkpoint(ck)
    shutil.copy(Path(tiny_gmm8_teacher) / CARD_NAME, ck / CARD_NAME)
    (ck / WEIGHTS_NAME).unlink()
    with pytest.raises(FewstepError, match="missing model.safetensors"):
        load_checkpoint(ck)


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "out.bin"

    def bad_writer(p):
        Path(p).write_bytes(b"half of the")
        raise RuntimeError("disk full")

    # a refused write is one clear error naming the file (torch.save reports one as RuntimeError)
    with pytest.raises(FewstepError, match=r"could not write .*out.bin \(disk full\)"):
        atomic_write(target, bad_writer)
    assert list(tmp_path.iterdir()) == []

    def no_space(p):
        Path(p).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(FewstepError, match=r"out.bin \(No space left on device\); its earlier version"):
        atomic_write(target, no_space)
    assert list(tmp_path.iterdir()) == []
    # an existing file survives a failed rewrite untouched
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, lambda p: (Path(p).write_bytes(b"new"), (_ for _ in ()).throw(KeyboardInterrupt()))[0])
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]
    atomic_write(target, lambda p: Path(p).write_bytes(b"new"))
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]
    write_json(tmp_path / "sub" / "a.json", {"k": [1, 2]})
    assert json.loads((tmp_path / "sub" / "a.json").read_text()) == {"k": [1, 2]}


class _Payload:
    """Unpickling this would run `open(marker, "w")`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_train_state_is_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"step": 3, "model": {}, "payload": _Payload(str(marker))}, tmp_path / STATE_NAME)
    with pytest.raises(FewstepError) as e:
        load_train_state(tmp_path)
    # one line, naming what it refused, with advice that works (never torch's "retry with weights_only=False")
    message = str(e.value)
    assert "it names io.open" in message and "cannot be resumed; train again in another folder for out" in message
    assert "weights_only" not in message and len(message.splitlines()) == 1
    assert not marker.exists()
    (tmp_path / STATE_NAME).write_bytes(b"\x00garbage, not a zip")
    with pytest.raises(FewstepError, match="cannot be read .*so this run cannot be resumed"):
        load_train_state(tmp_path)
    # plain tensors and containers load fine
    torch.save({"step": 3, "model": {"w": torch.ones(2)}, "betas": (0.9, 0.99)}, tmp_path / STATE_NAME)
    assert load_train_state(tmp_path)["step"] == 3


# the one module that may import pickle: the allow-list unpickler for NVlabs/edm snapshots
ALLOW_LIST_UNPICKLER = Path("interop") / "edm_pickle.py"


def test_no_source_file_unpickles():
    """Every torch.load in the package passes weights_only=True; nothing imports pickle except the
    allow-list unpickler, and nothing calls pickle.load(s), allows pickled numpy arrays, or evals code."""
    src = Path(fewstep.__file__).parent
    for path in src.rglob("*.py"):
        text = path.read_text()
        if path.relative_to(src) != ALLOW_LIST_UNPICKLER:
            assert not re.search(r"^\s*(import|from)\s+(c?pickle|dill|joblib)\b", text, re.M), path
        assert not re.search(r"\bpickle\.loads?\(|allow_pickle\s*=\s*True|(?<![\w.])(eval|exec)\(", text), path
        for call in re.finditer(r"torch\.load\(", text):
            end = text.find(")", call.end())
            depth, i = 1, call.end()
            while depth and i < len(text):  # the whole call, nested parentheses included
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
            assert "weights_only=True" in text[call.start():i], f"{path}: {text[call.start():end + 1]}"


def test_a_pickle_inside_an_npz_is_refused_and_never_runs(tmp_path, capsys):
    """Samples (`fewstep eval`) and data (`--data x.npz`) files with an object array: refused, no side effect."""
    import numpy as np

    from fewstep.cli import main

    marker = tmp_path / "pwned"
    bad = tmp_path / "bad.npz"
    np.savez(bad, samples=np.array([_Payload(str(marker))], dtype=object))
    for argv in (["eval", str(bad), "--data", "gmm8"],
                 ["train", "--data", str(bad), "--iters", "1", "--out", str(tmp_path / "run")]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "bad.npz" in err[0], err
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_builtin_models_are_checkpoint_dirs():
    for name, path in builtin_models().items():
        assert (path / CARD_NAME).is_file() and (path / WEIGHTS_NAME).is_file(), name


def test_teacher_reference_is_absolute_whatever_the_path_given(tmp_path, monkeypatch):
    """Every method records its teacher one way: the absolute path, also when named relative to the cwd."""
    from fewstep.checkpoint import teacher_reference
    from fewstep.models import resolve_model
    teacher = resolve_model("gmm8-teacher")
    monkeypatch.chdir(teacher.parent)
    ref = teacher_reference(Path(teacher.name))
    assert ref["path"] == str(teacher.resolve()) and Path(ref["path"]).is_absolute() and ref["name"] == teacher.name
