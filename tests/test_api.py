"""The Python API (`import fewstep`): a CLI run and the same call train byte-identical weights, the command
line's defaults are the methods' configs and recipes, a config is never changed by a run, and arguments are
checked up front with fewstep's own error."""
import argparse
import importlib
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

import fewstep
from fewstep.checkpoint import WEIGHTS_NAME, load_checkpoint
from fewstep.cli import build_parser
from fewstep.progressive.recipe import PROGRESSIVE_LOOP
from fewstep.sfd.config import SFDConfig
from fewstep.sfd.method import SFD
from fewstep.sfd.recipe import SFD_LOOP
from fewstep.sfddm.config import SFDDMConfig
from fewstep.sfddm.recipe import SFDDM_LOOP
from fewstep.errors import FewstepError, command_line, option
from fewstep.recipe import config_defaults
from fewstep.teacher.method import TEACHER_LOOP
from test_cli import run

QUIET = ["--no-progress", "--ckpt-every", 0]


def weights(folder) -> bytes:
    return (folder / WEIGHTS_NAME).read_bytes()


def test_import_fewstep_loads_nothing_heavy():
    code = "import sys, fewstep; print('torch' in sys.modules, callable(fewstep.distill_sfd), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True", "True"]
    assert set(fewstep.__all__) <= set(dir(fewstep))
    # every name is the call or class it documents, also after fewstep's modules are imported (a submodule of
    # the same name would shadow it)
    for module in ("bench", "compare", "models", "sampling", "train", "teacher"):
        importlib.import_module(f"fewstep.{module}")
    for name in fewstep.__all__[1:]:
        assert callable(getattr(fewstep, name)) and not isinstance(getattr(fewstep, name), type(fewstep)), name


def test_cli_and_api_train_identical_weights(tmp_path):
    """Each method: the command line and the Python call with the same settings give the same bytes."""
    cases = [
        (["train", "--data", "gmm8", "--iters", 4, "--batch", 32, "--channels", 16],
         lambda out: fewstep.train_teacher("gmm8", out, iters=4, batch=32, channels=16, progress=False)),
        (["distill", "sfd", "--teacher", "gmm8-teacher", "--nfe", 3, "--iters", 3, "--batch", 16],
         lambda out: fewstep.distill_sfd("gmm8-teacher", out, nfe=3, iters=3, batch=16, progress=False)),
        (["distill", "sfd", "--teacher", "gmm8-teacher", "--nfe", "2,3", "--iters", 3, "--batch", 16],
         lambda out: fewstep.distill_sfd("gmm8-teacher", out, nfe=[2, 3], iters=3, batch=16, progress=False)),
        (["distill", "sfddm", "--teacher", "gmm8-teacher", "--data", "gmm8", "--steps", 4, "--iters", 3, "--batch", 16],
         lambda out: fewstep.distill_sfddm("gmm8-teacher", "gmm8", out, steps=4, iters=3, batch=16, progress=False)),
        (["distill", "progressive", "--teacher", "gmm8-teacher", "--data", "gmm8", "--start-steps", 8, "--steps", 4,
          "--iters", 2, "--batch", 16],
         lambda out: fewstep.distill_progressive("gmm8-teacher", "gmm8", out, start_steps=8, steps=4, iters=2,
                                                 batch=16, progress=False)),
    ]
    for i, (argv, call) in enumerate(cases):
        cli, py = tmp_path / f"cli{i}", tmp_path / f"api{i}"
        assert run([*argv, "--out", cli, *QUIET]) == 0
        model = call(py)
        assert model.path == py and model.card["training"]["finished"]
        assert weights(cli) == weights(py), argv[:2]
    # the 1-NFE stage from the NFE-3 student of both roads
    assert run(["distill", "sfd", "--teacher", tmp_path / "cli1", "--stage2", "--iters", 2, "--batch", 16,
                "--out", tmp_path / "cli-s2", *QUIET]) == 0
    fewstep.distill_sfd(tmp_path / "api1", tmp_path / "api-s2", stage2=True, iters=2, batch=16, progress=False)
    assert weights(tmp_path / "cli-s2") == weights(tmp_path / "api-s2")


def subparser(*words) -> argparse.ArgumentParser:
    p = build_parser(list(words))
    for w in words:
        p = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices[w]
    return p


def defaults_of(parser) -> dict:
    """Each option's default as parsing applies it (the first action of a dest sets it)."""
    found = {}
    for a in parser._actions:
        found.setdefault(a.dest, a.default)
    return found


@pytest.mark.parametrize("words, recipe", [(("train",), TEACHER_LOOP), (("distill", "sfd"), SFD_LOOP),
                                           (("distill", "sfddm"), SFDDM_LOOP),
                                           (("distill", "progressive"), PROGRESSIVE_LOOP)])
def test_the_command_line_defaults_are_the_recipe(words, recipe):
    """One place for every default: a method's flags default to its recipe and its config's fields."""
    given = defaults_of(subparser(*words))
    for key, value in recipe.items():
        flag = "no_progress" if key == "progress" else key
        assert given[flag] == ((not value) if key == "progress" else value), key
    config = {("distill", "sfd"): SFDConfig, ("distill", "sfddm"): SFDDMConfig}.get(tuple(words))
    if config is not None:
        for key, value in config_defaults(config).items():
            if key in given and key != "seed":
                assert given[key] == value, key


def test_a_config_is_never_changed_by_a_run(tmp_path):
    first = fewstep.distill_sfd("gmm8-teacher", tmp_path / "first", nfe=3, iters=1, batch=8, progress=False)
    cfg = SFDConfig(stage2=True)
    before = asdict(cfg)
    method = SFD(first, cfg)
    assert asdict(cfg) == before and method.cfg.nfe == [1] and cfg.nfe == [2]
    with pytest.raises(Exception):  # frozen: a run (or a user) cannot change it in place
        cfg.nfe = [4]
    # the card records the resolved copy
    student = fewstep.distill_sfd(first, tmp_path / "s2", cfg, iters=1, batch=8, progress=False)
    assert student.card["method"]["nfe"] == [1] and asdict(cfg) == before


def test_messages_name_options_as_the_caller_gave_them(capsys):
    """From Python an option is its keyword (nfe=[0]); from the command line, its flag (--nfe [0]), hints too."""
    with pytest.raises(FewstepError, match=r"^nfe=\[0\]: expected NFE values >= 1"):
        SFDConfig(nfe=[0])
    with command_line(), pytest.raises(FewstepError, match=r"^--nfe \[0\]: expected NFE values >= 1"):
        SFDConfig(nfe=[0])
    with pytest.raises(FewstepError, match=r"^class_label=3: this model is not class-conditional"):
        fewstep.sample("gmm8-teacher", 4, class_label=3, progress=False)
    assert run(["sample", "gmm8-teacher", "--n", 4, "--class", 3]) == 2
    assert "error: --class 3: this model is not class-conditional" in capsys.readouterr().err
    with pytest.raises(FewstepError, match=r"lora_alpha / lora_targets: give the adapter's rank with lora=RANK"):
        SFDConfig(lora_alpha=8)
    with command_line(), pytest.raises(FewstepError, match=r"--lora-alpha / --lora-targets: .* with --lora RANK"):
        SFDConfig(lora_alpha=8)
    with command_line():  # a switch is its flag alone
        assert (option("resume", True), option("final_denoise", True), option("nfe", 2)) == \
            ("--resume", "--final-denoise", "--nfe 2")
    assert (option("resume", True), option("nfe", 2)) == ("resume=True", "nfe=2")
    with pytest.raises(FewstepError, match=r"n=5000: .* give a larger max_seconds"):
        fewstep.sample("gmm8-teacher", 5000, nfe=4, progress=False, max_seconds=1e-6)


def test_arguments_are_checked_up_front(tmp_path):
    assert SFDConfig(nfe=2).nfe == [2] and SFDConfig(nfe=(2, 3)).nfe == [2, 3]
    bad = [
        (lambda: SFDConfig(nfe=2.5), r"nfe=2\.5: expected an integer or a list of integers"),
        (lambda: SFDConfig(nfe=[2, 2]), r"nfe=\[2, 2\]: values must be distinct"),
        (lambda: SFDConfig(nfe="2"), r"nfe='2': expected"),
        (lambda: SFDConfig(nfe=[0]), r"nfe=\[0\]: expected NFE values >= 1"),
        (lambda: fewstep.distill_sfd("gmm8-teacher", tmp_path / "a", batch="64"), r"batch='64': expected an integer"),
        (lambda: fewstep.distill_sfd("gmm8-teacher", tmp_path / "b", bogus=1), "unknown option.*bogus"),
        (lambda: fewstep.distill_sfd("gmm8-teacher", tmp_path / "c", SFDConfig(), nfe=3), "one way"),
        (lambda: fewstep.distill_sfd(42, tmp_path / "d"), "teacher=42: expected a loaded model"),
        (lambda: fewstep.train_teacher("gmm8", tmp_path / "e", lr_schedule="linear"), "lr_schedule='linear'"),
        (lambda: fewstep.sample("gmm8-teacher", n=0), r"n=0: expected an integer >= 1"),
        (lambda: fewstep.sample("gmm8-teacher", device="gpu"), "device='gpu'"),
        (lambda: fewstep.run_bench(tmp_path / "f", preset="demo", no_such_field=1), "bench: .*no_such_field"),
    ]
    for call, message in bad:
        with pytest.raises(FewstepError, match=message):
            call()
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_samples_round_trip(tmp_path):
    s = fewstep.sample("gmm8-teacher", 200, seed=3, nfe=8, progress=False)
    assert s.x.shape == (200, 2) and s.info["nfe"] == 8 and len(s) == 200
    again = fewstep.sample(fewstep.load("gmm8-teacher"), 200, seed=3, nfe=8, progress=False)
    assert torch.equal(s.x, again.x)
    path = s.save(tmp_path / "s.npz")
    assert s.picture(tmp_path / "s.png").stat().st_size > 0
    from_file, from_memory = fewstep.evaluate(path, "gmm8"), fewstep.evaluate(s, "gmm8")
    assert from_file["swd"] == from_memory["swd"] and from_file["n"] == 200
    assert fewstep.evaluate(s.x.numpy(), "gmm8")["swd"] == from_memory["swd"]
    with pytest.raises(FewstepError, match=r"samples=ndarray: samples have shape \(200, 2, 1\)"):
        fewstep.evaluate(s.x.numpy()[..., None], "gmm8")
    c = fewstep.compare_models("gmm8-teacher", "gmm8-teacher", 16, nfe_b=4)
    assert c.stats["a"]["nfe"] != c.stats["b"]["nfe"] and c.a.x.shape == c.b.x.shape
    assert c.picture(tmp_path / "pairs.png", n=8).stat().st_size > 0


def test_interpolation_from_python_is_the_commands(tmp_path, capsys):
    frames = fewstep.interpolate("digits-teacher", (1, 2), frames=5, mode="both", nfe=4)
    assert list(frames.frames) == ["slerp", "linear"] and frames.frames["slerp"].shape == (5, 1, 8, 8)
    assert frames.info["seeds"] == [1, 2] and frames.info["nfe"] == 4
    # the ends are the two seeds' own first samples, whatever the path between them (to float rounding: five
    # noises go through the network as one batch, against one alone)
    for m in ("slerp", "linear"):
        first = fewstep.sample("digits-teacher", 1, seed=1, nfe=4, sampler=frames.info["sampler"], progress=False)
        assert torch.allclose(frames.frames[m][0], first.x[0], atol=1e-3)
        last = fewstep.sample("digits-teacher", 1, seed=2, nfe=4, sampler=frames.info["sampler"], progress=False)
        assert torch.allclose(frames.frames[m][-1], last.x[0], atol=1e-3)
    assert (frames.frames["slerp"][2] - frames.frames["linear"][2]).abs().max() > 0.01  # two paths between them
    frames.picture(tmp_path / "py.png")
    assert run(["interpolate", "digits-teacher", "--seeds", "1,2", "--frames", 5, "--mode", "both", "--nfe", 4,
                "--out", tmp_path / "cli.png"]) == 0
    assert (tmp_path / "py.png").read_bytes() == (tmp_path / "cli.png").read_bytes()
    assert "slerp/linear interpolation, seeds 1 → 2, 5 frames" in capsys.readouterr().out
    for bad, message in [(dict(seeds=(1,)), r"^seeds=\(1,\): expected two integers"),
                         (dict(frames=1), "^frames=1: "), (dict(mode="cubic"), "^mode='cubic': ")]:
        with pytest.raises(FewstepError, match=message):
            fewstep.interpolate("digits-teacher", **{"seeds": (1, 2), **bad})


def test_a_loaded_model_is_used_as_it_is(tmp_path):
    teacher = fewstep.load("gmm8-teacher")
    student = fewstep.distill_sfd(teacher, tmp_path / "s", nfe=2, iters=1, batch=8, progress=False)
    assert student.card["teacher"]["name"] == "gmm8-teacher"
    assert load_checkpoint(tmp_path / "s").card == student.card
