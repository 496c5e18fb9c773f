"""What every route of the UI's server shares: the UI's state, JSON endpoints with one-line
errors, request bodies read with limits."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response

from stylelora.errors import UserError, first_line
from stylelora.ui.jobs import Jobs
from stylelora.ui.roots import OutsideRoots, Roots
from stylelora.ui.runner import Runner
from stylelora.ui.store import Run, Store

STATIC = Path(__file__).parent / "static"
MAX_BODY = 2**20  # a request's body: a config, a caption; nothing the UI takes is larger

DRAIN_LIMIT = 256 * 2**20  # a larger body is read through (not kept) before the 413


@dataclass
class UI:
    roots: Roots
    data: Path  # the UI's own folder: the database and rendered comparisons
    store: Store
    runner: Runner
    jobs: Jobs = field(default_factory=Jobs)  # the Try page's render and the Tools page's tool


def page(name: str):
    async def serve(request: Request) -> Response:
        return FileResponse(STATIC / name, headers={"Cache-Control": "no-store"})

    return serve


class NotFound(UserError):
    status = 404


class TooLarge(UserError):
    status = 413


def api(handler):
    """A JSON endpoint: a UserError (a bad path, value or state) is a 4xx with its one line
    (a path outside the roots 403, what does not exist 404, a body over MAX_BODY 413). Anything
    else is a bug: a 500 with one line, here and in the server's log."""

    async def endpoint(request: Request) -> Response:
        try:
            refuse_null_bytes(request)
            result = await handler(request, request.app.state.ui)
        except UserError as exc:
            status = 403 if isinstance(exc, OutsideRoots) else getattr(exc, "status", 400)
            return JSONResponse({"error": first_line(exc)}, status_code=status)
        except Exception as exc:
            line = f"{type(exc).__name__}: {first_line(exc)}"
            print(f"stylelora ui: {request.method} {request.url.path}: {line}", file=sys.stderr)
            return JSONResponse({"error": f"internal error: {line}"}, status_code=500)
        return result if isinstance(result, Response) else JSONResponse(result)

    return endpoint


def refuse_null_bytes(request: Request) -> None:
    """No file name holds a NUL: a path or query parameter with one is refused whole."""
    for name, value in [*request.path_params.items(), *request.query_params.items()]:
        if "\x00" in str(value) or "\x00" in name:
            raise UserError(f"{name}: a parameter cannot hold a null byte")


async def body(request: Request) -> dict[str, Any]:
    """The request's JSON object, at most MAX_BODY bytes; no string in it holds a NUL."""
    declared = request.headers.get("content-length", "0")
    if not declared.isdigit() or int(declared) > DRAIN_LIMIT:
        raise TooLarge(f"the request body is over {MAX_BODY // 2**20} MiB")
    received, size = bytearray(), 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= MAX_BODY:
            received += chunk
        elif size > DRAIN_LIMIT:
            break
    if size > MAX_BODY:  # read to its end (unkept) so that the client hears the answer
        raise TooLarge(f"the request body is over {MAX_BODY // 2**20} MiB")
    try:
        data = json.loads(received)
    except ValueError:
        raise UserError("the request body is not JSON") from None
    if not isinstance(data, dict):
        raise UserError("the request body must be a JSON object")
    if holds_null_byte(data):
        raise UserError("the request holds a null byte, which no name or path can hold")
    return data


def holds_null_byte(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(holds_null_byte(k) or holds_null_byte(v) for k, v in value.items())
    if isinstance(value, list):
        return any(holds_null_byte(item) for item in value)
    return False


def get_run(ui: UI, run_id: int) -> Run:
    run = ui.store.get(run_id)
    if run is None:
        raise NotFound(f"no run {run_id}")
    return run


def number(value: Any, name: str, kind: type):
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise UserError(f"{name}: expected a number (got {value!r})") from None
