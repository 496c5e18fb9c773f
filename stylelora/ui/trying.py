"""Try an adapter: the adapters the runs wrote (final and checkpoints', with their model), and
`stylelora sample` in a process of its own: its progress, cancel, the image served."""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from stylelora.config import _read_toml
from stylelora.errors import UserError
from stylelora.train.checkpoint import ADAPTER, checkpoints_dir, complete_checkpoints
from stylelora.ui.http import UI, NotFound, api, body, get_run, number
from stylelora.ui.jobs import Job, cli
from stylelora.ui.runs import exported_adapter
from stylelora.ui.store import Run

TRY_IMAGE = re.compile(r"try-[0-9]{1,20}\.png")  # what /api/try writes and serves
MAX_STRENGTHS = 16
SIZES = (16, 4096)  # width and height the page may ask for
MAX_STEPS = 500


def routes() -> list[Route]:
    return [
        Route("/api/adapters", api(list_adapters)),
        Route("/api/try", api(try_adapter), methods=["POST"]),
        Route("/api/try/status", api(try_status)),
        Route("/api/try/cancel", api(cancel_try), methods=["POST"]),
        Route("/api/try/{name}", api(try_image)),
    ]


# --- the adapters there are ------------------------------------------------------------------


def run_settings(run: Run) -> dict[str, Any]:
    """The run's resolved config (config.json), else the config file it was started from."""
    try:
        resolved = run.folder / "config.json"
        if resolved.is_file():
            return json.loads(resolved.read_text(encoding="utf-8"))
        return _read_toml(Path(run.config))
    except (OSError, ValueError, UserError):
        return {}


def run_resolution(settings: dict[str, Any]) -> int | None:
    """The side the run trained at (the largest of several)."""
    value = (settings.get("data") or {}).get("resolution")
    values = value if isinstance(value, list) else [value]
    sides = [v for v in values if isinstance(v, int) and v > 0]
    return max(sides) if sides else None


def run_adapters(ui: UI, run: Run) -> list[dict[str, Any]]:
    """The adapter files of `run` that exist: its final one, then its checkpoints', newest
    first; each with the run's model and resolution."""
    settings = run_settings(run)
    common = {
        "run": run.id,
        "run_name": run.name,
        "model": str(settings.get("model") or ""),
        "resolution": run_resolution(settings),
    }
    found = []
    final = run.adapter
    if final.is_file():
        found.append({**common, "step": None, "path": ui.roots.relative(final),
                      "label": f"{run.name} (final)"})  # fmt: skip
    if checkpoints_dir(run.folder).is_dir():
        for folder in reversed(complete_checkpoints(run.folder)):
            step = int(folder.name.removeprefix("step-"))
            # a checkpoint from before checkpoints held an exported adapter: sample converts
            # its training state
            adapter = exported_adapter(folder) or folder / ADAPTER
            found.append({**common, "step": step, "path": ui.roots.relative(adapter),
                          "label": f"{run.name} step {step}"})  # fmt: skip
    return found


async def list_adapters(request: Request, ui: UI) -> dict[str, Any]:
    """Every run's adapters; `?run=ID`: that run's."""
    if "run" in request.query_params:
        runs = [get_run(ui, number(request.query_params["run"], "run", int))]
    else:
        runs = ui.store.all()
    adapters = []
    for run in runs:
        adapters += run_adapters(ui, run)
    return {"adapters": adapters}


# --- rendering -------------------------------------------------------------------------------


def strengths(value: Any) -> list[float]:
    """`0, 0.5, 1` (or a number, or a list of them): the strengths to render, left to right."""
    parts = value if isinstance(value, list) else str(value).replace(",", " ").split()
    numbers = [number(part, "strength", float) for part in parts]
    if not numbers or len(numbers) > MAX_STRENGTHS:
        raise UserError(f"strength: give 1 to {MAX_STRENGTHS} numbers, such as 0, 0.5, 1")
    if not all(math.isfinite(n) and abs(n) <= 100 for n in numbers):
        raise UserError("strength: each must be a number between -100 and 100")
    return numbers


def bounded(data: dict[str, Any], key: str, kind: type, low: float, high: float, default=None):
    """A number of the request within [low, high]; `default` when absent or empty."""
    value = data.get(key)
    if value is None or value == "":
        return default
    parsed = number(value, key, kind)
    if not (isinstance(parsed, int) or math.isfinite(parsed)) or not low <= parsed <= high:
        raise UserError(f"{key}: must be between {low:g} and {high:g} (got {value!r})")
    return parsed


def label(scale: float) -> str:
    return f"strength {scale:g}"


def sample_command(ui: UI, data: dict[str, Any], out: Path) -> tuple[list[str], list[str]]:
    """The `stylelora sample` command for the request, and the labels of its images."""
    adapter = ui.roots.resolve(str(data.get("adapter", "")))
    if not adapter.exists():
        raise UserError(f"{data.get('adapter')}: no such adapter file")
    if not str(data.get("model", "")).strip():
        raise UserError("model: choose the base model the adapter was trained on")
    model = ui.roots.model(str(data["model"]))
    scales = strengths(data.get("scales", data.get("scale", 1.0)))
    command = cli(
        "sample", "--model", model, "--adapter", str(adapter),
        "--prompt", str(data.get("prompt", "")), "--negative", str(data.get("negative", "")),
        "--seed", str(bounded(data, "seed", int, 0, 2**63 - 1, 0)),
        "--steps", str(bounded(data, "steps", int, 1, MAX_STEPS, 20)),
        "--guidance", str(bounded(data, "guidance", float, 0, 100, 7.5)),
        "--scales", ",".join(f"{s:g}" for s in scales), "--out", str(out),
    )  # fmt: skip
    for side in ("width", "height"):
        if (value := bounded(data, side, int, *SIZES)) is not None:
            command += [f"--{side}", str(value)]
    if len(scales) == 1:  # one strength: beside the base model's image
        return command + ["--compare"], ["without the adapter", label(scales[0])]
    return command, [label(scale) for scale in scales]


async def try_adapter(request: Request, ui: UI) -> dict[str, Any]:
    """`stylelora sample` in a process of its own; the page follows it at /api/try/status."""
    data = await body(request)
    name = f"try-{time.time_ns() // 1000}.png"
    out = ui.data / "try" / name
    command, labels = sample_command(ui, data, out)
    info = {"image": f"/api/try/{name}", "labels": labels, "what": "rendering"}
    job = Job(command, out, ui.data / "try" / "sample.log", info)
    out.parent.mkdir(parents=True, exist_ok=True)
    await asyncio.to_thread(ui.jobs.start, "try", job, ui.data)
    return job.summary()


async def try_status(request: Request, ui: UI) -> dict[str, Any]:
    job = ui.jobs.get("try")
    return job.summary() if job else {"state": "idle"}


async def cancel_try(request: Request, ui: UI) -> dict[str, Any]:
    await body(request)  # nothing in it, but read: a request is answered whole
    return (await asyncio.to_thread(ui.jobs.cancel, "try")).summary()


async def try_image(request: Request, ui: UI) -> Response:
    name = request.path_params["name"]
    path = ui.data / "try" / name
    if not TRY_IMAGE.fullmatch(name) or not path.is_file():
        raise NotFound(f"{name[:60]}: no such image")
    return FileResponse(path)
