"""Where a training step's time goes, and how often it waits for the device.

The trainer marks its phases (`with phase("vae"): ...`). Outside a `StepProfile` a mark costs a
global lookup; inside one, each phase's wall time is added up exclusive of the phases nested in
it, and on a GPU the device is synchronised at each mark so the time lands where the work was
queued. torch.profiler records every operator, which on a small model costs more than the
operators themselves; these marks time only the few phases a reader asks about, and they also
appear as `record_function` ranges in a torch.profiler trace.

`host_read` is the one way the step reads values back from the device (on a GPU each read
waits for every queued kernel); a profile counts its calls, and with `count_syncs` also every
other read (`.item()`, `bool(tensor)`) and every blocking upload to a GPU, as a torch dispatch
mode sees them.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_active: StepProfile | None = None
_END = object()
T = TypeVar("T")


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Time the block as `name` while a StepProfile is active."""
    profile = _active
    if profile is None:
        yield
        return
    with torch.profiler.record_function(name):
        profile.enter(name)
        try:
            yield
        finally:
            profile.leave()


def timed(batches: Iterable[T], name: str) -> Iterator[T]:
    """The items of `batches`, each fetch timed as `name`."""
    iterator = iter(batches)
    while True:
        with phase(name):
            item = next(iterator, _END)
        if item is _END:
            return
        yield item


def step_done() -> None:
    """One optimizer step ended (the profile leaves out its first `warmup` steps)."""
    if _active is not None:
        _active.step_done()


def host_read(*values: torch.Tensor) -> list[float]:
    """The values (scalars on the device) as Python floats, in one transfer."""
    if _active is not None:
        _active.host_reads += 1
    return torch.stack([v.detach().float().reshape(()) for v in values]).tolist()


class SyncCounter(TorchDispatchMode):
    """Counts, per phase, reads of a tensor's value on the host and blocking copies from the
    host to a GPU."""

    def __init__(self, current_phase: Callable[[], str]) -> None:
        super().__init__()
        self.current_phase = current_phase
        self.reads: Counter[str] = Counter()
        self.uploads: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads[self.current_phase()] += 1
        elif blocking_upload(func, args, kwargs):
            self.uploads[self.current_phase()] += 1
        return func(*args, **kwargs)


def blocking_upload(func, args, kwargs) -> bool:
    if func not in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
        return False
    source = args[1] if func is torch.ops.aten.copy_.default else args[0]
    target = args[0].device if func is torch.ops.aten.copy_.default else kwargs.get("device")
    return (
        isinstance(source, torch.Tensor)
        and source.device.type == "cpu"
        and target is not None
        and torch.device(target).type == "cuda"
        and not kwargs.get("non_blocking", False)
    )


class StepProfile:
    """Seconds per phase (exclusive of nested phases), host reads and, with `count_syncs`,
    every other host read and blocking upload, over the steps after the first `warmup`."""

    def __init__(
        self, device: torch.device | str = "cpu", warmup: int = 0, count_syncs: bool = False
    ) -> None:
        self.device = torch.device(device)
        self.warmup = warmup
        self.steps = 0  # counted after the warm-up
        self.seconds: dict[str, float] = defaultdict(float)
        self.host_reads = 0
        self.counter = SyncCounter(self.current_phase) if count_syncs else None
        self._stack: list[str] = []
        self._since = 0.0
        self._seen = 0

    def step_done(self) -> None:
        self._seen += 1
        if self._seen <= self.warmup:
            self._charge()
            self.seconds.clear()
            self.host_reads = 0
            if self.counter is not None:
                self.counter.reads.clear()
                self.counter.uploads.clear()
        else:
            self.steps += 1

    def per_step(self) -> dict[str, float]:
        """Seconds per counted step of each phase, largest first."""
        steps = max(self.steps, 1)
        ordered = sorted(self.seconds.items(), key=lambda item: -item[1])
        return {name: seconds / steps for name, seconds in ordered}

    def __enter__(self) -> StepProfile:
        global _active
        _active = self
        if self.counter is not None:
            self.counter.__enter__()
        self._since = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        global _active
        self._charge()
        if self.counter is not None:
            self.counter.__exit__(*exc)
        _active = None

    def enter(self, name: str) -> None:
        self._charge()
        self._stack.append(name)

    def leave(self) -> None:
        self._charge()
        self._stack.pop()

    def _charge(self) -> None:
        """Add the time since the last mark to the phase that was running (or to 'other')."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[self.current_phase()] += now - self._since
        self._since = now

    def current_phase(self) -> str:
        return self._stack[-1] if self._stack else "other"

    def syncs_per_step(self) -> dict[str, dict[str, float]]:
        """Per phase, host reads and blocking uploads per counted step (needs `count_syncs`;
        `host_read`'s reads are counted under 'trainer reads')."""
        steps = max(self.steps, 1)
        table = {"trainer reads": {"reads": self.host_reads / steps, "uploads": 0.0}}
        if self.counter is not None:
            for name in sorted({*self.counter.reads, *self.counter.uploads}):
                table[name] = {
                    "reads": self.counter.reads[name] / steps,
                    "uploads": self.counter.uploads[name] / steps,
                }
        return table
