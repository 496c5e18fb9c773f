"""`progress.jsonl` in the run folder: one JSON line per step, validation, preview, phase and
status.

The web UI (and any script) follows a run through it while it trains, without parsing the
progress bar or TensorBoard's event files. A resumed run appends to the same file; a reader
keeps the last line of each step.

A phase (caching latents, validating, rendering previews, saving a checkpoint, exporting) is
a `phase` line when it starts (`done` 0 of `total`), one as it advances, and one with `ended`
when it ends, failed or not; between phases the run trains.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PROGRESS_FILE = "progress.jsonl"


class ProgressLog:
    """Appends events; the main process writes, the others hold a log that writes nothing."""

    def __init__(self, output_dir: Path, enabled: bool = True) -> None:
        self.path = output_dir / PROGRESS_FILE
        self.handle = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.handle = open(self.path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115

    def write(self, event: str, **values: Any) -> None:
        if self.handle is not None:
            line = json.dumps({"event": event, "time": round(time.time(), 3), **values})
            self.handle.write(line + "\n")

    @contextmanager
    def phase(self, name: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
        """Writes the phase's start and end; the block calls what it gets with how many of
        `total` more are done."""
        done = 0

        def advance(count: int = 1) -> None:
            nonlocal done
            done += count
            self.write("phase", phase=name, done=done, total=total)

        self.write("phase", phase=name, done=0, total=total)
        try:
            yield advance
        finally:
            self.write("phase", phase=name, done=done, total=total, ended=True)

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


def read_events(path: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """The complete lines after byte `offset`, and the offset after them (a line still being
    written is left for the next read)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            data = handle.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    events = []
    for line in data[:end].splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:  # a line cut by a crash of the writer: skip it
            continue
    return events, offset + end
