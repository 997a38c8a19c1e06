"""Where a training run's time and memory go, and what it will cost: the `Profiler` that splits each iteration
into the method's teacher and student calls, the optimizer and the rest, the floor those calls set when timed
alone (`profile_summary`, the card's `training.profile`), peak memory, and the `CostNote` a long run prints
before most of it is spent."""
from __future__ import annotations

import contextlib
import resource
import sys
import time

import torch

from fewstep.errors import option

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


def peak_memory_mb(device: torch.device) -> float:
    """The process's peak memory so far: allocated on a GPU, resident on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux: the process's peak RSS


class CostNote:
    """Says, once, what a long run will cost before most of it is spent: its iterations and the wall time the
    first ones project (after WARMUP iterations and at least a few seconds). Runs projected under a minute
    say nothing.

    Iterations that read their teacher outputs from a cache (a method logs `teacher_cached`) run faster than
    those that compute them, and a resumed run first redoes iterations whose trajectories the interrupted run
    had cached: so the projection waits for WARMUP iterations that computed theirs and projects the rest at
    their pace. Only where every iteration for CACHED_ONLY_S reads from the cache does it project from those."""
    WARMUP, MIN_SECONDS, QUIET_BELOW_S, CACHED_ONLY_S = 3, 2.0, 60.0, 30.0

    def __init__(self, name: str, start: int, steps: int, announce: bool, clock=time.perf_counter):
        self.name, self.start, self.steps, self.announce, self.clock = name, start, steps, announce, clock
        self.t0 = self.last = clock()
        self.done = not announce
        self.spent = {False: [0, 0.0], True: [0, 0.0]}  # cached? -> [iterations, seconds]

    def after_iteration(self, step: int, cached: bool = False):
        if self.done:
            return
        now = self.clock()
        self.spent[cached][0] += 1
        self.spent[cached][1] += now - self.last
        self.last = now
        (computed, computed_s), (hits, hits_s) = self.spent[False], self.spent[True]
        elapsed = now - self.t0
        if computed >= self.WARMUP and computed_s >= self.MIN_SECONDS:
            pace, told = computed_s / computed, f"the first {computed} took {computed_s:.1f} s"
            if hits:
                told = (f"{computed} that computed their teacher outputs took {computed_s:.1f} s; {hits} read "
                        f"theirs from the cache, {hits_s:.1f} s")
        elif not computed and hits >= self.WARMUP and elapsed >= self.CACHED_ONLY_S:
            pace = hits_s / hits
            told = f"the first {hits}, their teacher outputs read from the cache, took {hits_s:.1f} s"
        else:
            return
        self.done = True
        total = elapsed + (self.steps - step) * pace
        if total >= self.QUIET_BELOW_S:
            print(f"fewstep: note: {self.name}: {self.steps - self.start:,} iterations, about "
                  f"{_duration(total)} on this machine ({told}); {option('iters', shown='N')} runs "
                  "fewer", file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    if seconds >= 5400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"
