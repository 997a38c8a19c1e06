"""What an adversarial user tries, each answered with exit status 2, one `fewstep: error:` line, no traceback
and nothing written (or, for data, a correct reading and a note): odd images, odd paths, a read-only or full
disk, archives that declare more than fits, deeply nested JSON, damaged state files, interrupts outside
training, runs that would take hours, and model folders that point outside themselves."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fewstep
from fewstep.checkpoint import STATE_NAME, WEIGHTS_NAME
from fewstep.cli import main
from fewstep.data import load_dataset
from fewstep.errors import FewstepError
from fewstep.metrics import evaluate_samples
from fewstep.models import builtin_models, load_model
from fewstep.sampling import sample
from fewstep.userdata import load_samples_file

TRAIN = ["train", "--data", "gmm8", "--channels", "32", "--iters", "4", "--batch", "16", "--no-progress"]


def run(argv) -> int:
    try:
        main([str(a) for a in argv])
    except SystemExit as e:
        return e.code
    return 0


def one_error_line(capsys) -> str:
    """The one error line, last on stderr (after any progress bar), and no traceback."""
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if "error" in line.lower() or "Traceback" in line]
    assert len(errors) == 1 and err[-1] == errors[0] and errors[0].startswith("fewstep: error: "), err
    return errors[0]


def process(argv, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FEWSTEP_NO_NETWORK": "1"}
    return subprocess.run([sys.executable, "-m", "fewstep", *map(str, argv)], capture_output=True, text=True,
                          env=env, timeout=300, **kw)


# ---- images ---------------------------------------------------------------------------------------

def test_sixteen_bit_grey_png_uses_its_whole_range(tmp_path):
    folder = tmp_path / "deep"
    folder.mkdir()
    ramp = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    Image.fromarray(ramp).save(folder / "a.png")
    x = load_dataset(str(folder)).x
    assert x.shape == (1, 1, 8, 8)
    expected = torch.from_numpy(ramp.astype(np.float32) / 65535 * 2 - 1).reshape(1, 1, 8, 8)
    torch.testing.assert_close(x, expected, atol=1e-6, rtol=0)  # not 99.8 % white, as a clip at 255 gave
    assert load_dataset(str(folder)).info["sixteen_bit"].startswith("1 image")


def test_transparency_is_composited_onto_black_and_said(tmp_path, capsys):
    folder = tmp_path / "alpha"
    folder.mkdir()
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 128  # red at half opacity
    Image.fromarray(rgba, "RGBA").save(folder / "a.png")
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    pal.save(folder / "b.png", transparency=1)  # every pixel the transparent colour
    ds = load_dataset(str(folder))
    assert "2 image(s) composited onto black" in ds.info["transparency"]
    assert "composited onto a black background" in capsys.readouterr().err
    red = ds.x[0, 0]
    assert torch.allclose(red, torch.full_like(red, 128 / 255 * 2 - 1), atol=1 / 127)
    assert torch.equal(ds.x[1], torch.full_like(ds.x[1], -1.0))  # fully transparent: black


@pytest.mark.parametrize("case", ["resolution 3", "resolution 5", "one-pixel images"])
def test_unusable_image_sizes_are_refused_before_anything_is_written(tmp_path, capsys, case):
    out = tmp_path / "run"
    if case == "one-pixel images":
        folder = tmp_path / "tiny"
        folder.mkdir()
        for i in range(3):
            Image.fromarray(np.full((1, 1), 40 * i, np.uint8)).save(folder / f"{i}.png")
        argv = ["train", "--data", folder, "--out", out, "--iters", "1", "--no-progress"]
    else:
        argv = ["train", "--data", "digits", "--resolution", case.split()[1], "--out", out, "--iters", "1",
                "--no-progress"]
    assert run(argv) == 2
    assert "U-Net resolution" in one_error_line(capsys)
    assert not out.exists()


# ---- paths and the file system ------------------------------------------------------------------------

def test_an_output_path_that_is_not_utf8_is_refused(tmp_path):
    bad = os.fsencode(tmp_path) + b"/run-\xff"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FEWSTEP_NO_NETWORK": "1"}
    p = subprocess.run([sys.executable.encode(), b"-m", b"fewstep", *[a.encode() for a in TRAIN], b"--out", bad],
                       capture_output=True, env=env, timeout=300)
    err = p.stderr.decode(errors="replace").strip().splitlines()
    assert p.returncode == 2 and len(err) == 1 and "is not valid UTF-8" in err[0], err
    assert os.listdir(tmp_path) == []


def test_an_output_path_under_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    for argv in ([*TRAIN, "--out", tmp_path / "file" / "run"],
                 ["sample", "gmm8-teacher", "--n", "8", "--out", tmp_path / "file" / "s.npz"],
                 ["sample", "gmm8-teacher", "--n", "8", "--png", tmp_path / "file" / "s.png"],
                 ["eval", tmp_path / "file", "--data", "gmm8", "--json", tmp_path / "file" / "m.json"]):
        assert run(argv) == 2  # refused as the command line is read, before any work
        assert f"{tmp_path / 'file'} is a file, not a folder" in one_error_line(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a CUDA device")
def test_a_device_the_machine_lacks_is_refused_before_anything_runs(tmp_path, capsys):
    for argv in (["sample", "gmm8-teacher", "--n", "2", "--device", "cuda"],
                 [*TRAIN, "--device", "cuda:1", "--out", tmp_path / "run"],
                 ["distill", "sfd", "--teacher", "gmm8-teacher", "--iters", "1", "--device", "cuda",
                  "--out", tmp_path / "sfd"]):
        assert run(argv) == 2
        assert "--device cuda" in one_error_line(capsys)
    if not torch.backends.mps.is_available():
        assert run(["sample", "gmm8-teacher", "--n", "2", "--device", "mps"]) == 2
        assert "--device mps: this machine or torch build has no MPS device" in one_error_line(capsys)
    with pytest.raises(FewstepError, match="^device='cuda': "):
        fewstep.sample("gmm8-teacher", 2, device="cuda", progress=False)
    assert os.listdir(tmp_path) == []


def test_samples_read_from_a_npy_are_an_array_of_their_own(tmp_path):
    # a .npy is mapped read-only; a tensor made on that map warns (and must never be written to)
    np.save(tmp_path / "s.npy", np.zeros((6, 2), np.float32))
    x = load_samples_file(tmp_path / "s.npy")
    assert x.shape == (6, 2) and x.numpy().flags.writeable


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert run([*TRAIN, "--out", ro / "run"]) == 2
        assert "Permission denied" in one_error_line(capsys)
        assert run(["sample", "gmm8-teacher", "--n", "8", "--out", ro / "s.npz"]) == 2
        assert "Permission denied" in one_error_line(capsys)
    finally:
        ro.chmod(0o755)


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path):
    """A file-size limit (as a full disk would) makes a checkpoint write fail: one line naming the file, and
    the checkpoint before it is intact, so --resume still works once there is room."""
    out = tmp_path / "run"
    first = process([*TRAIN, "--iters", "2", "--out", out])
    assert first.returncode == 0, first.stderr
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name in (WEIGHTS_NAME, STATE_NAME, "fewstep.json")}
    limit = min(len(before[WEIGHTS_NAME]), len(before[STATE_NAME])) // 2

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    grown = process([*TRAIN, "--iters", "4", "--out", out, "--resume"], preexec_fn=small_files)
    err = grown.stderr.strip().splitlines()
    assert grown.returncode == 2 and "Traceback" not in grown.stderr, grown.stderr
    assert err[-1].startswith("fewstep: error: could not write") and "earlier version" in err[-1], err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name in before} == before
    assert process([*TRAIN, "--iters", "4", "--out", out, "--resume"]).returncode == 0


# ---- declared sizes, nested JSON, damaged files ------------------------------------------------------------

def _bomb(path: Path, key: str):
    """An .npz whose member declares 64 GiB of float32 but holds a header only (what a zip of zeros looks like
    before it is inflated)."""
    with zipfile.ZipFile(path, "w") as z, z.open(f"{key}.npy", "w") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False,
                                                 "shape": (1 << 20, 1, 128, 128)})


@pytest.mark.parametrize("where", ["eval samples", "data"])
def test_an_archive_declaring_more_than_fits_is_refused_before_reading(tmp_path, capsys, where):
    bomb = tmp_path / "bomb.npz"
    _bomb(bomb, "samples" if where == "eval samples" else "x")
    argv = (["eval", bomb, "--data", "digits"] if where == "eval samples"
            else ["train", "--data", bomb, "--out", tmp_path / "run", "--iters", "1"])
    assert run(argv) == 2
    line = one_error_line(capsys)
    assert "declares shape (1048576, 1, 128, 128)" in line and "GiB" in line
    assert not (tmp_path / "run").exists()


def _deep(levels: int = 5000) -> str:
    return "[" * levels + "]" * levels


@pytest.mark.parametrize("which", ["card", "config", "metrics"])
def test_deeply_nested_json_is_an_error_not_a_crash(tmp_path, capsys, which):
    out = tmp_path / "run"
    assert run([*TRAIN, "--iters", "2", "--out", out, "--ckpt-every", "1"]) == 0
    target = {"card": out / "fewstep.json", "config": out / "config.json", "metrics": out / "metrics.jsonl"}[which]
    target.write_text(_deep() + ("\n" if which == "metrics" else ""))
    capsys.readouterr()
    if which == "card":
        for argv in (["info", out], ["sample", out, "--n", 4]):
            assert run(argv) == 2 and "nested too deeply" in one_error_line(capsys)
    else:  # the resumed run reads its config and metrics: a bad line is skipped, never fatal
        assert run([*TRAIN, "--iters", "3", "--out", out, "--resume"]) == 0


def test_a_damaged_feature_cache_entry_is_recomputed(tmp_path):
    x = load_dataset("digits").x[:64]
    first = evaluate_samples(x, "digits", cache_dir=tmp_path, metrics="fcd")
    (entry,) = tmp_path.glob("*.npz")
    entry.write_bytes(entry.read_bytes()[:100])  # cut short, as a kill during the write once left it
    again = evaluate_samples(x, "digits", cache_dir=tmp_path, metrics="fcd")
    assert again["fcd"] == first["fcd"] and not list(tmp_path.glob(".*.tmp"))


def test_a_classifier_folder_cannot_point_outside_itself(tmp_path, capsys):
    from fewstep.featnet import classifier_dir
    src = classifier_dir("digits", 8)
    clf = tmp_path / "clf"
    clf.mkdir()
    meta = json.loads((src / "classifier.json").read_text())
    (tmp_path / "weights.safetensors").write_bytes((src / meta["weights_file"]).read_bytes())
    meta["weights_file"] = "../weights.safetensors"
    (clf / "classifier.json").write_text(json.dumps(meta))
    np.savez(tmp_path / "s.npz", samples=np.zeros((8, 1, 8, 8), np.float32))
    assert run(["eval", tmp_path / "s.npz", "--data", "digits", "--classifier", clf]) == 2
    assert "outside its folder" in one_error_line(capsys)


# ---- interrupts and long runs outside training --------------------------------------------------------------

@pytest.mark.parametrize("command", ["sample", "eval"])
def test_ctrl_c_outside_training_prints_one_line(tmp_path, capsys, monkeypatch, command):
    """Ctrl-C in the middle of sampling or scoring: exit 130 and one line, not a KeyboardInterrupt traceback."""
    import fewstep.metrics
    import fewstep.solvers

    def interrupted(*args, **kw):
        raise KeyboardInterrupt

    np.savez(tmp_path / "s.npz", samples=np.zeros((8, 2), np.float32))
    if command == "sample":
        monkeypatch.setattr(fewstep.solvers, "dpmpp2m", interrupted)
        monkeypatch.setitem(fewstep.solvers.SOLVERS, "dpmpp2m", interrupted)
        argv = ["sample", "gmm8-teacher", "--n", "8", "--out", tmp_path / "new.npz"]
    else:
        monkeypatch.setattr(fewstep.metrics, "sliced_wasserstein", interrupted)
        argv = ["eval", tmp_path / "s.npz", "--data", "gmm8"]
    assert run(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "fewstep: interrupted" and not any("Traceback" in line for line in err)
    assert not (tmp_path / "new.npz").exists()


def test_a_run_projected_past_the_limit_asks_for_yes(capsys):
    ckpt = load_model("gmm8-teacher")
    with pytest.raises(FewstepError, match=r"n=5000: about .* hours .*give a larger max_seconds"):
        sample(ckpt, 5000, nfe=4, batch_size=500, progress=False, max_seconds=1e-6)
    assert len(sample(ckpt, 5000, nfe=4, batch_size=500, progress=False, max_seconds=3600)) == 5000
    assert len(sample(ckpt, 400, nfe=4, batch_size=500, progress=False, max_seconds=1e-6)) == 400  # one batch


def test_the_shipped_cards_name_no_machine_paths():
    for name, folder in builtin_models().items():
        command = json.loads((folder / "fewstep.json").read_text())["training"]["command"]
        assert " /" not in command, (name, command)
