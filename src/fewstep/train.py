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
import os
import signal
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from fewstep.checkpoint import STATE_NAME, finished_run, load_train_state, save_checkpoint, save_train_state
from fewstep.devices import AMP_DEVICES, pick_device
from fewstep.errors import FewstepError, option
from fewstep.loop_signals import StoppedTime, StopRequests
from fewstep.runfolder import RunFolder, tensorboard_writer
from fewstep.timing import CostNote, Profiler, peak_memory_mb, profile_summary
from fewstep.train_config import TrainConfig, changed_settings, refuse_another_method, settings_refusal


class TrainMethod:
    """What a method gives the loop. Subclasses set `name` and implement the hooks."""
    name = "method"
    needs_data = False
    # the last iteration's inputs, kept by train_step for floor_calls to replay (None before the first)
    _last = None

    def trainable(self) -> nn.Module:
        """The module whose parameters are optimized (a student Denoiser)."""
        raise NotImplementedError

    def train_step(self, ctx: "StepContext", batch: torch.Tensor | None, gen: torch.Generator) -> dict:
        """One iteration: compute losses, call ctx.step(loss) for each optimizer step, return logs (with
        `teacher_cached`: 1 where the iteration read its teacher outputs from a cache, for the cost note)."""
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
        student: a forward and a backward), built from `self._last`. None: the method has no floor (or has not
        run an iteration yet)."""
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
            raise FewstepError(f"loss became {float(loss.detach())} at iteration {self.t.step}; lower {option('lr')} "
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


def global_batch_indices(n: int, batch: int, seed: int, step: int) -> torch.Tensor:
    """Indices into n data items of iteration `step`'s whole global batch: epoch-wise seeded permutations,
    read in order (a batch that crosses an epoch's end takes the rest from the next one)."""
    parts, pos, remaining = [], step * batch, batch
    while remaining:
        epoch, off = divmod(pos, n)
        take = torch.randperm(n, generator=_seeded(seed, epoch, 1))[off:off + remaining]
        parts.append(take)
        pos += len(take)
        remaining -= len(take)
    return torch.cat(parts)


def _check_data(method: TrainMethod, data, labels) -> None:
    if method.needs_data and (data is None or len(data) == 0):
        raise FewstepError(f"method {method.name!r} needs training data; pass {option('data')}")
    if labels is not None and (data is None or len(labels) != len(data)):
        raise FewstepError(f"labels: expected one per training sample ({0 if data is None else len(data)}), "
                           f"got {len(labels)}")


def _checkpoint_gradients(model: nn.Module) -> None:
    net = getattr(model, "net", model)
    if not hasattr(net, "set_gradient_checkpointing"):
        raise FewstepError(f"{option('grad_checkpoint')}: the {net.config.get('type')} network has no gradient "
                           "checkpointing; it is there for diffusers networks (large UNets)")
    net.set_gradient_checkpointing(True)


def _adam(params: list, config: TrainConfig, device: torch.device) -> tuple[bool, torch.optim.Adam]:
    """(fused, the optimizer). Fused Adam: one kernel over every parameter instead of a loop over tensors; on
    CPU a step of the 1M-parameter digits UNet takes 2.2 ms instead of 9.6 (the same update up to float
    rounding). A resumed run keeps the setting saved with its optimizer state, so resuming stays exact."""
    fused = device.type in ("cpu", "cuda") and all(p.dtype in FUSED_ADAM_DTYPES for p in params)
    return fused, torch.optim.Adam(params, lr=config.lr, betas=tuple(config.betas),
                                   weight_decay=config.weight_decay, fused=fused or None)


class Trainer:
    """Runs a TrainMethod for config.steps iterations into out_dir (its files: fewstep.runfolder.RunFolder)."""

    def __init__(self, method: TrainMethod, config: TrainConfig, out_dir: str | Path,
                 data: torch.Tensor | None = None, resume: bool = False, run_info: dict | None = None,
                 labels: torch.Tensor | None = None):
        config.validate()
        self.out_dir = Path(out_dir)
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.is_main = self.rank == 0
        self.folder = RunFolder(self.out_dir, self.is_main).open()
        try:
            self._setup(method, config, data, resume, run_info or {}, labels)
        except BaseException:
            self.folder.refused()
            raise

    def _setup(self, method, config, data, resume, run_info, labels):
        self.method, self.config, self.run_info = method, config, run_info  # what _changed_settings compares
        self.fresh_resume = False
        if self.is_main:
            resume, self.fresh_resume = self.folder.check(resume, self._changed_settings)
        elif resume:  # the other processes of a torchrun follow the same rule as process 0
            resume = (self.out_dir / STATE_NAME).exists()
        if resume:
            self.config = config = _keep_saved_channels_last(config, self.out_dir)
        if self.world > 1 and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() and config.device != "cpu" else "gloo"
            dist.init_process_group(backend)
        if config.batch % self.world:
            raise FewstepError(f"batch={config.batch} must divide evenly over {self.world} processes")
        self.device = pick_device(config.device)
        if config.amp != "none" and (self.device.type, config.amp) not in AMP_DEVICES:
            raise FewstepError(f"{option('amp', config.amp)}: mixed precision runs bf16 or fp16 on CUDA and bf16 on a "
                               f"CPU, not {config.amp} on {self.device.type}")
        if self.device.type == "cuda" and self.world > 1:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        _check_data(method, data, labels)
        self.data, self.labels = data, labels
        self.model = method.trainable().to(self.device)
        self.model.train()
        if config.grad_checkpoint:
            _checkpoint_gradients(self.model)
        self.channels_last = config.channels_last == "on" or (config.channels_last == "auto"
                                                              and self.device.type == "cpu")
        if self.channels_last:
            # CPU: measured faster for image teachers; the format changes float rounding, so a resumed
            # run must use the same setting (it is not among RESUMABLE_CHANGES)
            method.use_channels_last()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.fused_adam, self.optimizer = _adam(self.params, config, self.device)
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
        self.saved_wall = 0.0  # training time at the last checkpoint (ckpt_minutes counts from it)
        self.held = StoppedTime()  # time the process was stopped, left out of self.wall
        self.profiler = Profiler(self.device)
        if config.log == "tensorboard":
            tensorboard_writer()  # a missing extra is reported before anything is written
        if resume:
            self._resume()

    # ---- helpers ---------------------------------------------------------------------------------
    def autocast(self):
        if self.config.amp == "none":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if self.config.amp == "bf16" else torch.float16)

    def lr_at(self, step: int) -> float:
        return self.config.lr_at(step)

    def eval_model(self) -> nn.Module:
        return self.ema if self.ema is not None else self.model

    # ---- state -----------------------------------------------------------------------------------
    def _state(self) -> dict:
        return {"step": self.step, "wall": self.wall, "model": self.model.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "optimizer": self.optimizer.state_dict(), "method": self.method.state_dict(),
                "config": json.loads(json.dumps(asdict(self.config))), "args": self.run_info.get("args") or {},
                "method_name": self.method.name}

    def _resume(self):
        st = load_train_state(self.out_dir)
        differ = self._changed_settings(st)
        if differ:
            raise settings_refusal(differ)
        try:
            self.model.load_state_dict(st["model"])
        except RuntimeError as e:
            raise FewstepError(f"{option('resume')}: the saved weights in {self.out_dir} do not fit this model (was "
                               f"it made with another network or fewstep version?): {str(e).splitlines()[0]}") from None
        if self.ema is not None and st.get("ema") is not None:
            self.ema.load_state_dict(st["ema"])
        self.optimizer.load_state_dict(st["optimizer"])
        if not self.fused_adam:  # saved where fused Adam runs, resumed on a device where it does not
            for group in self.optimizer.param_groups:
                group["fused"] = None
        self.method.load_state_dict(st.get("method") or {})
        self.step, self.wall = int(st["step"]), float(st.get("wall", 0.0))
        self.saved_wall = self.wall

    def _changed_settings(self, saved: dict) -> list[str]:
        """What differs from a saved run's settings (see changed_settings); a run of another method is refused
        outright, its settings being another method's."""
        refuse_another_method(self.out_dir, saved, self.method.name)
        return changed_settings(self.config, self.run_info, saved)

    def save(self, final: bool = False):
        self.saved_wall = self.wall
        if not self.is_main:
            return
        card = self.method.card()
        card.setdefault("training", {})
        card["training"].update({"iterations": self.step, "batch": self.config.batch,
                                 "wall_time_s": round(self.wall, 2), "processes": self.world,
                                 "device": str(self.device), "finished": final,
                                 "peak_memory_mb": round(peak_memory_mb(self.device), 1),
                                 **self.run_info.get("training", {})})
        profile = profile_summary(self.folder.records())
        if profile is not None:
            card["training"]["profile"] = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in profile.items()}
        if self.run_info.get("command"):
            card["training"]["command"] = self.run_info["command"]
        save_checkpoint(self.out_dir, self.eval_model(), card)
        save_train_state(self.out_dir, self._state())

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
        net = getattr(self.eval_model(), "net", self.eval_model())
        self.folder.snapshot(net.state_dict(), self.step, self.wall)

    def _preview(self):
        if not self.is_main or not self.config.n_preview:
            return
        model = self.eval_model()
        was_training = model.training
        model.eval()
        with torch.no_grad():
            x = self.method.preview(model, self.config.n_preview, seed=self.config.seed)
            x = getattr(model, "decode", lambda v: v)(x)  # a latent model's previews are images
        model.train(was_training)
        self.folder.preview(x, self.step)

    # ---- the loop --------------------------------------------------------------------------------
    def run(self) -> Path:
        try:
            return self._run()
        finally:
            self.folder.close()

    def _run(self) -> Path:
        c = self.config
        if self.step >= c.steps and finished_run(self.out_dir):
            # --resume of a finished run: nothing to do, and its card (the command that made it) stays as it is
            if self.is_main:
                print(f"fewstep: note: {self.out_dir} is a finished run of {self.step} iterations; nothing to "
                      f"resume (a larger {option('iters')} continues it)", file=sys.stderr)
            return self.out_dir
        # the logs keep what this run's saved state covers: nothing for a run from iteration 0, which also clears
        # the lines and snapshots a run killed before its first checkpoint left in the folder
        self.folder.start({"train": asdict(c), **self.run_info, "method": self.method.name, "processes": self.world},
                          drop_logs_after=self.step)
        ctx = StepContext(self)
        self.folder.open_board(c.log, self.step)
        bar = tqdm(total=c.steps, initial=self.step, desc=self.method.name, unit="it",
                   disable=not (c.progress and self.is_main), dynamic_ncols=True)
        interrupted, in_iteration, late_stop = False, False, False
        cost = CostNote(self.method.name, self.step, c.steps, announce=self.is_main)
        try:
            with StopRequests(announce=self.is_main) as stop, self.held:
                while self.step < c.steps:
                    if self._agreed_stop(stop):
                        interrupted = True
                        break
                    in_iteration = True
                    logs = self._iteration(ctx, bar)
                    in_iteration = False
                    cost.after_iteration(self.step, cached=bool(logs.get("teacher_cached")))
                # a stop asked for during the last iteration: the run is complete, and its caller stops too
                late_stop = not interrupted and self._agreed_stop(stop)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            bar.close()
        if interrupted and in_iteration:  # its weights and optimizer state may be half updated: keep none of it
            if self.is_main:
                print(f"\nstopped at once inside iteration {self.step + 1}; nothing of it was saved, and "
                      f"{option('resume', True)} continues from the last checkpoint", file=sys.stderr)
            raise SystemExit(130)
        self.save(final=not interrupted)
        if interrupted:
            if self.is_main:
                print(f"\ninterrupted at iteration {self.step}; state saved in {self.out_dir} "
                      f"(continue with {option('resume', True)})")
            raise SystemExit(130)
        if late_stop:
            if self.is_main:
                print(f"\ninterrupted during the last iteration; the run is finished and saved in {self.out_dir}",
                      file=sys.stderr)
            raise SystemExit(130)
        self._preview()
        if self.world > 1:
            dist.barrier()
        return self.out_dir

    def _agreed_stop(self, stop) -> bool:
        """Whether a stop was requested, the same answer in every process of a torchrun (all must stop at the
        same iteration: a process that was not asked takes the request as its own)."""
        if self.world > 1:
            flag = torch.tensor([float(bool(stop.requested))], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() and not stop.requested:
                stop.requested.append(signal.SIGINT)
        return bool(stop.requested)

    def _iteration(self, ctx: "StepContext", bar):
        """One iteration (the step count moves at its end), then its log line, snapshot, checkpoint, preview;
        returns the method's logs."""
        c = self.config
        self.profiler.reset()
        logged = (self.step + 1) % c.log_every == 0 or self.step + 1 == c.steps
        # CUDA: a logged iteration's parts wait for the device, so they are its own work
        self.profiler.sync = logged and c.profile and self.device.type == "cuda"
        self.held.take()  # a stop between iterations is in no iteration's time
        t0 = time.perf_counter()
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr_at(self.step)
        torch.manual_seed((c.seed * 1_000_003 + self.step * 7919 + 101 + self.rank) % (2**63 - 1))
        gen = _seeded(c.seed, self.step, 2)
        idx = (global_batch_indices(len(self.data), c.batch, c.seed, self.step)
               if self.data is not None and self.method.needs_data else None)
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
        iteration_s = max(0.0, time.perf_counter() - t0 - self.held.take())
        self.wall += iteration_s
        bar.update(1)
        if "loss" in logs:
            bar.set_postfix(loss=f"{logs['loss']:.4g}", refresh=False)
        if logged:
            timing = self.profiler.record(iteration_s)
            if c.profile:  # after the iteration, outside its wall time
                timing.update(self._measure_floor())
            self.folder.log({"step": self.step, "lr": self.lr_at(self.step - 1), "wall_s": round(self.wall, 3),
                             **logs, **timing})
        if c.snapshot_every and (self.step % c.snapshot_every == 0 or self.step == c.steps):
            self._snapshot()
        # only the main process writes, so the time-based checkpoint needs no agreement between processes
        on_cadence = c.ckpt_every and self.step % c.ckpt_every == 0
        on_time = c.ckpt_minutes and self.wall - self.saved_wall >= 60 * c.ckpt_minutes
        if (on_cadence or on_time) and self.step < c.steps:
            self.save()
        if c.sample_every and self.step % c.sample_every == 0 and self.step < c.steps:
            self._preview()
        return logs
