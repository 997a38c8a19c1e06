"""A small image classifier whose penultimate layer is a feature space of fewstep's image metrics.

Inception features mean little on 8x8 or 28x28 grey digits, so fewstep measures Fréchet
distance, KID and precision/recall on the 128-d features of a CNN trained on the same data set
(the "Fréchet classifier distance", FCD). Trained weights ship in ``fewstep/assets`` as
``classifier-<data>-<resolution>/{model.safetensors, classifier.json}``; the JSON records the
architecture, the training recipe, the classes, the held-out accuracy and the sha256 of the
weights, which is checked on every load.

Train one on the built-in digits / mnist, or on any labelled images (a folder with one sub-folder
of images per class, 1 or 3 channels); to replace a shipped one, point DIR at its assets folder::

    fewstep classifier train --data my_labelled/ --out DIR [--resolution R] [--iters N] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from fewstep import __version__
from fewstep.checkpoint import atomic_write, refuse_to_overwrite
from fewstep.data import NATIVE_RESOLUTION, load_dataset, split_indices
from fewstep.errors import FewstepError, option
from fewstep.hashing import sha256_file

ASSETS_DIR = Path(__file__).parent / "assets"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "classifier.json"
CLASSIFIER_DATASETS = ("digits", "mnist")  # built-ins with labels; any labelled folder works too
# Enough for the loss to settle on each set; about a minute of CPU each.
DEFAULT_STEPS = {"digits": 2000, "mnist": 3000}
DEFAULT_FOLDER_STEPS = 2000


class DigitClassifier(nn.Module):
    """CNN for 1- or 3-channel images at any size >= 4 (tested at 8, 16, 28).

    conv -> [2x max-pool when wider than 8] -> conv -> adaptive avg-pool 8x8 -> conv ->
    adaptive avg-pool 4x4 -> fc ``feature_dim`` (ReLU: the features) -> fc ``num_classes``.
    The pooling makes one set of weights shapes-compatible with every resolution, and keeps the
    cost at 28x28 close to that at 8x8.
    """
    def __init__(self, in_channels: int = 1, widths=(16, 32, 64), feature_dim: int = 128,
                 num_classes: int = 10):
        super().__init__()
        c1, c2, c3 = widths
        self.config = {
            "class": "DigitClassifier",
            "in_channels": in_channels,
            "widths": list(widths),
            "feature_dim": feature_dim,
            "num_classes": num_classes,
        }
        self.meta: dict = {}  # filled by load_classifier from classifier.json
        self.conv1 = nn.Conv2d(in_channels, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1)
        self.fc1 = nn.Linear(c3 * 16, feature_dim)
        self.fc2 = nn.Linear(feature_dim, num_classes)

    def feature_maps(self, x: torch.Tensor) -> list:
        """The three convolutions' (ReLU) maps for images in [-1, 1] (a perceptual distance's features)."""
        h1 = F.relu(self.conv1(x))
        h = F.max_pool2d(h1, 2, ceil_mode=True) if h1.shape[-1] > 8 else h1
        h2 = F.relu(self.conv2(h))
        h3 = F.relu(self.conv3(F.adaptive_avg_pool2d(h2, 8)))
        return [h1, h2, h3]

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (logits, penultimate features) for images in [-1, 1]."""
        h = F.adaptive_avg_pool2d(self.feature_maps(x)[-1], 4)
        feats = F.relu(self.fc1(h.flatten(1)))
        return self.fc2(feats), feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_features(x)[0]


# ----------------------------------------------------------------------------- training


def _random_shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by a random -1..1 pixels in x and y, filling with background (-1)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    sx = torch.randint(0, 3, (n,), generator=gen)
    sy = torch.randint(0, 3, (n,), generator=gen)
    out = torch.empty_like(x)
    for dy in range(3):
        for dx in range(3):
            sel = (sx == dx) & (sy == dy)
            out[sel] = padded[sel, :, dy:dy + h, dx:dx + w]
    return out


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
    return correct / len(x)


def labelled_folder(folder, resolution=None, seed: int = 0):
    """A folder with one sub-folder of images per class, as (train, held-out, class names).

    Classes are the sub-folders in sorted order. Grey classes beside colour ones are given three
    channels. Train and held-out are ``fewstep.data``'s seeded 90 / 10 split of all images.
    Returns ``(x_train, y_train), (x_held, y_held), classes``.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FewstepError(f"labelled data {str(folder)!r} is not a folder; expected one sub-folder of "
                           f"images per class, or one of {', '.join(CLASSIFIER_DATASETS)}")
    subs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(subs) < 2:
        raise FewstepError(f"labelled data {str(folder)!r} has {len(subs)} sub-folder(s); expected one "
                           "sub-folder of images per class, at least two classes")
    xs = [load_dataset(str(d), resolution, split="all").x for d in subs]
    channels = max(x.shape[1] for x in xs)
    xs = [x.expand(-1, channels, -1, -1) if x.shape[1] != channels else x for x in xs]
    for d, x in zip(subs, xs):
        if x.shape[1:] != xs[0].shape[1:]:
            raise FewstepError(f"class folders hold images of different sizes: {subs[0].name!r} "
                               f"{tuple(xs[0].shape[1:])}, {d.name!r} {tuple(x.shape[1:])}; pass "
                               f"{option('resolution', shown='N')}")
    x = torch.cat(xs).contiguous()
    y = torch.cat([torch.full((len(t),), k, dtype=torch.long) for k, t in enumerate(xs)])
    tr, he = (torch.from_numpy(split_indices(len(x), split, seed)) for split in ("train", "heldout"))
    return (x[tr], y[tr]), (x[he], y[he]), [d.name for d in subs]


def train_classifier(
    dataset_name: str,
    resolution: int | None = None,
    steps: int | None = None,
    seed: int = 0,
    *,
    out_dir,
    batch_size: int = 128,
    lr: float = 2e-3,
    progress: bool = True,
) -> dict:
    """Train a DigitClassifier on the TRAIN split of labelled images and save it.

    ``dataset_name``: ``digits`` or ``mnist`` (built-in labels), or a folder with one sub-folder
    of images per class. Uses random +-1 px shifts, Adam with a cosine learning-rate decay, and
    reports accuracy on the held-out split (never seen in training; split seed ``seed``).
    ``steps`` defaults to ``DEFAULT_STEPS`` (2000 for a folder). Writes
    ``out_dir/model.safetensors`` and ``out_dir/classifier.json``; returns the JSON's content.
    """
    # before any training: a folder that holds a model or a classifier is never written over
    refuse_to_overwrite(Path(out_dir))
    if (Path(out_dir) / META_FILE).is_file():
        raise FewstepError(f"{option('out', out_dir)}: the folder already holds a classifier; choose another folder")
    if steps is None:
        steps = DEFAULT_STEPS.get(dataset_name, DEFAULT_FOLDER_STEPS)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise FewstepError(f"steps must be a positive integer, got {steps!r}")
    if dataset_name in CLASSIFIER_DATASETS:
        res = NATIVE_RESOLUTION[dataset_name] if resolution is None else int(resolution)
        train = load_dataset(dataset_name, res, split="train", seed=seed)
        held = load_dataset(dataset_name, res, split="heldout", seed=seed)
        (train_x, train_y), (held_x, held_y) = (train.x, train.labels), (held.x, held.labels)
        classes, name = [str(k) for k in range(10)], dataset_name
    else:
        (train_x, train_y), (held_x, held_y), classes = labelled_folder(dataset_name, resolution, seed)
        res, name = int(train_x.shape[-1]), Path(dataset_name).name
    if train_x.shape[-1] < 4 or train_x.shape[-2] != train_x.shape[-1]:
        raise FewstepError(f"classifier images must be square and at least 4x4, got {tuple(train_x.shape[1:])}; "
                           f"pass {option('resolution', shown='N')}")
    if len(held_x) == 0:
        raise FewstepError(f"labelled data {dataset_name!r} is too small for a held-out split")

    # Its own short loop, not the Trainer: the classifier sits below the training loop (metrics and the
    # perceptual term use it), writes no diffusion card, and trains in seconds to a fixed recipe, so resume,
    # torchrun and AMP would buy nothing; the shipped classifiers are what this exact loop produces.
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
        torch.manual_seed(seed)
        model = DigitClassifier(in_channels=int(train_x.shape[1]), num_classes=len(classes))
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    model.train()
    bar = tqdm(range(steps), desc=f"classifier {name}-{res}", disable=not progress)
    for _ in bar:
        idx = torch.randint(0, len(train_x), (batch_size,), generator=gen)
        xb = _random_shift(train_x[idx], gen)
        loss = F.cross_entropy(model(xb), train_y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    train_seconds = time.perf_counter() - t0
    held_acc = accuracy(model, held_x, held_y)
    train_acc = accuracy(model, train_x, train_y)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / WEIGHTS_FILE
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write(weights, lambda p: save_file(state, str(p)))
    meta = {
        "format": "fewstep-classifier",
        "format_version": 1,
        "architecture": model.config,
        "dataset": name,
        "source": dataset_name if dataset_name in CLASSIFIER_DATASETS else str(Path(dataset_name).resolve()),
        "classes": classes,
        "num_classes": len(classes),
        "resolution": res,
        "split_seed": seed,
        "train_n": len(train_x),
        "heldout_n": len(held_x),
        "heldout_accuracy": round(held_acc, 5),
        "train_accuracy": round(train_acc, 5),
        "recipe": {
            "steps": steps,
            "batch_size": batch_size,
            "optimizer": "Adam",
            "lr": lr,
            "lr_schedule": "cosine",
            "augmentation": "random shift of -1..1 px in x and y",
            "seed": seed,
        },
        "train_seconds": round(train_seconds, 1),
        "weights_file": WEIGHTS_FILE,
        "weights_sha256": sha256_file(weights),
        "fewstep_version": __version__,
        "torch_version": torch.__version__,
    }
    atomic_write(out / META_FILE, lambda p: Path(p).write_text(json.dumps(meta, indent=2) + "\n"))
    return meta


# ----------------------------------------------------------------------------- loading


def classifier_dir(dataset_name: str, resolution: int) -> Path:
    return ASSETS_DIR / f"classifier-{dataset_name}-{int(resolution)}"


def available_classifiers() -> list[tuple[str, int]]:
    """(data set, resolution) pairs with a shipped classifier."""
    found = []
    if ASSETS_DIR.is_dir():
        for d in sorted(ASSETS_DIR.glob("classifier-*-*")):
            name, _, res = d.name[len("classifier-"):].rpartition("-")
            if res.isdigit() and (d / META_FILE).is_file():
                found.append((name, int(res)))
    return found


def retrain_command(dataset_name: str, resolution: int, out=None) -> str:
    out = out or classifier_dir(dataset_name, resolution)
    return f"fewstep classifier train --data {dataset_name} --resolution {resolution} --out {out}"


def load_classifier(dataset_name: str, resolution: int | None = None, path=None) -> DigitClassifier:
    """Load a trained classifier, frozen and in eval mode; its ``classifier.json`` is ``.meta``.

    ``path`` is a directory written by ``train_classifier``; by default the shipped one for
    ``dataset_name`` at ``resolution`` (native resolution when None). The weights' sha256 must
    match the one recorded in ``classifier.json``.
    """
    if path is None:

        if resolution is None:
            resolution = NATIVE_RESOLUTION.get(dataset_name)
        d = classifier_dir(dataset_name, resolution) if resolution is not None else None
        if d is None or not (d / META_FILE).is_file():
            have = ", ".join(f"{n} at {r}x{r}" for n, r in available_classifiers()) or "none"
            how = (f"train one with: {retrain_command(dataset_name, resolution)}"
                   if dataset_name in CLASSIFIER_DATASETS and resolution is not None else
                   "train one on labelled images with: fewstep classifier train --data LABELLED_DIR --out DIR")
            raise FewstepError(
                f"no classifier shipped for data set {dataset_name!r} at resolution "
                f"{resolution}; shipped: {have}; {how}"
            )
    else:
        d = Path(path)
        if not (d / META_FILE).is_file():
            raise FewstepError(f"classifier folder {str(d)!r} has no {META_FILE}")

    try:
        meta = json.loads((d / META_FILE).read_text())
        weights = d / meta["weights_file"]
        expected = meta["weights_sha256"]
        arch = dict(meta["architecture"])
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise FewstepError(f"cannot read classifier description {str(d / META_FILE)!r}: "
                           f"{e if not isinstance(e, RecursionError) else 'nested too deeply'}") from None
    # every file a model folder names lies inside it
    if Path(meta["weights_file"]).is_absolute() or d.resolve() not in weights.resolve().parents:
        raise FewstepError(f"{str(d / META_FILE)!r} names weights_file {meta['weights_file']!r} outside its folder; "
                           "a classifier folder's files must lie inside it")
    if not weights.is_file():
        raise FewstepError(f"classifier weights {str(weights)!r} are missing")
    actual = sha256_file(weights)
    if actual != expected:
        raise FewstepError(
            f"classifier weights {str(weights)!r} fail their checksum (sha256 {actual[:16]}..., "
            f"{META_FILE} records {expected[:16]}...); the file is damaged or was replaced. "
            f"Retrain with: {retrain_command(meta.get('dataset', dataset_name), meta.get('resolution', resolution), d)}"
        )
    if arch.pop("class", None) != "DigitClassifier":
        raise FewstepError(f"{str(d / META_FILE)!r} describes an unknown architecture")
    model = DigitClassifier(**arch)
    model.load_state_dict(load_file(str(weights)))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.meta = meta
    return model


# ----------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fewstep.featnet",
        description="Train the classifier whose features fewstep's image metrics use "
                    "(the same as `fewstep classifier train`).",
    )
    parser.add_argument("--data", required=True,
                        help="digits, mnist, or a folder with one sub-folder of images per class")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--resolution", type=int, default=None,
                        help="image size (default: the data set's native size)")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps (default: 3000 for mnist, else 2000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training run and split")
    args = parser.parse_args(argv)
    try:
        meta = train_classifier(args.data, args.resolution, args.steps, args.seed, out_dir=args.out)
    except FewstepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"held-out accuracy {meta['heldout_accuracy']:.4f} ({meta['heldout_n']} images), "
          f"{meta['train_seconds']:.0f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
