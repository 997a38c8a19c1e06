"""What a process's signals mean to the training loop: Ctrl-C / SIGTERM request a stop between iterations
(`StopRequests`), and time the process spent stopped (Ctrl-Z, SIGSTOP) is not training time (`StoppedTime`)."""
from __future__ import annotations

import signal
import sys
import threading
import time


class StopRequests:
    """Ctrl-C / SIGTERM while a loop runs only request a stop, taken between iterations: an interrupt that
    landed after the optimizer step but before the step count moved would make --resume repeat an update. A
    second request stops at once (a KeyboardInterrupt where it lands). Handlers are restored on exit."""

    def __init__(self, announce: bool):
        self.requested, self.announce, self.previous = [], announce, {}

    def _request(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested.append(signum)
        if self.announce:
            print("\nstopping after the current iteration (interrupt again to stop at once)", file=sys.stderr,
                  flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._request)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


class StoppedTime:
    """Time the process was held inside the training loop (Ctrl-Z, SIGSTOP, a suspended machine), which the
    run's training time leaves out: a run paused for an hour does not report an hour more. A thread ticks every
    `interval` seconds; a tick more than `gap` seconds after the one before counts its wait as held, but only if
    SIGCONT arrived meanwhile, so a long computation that keeps the thread from its tick is never taken for a
    stop. Counts nothing outside the main thread (where no signal handler can be set)."""

    def __init__(self, interval: float = 0.5, gap: float = 2.0, clock=time.monotonic):
        self.interval, self.gap, self.clock = interval, gap, clock
        self.lock, self.done = threading.Lock(), threading.Event()
        self.last, self.late, self.continued = None, 0.0, False
        self.thread, self.previous = None, None

    def tick(self):
        now = self.clock()
        with self.lock:
            if self.last is not None and now - self.last > self.gap:
                self.late += now - self.last - self.interval
            self.last = now

    def take(self) -> float:
        """Seconds held since the last call."""
        self.tick()
        with self.lock:
            held = self.late if self.continued else 0.0
            self.late, self.continued = 0.0, False
        return held

    def _continued(self, signum, frame):
        self.continued = True

    def _beat(self):
        while not self.done.wait(self.interval):
            self.tick()

    def __enter__(self):
        self.tick()
        if threading.current_thread() is threading.main_thread():
            self.done.clear()
            self.previous = signal.getsignal(signal.SIGCONT)
            signal.signal(signal.SIGCONT, self._continued)
            self.thread = threading.Thread(target=self._beat, name="fewstep-stopped-time", daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.thread is not None:
            self.done.set()
            self.thread.join()
            self.thread = None
            signal.signal(signal.SIGCONT, self.previous)
        return False
