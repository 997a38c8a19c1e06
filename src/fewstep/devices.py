"""Which device a run uses: a name (auto, cpu, cuda, cuda:N, mps) checked against what this machine and this
torch build have, and where mixed precision runs."""
from __future__ import annotations

import torch

from fewstep.errors import FewstepError, option

# where --amp runs: bf16 on a CPU too (AMX or AVX512-BF16 make it fast), fp16 only with CUDA's loss scaling
AMP_DEVICES = {("cuda", "bf16"), ("cuda", "fp16"), ("cpu", "bf16")}


def pick_device(name: str) -> torch.device:
    """The torch device `name` names (auto: CUDA where there is one, else the CPU), refused with a message where
    this machine has no such device (torch would fail later, on the first tensor moved there)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FewstepError(f"{option('device', name)}: expected cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if torch.version.cuda is None:
            why = "this torch is a build without CUDA"
        elif not torch.cuda.is_available():
            why = "no CUDA GPU is visible"
        elif (device.index or 0) >= torch.cuda.device_count():
            why = f"this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0"
        else:
            return device
        raise FewstepError(f"{option('device', name)}: {why}; use cpu (or auto: CUDA where there is one)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise FewstepError(f"{option('device', name)}: this machine or torch build has no MPS device; use cpu")
    return device
