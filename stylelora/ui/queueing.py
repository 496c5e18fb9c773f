"""The queue's order, for the Runs page: each queued run's place, and moving one up, down or to
the front (kept in the store, so the order holds across restarts and for a second UI)."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.routing import Route

from stylelora.errors import UserError
from stylelora.ui.http import UI, api, body, get_run

MOVES = ("up", "down", "front")


def routes() -> list[Route]:
    return [
        Route("/api/queue", api(queue_order)),
        Route("/api/runs/{id:int}/move", api(move_run), methods=["POST"]),
    ]


async def queue_order(request: Request, ui: UI) -> dict[str, Any]:
    """The queued runs' ids, the next to start first."""
    return {"queue": [run.id for run in await asyncio.to_thread(ui.store.queued)]}


async def move_run(request: Request, ui: UI) -> dict[str, Any]:
    run = get_run(ui, request.path_params["id"])
    to = (await body(request)).get("to")
    if to not in MOVES:
        raise UserError(f"to: move a queued run {', '.join(MOVES)} (got {str(to)[:40]!r})")
    if not await asyncio.to_thread(ui.store.move, run.id, to):
        raise UserError(f"run {run.id} is {ui.store.get(run.id).status}: only a queued run moves")
    return await queue_order(request, ui)
