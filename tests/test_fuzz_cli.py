"""Bad input, fuzzed: every subcommand with one generated bad value at a time must exit with status 2
and one `fewstep: error:` line that names the input, print no traceback, and create or change no file.

Each case starts from a command line that works and replaces one value with a bad one: wrong types,
negatives, zero, huge values, NaN, empty and repeated lists, unknown names, missing paths, a file
where a folder is expected, an empty or mixed image folder, a truncated or bit-flipped
`model.safetensors`, cards with missing keys / wrong types / a newer format, weights that do not fit
the card, and `.npz` files with the wrong shape, dtype, NaNs or a pickled object array.
"""
import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fewstep.checkpoint import CARD_NAME, WEIGHTS_NAME
from fewstep.models import builtin_models
from fewstep.cli import main

INTS = ["abc", "1.5", "-1", "0", "nan", "", "1e3", "0x10", "99999999999999999999999"]
SEEDS = [v for v in INTS if v != "0"]  # 0 is a seed
FLOATS = ["nan", "inf", "-inf", "-1", "abc", "", "1e999"]
NAMES = ["", "nosuch", "DDIM ", "-", "0"]


class Pickled:
    def __reduce__(self):
        return (print, ("a pickled object ran",))


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A workspace of good and broken inputs; the cache of on-the-fly imports lives inside it."""
    root = tmp_path_factory.mktemp("fuzz")
    good = builtin_models()["gmm8-teacher"]
    bad_models = {}

    def broken(name, edit):
        d = root / "models" / name
        shutil.copytree(good, d)
        edit(d)
        bad_models[name] = d

    def truncate(d):
        w = d / WEIGHTS_NAME
        w.write_bytes(w.read_bytes()[:200])

    def flip(d):
        w = d / WEIGHTS_NAME
        b = bytearray(w.read_bytes())
        b[len(b) // 2] ^= 0x40
        w.write_bytes(bytes(b))

    def card_edit(fn):
        def edit(d):
            card = json.loads((d / CARD_NAME).read_text())
            fn(card)
            (d / CARD_NAME).write_text(json.dumps(card))
        return edit

    broken("truncated", truncate)
    broken("bitflip", flip)
    broken("no-net", card_edit(lambda c: c.pop("net")))
    broken("net-wrong-type", card_edit(lambda c: c.__setitem__("net", "mlp")))
    broken("hidden-wrong-type", card_edit(lambda c: c["net"].__setitem__("hidden", "wide")))
    broken("newer-format", card_edit(lambda c: c.__setitem__("format_version", 99)))
    broken("not-json", lambda d: (d / CARD_NAME).write_text("{ not json"))
    broken("no-weights", lambda d: (d / WEIGHTS_NAME).unlink())

    def misfit(d):  # weights of another network under this card (hash updated so only the fit is wrong)
        from fewstep.hashing import sha256_file
        shutil.copy(builtin_models()["digits-teacher"] / WEIGHTS_NAME, d / WEIGHTS_NAME)
        card_edit(lambda c: c.__setitem__("weights_sha256", sha256_file(d / WEIGHTS_NAME)))(d)

    broken("misfit", misfit)
    (root / "empty").mkdir()
    (root / "file.txt").write_text("plain text")
    mixed = root / "mixed"
    mixed.mkdir()
    from PIL import Image
    Image.new("L", (8, 8)).save(mixed / "a.png")
    Image.new("RGB", (12, 5)).save(mixed / "b.png")
    (mixed / "c.png").write_bytes(b"not a png")
    arrays = {
        "shape3": np.zeros((10, 3, 5), np.float32),
        "strings": np.array(["a", "b"]),
        "nan": np.full((10, 2), np.nan, np.float32),
        "object": np.array([Pickled()], dtype=object),
        "empty": np.zeros((0, 2), np.float32),
        "scalar": np.float32(3),
    }
    bad_arrays = {}
    for name, arr in arrays.items():
        p = root / "arrays" / f"{name}.npz"
        p.parent.mkdir(exist_ok=True)
        np.savez(p, samples=arr)
        bad_arrays[name] = p
    good_samples = root / "good.npz"
    np.savez(good_samples, samples=np.random.default_rng(0).standard_normal((64, 2)).astype(np.float32))
    return {"root": root, "models": bad_models, "arrays": bad_arrays, "good_samples": good_samples,
            "paths": {"missing": root / "no" / "such", "empty folder": root / "empty", "a text file": root / "file.txt",
                      "mixed folder": mixed}}


def model_values(ws):
    return [*map(str, ws["models"].values()), *map(str, ws["paths"].values()), "nosuch-model"]


def data_values(ws):
    return [*map(str, ws["arrays"].values()), *map(str, ws["paths"].values()), "nosuchset"]


def commands(ws):
    """name -> (good argv with {slot} markers filled by default, {slot: bad values})."""
    out = str(ws["root"] / "out-never-written")
    png = str(ws["root"] / "never.png")
    m, d = "gmm8-teacher", "gmm8"
    return {
        "sample": (["sample", "{model}", "--n", "{n}", "--nfe", "{nfe}", "--seed", "{seed}", "--batch", "{batch}",
                    "--sampler", "{sampler}", "--grid", "{grid}", "--rho", "{rho}", "--class", "{class}"],
                   {"model": model_values(ws), "n": INTS, "nfe": INTS + ["10001"], "seed": SEEDS, "batch": INTS,
                    "sampler": NAMES, "grid": NAMES, "rho": FLOATS + ["0"], "class": INTS[:3] + ["0", "3"]},
                   {"model": m, "n": "4", "nfe": "4", "seed": "0", "batch": "8", "sampler": "ddim", "grid": "logsnr",
                    "rho": "7", "class": None}),
        "info": (["info", "{model}"], {"model": model_values(ws)}, {"model": m}),
        "eval": (["eval", "{samples}", "--data", "{data}", "--seed", "{seed}"],
                 {"samples": [*map(str, ws["arrays"].values()), *map(str, ws["paths"].values())],
                  "data": data_values(ws), "seed": SEEDS},
                 {"samples": str(ws["good_samples"]), "data": d, "seed": "0"}),
        "train": (["train", "--data", "{data}", "--iters", "{iters}", "--batch", "{batch}", "--lr", "{lr}",
                   "--ema", "{ema}", "--dropout", "{dropout}", "--T", "{T}", "--channels", "{channels}",
                   "--grad-clip", "{clip}", "--param", "{param}", "--schedule", "{schedule}", "--log", "{log}",
                   "--no-progress", "--out", out],
                  {"data": data_values(ws), "iters": INTS, "batch": INTS, "lr": FLOATS + ["0"],
                   "ema": FLOATS + ["0", "1"], "dropout": FLOATS + ["1"], "T": INTS + ["1", "10"],
                   "channels": INTS + ["100000"], "clip": FLOATS, "param": NAMES, "schedule": NAMES, "log": NAMES},
                  {"data": d, "iters": None, "batch": "8", "lr": "1e-3", "ema": "0.9", "dropout": "0", "T": "1024",
                   "channels": "8", "clip": "1", "param": "eps", "schedule": "linear", "log": "jsonl"}),
        "distill sfd": (["distill", "sfd", "--teacher", "{model}", "--nfe", "{nfe}", "--m", "{m}", "--rho", "{rho}",
                         "--trajectories", "{traj}", "--teacher-solver", "{solver}", "--grid", "{grid}",
                         "--sigma-min", "{smin}", "--batch", "{batch}", "--teacher-precision", "{precision}",
                         "--teacher-precision-tol", "{tol}", "--trajectory-cache", "{cache}", "--no-progress",
                         "--out", out],
                        {"model": model_values(ws), "nfe": INTS + ["2,2", "2,,3", ",", "0,1", "a,b"], "m": INTS[:3] + ["-1", "999"],
                         "rho": FLOATS + ["0"], "traj": INTS, "solver": NAMES, "grid": NAMES, "smin": FLOATS + ["0"],
                         "batch": INTS, "precision": NAMES + ["fp16"], "tol": FLOATS + ["0", "1"],
                         "cache": [str(ws["paths"]["a text file"]), ""]},
                        {"model": m, "nfe": "2", "m": "3", "rho": "7", "traj": None, "solver": "dpmpp3m",
                         "grid": "polynomial", "smin": None, "batch": "8", "precision": "fp32", "tol": None,
                         "cache": None}),
        "distill sfddm": (["distill", "sfddm", "--teacher", "{model}", "--data", "{data}", "--steps", "{steps}",
                           "--iters", "{iters}", "--index", "{index}", "--lam", "{lam}", "--batch", "{batch}",
                           "--no-progress", "--out", out],
                          {"model": model_values(ws), "data": data_values(ws), "steps": INTS + ["1024", "5000"],
                           "iters": INTS, "index": ["", "5,3", "0,0", "-1,2", "x", "0,1024", "leadin"],
                           "lam": FLOATS, "batch": INTS},
                          {"model": m, "data": d, "steps": "4", "iters": None, "index": None, "lam": "1", "batch": "8"}),
        "distill progressive": (["distill", "progressive", "--teacher", "{model}", "--data", "{data}", "--steps", "{steps}",
                                 "--start-steps", "{start}", "--iters", "{iters}", "--no-progress", "--out", out],
                                {"model": model_values(ws), "data": data_values(ws), "steps": INTS + ["3"],
                                 "start": INTS + ["12", "4096"], "iters": INTS},
                                {"model": m, "data": d, "steps": "4", "start": "16", "iters": None}),
        "compare": (["compare", "{a}", "{b}", "--n", "{n}", "--nfe-a", "{nfe}", "--png", png],
                    {"a": model_values(ws), "b": model_values(ws), "n": INTS + ["1"], "nfe": INTS},
                    {"a": m, "b": m, "n": "4", "nfe": "4"}),
        "interpolate": (["interpolate", "{model}", "--seeds", "{seeds}", "--frames", "{frames}", "--mode", "{mode}",
                         "--out", png],
                        {"model": model_values(ws), "seeds": ["", "1", "a,b", "1,2,3", "1.5,2"],
                         "frames": INTS + ["1"], "mode": NAMES},
                        {"model": m, "seeds": "3,7", "frames": "3", "mode": "slerp"}),
        "import": (["import", "{source}", "--out", out],
                   {"source": [*map(str, ws["paths"].values()), str(ws["good_samples"]), str(ws["models"]["bitflip"])]},
                   {"source": None}),
        "export": (["export", "{model}", "--nfe", "{nfe}", "--out", out],
                   {"model": model_values(ws), "nfe": INTS}, {"model": m, "nfe": None}),
    }


def build(template, slot, value, defaults):
    """The command line with `slot` set to `value`; other slots get their good default, or are dropped
    (with their option) when the default is None."""
    argv, i = [], 0
    while i < len(template):
        tok = template[i]
        nxt = template[i + 1] if i + 1 < len(template) else None
        if nxt is not None and nxt.startswith("{") and tok.startswith("--"):
            name = nxt[1:-1]
            v = value if name == slot else defaults[name]
            if v is not None:
                argv += [tok, v]
            i += 2
            continue
        if tok.startswith("{"):
            name = tok[1:-1]
            argv.append(value if name == slot else defaults[name])
        else:
            argv.append(tok)
        i += 1
    return argv


def snapshot(root: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def run_main(argv) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
            code = 0
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


CASES_PER_COMMAND = 60


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sample", "info", "train", "distill sfd", "distill sfddm",
                                  "distill progressive", "compare", "interpolate", "import", "eval", "export"])
def test_one_bad_value_gives_one_clear_line_and_changes_nothing(ws, name, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(ws["root"] / "cache"))
    template, bad, defaults = commands(ws)[name]
    seen = []

    @settings(max_examples=CASES_PER_COMMAND, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(sorted(bad)).flatmap(lambda s: st.tuples(st.just(s), st.sampled_from(bad[s]))))
    def case(slot_value):
        slot, value = slot_value
        argv = build(template, slot, value, defaults)
        before = snapshot(ws["root"])
        code, err = run_main(argv)
        lines = err.strip().splitlines()
        seen.append((slot, value))
        where = f"{name} with {slot}={value!r}: {argv}"
        assert code == 2, f"{where}: exit {code}, stderr {err[-800:]!r}"
        assert len(lines) == 1 and lines[0].startswith("fewstep: error: "), f"{where}: {lines}"
        assert "Traceback" not in err
        option = next((t for t, n in zip(template, template[1:]) if n == "{" + slot + "}"), None)
        names = [n for n in (option if option and option.startswith("--") else None, value, Path(value).name)
                 if n]
        assert any(n in lines[0] for n in names), f"{where}: the message does not name the input: {lines[0]}"
        assert snapshot(ws["root"]) == before, f"{where}: files were created or changed"

    case()
    assert len(seen) >= min(CASES_PER_COMMAND, sum(len(v) for v in bad.values())) // 2
