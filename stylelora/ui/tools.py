"""Tools on a finished run's adapter, as the command line runs them (`stylelora merge`, `resize`,
`combine`), each in a process of its own; what they write goes to the run's `tools/` folder."""

from __future__ import annotations

import asyncio
import math
import re
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.routing import Route

from stylelora.errors import UserError
from stylelora.ui.http import UI, api, body, get_run, number
from stylelora.ui.jobs import Job, cli
from stylelora.ui.store import Run
from stylelora.ui.trying import run_adapters, run_settings

TOOLS_DIR = "tools"
DTYPES = ("fp16", "bf16", "fp32")
MAX_RANK = 4096


def routes() -> list[Route]:
    return [
        Route("/api/tools/status", api(tool_status)),
        Route("/api/tools/cancel", api(cancel_tool), methods=["POST"]),
        Route("/api/tools/{id:int}", api(run_tools)),
        Route("/api/tools/{id:int}/merge", api(merge), methods=["POST"]),
        Route("/api/tools/{id:int}/resize", api(resize), methods=["POST"]),
        Route("/api/tools/{id:int}/combine", api(combine), methods=["POST"]),
    ]


def final_adapter(run: Run) -> Path:
    path = run.adapter
    if not path.is_file():
        raise UserError(
            f"run {run.id} ({run.name}) has no adapter yet ({run.status}): the tools take a "
            "finished run's"
        )
    return path


def results(ui: UI, run: Run) -> list[dict[str, Any]]:
    """What the tools wrote for this run, newest first."""
    folder = run.folder / TOOLS_DIR
    files = sorted(folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime, reverse=True)
    return [result(ui, run, path) for path in files if path.is_file()]


def result(ui: UI, run: Run, path: Path) -> dict[str, Any]:
    """A written file: its download, and where it can be tried (an adapter on the Try page;
    a merged model as the Try page's model)."""
    relative = ui.roots.relative(path)
    merged = path.stem.endswith("-merged")
    return {
        "name": path.name,
        "path": relative,
        "kind": "model" if merged else "adapter",
        "download": f"/api/runs/{run.id}/files/{TOOLS_DIR}/{path.name}?download=1",
    }


async def run_tools(request: Request, ui: UI) -> dict[str, Any]:
    run = get_run(ui, request.path_params["id"])
    settings = run_settings(run)
    adapter = run.adapter
    written = [
        {"path": item["path"], "label": item["name"]}
        for item in results(ui, run)
        if item["kind"] == "adapter"
    ]
    others = written + [
        {"path": entry["path"], "label": entry["label"]}
        for other in ui.store.all()
        for entry in run_adapters(ui, other)
        if entry["path"] != ui.roots.relative(adapter)
    ]
    return {
        "id": run.id,
        "name": run.name,
        "status": run.status,
        "model": str(settings.get("model") or ""),
        "rank": (settings.get("adapter") or {}).get("rank"),
        "adapter": ui.roots.relative(adapter) if adapter.is_file() else None,
        "others": others,
        "results": results(ui, run),
    }


def bounded_rank(value: Any, name: str = "rank") -> int:
    rank = number(value, name, int)
    if not 1 <= rank <= MAX_RANK:
        raise UserError(f"{name}: must be between 1 and {MAX_RANK} (got {value!r})")
    return rank


def strength(value: Any, name: str) -> float:
    parsed = number(1.0 if value is None or value == "" else value, name, float)
    if not math.isfinite(parsed) or abs(parsed) > 100:
        raise UserError(f"{name}: must be a number between -100 and 100 (got {value!r})")
    return parsed


def stem(path: Path) -> str:
    """A file name's stem fit for a new file's name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem)[:60]


async def start(request: Request, ui: UI, run: Run, what: str, args: list[str], out: Path):
    out.parent.mkdir(parents=True, exist_ok=True)
    info = {"what": what, "run": run.id, "result": result(ui, run, out)}
    job = Job(cli(*args, "--out", str(out)), out, ui.data / "tools" / "tool.log", info)
    await asyncio.to_thread(ui.jobs.start, "tools", job, ui.data)
    return job.summary()


async def merge(request: Request, ui: UI) -> dict[str, Any]:
    """The adapter merged into the run's base model: one .safetensors file."""
    run = get_run(ui, request.path_params["id"])
    data = await body(request)
    adapter = final_adapter(run)
    dtype = data.get("dtype") or "fp16"
    if dtype not in DTYPES:
        raise UserError(f"dtype: one of {', '.join(DTYPES)} (got {str(dtype)[:20]!r})")
    model = ui.roots.model(str(run_settings(run).get("model") or ""), run.folder)
    weight = strength(data.get("strength"), "strength")
    out = run.folder / TOOLS_DIR / f"{stem(adapter)}-merged.safetensors"
    args = ["merge", "--model", model, "--adapter", f"{adapter}:{weight:g}", "--dtype", dtype]
    return await start(request, ui, run, f"merging into {model}", args, out)


async def resize(request: Request, ui: UI) -> dict[str, Any]:
    """The adapter at a lower rank (SVD)."""
    run = get_run(ui, request.path_params["id"])
    data = await body(request)
    adapter = final_adapter(run)
    rank = bounded_rank(data.get("rank"))
    out = run.folder / TOOLS_DIR / f"{stem(adapter)}-rank{rank}.safetensors"
    args = ["resize", str(adapter), "--rank", str(rank)]
    return await start(request, ui, run, f"resizing to rank {rank}", args, out)


async def combine(request: Request, ui: UI) -> dict[str, Any]:
    """The adapter and another, each at its strength, as one adapter."""
    run = get_run(ui, request.path_params["id"])
    data = await body(request)
    adapter = final_adapter(run)
    if not str(data.get("other") or "").strip():
        raise UserError("other: choose the adapter to combine with")
    other = ui.roots.resolve(str(data["other"]))
    if not other.is_file():
        raise UserError(f"{data['other']}: no such adapter file")
    mine, theirs = (
        strength(data.get("strength"), "strength"),
        strength(data.get("other_strength"), "other_strength"),
    )
    args = ["combine", f"{adapter}:{mine:g}", f"{other}:{theirs:g}"]
    if data.get("rank") not in (None, ""):
        args += ["--rank", str(bounded_rank(data["rank"]))]
    out = run.folder / TOOLS_DIR / f"{stem(adapter)}+{stem(other)}.safetensors"
    return await start(request, ui, run, f"combining with {other.name}", args, out)


async def tool_status(request: Request, ui: UI) -> dict[str, Any]:
    job = ui.jobs.get("tools")
    return job.summary() if job else {"state": "idle"}


async def cancel_tool(request: Request, ui: UI) -> dict[str, Any]:
    await body(request)  # nothing in it, but read: a request is answered whole
    return (await asyncio.to_thread(ui.jobs.cancel, "tools")).summary()
