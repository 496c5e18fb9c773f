"""Runs and the queue, kept in SQLite in the UI's data folder so they survive a restart."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    config TEXT NOT NULL,          -- the TOML file `stylelora train` reads
    output_dir TEXT NOT NULL,
    status TEXT NOT NULL,          -- see STATUSES
    resume INTEGER NOT NULL DEFAULT 0,
    queued_at REAL,                -- when it joined the queue: the queue's order (see move)
    started_at REAL,
    ended_at REAL,
    pid INTEGER,
    slot INTEGER,
    returncode INTEGER,
    message TEXT NOT NULL DEFAULT ''
)
"""

# queued -> running -> finished | failed | stopped (a checkpoint, then exit) | interrupted (the
# process died without saying why, or the UI found it gone after a restart)
STATUSES = ("queued", "running", "stopping", "finished", "failed", "stopped", "interrupted")
ACTIVE = ("running", "stopping")


@dataclass
class Run:
    id: int
    name: str
    config: str
    output_dir: str
    status: str
    resume: bool
    queued_at: float | None
    started_at: float | None
    ended_at: float | None
    pid: int | None
    slot: int | None
    returncode: int | None
    message: str

    @property
    def folder(self) -> Path:
        return Path(self.output_dir)

    @property
    def adapter(self) -> Path:
        """The adapter the run exports when it finishes."""
        return self.folder / f"{self.name}.safetensors"


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with self.connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(SCHEMA)

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=10)
        db.row_factory = sqlite3.Row
        try:
            with db:  # commits, or rolls back on an exception
                yield db
        finally:
            db.close()

    def add(self, name: str, config: Path, output_dir: Path) -> Run:
        with self.connect() as db:
            cursor = db.execute(
                "INSERT INTO runs (name, config, output_dir, status, queued_at) "
                "VALUES (?, ?, ?, 'queued', ?)",
                (name, str(config), str(output_dir), time.time()),
            )
            run_id = cursor.lastrowid
        return self.get(run_id)

    def get(self, run_id: int) -> Run | None:
        if not 0 < run_id < 2**63:  # SQLite's integers: a larger id names no run
            return None
        with self.connect() as db:
            row = db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        return Run(**{**dict(row), "resume": bool(row["resume"])}) if row else None

    def all(self) -> list[Run]:
        with self.connect() as db:
            rows = db.execute("SELECT * FROM runs ORDER BY id DESC").fetchall()
        return [Run(**{**dict(row), "resume": bool(row["resume"])}) for row in rows]

    def with_status(self, *statuses: str) -> list[Run]:
        return [run for run in self.all() if run.status in statuses]

    def queued(self) -> list[Run]:
        """The queue, first to start first."""
        return sorted(self.with_status("queued"), key=lambda run: (run.queued_at or 0, run.id))

    def next_queued(self) -> Run | None:
        queued = self.queued()
        return queued[0] if queued else None

    def move(self, run_id: int, to: str) -> bool:
        """Move a queued run `up`, `down` or to the `front` of the queue; False if it is not
        queued. The queue's times are dealt out again in the new order, in one write
        transaction, so that two UIs over one folder never interleave their moves."""
        with self.connect() as db:
            db.execute("BEGIN IMMEDIATE")
            rows = db.execute(
                "SELECT id, queued_at FROM runs WHERE status = 'queued' "
                "ORDER BY COALESCE(queued_at, 0), id"
            ).fetchall()
            order = [row["id"] for row in rows]
            if run_id not in order:
                return False
            place = order.index(run_id)
            order.remove(run_id)
            order.insert({"up": max(place - 1, 0), "down": place + 1, "front": 0}[to], run_id)
            times = distinct_increasing([row["queued_at"] or 0.0 for row in rows])
            db.executemany(
                "UPDATE runs SET queued_at = ? WHERE id = ?", list(zip(times, order, strict=True))
            )
        return True

    def update(self, run_id: int, **values) -> None:
        self.check_columns(values)
        assignments = ", ".join(f"{key} = ?" for key in values)
        with self.connect() as db:
            db.execute(f"UPDATE runs SET {assignments} WHERE id = ?", (*values.values(), run_id))

    @staticmethod
    def check_columns(values: dict) -> None:
        for key in values:
            if key not in Run.__dataclass_fields__ or key == "id":
                raise KeyError(key)

    def claim(self, run_id: int, statuses: tuple[str, ...], **values) -> bool:
        """Set `values` only if the run's status is one of `statuses`, in one statement, so
        two callers (threads, or two UIs over one folder) cannot both start or queue it."""
        self.check_columns(values)
        assignments = ", ".join(f"{key} = ?" for key in values)
        marks = ", ".join("?" for _ in statuses)
        with self.connect() as db:
            cursor = db.execute(
                f"UPDATE runs SET {assignments} WHERE id = ? AND status IN ({marks})",
                (*values.values(), run_id, *statuses),
            )
            return cursor.rowcount == 1

    def remove(self, run_id: int) -> None:
        with self.connect() as db:
            db.execute("DELETE FROM runs WHERE id = ?", (run_id,))


def distinct_increasing(times: list[float]) -> list[float]:
    """`times` (sorted), each made later than the one before it where two are equal."""
    out: list[float] = []
    for value in times:
        out.append(value if not out or value > out[-1] else out[-1] + 1e-3)
    return out
