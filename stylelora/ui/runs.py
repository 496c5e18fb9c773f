"""Runs: the list, a run's page and its live events, stop, resume, remove, its files, and
runs the command line started, imported."""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route

from stylelora.config import _read_toml
from stylelora.errors import UserError
from stylelora.export.atomic import atomic_path
from stylelora.train.progress import PROGRESS_FILE, read_events
from stylelora.ui import form
from stylelora.ui.http import UI, NotFound, api, body, get_run
from stylelora.ui.new_run import RUN_CONFIG
from stylelora.ui.roots import OutsideRoots
from stylelora.ui.runner import LOG_FILE, LogFollower, whole_log
from stylelora.ui.store import ACTIVE, Run

POLL_SECONDS = 0.5


def routes() -> list[Route]:
    return [
        Route("/api/runs", api(list_runs)),
        Route("/api/runs/import", api(import_run), methods=["POST"]),
        Route("/api/runs/{id:int}", api(run_detail)),
        Route("/api/runs/{id:int}/events", run_events),
        Route("/api/runs/{id:int}/stop", api(stop_run), methods=["POST"]),
        Route("/api/runs/{id:int}/resume", api(resume_run), methods=["POST"]),
        Route("/api/runs/{id:int}", api(remove_run), methods=["DELETE"]),
        Route("/api/runs/{id:int}/files/{path:path}", api(run_file)),
        Route("/api/runs/{id:int}/log", api(run_log)),
    ]


def confined_config(ui: UI, raw: Any, source: Path) -> dict[str, Any]:
    """A run folder's config (`source`), every path it names resolved inside the roots,
    relative to the folder the run's process starts in; refused whole if one lies outside."""
    if not isinstance(raw, dict):
        raise UserError(f"{source}: not a config (expected a table of settings)")
    problems = form.confine(raw, ui.roots, source.parent)
    if problems:
        key, problem = next(iter(problems.items()))
        raise OutsideRoots(f"{source}: {key}: {problem}")
    return raw


async def import_run(request: Request, ui: UI) -> dict[str, Any]:
    """A run folder the CLI wrote: its config.json becomes config.toml, and the run can be
    resumed here."""
    folder = ui.roots.resolve(str((await body(request)).get("folder", "")))
    resolved = folder / "config.json"
    if not resolved.is_file():
        raise UserError(f"{folder}: no config.json; is this a stylelora run folder?")
    try:
        raw = drop_none(json.loads(resolved.read_text(encoding="utf-8")))
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{resolved}: not valid JSON; is this a stylelora run folder?") from None
    if isinstance(raw, dict):
        raw.pop("preset", None)  # config.json holds the preset's values already
        raw["output_dir"] = str(folder)
    raw = confined_config(ui, raw, resolved)
    config_path = folder / RUN_CONFIG
    if config_path.exists():
        confined_config(ui, _read_toml(config_path), config_path)
    else:
        with atomic_path(config_path) as tmp:
            tmp.write_text(form.toml_of(raw), encoding="utf-8")
    run = ui.store.add(str(raw.get("name", folder.name)), config_path, folder)
    finished = run.adapter.exists()
    ui.store.update(run.id, status="finished" if finished else "stopped", resume=1,
                    message="imported from the command line", ended_at=time.time())  # fmt: skip
    return {"id": run.id}


def drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: drop_none(v) for k, v in value.items() if v is not None}
    return value


def queue_places(ui: UI) -> dict[int, int]:
    """Each queued run's place in the queue (1: it starts next)."""
    return {run.id: place for place, run in enumerate(ui.store.queued(), start=1)}


def run_summary(run: Run, places: dict[int, int] | None = None) -> dict[str, Any]:
    events, _ = read_events(run.folder / PROGRESS_FILE)
    steps = [event for event in events if event.get("event") == "step"]
    last = steps[-1] if steps else {}
    return {
        **asdict(run),
        "step": last.get("step", 0),
        "max_steps": last.get("max_steps")
        or next((e.get("max_steps") for e in events if e.get("event") == "start"), None),
        "loss": last.get("loss"),
        "queue_place": (places or {}).get(run.id),
        "can_resume": run.status in ("stopped", "interrupted", "failed")
        and any((run.folder / "checkpoints").glob("step-*")),
    }


async def list_runs(request: Request, ui: UI) -> dict[str, Any]:
    places = queue_places(ui)
    return {"runs": [run_summary(run, places) for run in ui.store.all()]}


async def run_detail(request: Request, ui: UI) -> dict[str, Any]:
    run = get_run(ui, request.path_params["id"])
    downloads = [
        path.name
        for path in sorted(run.folder.glob("*.safetensors")) + [run.folder / "report.html"]
        if path.is_file()
    ]
    config = Path(run.config).read_text(encoding="utf-8") if Path(run.config).is_file() else ""
    resolved = run.folder / "config.json"
    return {
        **run_summary(run, queue_places(ui)),
        "config_text": config,
        "resolved": resolved.read_text(encoding="utf-8") if resolved.is_file() else "",
        "downloads": downloads,
        "checkpoints": checkpoint_adapters(run.folder),
        "has_log": (run.folder / LOG_FILE).is_file(),
        "resume_command": f"stylelora train {run.config} --resume latest",
    }


def exported_adapter(checkpoint: Path) -> Path | None:
    """The adapter file a checkpoint holds as the run exports its own (`NAME-step-N`), if any."""
    return next(iter(sorted(checkpoint.glob("*-step-*.safetensors"))), None)


def checkpoint_adapters(folder: Path) -> list[dict[str, Any]]:
    """Each complete checkpoint (its manifest is written last) with its adapter file, newest
    first; `adapter` is None in a checkpoint written before checkpoints held one."""
    found = []
    for manifest in folder.glob("checkpoints/step-*/checkpoint.json"):
        step = manifest.parent.name.removeprefix("step-")
        adapter = exported_adapter(manifest.parent)
        if step.isdigit():
            path = adapter.relative_to(folder).as_posix() if adapter else None
            found.append({"step": int(step), "adapter": path})
    return sorted(found, key=lambda checkpoint: -checkpoint["step"])


async def run_events(request: Request) -> Response:
    """Server-sent events: the run's progress lines as they are written, its status and place
    in the queue, and the log's lines: all of them first, then those written since."""
    ui: UI = request.app.state.ui
    run_id = request.path_params["id"]
    run = ui.store.get(run_id)
    if run is None:
        return JSONResponse({"error": f"no run {run_id}"}, status_code=404)
    log = followed_log(ui, run)

    async def stream():
        offset, last_state = 0, None
        while not await request.is_disconnected():
            run = ui.store.get(run_id)
            if run is None:
                yield message({"removed": True})
                return
            events, offset = read_events(run.folder / PROGRESS_FILE, offset)
            new_log = await asyncio.to_thread(log.read) if log else None
            place = queue_places(ui).get(run_id) if run.status == "queued" else None
            state = (run.status, run.message, place)
            if events or new_log or state != last_state:
                yield message({"events": events, "status": run.status, "message": run.message,
                               "queue_place": place, "log": new_log})  # fmt: skip
                last_state = state
            await asyncio.sleep(POLL_SECONDS)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store"})  # fmt: skip


def followed_log(ui: UI, run: Run) -> LogFollower | None:
    """The run's log, followed; None if it links out of the roots."""
    try:
        return LogFollower(ui.roots.resolve(run.folder / LOG_FILE))
    except UserError:
        return None


def message(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


async def stop_run(request: Request, ui: UI) -> dict[str, Any]:
    run = get_run(ui, request.path_params["id"])
    await asyncio.to_thread(ui.runner.stop, run.id)
    return {"status": ui.store.get(run.id).status}


async def resume_run(request: Request, ui: UI) -> dict[str, Any]:
    run = get_run(ui, request.path_params["id"])
    # the file the run will read, checked as a new run's settings are (it may have come
    # from an imported folder, or been edited since)
    config = Path(run.config)
    if not config.is_file():
        raise UserError(f"{config}: the run's config file is gone")
    confined_config(ui, _read_toml(config), config)
    has_checkpoint = any((run.folder / "checkpoints").glob("step-*"))
    await asyncio.to_thread(ui.runner.queue, run.id, has_checkpoint)
    await asyncio.to_thread(ui.runner.poll)
    return {"status": ui.store.get(run.id).status}


async def remove_run(request: Request, ui: UI) -> dict[str, Any]:
    run = get_run(ui, request.path_params["id"])
    if run.status in ACTIVE:
        raise UserError(f"run {run.id} is {run.status}: stop it first")
    ui.store.remove(run.id)
    return {"removed": run.id, "kept": str(run.folder)}


async def run_log(request: Request, ui: UI) -> Response:
    """The whole log to download, each progress bar as last drawn."""
    run = get_run(ui, request.path_params["id"])
    path = ui.roots.resolve(run.folder / LOG_FILE)
    if not path.is_file():
        raise NotFound(f"run {run.id} has no log yet")
    text = await asyncio.to_thread(whole_log, path)
    filename = re.sub(r"[^\w.-]", "_", run.name)
    headers = {"Content-Disposition": f'attachment; filename="{filename}.log"'}
    return PlainTextResponse(text, headers=headers)


async def run_file(request: Request, ui: UI) -> Response:
    """A file of the run's folder: a preview, the adapter, the report, the curves."""
    run = get_run(ui, request.path_params["id"])
    name = request.path_params["path"]
    path = ui.roots.resolve(run.folder / name)
    if not path.is_relative_to(run.folder.resolve()) or not path.is_file():
        raise UserError(f"{name}: no such file in the run folder")
    download = request.query_params.get("download") == "1"
    return FileResponse(path, filename=path.name if download else None)
