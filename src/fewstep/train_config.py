"""The training loop's settings (`TrainConfig`), what a run records of the command that started it, and which
settings a resumed run may change."""
from __future__ import annotations

import json
import math
import shlex
import sys
from dataclasses import asdict, dataclass

from fewstep.errors import FewstepError, option
from fewstep.recipe import AMP_MODES, LOG_KINDS, LR_SCHEDULES

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
    amp: str = "none"                 # none | bf16 | fp16 (bf16 on a CPU, either on CUDA)
    seed: int = 0
    log_every: int = 50
    sample_every: int = 0             # 0: only at the end
    ckpt_every: int = 0               # 0: only at the end
    # also a checkpoint once this many minutes of training passed since the last one (0: off), so a long run on
    # a slow machine loses at most that much when its process dies, whatever its iteration cadence
    ckpt_minutes: float = 0.0
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
    grad_checkpoint: bool = False     # recompute the trained network's blocks in backward (diffusers networks)

    @classmethod
    def from_options(cls, o: dict) -> "TrainConfig":
        """The loop's settings from a method's resolved options (its recipe, `loop_recipe`, with the caller's over
        it and its None for iters and lr replaced by the method's own values); grad_clip 0 or None is none."""
        if o["iters"] is None or o["lr"] is None:
            raise FewstepError("the method left its iterations or learning rate undecided")
        return cls(steps=o["iters"], batch=o["batch"], lr=o["lr"], lr_schedule=o["lr_schedule"], warmup=o["warmup"],
                   ema=o["ema"], grad_clip=o["grad_clip"] or None, amp=o["amp"], seed=o["seed"],
                   log_every=o["log_every"], sample_every=o["sample_every"], ckpt_every=o["ckpt_every"],
                   ckpt_minutes=o["ckpt_minutes"], device=o["device"], progress=o["progress"], log=o["log"],
                   grad_checkpoint=o["grad_checkpoint"])

    def lr_at(self, step: int) -> float:
        """The learning rate of iteration `step`: the schedule, then the warm-up."""
        lr = self.lr
        if self.lr_schedule == "step" and step >= self.steps // 2:
            lr = self.lr / 10
        elif self.lr_schedule == "cosine":
            lr = self.lr * 0.5 * (1 + math.cos(math.pi * step / self.steps))
        if self.warmup and step < self.warmup:
            lr *= (step + 1) / self.warmup
        return lr

    def validate(self):
        if self.steps < 1:
            raise FewstepError(f"steps={self.steps}: expected at least 1 training iteration")
        if self.batch < 1:
            raise FewstepError(f"batch={self.batch}: expected a positive batch size")
        if not self.lr > 0:
            raise FewstepError(f"lr={self.lr}: expected a positive learning rate")
        if self.lr_schedule not in LR_SCHEDULES:
            raise FewstepError(f"lr schedule {self.lr_schedule!r}: expected {', '.join(LR_SCHEDULES)}")
        if self.amp not in AMP_MODES:
            raise FewstepError(f"amp={self.amp!r}: expected {', '.join(AMP_MODES)}")
        if self.ema is not None and not 0 < self.ema < 1:
            raise FewstepError(f"ema={self.ema}: expected a decay in (0, 1), or none")
        if self.log not in LOG_KINDS:
            raise FewstepError(f"{option('log', self.log)}: expected {' or '.join(LOG_KINDS)}")
        if not self.ckpt_minutes >= 0:
            raise FewstepError(f"ckpt_minutes={self.ckpt_minutes}: expected 0 (off) or a positive number of minutes")
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


RESUMABLE_CHANGES = {"config": {"steps", "progress", "log_every", "sample_every", "ckpt_every", "ckpt_minutes",
                                "n_preview", "device", "log", "profile", "snapshot_every"},
                     "args": {"iters", "no_progress", "progress", "log_every", "sample_every", "ckpt_every",
                              "ckpt_minutes", "device",
                              "resume", "out", "log", "profile", "snapshot_every", "trajectory_cache"}}


RUN_WORDS = {"teacher": "a teacher's training run", "sfd": "an SFD distillation", "sfddm": "an SFDDM distillation",
             "progressive": "a progressive distillation"}


def _run_family(saved: dict) -> str | None:
    """Which method a saved run is (SFD, SFD-v and the 1-NFE stage are one family: their differences are
    settings), from its recorded method, or from an older run's command line; None where neither says."""
    name = saved.get("method_name")
    if name is None:
        args = saved.get("args") or {}
        name = {"train": "teacher", "distill": args.get("method")}.get(args.get("command"))
    return {"sfd-v": "sfd", "sfd-stage2": "sfd"}.get(name, name)


def refuse_another_method(out, saved: dict, method_name: str) -> None:
    """A resume into a folder whose run is another method's is refused as that: its settings are that method's,
    so listing how they differ would say nothing."""
    before, now = _run_family(saved), _run_family({"method_name": method_name})
    if before is not None and before != now:
        words = {k: RUN_WORDS.get(k, f"a {k} run") for k in (before, now)}  # a method of the user's own too
        raise FewstepError(f"{option('resume')}: {out} holds {words[before]}, not {words[now]}; choose another "
                           f"folder for {option('out')}")


def settings_refusal(differ: list[str]) -> FewstepError:
    """The refusal of a resume whose settings differ from the saved run's (`differ`: changed_settings)."""
    return FewstepError(f"{option('resume')}: settings differ from the interrupted run's: " + "; ".join(differ)
                        + ". Resume with the same settings (only the iteration count, logging, checkpoint cadence "
                        "and device may change)")


def changed_settings(config: TrainConfig, run_info: dict, saved: dict) -> list[str]:
    """'name: now X, was Y' for every loop or command-line setting that differs from a saved run's
    ({"config", "args"}, as a training state or a config.json holds them)."""
    now = {"config": json.loads(json.dumps(asdict(config))), "args": run_info.get("args") or {}}
    differ, reported = [], set()
    for section in ("config", "args"):
        before = saved.get(section) or {}
        for key, value in now[section].items():
            if key in RESUMABLE_CHANGES[section] or key not in before:
                continue
            if json.loads(json.dumps(before[key])) != value:
                # a loop setting is also on the command line it came from: named once, as the loop's
                if key not in reported:
                    reported.add(key)
                    name = f"--{key.replace('_', '-')}" if section == "args" else key
                    differ.append(f"{name}: now {value!r}, was {before[key]!r}")
    return differ
