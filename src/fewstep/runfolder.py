"""A training run's folder, from the side of its files: the lock it holds for the run's life, the check that it
holds no other run or model, config.json, metrics.jsonl (and TensorBoard), the snapshots along the run, the
preview pictures, and the log lines a resumed run drops. Only the main process of a torchrun writes; on the
others every call is a no-op. The training loop (fewstep.train.Trainer) decides what goes in."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.torch import save_file

from fewstep.checkpoint import (CARD_NAME, LOCK_NAME, STATE_NAME, WEIGHTS_NAME, RunLock, atomic_write,
                                remove_stale_temp_files, write_json)
from fewstep.errors import FewstepError, option
from fewstep.train_config import settings_refusal
from fewstep.viz import save_samples_picture

LOGS = ("metrics.jsonl", "snapshots/snapshots.jsonl")


def read_log(path: Path) -> list[dict]:
    """The records of one of a run's JSONL logs (a line cut short by a kill, or being written, is skipped)."""
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def read_snapshots(run_dir: Path) -> list[dict]:
    """The snapshots along a run ({"step", "wall_s", "file"}), one a step in step order: the last line of each
    (a log an older fewstep wrote may hold a restarted run's steps twice)."""
    entries = read_log(Path(run_dir) / "snapshots" / "snapshots.jsonl")
    return sorted({e["step"]: e for e in entries}.values(), key=lambda e: e["step"])


def tensorboard_writer():
    """TensorBoard's SummaryWriter class, or a clear error when the optional extra is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise FewstepError(f"{option('log', 'tensorboard')} needs the tensorboard package: pip install "
                           "'fewstep[tensorboard]'") from None
    return SummaryWriter


class RunFolder:
    def __init__(self, path: str | Path, is_main: bool = True):
        self.path, self.is_main = Path(path), is_main
        self.lock, self.created, self.board = None, False, None
        self.started_before = False  # a run opened this folder before (its lock file was there)

    # ---- the lock ----------------------------------------------------------------------------------------
    def open(self) -> "RunFolder":
        """Create the folder if needed and take its lock: from here on it is this run's alone (the system
        releases the lock if the process dies)."""
        if self.is_main:
            self.created = not self.path.exists()
            self.started_before = (self.path / LOCK_NAME).exists()
            self.path.mkdir(parents=True, exist_ok=True)
            self.lock = RunLock(self.path).acquire()
        return self

    def close(self):
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if self.board is not None:
            self.board.close()
            self.board = None

    def refused(self):
        """A run refused before it started: release the folder, and leave none behind if it made it."""
        self.close()
        if self.is_main and self.created and not any(p.name != LOCK_NAME for p in self.path.iterdir()):
            shutil.rmtree(self.path, ignore_errors=True)

    # ---- what the folder holds -----------------------------------------------------------------------------
    def check(self, resume: bool, changed_settings) -> tuple[bool, bool]:
        """(resume from a saved state?, start a stopped run again from iteration 0?). Refuses a folder that
        holds another run or a model. A run killed before its first checkpoint left its config.json, or only its
        lock file if it was killed before writing that: --resume starts it again (the same bytes as an
        uninterrupted run), after checking that `changed_settings(saved)`, given a saved {"config", "args"},
        names no difference. A folder no run has opened holds nothing to resume."""
        out = self.path
        has_state = (out / STATE_NAME).exists()
        has_model = (out / WEIGHTS_NAME).exists() or (out / CARD_NAME).exists()
        if not resume:
            if has_state:
                raise FewstepError(f"{out} already holds a run; pass {option('resume', True)} to continue it or "
                                   f"choose another folder for {option('out')}")
            if has_model:
                raise FewstepError(f"{out} already holds a model; choose another folder for {option('out')} (fewstep never "
                                   "writes over a model)")
            return False, False
        if has_state:
            return True, False
        if has_model:
            raise FewstepError(f"{option('resume')}: {out} holds a model but no training state ({STATE_NAME}): "
                               f"nothing to resume; choose another folder for {option('out')} to train again")
        if not (out / "config.json").exists() and self.started_before:
            # a run opened the folder and was killed before it wrote its config: nothing to compare or keep
            print(f"fewstep: note: {out} holds a run stopped before it began; it starts at iteration 0",
                  file=sys.stderr)
            return False, True
        try:
            saved = json.loads((out / "config.json").read_text())
            saved = {"config": saved["train"], "args": saved.get("args") or {}, "method_name": saved.get("method")}
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            raise FewstepError(f"{option('resume')}: {out} holds no run (no {STATE_NAME} and no readable config.json): "
                               f"nothing to resume; start without {option('resume')}") from None
        differ = changed_settings(saved)
        if differ:
            raise settings_refusal(differ)
        print(f"fewstep: note: {out} was stopped before its first checkpoint; its run starts again from "
              "iteration 0", file=sys.stderr)
        return False, True

    def start(self, config: dict, drop_logs_after: int | None = None):
        """The run begins: sign the lock, clear what killed writers left, drop the log lines (and snapshot
        entries) after the iteration it starts from, and write config.json."""
        if not self.is_main:
            return
        self.lock.sign()
        remove_stale_temp_files(self.path)  # under the lock: no other process writes here
        if drop_logs_after is not None:
            self.drop_logs_after(drop_logs_after)
        write_json(self.path / "config.json", config)

    def drop_logs_after(self, step: int):
        """Forget log lines after `step`: the resumed run logs those iterations again."""
        for name in LOGS:
            path = self.path / name
            if not path.is_file():
                continue
            kept = []
            for line in path.read_text().splitlines():
                try:
                    if int(json.loads(line).get("step", 0)) <= step:
                        kept.append(line)
                except (ValueError, AttributeError, TypeError, RecursionError):
                    pass  # a line cut short by a kill (or not a record)
            atomic_write(path, lambda p, kept=kept: Path(p).write_text("".join(f"{line}\n" for line in kept)))

    # ---- logs ------------------------------------------------------------------------------------------------
    def open_board(self, kind: str, step: int):
        """TensorBoard's writer in OUT/tensorboard when `kind` asks for it (on resume, events after the saved
        iteration are dropped)."""
        if kind == "tensorboard" and self.is_main:
            self.board = tensorboard_writer()(str(self.path / "tensorboard"), purge_step=step or None)

    def log(self, record: dict):
        if not self.is_main:
            return
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.board is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.board.add_scalar(key, value, record["step"])

    def records(self) -> list[dict]:
        """The run's metrics.jsonl records (a line cut short by a kill is skipped)."""
        return read_log(self.path / "metrics.jsonl")

    def snapshot(self, state_dict: dict, step: int, wall: float):
        """Weights now, in snapshots/step-<step>.safetensors, and a line in snapshots.jsonl with the iteration
        and the training wall time so far: checkpoints along the run, for quality against time."""
        if not self.is_main:
            return
        folder = self.path / "snapshots"
        folder.mkdir(exist_ok=True)
        sd = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
        name = f"step-{step:07d}.safetensors"
        atomic_write(folder / name, lambda p: save_file(sd, p))
        with open(folder / "snapshots.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "wall_s": round(wall, 3), "file": name}) + "\n")

    def preview(self, samples, step: int):
        """samples-<step>.png (and the same picture in TensorBoard)."""
        if not self.is_main:
            return
        path = save_samples_picture(samples, self.path / f"samples-{step:07d}.png", title=f"step {step}")
        if self.board is not None:
            with Image.open(path) as im:
                self.board.add_image("samples", np.asarray(im.convert("RGB")), step, dataformats="HWC")
