"""A command of the CLI (`stylelora sample`, `merge`, `resize`, `combine`) in a process of its
own, for the Try and Tools pages: its output's last line as progress, cancel ending it and
every process it started. One job of a kind at a time: a second is refused with one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stylelora.errors import UserError
from stylelora.ui.runner import last_log_line

CANCEL_GRACE_SECONDS = 5.0
NOUNS = {"try": "render", "tools": "tool", "caption": "captioning"}


class Busy(UserError):
    status = 409


@dataclass
class Job:
    command: list[str]
    out: Path  # what it writes: done only once this exists
    log: Path
    info: dict[str, Any] = field(default_factory=dict)  # what the page shows with its result
    process: subprocess.Popen | None = None
    state: str = "running"  # running | done | failed | cancelled
    error: str = ""
    started: float = field(default_factory=time.time)
    ended: float | None = None

    def update(self) -> None:
        """Notice that the process ended, and how."""
        if self.state != "running" or self.process.poll() is None:
            return
        self.ended = time.time()
        if self.process.returncode == 0 and self.out.exists():
            self.state = "done"
        else:
            self.state = "failed"
            self.error = failure_line(self.log, self.process.returncode)

    def progress(self) -> str:
        """The last line the command printed: `image 1/2: step 6/20`, what it wrote."""
        return last_log_line(self.log, 4096)

    def summary(self) -> dict[str, Any]:
        self.update()
        return {
            **self.info,
            "state": self.state,
            "progress": self.progress() if self.state == "running" else "",
            "error": self.error,
            "seconds": round((self.ended or time.time()) - self.started, 1),
        }


def failure_line(log: Path, code: int | None) -> str:
    """The command's `stylelora: error: ...` line, or its last line."""
    line = last_log_line(log, 8192)
    return line.removeprefix("stylelora: error: ") or f"the command exited with {code}"


class Jobs:
    """The one job of each kind (`try`, `tools`) a UI runs at a time."""

    def __init__(self) -> None:
        self.current: dict[str, Job] = {}
        self.lock = threading.Lock()

    def start(self, kind: str, job: Job, cwd: Path) -> Job:
        with self.lock:
            running = self.current.get(kind)
            if running is not None:
                running.update()
                if running.state == "running":
                    raise Busy(
                        f"one {NOUNS.get(kind, kind)} at a time: {running.info.get('what', '')} "
                        "is under way; wait for it or cancel it"
                    )
            job.log.parent.mkdir(parents=True, exist_ok=True)
            with open(job.log, "wb") as log:
                job.process = subprocess.Popen(
                    job.command,
                    cwd=cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                    start_new_session=True,  # its own group: cancel reaches its children
                )
            self.current[kind] = job
            return job

    def get(self, kind: str) -> Job | None:
        return self.current.get(kind)

    def cancel(self, kind: str) -> Job:
        with self.lock:
            job = self.current.get(kind)
            if job is None:
                raise UserError(f"no {NOUNS.get(kind, kind)} to cancel")
            job.update()
            if job.state != "running":
                raise UserError(f"the {NOUNS.get(kind, kind)} is {job.state}: nothing to cancel")
            end_group(job.process)
            job.state, job.ended = "cancelled", time.time()
            return job


def end_group(process: subprocess.Popen) -> None:
    """SIGTERM to the process's group, SIGKILL to what is left after a grace period."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=CANCEL_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            continue
        try:
            os.killpg(process.pid, 0)  # a child may have outlived its parent
        except ProcessLookupError:
            return


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "stylelora", *args]
