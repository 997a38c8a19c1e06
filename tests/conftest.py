"""Shared fixtures: tiny trained teachers (built once per session) and an offline guard.

Every test runs with outbound connections refused, so the suite proves fewstep needs no network
at run time (no weight or data downloads).
"""
from __future__ import annotations

import os
import socket

import pytest
import torch

# libraries that look for a hub must not try to reach it (sub-processes inherit these)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FEWSTEP_NO_NETWORK", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# `make test` runs one pytest-xdist worker per core: each computes on one thread (and so do the commands it
# starts), so the workers do not fight over the cores
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


class NetworkBlocked(RuntimeError):
    pass


def _refuse(self, address, *args, **kwargs):
    # AF_UNIX sockets are local IPC, not network
    if getattr(self, "family", None) == getattr(socket, "AF_UNIX", object()):
        return _original_connect(self, address, *args, **kwargs)
    raise NetworkBlocked(f"network access attempted during tests: connect to {address!r}")


_original_connect = socket.socket.connect


@pytest.fixture(scope="session", autouse=True)
def no_network():
    """Refuse every outbound connection made in this process for the whole session."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", _refuse)
        mp.setattr(socket.socket, "connect_ex", _refuse)
        yield


def train_tiny_teacher(out_dir, net, data_name: str, steps: int, batch: int, lr: float = 1e-3, T: int = 1024):
    """Train `net` as an ε-prediction VP teacher on a built-in data set; returns the checkpoint dir."""
    from fewstep.data import load_dataset
    from fewstep.denoiser import Denoiser
    from fewstep.schedule import Schedule
    from fewstep.teacher.method import TeacherTraining
    from fewstep.train import TrainConfig, Trainer

    ds = load_dataset(data_name)
    den = Denoiser(net, Schedule.vp("linear", T), "eps")
    info = {**ds.info, "name": ds.name, "kind": ds.kind, "shape": list(ds.shape)}
    cfg = TrainConfig(steps=steps, batch=batch, lr=lr, seed=0, log_every=max(1, steps // 4), n_preview=0,
                      device="cpu", progress=False)
    return Trainer(TeacherTraining(den, info), cfg, out_dir, data=ds.x).run()


@pytest.fixture(scope="session")
def tiny_gmm8_teacher(tmp_path_factory):
    """Checkpoint dir of a small MLP teacher on gmm8 (T=1024 linear VP, ε): good enough to sample."""
    from fewstep.nets import MLP

    torch.manual_seed(0)
    net = MLP(dim=2, hidden=64, depth=2, dropout=0.0)
    return train_tiny_teacher(tmp_path_factory.mktemp("gmm8-teacher"), net, "gmm8", steps=300, batch=256)


@pytest.fixture(scope="session")
def tiny_digits_teacher(tmp_path_factory):
    """Checkpoint dir of a tiny 8x8 U-Net teacher on digits; its quality is irrelevant."""
    from fewstep.nets import UNet

    torch.manual_seed(0)
    net = UNet(resolution=8, in_channels=1, channels=16, channel_mult=(1, 2), num_res_blocks=1,
               attn_resolutions=(), dropout=0.0)
    return train_tiny_teacher(tmp_path_factory.mktemp("digits-teacher"), net, "digits", steps=100, batch=32)
