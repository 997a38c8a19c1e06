"""One training loop for teacher training and every distillation method.

A method supplies the loss; the loop supplies everything else: Adam, learning-rate schedule, EMA,
gradient clipping, mixed precision on GPU, data parallelism over torchrun, a progress bar,
`metrics.jsonl`, sample pictures from fixed seeds, atomic checkpoints, exact resume and a clean
stop on Ctrl-C.

Exact resume and data parallelism rest on one rule: every random draw of iteration k comes from
generators seeded by (seed, k), and each iteration draws the *global* batch, of which a process
uses its own slice. So a resumed run, an uninterrupted run and a 2-process run see the same data
and noise; gradients are averaged over processes (an all-reduce after each backward), which for a
batch-mean loss gives the full-batch gradient.

Methods may take several optimizer steps in one iteration (SFD steps once per student step), so a
method calls `ctx.step(loss)` itself rather than returning a single loss.

Timing: every iteration's wall time is split by a `Profiler` into the method's teacher calls
(`with ctx.timed("teacher")`), the student's forward (`ctx.timed("student")`) and backward (inside
`ctx.step`), the optimizer (all-reduce, clipping, Adam) and the rest. At each logged iteration the
loop also measures the *floor*: the same network calls as that iteration, on the same batch, timed
alone (`TrainMethod.floor_calls`). Both go to `metrics.jsonl`; the card's `training.profile` sums
them up, with overhead = iteration wall / floor. The floor's own time is not counted as training
time, and it changes no weights, optimizer state or random stream, so resume stays exact.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shlex
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from fewstep.checkpoint import (CARD_NAME, STATE_NAME, WEIGHTS_NAME, RunLock, atomic_write, load_train_state,
                                remove_stale_temp_files, save_checkpoint, save_train_state, write_json)
from fewstep.errors import FewstepError
from fewstep.viz import save_samples_picture


@dataclass
class TrainConfig:
    steps: int = 1000                 # iterations
    batch: int = 64                   # global batch (split over processes)
    lr: float = 2e-4
    lr_schedule: str = "constant"     # constant | step (÷10 at half, SFD) | cosine
    warmup: int = 0
    betas: tuple = (0.9, 0.999)
    weight_decay: float = 0.0
    ema: float | None = None          # EMA decay, None for none
    grad_clip: float | None = 1.0
    amp: str = "none"                 # none | bf16 | fp16 (GPU only)
    seed: int = 0
    log_every: int = 50
    sample_every: int = 0             # 0: only at the end
    ckpt_every: int = 0               # 0: only at the end
    n_preview: int = 64
    device: str = "auto"
    progress: bool = True
    log: str = "jsonl"                # jsonl | tensorboard (metrics.jsonl is always written)
    profile: bool = True              # time the network floor at each logged iteration (not counted as wall)
    # frozen teachers in channels-last format: off | on | auto (on for CPU). Off by default: on our 2-core CPU
    # it made SFD's teacher about 10 % slower, and its rounding differs from the standard-format student's,
    # so a teacher-initialised SFDDM student no longer starts at zero loss: Adam turns that rounding noise
    # into full-size steps (loss 3.8e-7 at the first iteration on the digits teacher, 0.089 at the second)
    channels_last: str = "off"
    snapshot_every: int = 0           # >0: weights every so many iterations in snapshots/ (quality vs time)

    @classmethod
    def from_args(cls, args) -> "TrainConfig":
        """The loop's settings from the command line's training-loop options (fewstep.cli.common.add_train_args)."""
        if args.iters < 1:
            raise FewstepError(f"--iters {args.iters}: expected at least 1 training iteration")
        return cls(steps=args.iters, batch=args.batch, lr=args.lr, lr_schedule=args.lr_schedule, warmup=args.warmup,
                   ema=args.ema, grad_clip=args.grad_clip or None, amp=args.amp, seed=args.seed,
                   log_every=args.log_every, sample_every=args.sample_every, ckpt_every=args.ckpt_every,
                   device=args.device, progress=not args.no_progress, log=args.log)

    def validate(self):
        if self.steps < 1:
            raise FewstepError(f"steps={self.steps}: expected at least 1 training iteration")
        if self.batch < 1:
            raise FewstepError(f"batch={self.batch}: expected a positive batch size")
        if not self.lr > 0:
            raise FewstepError(f"lr={self.lr}: expected a positive learning rate")
        if self.lr_schedule not in ("constant", "step", "cosine"):
            raise FewstepError(f"lr schedule {self.lr_schedule!r}: expected constant, step or cosine")
        if self.amp not in ("none", "bf16", "fp16"):
            raise FewstepError(f"amp={self.amp!r}: expected none, bf16 or fp16")
        if self.ema is not None and not 0 < self.ema < 1:
            raise FewstepError(f"ema={self.ema}: expected a decay in (0, 1), or none")
        if self.log not in ("jsonl", "tensorboard"):
            raise FewstepError(f"--log {self.log!r}: expected jsonl or tensorboard")
        if self.snapshot_every < 0:
            raise FewstepError(f"snapshot_every={self.snapshot_every}: expected 0 (none) or a positive iteration count")
        if self.channels_last not in ("auto", "on", "off"):
            raise FewstepError(f"channels_last={self.channels_last!r}: expected auto, on or off")


def run_record(args) -> dict:
    """The command line and its parsed arguments, as a run records them (a resume compares them)."""
    # cli.main(argv) records the arguments it parsed; sys.argv is someone else's when called in-process
    argv = getattr(args, "_argv", None)
    argv = sys.argv[1:] if argv is None else argv
    return {"command": "fewstep " + " ".join(shlex.quote(a) for a in argv), "args": {
        k: v for k, v in vars(args).items()
        if k not in ("func", "_argv") and isinstance(v, (int, float, str, bool, list, type(None)))}}


class TrainMethod:
    """What a method gives the loop. Subclasses set `name` and implement the hooks."""
    name = "method"
    needs_data = False

    def trainable(self) -> nn.Module:
        """The module whose parameters are optimized (a student Denoiser)."""
        raise NotImplementedError

    def train_step(self, ctx: "StepContext", batch: torch.Tensor | None, gen: torch.Generator) -> dict:
        """One iteration: compute losses, call ctx.step(loss) for each optimizer step, return logs."""
        raise NotImplementedError

    def card(self) -> dict:
        """Card sections from this method: 'method', 'sampler', 'teacher', 'data', ..."""
        raise NotImplementedError

    def preview(self, model: nn.Module, n: int, seed: int) -> torch.Tensor:
        """Samples from `model` (the trainable module, or its EMA) for the progress pictures."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def use_channels_last(self) -> None:
        """Run the method's frozen teacher networks in channels-last format (the loop calls this once,
        before any iteration, when TrainConfig.channels_last is on). Default: nothing to change."""

    def floor_calls(self) -> dict | None:
        """The network calls of the last iteration, to be timed alone: {"teacher": [fn, ...], "student":
        [fn, ...]}, one callable per call on that iteration's batch (teacher: a forward without grad;
        student: a forward and a backward). None: the method has no floor."""
        return None


def _keep_saved_channels_last(config: TrainConfig, out_dir: Path) -> TrainConfig:
    """A run resumed with the default teacher layout keeps the layout it started with (runs started before
    the default became 'off' ran under 'auto'), so that resuming stays exact; any other value is checked
    against the saved one like every setting."""
    try:
        saved = json.loads((out_dir / "config.json").read_text())["train"]["channels_last"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return config
    if config.channels_last == TrainConfig.channels_last and saved in ("auto", "on"):
        return replace(config, channels_last=saved)
    return config


FUSED_ADAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
PROFILE_SECTIONS = ("teacher", "student", "optimizer")


class Profiler:
    """Seconds spent in named sections of one iteration. On CUDA, with `sync`, each section waits for
    the device at both ends so the time is the work's own (off by default: syncs cost throughput)."""
    def __init__(self, device: torch.device, sync: bool = False):
        self.device = device
        self.sync = sync and device.type == "cuda"
        self.times = dict.fromkeys(PROFILE_SECTIONS, 0.0)
        self._open = False

    def reset(self):
        self.times = dict.fromkeys(PROFILE_SECTIONS, 0.0)

    def _wait(self):
        if self.sync:
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def section(self, name: str):
        if name not in self.times:
            raise ValueError(f"profile section {name!r}: expected one of {', '.join(PROFILE_SECTIONS)}")
        if self._open:  # a section inside another is counted once, by the outer one
            yield
            return
        self._open = True
        self._wait()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._wait()
            self.times[name] += time.perf_counter() - t0
            self._open = False

    def record(self, wall: float) -> dict:
        """This iteration's split: time_<section>_s for each section, time_rest_s and time_iter_s (the sum)."""
        rec = {f"time_{k}_s": round(v, 6) for k, v in self.times.items()}
        rec["time_rest_s"] = round(max(0.0, wall - sum(self.times.values())), 6)
        rec["time_iter_s"] = round(sum(rec.values()), 6)
        return rec

    def floor(self, calls: dict) -> dict:
        """Times each group of network calls alone: floor_teacher_s, floor_student_s and floor_s."""
        rec = {}
        for name in ("teacher", "student"):
            fns = calls.get(name) or []
            self._wait_always()
            t0 = time.perf_counter()
            for fn in fns:
                fn()
            self._wait_always()
            rec[f"floor_{name}_s"] = round(time.perf_counter() - t0, 6)
        rec["floor_s"] = round(rec["floor_teacher_s"] + rec["floor_student_s"], 6)
        return rec

    def _wait_always(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def profile_summary(records: list[dict]) -> dict | None:
    """The card's `training.profile`: mean seconds per iteration in each part over the iterations whose
    floor was measured, the floor, and overhead = Σ iteration wall / Σ floor over those iterations."""
    rows = [r for r in records if r.get("floor_s") is not None and r.get("time_iter_s") is not None]
    if not rows:
        return None
    n = len(rows)
    out = {"iterations_measured": n}
    for part in PROFILE_SECTIONS + ("rest", "iter"):
        out[f"{part}_s"] = sum(float(r.get(f"time_{part}_s") or 0) for r in rows) / n
    for part in ("floor_teacher", "floor_student", "floor"):
        out[f"{part}_s"] = sum(float(r.get(f"{part}_s") or 0) for r in rows) / n
    floor = sum(float(r["floor_s"]) for r in rows)
    out["overhead"] = sum(float(r["time_iter_s"]) for r in rows) / floor if floor > 0 else None
    return out


def untimed(part):
    """A stand-in for StepContext.timed where no profile is kept (a method's losses called directly)."""
    return contextlib.nullcontext()


def fresh_autocast(autocast):
    """A reusable copy of an autocast context (None or a null context: no autocast), for replaying calls."""
    if autocast is None or isinstance(autocast, contextlib.nullcontext):
        return contextlib.nullcontext()
    return torch.autocast(autocast.device, dtype=autocast.fast_dtype, enabled=autocast._enabled)


class StepContext:
    """Handed to methods: one optimizer step from a loss, with DDP averaging, clipping, AMP."""
    def __init__(self, trainer: "Trainer"):
        self.t = trainer
        self.optimizer_steps = 0
        self.labels = None  # this process's class labels of the iteration's data batch, if the data has them

    @property
    def world(self) -> int:
        return self.t.world

    @property
    def rank(self) -> int:
        return self.t.rank

    @property
    def device(self) -> torch.device:
        return self.t.device

    def local(self, global_batch: torch.Tensor) -> torch.Tensor:
        """This process's slice of a tensor drawn for the whole global batch."""
        n = global_batch.shape[0]
        per = n // self.world
        return global_batch[self.rank * per:(self.rank + 1) * per]

    def autocast(self):
        return self.t.autocast()

    def timed(self, section: str):
        """Context manager: the enclosed work counts as `section` (teacher, student, optimizer) in the profile."""
        return self.t.profiler.section(section)

    def step(self, loss: torch.Tensor) -> float:
        """zero_grad → backward → all-reduce → clip → optimizer step. Returns the gradient norm."""
        if not torch.isfinite(loss.detach()):
            raise FewstepError(f"loss became {float(loss.detach())} at iteration {self.t.step}; lower --lr "
                               "or check the data (nothing was saved from this iteration)")
        opt = self.t.optimizer
        opt.zero_grad(set_to_none=True)
        with self.timed("student"):  # the student's backward
            if self.t.scaler is not None:
                self.t.scaler.scale(loss).backward()
            else:
                loss.backward()
        with self.timed("optimizer"):
            return self._update(opt)

    def _update(self, opt) -> float:
        if self.t.scaler is not None:
            self.t.scaler.unscale_(opt)
        params = self.t.params
        if self.world > 1:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= self.world
            offset = 0
            for p, g in zip(params, grads):
                p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
                offset += g.numel()
        clip = self.t.config.grad_clip
        gnorm = torch.nn.utils.clip_grad_norm_(params, clip if clip else float("inf"))
        if self.t.scaler is not None:
            self.t.scaler.step(opt)
            self.t.scaler.update()
        else:
            opt.step()
        self.optimizer_steps += 1
        return float(gnorm)


def _seeded(seed: int, step: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + stream) % (2**63 - 1))


def tensorboard_writer():
    """TensorBoard's SummaryWriter class, or a clear error when the optional extra is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise FewstepError("--log tensorboard needs the tensorboard package: pip install 'fewstep[tensorboard]'") from None
    return SummaryWriter


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise FewstepError(f"device {name!r}: expected cpu, cuda or cuda:N") from None


class Trainer:
    """Runs a TrainMethod for config.steps iterations into out_dir."""
    def __init__(self, method: TrainMethod, config: TrainConfig, out_dir: str | Path,
                 data: torch.Tensor | None = None, resume: bool = False, run_info: dict | None = None,
                 labels: torch.Tensor | None = None):
        config.validate()
        self.out_dir = Path(out_dir)
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.is_main = self.rank == 0
        self.lock, created = None, False
        if self.is_main:  # the folder is this run's alone from here on (released by the OS if the process dies)
            created = not self.out_dir.exists()
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.lock = RunLock(self.out_dir).acquire()
        try:
            self._setup(method, config, data, resume, run_info, labels)
        except BaseException:
            self._release()
            if created and not any(p.name != ".fewstep.lock" for p in self.out_dir.iterdir()):
                shutil.rmtree(self.out_dir, ignore_errors=True)  # a refused run leaves no folder behind
            raise

    def _release(self):
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _setup(self, method, config, data, resume, run_info, labels):
        self.fresh_resume = False
        if self.is_main:
            resume = self._check_folder(config, resume, run_info or {})
        elif resume:  # the other processes of a torchrun follow the same rule as process 0
            resume = (self.out_dir / STATE_NAME).exists()
        if resume:
            config = _keep_saved_channels_last(config, self.out_dir)
        self.method, self.config = method, config
        self.run_info = run_info or {}
        if self.world > 1 and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() and config.device != "cpu" else "gloo"
            dist.init_process_group(backend)
        if config.batch % self.world:
            raise FewstepError(f"batch={config.batch} must divide evenly over {self.world} processes")
        self.device = pick_device(config.device)
        if self.device.type == "cuda" and self.world > 1:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if method.needs_data and (data is None or len(data) == 0):
            raise FewstepError(f"method {method.name!r} needs training data; pass --data")
        self.data = data
        if labels is not None and (data is None or len(labels) != len(data)):
            raise FewstepError(f"labels: expected one per training sample ({0 if data is None else len(data)}), "
                               f"got {len(labels)}")
        self.labels = labels
        self.model = method.trainable().to(self.device)
        self.model.train()
        self.channels_last = config.channels_last == "on" or (config.channels_last == "auto"
                                                              and self.device.type == "cpu")
        if self.channels_last:
            # CPU: measured faster for image teachers; the format changes float rounding, so a resumed
            # run must use the same setting (it is not among RESUMABLE_CHANGES)
            method.use_channels_last()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # fused Adam: one kernel over every parameter instead of a loop over tensors; on CPU a step of the
        # 1M-parameter digits UNet takes 2.2 ms instead of 9.6 (the same update up to float rounding). A
        # resumed run keeps the setting saved with its optimizer state, so resuming stays exact
        self.fused_adam = self.device.type in ("cpu", "cuda") and all(p.dtype in FUSED_ADAM_DTYPES
                                                                      for p in self.params)
        self.optimizer = torch.optim.Adam(self.params, lr=config.lr, betas=tuple(config.betas),
                                          weight_decay=config.weight_decay, fused=self.fused_adam or None)
        self.ema = None
        if config.ema is not None:
            self.ema = copy.deepcopy(self.model).eval()
            for p in self.ema.parameters():
                p.requires_grad_(False)
        self.scaler = None
        if config.amp == "fp16" and self.device.type == "cuda":
            self.scaler = torch.amp.GradScaler("cuda")
        self.step = 0
        self.wall = 0.0
        self.profiler = Profiler(self.device)
        if config.log == "tensorboard":
            tensorboard_writer()  # a missing extra is reported before anything is written
        self.board = None
        if resume:
            self._resume()

    def _check_folder(self, config: TrainConfig, resume: bool, run_info: dict) -> bool:
        """Whether there is a state to resume from; refuses a folder that holds another run or a model.
        A run killed before its first checkpoint left only its config.json: --resume starts it again from
        iteration 0 (the same bytes as an uninterrupted run) when its settings are the same."""
        out = self.out_dir
        has_state = (out / STATE_NAME).exists()
        has_model = (out / WEIGHTS_NAME).exists() or (out / CARD_NAME).exists()
        if not resume:
            if has_state:
                raise FewstepError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
            if has_model:
                raise FewstepError(f"{out} already holds a model; choose another --out (fewstep never writes over "
                                   "a model)")
            return False
        if has_state:
            return True
        if has_model:
            raise FewstepError(f"--resume: {out} holds a model but no training state ({STATE_NAME}): nothing to "
                               "resume; choose another --out to train again")
        try:
            saved = json.loads((out / "config.json").read_text())
            saved = {"config": saved["train"], "args": saved.get("args") or {}}
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            raise FewstepError(f"--resume: {out} holds no run (no {STATE_NAME} and no readable config.json): "
                               "nothing to resume; start without --resume") from None
        self.config, self.run_info = config, run_info  # what _changed_settings compares
        differ = self._changed_settings(saved)
        if differ:
            raise FewstepError("--resume: settings differ from the interrupted run's: " + "; ".join(differ))
        print(f"fewstep: note: {out} was stopped before its first checkpoint; its run starts again from "
              "iteration 0", file=sys.stderr)
        self.fresh_resume = True
        return False

    # ---- helpers ---------------------------------------------------------------------------------
    def autocast(self):
        if self.device.type != "cuda" or self.config.amp == "none":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=torch.bfloat16 if self.config.amp == "bf16" else torch.float16)

    def lr_at(self, step: int) -> float:
        c = self.config
        lr = c.lr
        if c.lr_schedule == "step" and step >= c.steps // 2:
            lr = c.lr / 10
        elif c.lr_schedule == "cosine":
            lr = c.lr * 0.5 * (1 + math.cos(math.pi * step / c.steps))
        if c.warmup and step < c.warmup:
            lr *= (step + 1) / c.warmup
        return lr

    def global_indices(self, step: int) -> torch.Tensor | None:
        """Indices of the data of iteration `step` for the whole global batch (epoch-wise permutations)."""
        if self.data is None or not self.method.needs_data:
            return None
        n, b = len(self.data), self.config.batch
        parts, pos, remaining = [], step * b, b
        while remaining:
            epoch, off = divmod(pos, n)
            take = torch.randperm(n, generator=_seeded(self.config.seed, epoch, 1))[off:off + remaining]
            parts.append(take)
            pos += len(take)
            remaining -= len(take)
        return torch.cat(parts)

    def eval_model(self) -> nn.Module:
        return self.ema if self.ema is not None else self.model

    # ---- state -----------------------------------------------------------------------------------
    def _state(self) -> dict:
        return {"step": self.step, "wall": self.wall, "model": self.model.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "optimizer": self.optimizer.state_dict(), "method": self.method.state_dict(),
                "config": json.loads(json.dumps(asdict(self.config))), "args": self.run_info.get("args") or {}}

    def _resume(self):
        st = load_train_state(self.out_dir)
        differ = self._changed_settings(st)
        if differ:
            raise FewstepError("--resume: settings differ from the interrupted run's: " + "; ".join(differ)
                               + ". Resume with the same settings (only the iteration count, logging, "
                               "checkpoint cadence and device may change)")
        try:
            self.model.load_state_dict(st["model"])
        except RuntimeError as e:
            raise FewstepError(f"--resume: the saved weights in {self.out_dir} do not fit this model "
                               f"(was it made with another network or fewstep version?): {str(e).splitlines()[0]}") from None
        if self.ema is not None and st.get("ema") is not None:
            self.ema.load_state_dict(st["ema"])
        self.optimizer.load_state_dict(st["optimizer"])
        if not self.fused_adam:  # saved where fused Adam runs, resumed on a device where it does not
            for group in self.optimizer.param_groups:
                group["fused"] = None
        self.method.load_state_dict(st.get("method") or {})
        self.step, self.wall = int(st["step"]), float(st.get("wall", 0.0))
        if self.is_main:
            self._drop_logs_after(self.step)

    # settings a resumed run may change: they do not alter what the finished run computes
    RESUMABLE_CHANGES = {"config": {"steps", "progress", "log_every", "sample_every", "ckpt_every", "n_preview",
                                    "device", "log", "profile", "snapshot_every"},
                         "args": {"iters", "no_progress", "log_every", "sample_every", "ckpt_every", "device",
                                  "resume", "out", "log", "profile", "snapshot_every", "trajectory_cache"}}

    def _changed_settings(self, st: dict) -> list[str]:
        """'name: now X, was Y' for every loop or command-line setting that differs from the saved run."""
        now = {"config": json.loads(json.dumps(asdict(self.config))), "args": self.run_info.get("args") or {}}
        differ = []
        for section in ("config", "args"):
            saved = st.get(section) or {}
            for key, value in now[section].items():
                if key in self.RESUMABLE_CHANGES[section] or key not in saved:
                    continue
                if json.loads(json.dumps(saved[key])) != value:
                    name = f"--{key.replace('_', '-')}" if section == "args" else key
                    if not any(d.startswith(name + ":") for d in differ):
                        differ.append(f"{name}: now {value!r}, was {saved[key]!r}")
        return differ

    def _drop_logs_after(self, step: int):
        """Forget metrics logged after the saved state: the resumed run logs those iterations again."""
        for name in ("metrics.jsonl", "snapshots/snapshots.jsonl"):
            self._drop_lines_after(self.out_dir / name, step)

    @staticmethod
    def _drop_lines_after(path: Path, step: int):
        if not path.is_file():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                if int(json.loads(line).get("step", 0)) <= step:
                    kept.append(line)
            except (ValueError, AttributeError, TypeError, RecursionError):
                pass  # a line cut short by a kill (or not a record)
        atomic_write(path, lambda p: Path(p).write_text("".join(f"{line}\n" for line in kept)))

    def save(self, final: bool = False):
        if not self.is_main:
            return
        card = self.method.card()
        card.setdefault("training", {})
        card["training"].update({"iterations": self.step, "batch": self.config.batch,
                                 "wall_time_s": round(self.wall, 2), "processes": self.world,
                                 "device": str(self.device), "finished": final,
                                 **self.run_info.get("training", {})})
        profile = profile_summary(self._records())
        if profile is not None:
            card["training"]["profile"] = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in profile.items()}
        if self.run_info.get("command"):
            card["training"]["command"] = self.run_info["command"]
        model = self.eval_model()
        save_checkpoint(self.out_dir, model, card)
        save_train_state(self.out_dir, self._state())

    def _records(self) -> list[dict]:
        """The run's metrics.jsonl records (a line cut short by a kill is skipped)."""
        path = self.out_dir / "metrics.jsonl"
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

    def _measure_floor(self) -> dict:
        """The last iteration's network calls timed alone (grads they leave are dropped)."""
        calls = self.method.floor_calls()
        if not calls:
            return {}
        rec = self.profiler.floor(calls)
        for p in self.params:
            p.grad = None
        return rec

    def _snapshot(self):
        """The eval weights now, in snapshots/step-<step>.safetensors, and a line in snapshots.jsonl with
        the iteration and the training wall time so far: checkpoints along the run, for quality vs time."""
        if not self.is_main:
            return
        folder = self.out_dir / "snapshots"
        folder.mkdir(exist_ok=True)
        net = getattr(self.eval_model(), "net", self.eval_model())
        sd = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
        name = f"step-{self.step:07d}.safetensors"
        atomic_write(folder / name, lambda p: save_file(sd, p))
        with open(folder / "snapshots.jsonl", "a") as f:
            f.write(json.dumps({"step": self.step, "wall_s": round(self.wall, 3), "file": name}) + "\n")

    def _log(self, record: dict):
        if not self.is_main:
            return
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.board is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.board.add_scalar(key, value, record["step"])

    def _open_board(self):
        """TensorBoard's writer in OUT/tensorboard (on resume, events after the saved iteration are dropped)."""
        if self.config.log != "tensorboard" or not self.is_main:
            return None
        writer_class = tensorboard_writer()
        return writer_class(str(self.out_dir / "tensorboard"), purge_step=self.step or None)

    def _preview(self):
        if not self.is_main or not self.config.n_preview:
            return
        model = self.eval_model()
        was_training = model.training
        model.eval()
        with torch.no_grad():
            x = self.method.preview(model, self.config.n_preview, seed=self.config.seed)
        model.train(was_training)
        path = save_samples_picture(x, self.out_dir / f"samples-{self.step:07d}.png", title=f"step {self.step}")
        if self.board is not None:
            with Image.open(path) as im:
                self.board.add_image("samples", np.asarray(im.convert("RGB")), self.step, dataformats="HWC")

    # ---- the loop --------------------------------------------------------------------------------
    def run(self) -> Path:
        try:
            return self._run()
        finally:
            self._release()

    def _run(self) -> Path:
        c = self.config
        if self.is_main:
            self.lock.sign()
            remove_stale_temp_files(self.out_dir)  # under the run's lock: no other process writes here
            if self.fresh_resume:
                self._drop_logs_after(0)
            write_json(self.out_dir / "config.json", {"train": asdict(c), **self.run_info,
                                                      "method": self.method.name, "processes": self.world})
        ctx = StepContext(self)
        self.board = self._open_board()
        bar = tqdm(total=c.steps, initial=self.step, desc=self.method.name, unit="it",
                   disable=not (c.progress and self.is_main), dynamic_ncols=True)
        interrupted = False
        # Ctrl-C / SIGTERM only request a stop, taken between iterations: an interrupt that landed
        # after the optimizer step but before the step count moved would make --resume repeat an
        # update. A second request stops at once; if that is inside an iteration, whose weights and
        # optimizer state may be half updated, nothing is saved (the last checkpoint stays).
        stop: list[int] = []
        in_iteration = False

        def request_stop(signum, frame):
            if stop:
                raise KeyboardInterrupt
            stop.append(signum)
            if self.is_main:
                print("\nstopping after the current iteration (interrupt again to stop at once)",
                      file=sys.stderr, flush=True)

        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.getsignal(sig)
                signal.signal(sig, request_stop)
        try:
            while self.step < c.steps:
                if self.world > 1:  # all processes must stop at the same iteration
                    flag = torch.tensor([float(bool(stop))], device=self.device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    if flag.item() and not stop:
                        stop.append(signal.SIGINT)
                if stop:
                    interrupted = True
                    break
                in_iteration = True
                self.profiler.reset()
                logged = (self.step + 1) % c.log_every == 0 or self.step + 1 == c.steps
                # CUDA: a logged iteration's parts wait for the device, so they are its own work
                self.profiler.sync = logged and c.profile and self.device.type == "cuda"
                t0 = time.perf_counter()
                for g in self.optimizer.param_groups:
                    g["lr"] = self.lr_at(self.step)
                torch.manual_seed((c.seed * 1_000_003 + self.step * 7919 + 101 + self.rank) % (2**63 - 1))
                gen = _seeded(c.seed, self.step, 2)
                idx = self.global_indices(self.step)
                batch = None if idx is None else ctx.local(self.data[idx]).to(self.device)
                ctx.labels = None if idx is None or self.labels is None else ctx.local(self.labels[idx]).to(self.device)
                self.model.train()
                logs = self.method.train_step(ctx, batch, gen)
                if self.ema is not None:
                    # warm-up keeps a short run's EMA from lingering at the initial weights
                    decay = min(c.ema, (1 + self.step) / (10 + self.step))
                    with torch.no_grad():
                        for pe, p in zip(self.ema.parameters(), self.model.parameters()):
                            pe.lerp_(p, 1 - decay)
                        for be, b in zip(self.ema.buffers(), self.model.buffers()):
                            be.copy_(b)
                self.step += 1
                in_iteration = False
                iteration_s = time.perf_counter() - t0
                self.wall += iteration_s
                bar.update(1)
                if "loss" in logs:
                    bar.set_postfix(loss=f"{logs['loss']:.4g}", refresh=False)
                if logged:
                    timing = self.profiler.record(iteration_s)
                    if c.profile:  # after the iteration, outside its wall time
                        timing.update(self._measure_floor())
                    self._log({"step": self.step, "lr": self.lr_at(self.step - 1),
                               "wall_s": round(self.wall, 3), **logs, **timing})
                if c.snapshot_every and (self.step % c.snapshot_every == 0 or self.step == c.steps):
                    self._snapshot()
                if c.ckpt_every and self.step % c.ckpt_every == 0 and self.step < c.steps:
                    self.save()
                if c.sample_every and self.step % c.sample_every == 0 and self.step < c.steps:
                    self._preview()
        except KeyboardInterrupt:
            interrupted = True
        finally:
            bar.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if interrupted and in_iteration:
            self._close_board()
            if self.is_main:
                print(f"\nstopped at once inside iteration {self.step + 1}; nothing of it was saved, and --resume "
                      "continues from the last checkpoint", file=sys.stderr)
            raise SystemExit(130)
        self.save(final=not interrupted)
        if interrupted:
            self._close_board()
            if self.is_main:
                print(f"\ninterrupted at iteration {self.step}; state saved in {self.out_dir} "
                      "(continue with --resume)")
            raise SystemExit(130)
        self._preview()
        self._close_board()
        if self.world > 1:
            dist.barrier()
        return self.out_dir

    def _close_board(self):
        if self.board is not None:
            self.board.close()
            self.board = None
