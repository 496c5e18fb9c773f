"""What stops a run early: non-finite losses or gradients, and SIGINT / SIGTERM.

Also the crash-test hook: `STYLELORA_FAULT=<kind>:<step>` makes a real fault happen at a known
point, so tests can show what a real crash or Ctrl-C leaves behind (`interrupt`: the process
sends itself SIGINT after that step; `kill-in-checkpoint`: SIGKILL halfway through writing that
step's checkpoint; `term-in-export`: SIGTERM as the export after that step begins).
"""

from __future__ import annotations

import math
import os
import signal
import sys
from types import FrameType

from stylelora.errors import UserError

FAULT_ENV = "STYLELORA_FAULT"
FAULT_SIGNALS = {"kill-in-checkpoint": signal.SIGKILL, "term-in-export": signal.SIGTERM}


def fault_due(kind: str, step: int) -> bool:
    wanted, _, at = os.environ.get(FAULT_ENV, "").partition(":")
    return wanted == kind and at == str(step)


def inject_fault(kind: str, step: int) -> None:
    """Deliver the fault `STYLELORA_FAULT` asks for at this point, if it names this one."""
    if not fault_due(kind, step):
        return
    os.kill(os.getpid(), FAULT_SIGNALS.get(kind, signal.SIGINT))


class NonFiniteStop(UserError):
    """Too many non-finite steps in a row: the run stops, keeping the last good weights."""


class NonFiniteGuard:
    """Counts skipped steps; `limit` skipped in a row stops the run."""

    def __init__(self, limit: int, skipped: int = 0, in_a_row: int = 0):
        self.limit = limit
        self.skipped = skipped
        self.in_a_row = in_a_row

    def record(self, finite: bool, step: int) -> bool:
        """Count one optimizer step's outcome; raise NonFiniteStop at the limit."""
        if finite:
            self.in_a_row = 0
            return True
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise NonFiniteStop(
                f"{self.in_a_row} step(s) in a row had a non-finite loss or gradients after "
                f"step {step} (train.max_nonfinite_steps = {self.limit}); lower "
                "train.learning_rate, or look for a broken image"
            )
        return False


def step_is_finite(values: list[float]) -> bool:
    """Whether a step's losses and its gradients' total norm (non-finite when any gradient is)
    are all finite."""
    return all(math.isfinite(value) for value in values)


class StopRequest:
    """Within the block, SIGINT and SIGTERM ask the loop to stop after the current step; the
    same signal a second time acts as it did before (Ctrl-C twice stops at once)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signal: str | None = None
        self.previous: dict[int, object] = {}
        self.then = "stopping after this step and saving a checkpoint"  # what a signal does now

    def __enter__(self) -> StopRequest:
        if _in_main_thread():
            for number in self.SIGNALS:
                self.previous[number] = signal.signal(number, self._handle)
            # a Stop the UI sent while the run started was held until here (__main__.py)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, self.SIGNALS)
        return self

    def __exit__(self, *exc: object) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, _handler(handler))

    def _handle(self, number: int, frame: FrameType | None) -> None:
        self.signal = signal.Signals(number).name
        signal.signal(number, _handler(self.previous[number]))
        print(
            f"\n{self.signal}: {self.then} (send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    @property
    def requested(self) -> bool:
        return self.signal is not None


def _handler(previous: object) -> object:
    return signal.SIG_DFL if previous is None else previous


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
