"""The core CLI end to end (train → sample → info → eval) and its error contract: a user mistake
exits with status 2 and one `fewstep: error:` line, never a traceback."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import fewstep
from fewstep.cli import main
from fewstep.errors import FewstepError


def run(argv):
    """cli.main in-process; returns the exit status (0 when it returns normally)."""
    try:
        main([str(a) for a in argv])
    except SystemExit as e:
        return e.code
    return 0


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "teacher"
    assert run(["train", "--data", "gmm8", "--iters", 30, "--batch", 64, "--channels", 32, "--out", out,
                "--log-every", 10, "--ckpt-every", 0, "--no-progress"]) == 0
    return out


def test_train_writes_a_complete_run(trained):
    names = {p.name for p in trained.iterdir()}
    assert {"model.safetensors", "fewstep.json", "train_state.pt", "metrics.jsonl", "config.json"} <= names
    assert any(n.startswith("samples-") and n.endswith(".png") for n in names)
    card = json.loads((trained / "fewstep.json").read_text())
    assert card["training"]["iterations"] == 30 and card["training"]["finished"] is True
    assert card["data"]["name"] == "gmm8" and card["net"]["hidden"] == 32
    # the card records the command that made it (the argv given to main, not the test runner's)
    assert card["training"]["command"].startswith("fewstep train --data gmm8 --iters 30")
    recs = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [10, 20, 30]


def test_sample_info_eval(trained, tmp_path, capsys):
    s1, s2, png = tmp_path / "s.npz", tmp_path / "s2.npz", tmp_path / "s.png"
    assert run(["sample", trained, "--n", 300, "--nfe", 8, "--seed", 4, "--out", s1, "--png", png]) == 0
    out = capsys.readouterr().out
    assert "NFE 8" in out and "dpmpp2m" in out
    with np.load(s1) as f:
        x = f["samples"]
        info = json.loads(str(f["info"]))
    assert x.shape == (300, 2) and x.dtype == np.float32 and np.isfinite(x).all()
    assert info["nfe"] == 8 and info["seed"] == 4
    with Image.open(png) as im:
        assert im.size[0] > 50
    assert run(["sample", trained, "--n", 300, "--nfe", 8, "--seed", 4, "--out", s2]) == 0
    with np.load(s2) as f:
        assert np.array_equal(f["samples"], x)  # same seed, same samples

    capsys.readouterr()
    assert run(["info", trained]) == 0
    text = capsys.readouterr().out
    assert "teacher" in text and "T=1024" in text and "eps-prediction" in text and "dpmpp2m NFE 50" in text
    assert run(["info", trained, "--json"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["format"] == "fewstep-checkpoint" and card["training"]["iterations"] == 30

    mj = tmp_path / "m.json"
    assert run(["eval", s1, "--data", "gmm8", "--json", mj]) == 0
    assert "swd" in capsys.readouterr().out
    m = json.loads(mj.read_text())
    assert m["n"] == 300 and m["swd"] >= 0 and np.isfinite(m["mmd"])


def test_resume_through_the_cli(trained, tmp_path):
    import shutil
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    assert run(["train", "--data", "gmm8", "--iters", 35, "--batch", 64, "--channels", 32, "--out", run_dir,
                "--ckpt-every", 0, "--no-progress", "--resume"]) == 0
    assert json.loads((run_dir / "fewstep.json").read_text())["training"]["iterations"] == 35


def test_old_steps_spelling_of_iterations_still_works_with_a_note(tmp_path, capsys):
    assert run(["train", "--data", "gmm8", "--steps", 2, "--batch", 16, "--channels", 16, "--out", tmp_path / "r",
                "--no-progress"]) == 0
    assert "--steps is deprecated here, use --iters" in capsys.readouterr().err
    assert json.loads((tmp_path / "r" / "fewstep.json").read_text())["training"]["iterations"] == 2


def test_resume_with_changed_settings_names_every_difference(trained, tmp_path, capsys):
    import shutil
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}
    capsys.readouterr()
    assert run(["train", "--data", "gmm8", "--iters", 40, "--batch", 32, "--channels", 32, "--lr", 1e-3,
                "--out", run_dir, "--no-progress", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "batch: now 32, was 64" in err and "lr: now 0.001, was 0.0002" in err, err
    assert "--lr:" not in err and "--batch:" not in err  # each setting named once, not again as its flag
    assert len(err.strip().splitlines()) == 1
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == before  # nothing touched
    # another method's run in the folder: refused as that, not as a list of differing settings
    assert run(["distill", "sfd", "--teacher", trained, "--iters", 2, "--out", run_dir, "--no-progress",
                "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fewstep: error: --resume: {run_dir} holds a teacher's training run, not an SFD distillation; "
                   "choose another folder for --out"], err
    with pytest.raises(FewstepError, match="holds a teacher's training run, not an SFDDM distillation; choose "
                                           "another folder for out"):
        fewstep.distill_sfddm(trained, "gmm8", run_dir, steps=4, iters=2, resume=True, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == before


def _error_cases(trained, tmp):
    samples = tmp / "ok.npz"
    np.savez(samples, samples=np.zeros((10, 2), np.float32))
    (tmp / "empty").mkdir()
    (tmp / "notes.txt").write_text("not samples")
    return {
        "missing model": ["sample", tmp / "no-such-model"],
        "nfe 0": ["sample", trained, "--nfe", 0],
        "heun odd nfe": ["sample", trained, "--sampler", "heun", "--nfe", 4],
        "unknown sampler": ["sample", trained, "--sampler", "rk45"],
        "unknown grid": ["sample", trained, "--grid", "cubic"],
        "not a checkpoint": ["info", tmp / "empty"],
        "bad data path": ["train", "--data", tmp / "nope" / "data.npz", "--out", tmp / "r1", "--iters", 1],
        "unknown data set": ["train", "--data", "nosuchset", "--out", tmp / "r2", "--iters", 1],
        "T too small": ["train", "--data", "gmm8", "--T", 10, "--out", tmp / "r3", "--iters", 1, "--no-progress"],
        "existing run": ["train", "--data", "gmm8", "--channels", 32, "--out", trained, "--iters", 1],
        "zero iters": ["train", "--data", "gmm8", "--out", tmp / "r4", "--iters", 0],
        "missing samples": ["eval", tmp / "none.npz", "--data", "gmm8"],
        "unreadable samples": ["eval", tmp / "notes.txt", "--data", "gmm8"],
        "eval bad data path": ["eval", samples, "--data", tmp / "nope" / "ref.npz"],
    }


CASES = ["missing model", "nfe 0", "heun odd nfe", "unknown sampler", "unknown grid", "not a checkpoint",
         "bad data path", "unknown data set", "T too small", "existing run", "zero iters", "missing samples",
         "unreadable samples", "eval bad data path"]


@pytest.mark.parametrize("case", CASES)
def test_user_errors_exit_2_with_one_line(trained, tmp_path, capsys, case):
    argv = _error_cases(trained, tmp_path)[case]
    capsys.readouterr()
    assert run(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fewstep: error: "), err
    assert "Traceback" not in err[0]
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()  # nothing left behind
    if case in NAMED:  # the advice names the flags to type, a switch without a value
        assert NAMED[case] in err[0], err[0]


NAMED = {"existing run": "pass --resume to continue it or choose another folder for --out",
         "heun odd nfe": "--nfe 4: heun uses 2 evaluations per step"}


def test_an_unknown_or_shortened_option_points_at_its_commands_help(trained, tmp_path, capsys):
    # `--b` once stood for `--batch` by prefix; now every option is taken only as written
    for argv, command in [(["compare", trained, trained, "--b", 3], "compare"),
                          (["sample", trained, "--model", trained], "sample"),
                          (["distill", "sfd", "--teacher", trained, "--out", tmp_path / "s", "--iter", 1],
                           "distill sfd")]:
        assert run(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"fewstep: error: {command}: unrecognized arguments: "), err
        assert err[0].endswith(f"(see: fewstep {command} --help)"), err
    assert not (tmp_path / "s").exists()


def test_samples_are_written_as_their_file_name_says(trained, tmp_path, capsys):
    assert run(["sample", trained, "--n", 6, "--nfe", 2, "--out", tmp_path / "plain.npy"]) == 0
    plain = np.load(tmp_path / "plain.npy")
    assert isinstance(plain, np.ndarray) and plain.shape == (6, 2)
    assert run(["sample", trained, "--n", 6, "--nfe", 2, "--out", tmp_path / "kept.npz"]) == 0
    with np.load(tmp_path / "kept.npz") as kept:
        assert np.array_equal(kept["samples"], plain) and json.loads(str(kept["info"]))["nfe"] == 2
    capsys.readouterr()
    (tmp_path / "folder.npz").mkdir()
    for out, why in [("s.txt", "expected a file name ending in .npz"), ("folder.npz", "is a folder")]:
        assert run(["sample", trained, "--n", 6, "--out", tmp_path / out]) == 2  # refused before sampling
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and why in err[0], err
    assert not (tmp_path / "s.txt").exists()
    with pytest.raises(FewstepError, match="expected a file name ending in .npz"):
        fewstep.sample(trained, 2, nfe=2, progress=False).save(tmp_path / "s.csv")


def test_error_in_a_real_process_has_no_traceback(tmp_path):
    p = subprocess.run([sys.executable, "-m", "fewstep", "sample", str(tmp_path / "missing")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fewstep: error: model "), p.stderr
    assert "missing" in lines[0]


def test_suite_runs_with_the_network_blocked():
    """conftest refuses outbound connections, so every test above ran offline."""
    import socket

    with pytest.raises(RuntimeError, match="network access attempted"):
        socket.create_connection(("192.0.2.1", 80), timeout=1)  # an IP: no DNS lookup needed
    with socket.socket() as s, pytest.raises(RuntimeError, match="network access attempted"):
        s.connect(("127.0.0.1", 9))


def test_a_killed_writers_temp_file_is_removed_by_the_next_write(tmp_path):
    """`sample --out` (every atomic write) removes the temp files that killed writers of the same file left,
    and leaves a live writer's alone."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        orphan = tmp_path / f".s.npz.{gone.pid}.k1ll3d.tmp"
        busy = tmp_path / f".s.npz.{alive.pid}.wr1t1n.tmp"
        orphan.write_bytes(b"x" * 1000)
        busy.write_bytes(b"x")
        r = subprocess.run([sys.executable, "-m", "fewstep", "sample", "gmm8-teacher", "--n", "8", "--out",
                            str(tmp_path / "s.npz")], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        assert not orphan.exists() and busy.exists() and (tmp_path / "s.npz").is_file()
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["s.npz", busy.name])
    finally:
        alive.kill()


def test_out_of_memory_is_one_line(monkeypatch, capsys):
    import fewstep.api

    def too_big(*a, **k):
        raise MemoryError("Unable to allocate 4.8 GiB")
    monkeypatch.setattr(fewstep.api, "sample", too_big)
    assert run(["sample", "gmm8-teacher", "--n", 10]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "out of memory" in err[0]


def test_a_picture_is_written_in_the_format_its_name_asks_for(tmp_path):
    for name, fmt in (("s.png", "PNG"), ("s.jpg", "JPEG"), ("s.webp", "WEBP")):
        assert run(["sample", "digits-teacher", "--n", 4, "--nfe", 4, "--png", tmp_path / name]) == 0
        with Image.open(tmp_path / name) as im:
            assert im.format == fmt


def test_info_says_how_a_shipped_teachers_quality_was_measured(capsys):
    """One FCD story: the card's numbers come with their protocol, in words (samples, sampler, seed, reference
    split, interval, the command that measured them), and the card's command says what differs."""
    assert run(["info", "digits-teacher"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "quality FCD 4.56 [3.28, 5.84]" in out
    assert ("from 10,000 samples (dpmpp2m NFE 256, seed 0) against the digits train split (1,617 samples); "
            "[95 % interval] from 200 random halves; measured by fewstep bench --preset digits") in out
    assert "--iters 6255" in out and "stopped by the user at iteration 6,255" in out


def test_every_option_a_message_names_is_a_flag_of_the_command_line():
    """Messages name options by keyword (fewstep.errors.option); on the command line each becomes a flag, which
    must be one the parser knows."""
    import argparse
    import re
    from pathlib import Path

    import fewstep
    from fewstep.cli import build_parser
    from fewstep.errors import flag_of

    flags = set()

    def walk(parser):
        for action in parser._actions:
            flags.update(action.option_strings)
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    walk(sub)

    walk(build_parser())
    named = set()
    for path in Path(fewstep.__file__).parent.rglob("*.py"):
        text = path.read_text()
        named.update(re.findall(r"\boption\('(\w+)'", text))
        for group in re.findall(r"\boptions\(((?:'\w+'(?:, )?)+)\)", text):
            named.update(re.findall(r"'(\w+)'", group))
    assert len(named) > 30  # the scan found the messages
    unknown = {name: flag_of(name) for name in named if not set(flag_of(name).split(" / ")) <= flags}
    assert not unknown
