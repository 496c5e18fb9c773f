"""The UI's server: Starlette routes over the store, the runner, the config form and datasets.

Pages are static files (`static/`) that call the JSON API (one module per page: `new_run`,
`runs`, `datasets`, `trying`); a run's page follows it through server-sent events. Every path
a request names goes through `Roots`.
"""

from __future__ import annotations

import asyncio
import secrets
import sys
from contextlib import asynccontextmanager
from pathlib import Path

from starlette.applications import Starlette
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from stylelora.ui import captioning, datasets, machine, new_run, queueing, runs, tools, trying
from stylelora.ui.http import STATIC, UI, page
from stylelora.ui.roots import Roots
from stylelora.ui.runner import Runner, gpu_slots
from stylelora.ui.security import Guard
from stylelora.ui.store import Store

PAGES = {"/": "index.html", "/new": "new.html", "/datasets": "datasets.html", "/try": "try.html",
         "/tools": "tools.html"}  # fmt: skip
POLL_SECONDS = 0.5


def create_app(roots: list[Path], data: Path | None = None, token: str | None = None,
               local: bool = True, slots: list[str | None] | None = None) -> Starlette:  # fmt: skip
    checked = Roots(roots)
    data = Path(data) if data else checked.home / ".stylelora-ui"
    store = Store(data / "ui.db")
    ui = UI(checked, data, store, Runner(store, slots or gpu_slots()))

    @asynccontextmanager
    async def lifespan(app: Starlette):
        task = asyncio.create_task(watch(ui))
        try:
            yield
        finally:
            task.cancel()  # the runs go on: they are processes of their own

    routes = [
        *[Route(path, page(name)) for path, name in PAGES.items()],
        Route("/runs/{id:int}", page("run.html")),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
        *new_run.routes(),
        *runs.routes(),
        *datasets.routes(),
        *captioning.routes(),
        *trying.routes(),
        *[*machine.routes(), *queueing.routes(), *tools.routes()],
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.ui = ui
    app.add_middleware(Guard, token=token or secrets.token_urlsafe(24), local=local)
    return app


async def watch(ui: UI) -> None:
    """Notice ended runs and start queued ones, for as long as the UI runs."""
    while True:
        try:
            await asyncio.to_thread(ui.runner.poll)
        except Exception as exc:  # a broken run folder or a busy database: say so, go on
            print(f"stylelora ui: watching runs: {exc}", file=sys.stderr)
        await asyncio.sleep(POLL_SECONDS)
