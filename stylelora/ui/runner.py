"""Each run is `stylelora train CONFIG` in a process of its own, in its own session.

The UI keeps the pid; a run outlives the UI (stopping the UI sends it nothing) and is found
again by the next UI from that pid. Stop sends SIGINT, on which the trainer writes a checkpoint
and exits, exactly as Ctrl-C does on the command line; resume runs the same command with
`--resume latest`, so the CLI can go on with a run the UI started and the other way round.
"""

from __future__ import annotations

import codecs
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from stylelora.errors import UserError
from stylelora.train.progress import PROGRESS_FILE, read_events
from stylelora.ui.store import ACTIVE, Run, Store

LOG_FILE = "train.log"
STOPPED = 130  # the trainer's exit status after a signal and a checkpoint
USER_ERROR = 2  # bad input: the log's last line says what


def train_command(run: Run) -> list[str]:
    command = [sys.executable, "-m", "stylelora", "train", run.config]
    return command + (["--resume", "latest"] if run.resume else [])


def gpu_slots() -> list[str | None]:
    """One slot per visible GPU (its CUDA_VISIBLE_DEVICES value); one slot without a GPU."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [str(index) for index in range(count)] or [None]


class Runner:
    """Starts, stops and watches the runs. Every change of a run's state goes through one lock
    (the requests' threads and the watcher poll at once) and a conditional update in the
    store, so a run is never started twice."""

    def __init__(self, store: Store, slots: list[str | None]) -> None:
        self.store, self.slots = store, slots
        self.children: dict[int, subprocess.Popen] = {}
        self.lock = threading.Lock()

    # --- starting and stopping -----------------------------------------------------------

    def start(self, run: Run, slot: int) -> None:
        """Start a queued run on `slot` (with the lock held)."""
        if not self.store.claim(run.id, ("queued",), status="running", slot=slot, pid=None):
            return  # another UI over the same folder took it
        folder = run.folder
        folder.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.slots[slot] is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.slots[slot]
        with open(folder / LOG_FILE, "ab") as log:
            log.write(f"$ {' '.join(train_command(run))}\n".encode())
            log.flush()
            # SIGINT held until the trainer's loop can take it (stylelora/__main__.py)
            held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            try:
                process = subprocess.Popen(
                    train_command(run),
                    cwd=folder,  # not the repository: its datasets/ would shadow the package
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,  # Ctrl-C on the UI's terminal does not reach it
                )
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)
        self.children[run.id] = process
        self.store.update(
            run.id, status="running", pid=process.pid, slot=slot, started_at=time.time(),
            ended_at=None, returncode=None, message="",
        )  # fmt: skip

    def stop(self, run_id: int) -> None:
        """SIGINT: the trainer writes a checkpoint and exits; a queued run just leaves the queue."""
        with self.lock:
            run = self.store.get(run_id)
            if run.status == "queued":
                self.store.update(run.id, status="stopped", message="taken out of the queue")
            elif run.status == "running" and self.alive(run):
                os.kill(run.pid, signal.SIGINT)
                self.store.update(run.id, status="stopping")
            elif run.status == "running":
                self.ended(run)  # it ended since the last poll: record how
            else:
                raise UserError(f"run {run.id} is {run.status}: nothing to stop")

    def queue(self, run_id: int, resume: bool) -> None:
        """Queue an ended run again; refused while it is queued or running."""
        with self.lock:
            ended = ("finished", "failed", "stopped", "interrupted")
            if not self.store.claim(run_id, ended, status="queued", resume=int(resume),
                                    queued_at=time.time()):  # fmt: skip
                raise UserError(f"run {run_id} is {self.store.get(run_id).status} already")

    # --- watching ------------------------------------------------------------------------

    def alive(self, run: Run) -> bool:
        child = self.children.get(run.id)
        if child is not None:
            return child.poll() is None
        return pid_runs(run.pid, run.config)

    def poll(self) -> None:
        """Record the runs that ended, then start queued runs on the free slots."""
        with self.lock:
            self.poll_locked()

    def poll_locked(self) -> None:
        for run in self.store.with_status(*ACTIVE):
            if not self.alive(run):
                self.ended(run)
        for run in self.store.with_status("stopped", "interrupted", "failed"):
            if finished_elsewhere(run):
                self.store.update(
                    run.id, status="finished", message="finished from the command line"
                )
        busy = {run.slot for run in self.store.with_status(*ACTIVE)}
        for slot in range(len(self.slots)):
            if slot in busy:
                continue
            run = self.store.next_queued()
            if run is None:
                break
            try:
                self.start(run, slot)
            except OSError as exc:  # an unwritable folder, a missing interpreter
                self.store.update(run.id, status="failed", message=f"could not start: {exc}")

    def ended(self, run: Run) -> None:
        child = self.children.pop(run.id, None)
        code = child.returncode if child is not None else None
        status, message = outcome(run.folder, code)
        self.store.update(
            run.id, status=status, message=message, returncode=code, ended_at=time.time(), pid=None
        )


def finished_elsewhere(run: Run) -> bool:
    """Whether the run was resumed outside the UI (`stylelora train ... --resume latest`) and
    finished there since the UI saw it end."""
    adapter = run.adapter
    if not run.ended_at or not adapter.exists() or adapter.stat().st_mtime < run.ended_at:
        return False
    events, _ = read_events(run.folder / PROGRESS_FILE)
    said = [event for event in events if event.get("event") == "status"]
    return bool(said) and said[-1]["status"] == "finished" and said[-1]["time"] > run.ended_at


def pid_runs(pid: int | None, config: str) -> bool:
    """Whether `pid` is still this run's trainer (not a process that reused the number)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    cmdline = Path(f"/proc/{pid}/cmdline")
    if not cmdline.exists():  # no /proc (macOS): trust the pid
        return True
    try:
        text = cmdline.read_bytes().decode(errors="replace")
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1]
    except OSError:
        return False
    return config in text and state != "Z"


def outcome(folder: Path, code: int | None) -> tuple[str, str]:
    """(status, one line) of a run whose process ended with `code` (None: not known, the run
    was found again after a restart of the UI), from its progress file and log."""
    events, _ = read_events(folder / PROGRESS_FILE)
    said = [event["status"] for event in events if event.get("event") == "status"]
    last_status = said[-1] if said else ""
    last_line = last_log_line(folder / LOG_FILE)
    if code == 0 or (code is None and last_status == "finished"):
        return "finished", last_status or "finished"
    if code in (STOPPED, -signal.SIGINT) or last_status.startswith("interrupted"):
        return "stopped", last_status or last_line or "stopped while starting"
    if code == USER_ERROR or last_line.startswith("stylelora: error"):
        return "failed", last_line
    why = f"exit status {code}" if code is not None else "the process is gone"
    return "interrupted", f"{why}: {last_line}" if last_line else why


def last_log_line(path: Path, tail: int = 8192) -> str:
    """The log's last non-empty line, progress-bar redraws taken apart."""
    for line in reversed(log_tail(path, tail).splitlines()):
        if line.strip():
            return line.strip()
    return ""


def log_tail(path: Path, size: int = 65536) -> str:
    """The log's last `size` bytes as text; a progress bar's redraws (\\r) keep their last."""
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, path.stat().st_size - size))
            text = handle.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(last_drawn(line) for line in text.replace("\r\n", "\n").split("\n"))


def last_drawn(line: str) -> str:
    """A line as it was last drawn: of a progress bar's redraws (\\r), the last that is not
    blank (tqdm blanks its bar before a line is written above it)."""
    return ([part for part in line.split("\r") if part.strip()] or [""])[-1]


class LogFollower:
    """Follows a run's log from its start, reading only what was written since the last read:
    the lines completed since, and the line being written, each as last drawn."""

    CHUNK = 4 * 2**20

    def __init__(self, path: Path) -> None:
        self.path = path
        self.restart()

    def restart(self) -> None:
        self.offset = 0
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending = ""  # the line being written, cut to its last drawn state and what follows

    def read(self) -> dict[str, Any] | None:
        """{"lines", "partial", "restarted"}; None when nothing was written since."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return None
        restarted = size < self.offset  # the file was replaced: follow the new one
        if restarted:
            self.restart()
        if size == self.offset and not restarted:
            return None
        lines: list[str] = []
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            while chunk := handle.read(self.CHUNK):
                self.offset += len(chunk)
                lines += self.take(self.decoder.decode(chunk))
        return {"lines": lines, "partial": last_drawn(self.pending), "restarted": restarted}

    def take(self, text: str) -> list[str]:
        *complete, pending = (self.pending + text).replace("\r\n", "\n").split("\n")
        parts = pending.split("\r")
        # a progress bar redrawn for hours is one long line: keep only its last state
        self.pending = "\r".join([last_drawn("\r".join(parts[:-1])), parts[-1]])
        return [last_drawn(line) for line in complete]


def whole_log(path: Path) -> str:
    """The whole log, each line as last drawn."""
    read = LogFollower(path).read() or {"lines": [], "partial": ""}
    return "\n".join([*read["lines"], read["partial"]])
