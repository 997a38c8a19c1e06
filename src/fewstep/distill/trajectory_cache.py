"""A content-addressed store of SFD's teacher trajectories.

The teacher's states at the student timestamps are a pure function of what goes into the solve: the
teacher's weights (and the memory format they run in), its step condition, the solver, its grid and
clipping, the initial noise, the class labels, and where the arithmetic happens (device, thread count,
autocast, torch version). The key hashes all of that, so a hit returns exactly the tensors the solve
would have computed, and nothing else ever hits.

What that buys: SFD-v draws its noise before its N, so its iteration k starts from the same noise as an
SFD run at that N with the same seed and batch; after those runs every SFD-v trajectory is a hit. A run
with another learning rate or loss, or the iterations a resumed run repeats after its last checkpoint,
hit too. One entry holds len(positions) × batch × sample-size float32 values (0.9 MB for a batch of 128
MNIST 16×16 trajectories at NFE 5).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fewstep.checkpoint import atomic_write

CACHE_VERSION = 1


def module_digest(module: torch.nn.Module) -> str:
    """sha256 over a module's parameters and buffers (names, dtypes, shapes, values) and their memory
    format (channels-last weights round differently, so they are another teacher for the cache), and
    for a Denoiser its parameterization and schedule."""
    h = hashlib.sha256()
    if hasattr(module, "describe"):
        h.update(json.dumps(module.describe(), sort_keys=True).encode())
    for name, t in sorted(module.state_dict().items()):
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|{t.ndim == 4 and not t.is_contiguous()}".encode())
        h.update(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tensor_digest(t: torch.Tensor | None) -> str:
    if t is None:
        return "none"
    t = t.detach().to("cpu").contiguous()
    return hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode()
                          + t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


class TrajectoryCache:
    """Teacher states keyed by everything that determines them; entries are written atomically, so a
    killed run leaves no partial entry, and a second process computing the same key writes the same bytes."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.hits = 0
        self.misses = 0

    def key(self, teacher_digest: str, setup: dict, x: torch.Tensor, labels: torch.Tensor | None) -> str:
        where = {"device": x.device.type, "torch": torch.__version__,
                 "threads": torch.get_num_threads() if x.device.type == "cpu" else None,
                 "autocast": (torch.is_autocast_enabled(x.device.type),
                              str(torch.get_autocast_dtype(x.device.type)))}
        text = json.dumps({"version": CACHE_VERSION, "teacher": teacher_digest, **setup, **where,
                           "x": tensor_digest(x), "labels": tensor_digest(labels)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, key: str, device) -> tuple[list[torch.Tensor], int] | None:
        path = self.path(key)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            entry = load_file(path)
        except Exception:  # an unreadable entry is recomputed (and rewritten), never trusted
            self.misses += 1
            return None
        self.hits += 1
        states = entry["states"].to(device)
        return list(states.unbind(0)), int(entry["teacher_nfe"])

    def put(self, key: str, states: list[torch.Tensor], teacher_nfe: int) -> None:
        tensors = {"states": torch.stack([s.detach().to("cpu") for s in states]).contiguous(),
                   "teacher_nfe": torch.tensor(teacher_nfe)}
        atomic_write(self.path(key), lambda p: save_file(tensors, p))

    def summary(self) -> dict:
        return {"dir": str(self.root), "hits": self.hits, "misses": self.misses}
