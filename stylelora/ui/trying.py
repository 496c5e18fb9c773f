"""Try an adapter: `stylelora sample --compare` in a process of its own, the image served."""

from __future__ import annotations

import asyncio
import re
import sys
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from stylelora.errors import UserError
from stylelora.ui.http import UI, NotFound, api, body, number

TRY_IMAGE = re.compile(r"try-[0-9]{1,20}\.png")  # what /api/try writes and serves


def routes() -> list[Route]:
    return [
        Route("/api/try", api(try_adapter), methods=["POST"]),
        Route("/api/try/{name}", api(try_image)),
    ]


async def try_adapter(request: Request, ui: UI) -> dict[str, Any]:
    """`stylelora sample --compare` in a process of its own: the base and the adapted image."""
    data = await body(request)
    adapter = ui.roots.resolve(str(data.get("adapter", "")))
    if not adapter.exists():
        raise UserError(f"{data.get('adapter')}: no such adapter file")
    if not str(data.get("model", "")).strip():
        raise UserError("model: choose the base model the adapter was trained on")
    model = ui.roots.model(str(data["model"]))
    name = f"try-{int(time.time() * 1000)}.png"
    out = ui.data / "try" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "stylelora", "sample", "--model", model,
               "--adapter", str(adapter), "--prompt", str(data.get("prompt", "")),
               "--seed", str(number(data.get("seed", 0), "seed", int)),
               "--scale", str(number(data.get("scale", 1.0), "strength", float)),
               "--steps", str(number(data.get("steps", 20), "steps", int)),
               "--guidance", str(number(data.get("guidance", 7.5), "guidance", float)),
               "--out", str(out), "--compare"]  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        *command, cwd=ui.data, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await process.communicate()
    if process.returncode != 0 or not out.is_file():
        lines = [line for line in output.decode(errors="replace").splitlines() if line.strip()]
        raise UserError(lines[-1] if lines else f"sample exited with {process.returncode}")
    return {"image": f"/api/try/{name}"}


async def try_image(request: Request, ui: UI) -> Response:
    name = request.path_params["name"]
    path = ui.data / "try" / name
    if not TRY_IMAGE.fullmatch(name) or not path.is_file():
        raise NotFound(f"{name[:60]}: no such image")
    return FileResponse(path)
