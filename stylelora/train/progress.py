"""`progress.jsonl` in the run folder: one JSON line per step, validation, preview and status.

The web UI (and any script) follows a run through it while it trains, without parsing the
progress bar or TensorBoard's event files. A resumed run appends to the same file; a reader
keeps the last line of each step.
"""

from __future__ import annotations

import json
import time
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
