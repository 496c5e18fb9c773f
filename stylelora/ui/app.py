"""The UI's server: Starlette routes over the store, the runner, the config form and datasets.

Pages are static files (`static/`) that call the JSON API below; a run's page follows it
through server-sent events. Every path a request names goes through `Roots`.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import shutil
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from stylelora.config import Config, _read_toml
from stylelora.errors import UserError, first_line
from stylelora.export.atomic import atomic_path
from stylelora.families.registry import model_names
from stylelora.train.progress import PROGRESS_FILE, read_events
from stylelora.train.run import preflight
from stylelora.ui import form
from stylelora.ui.datasets import dataset_listing, subfolders, thumbnail, write_caption
from stylelora.ui.roots import OutsideRoots, Roots
from stylelora.ui.runner import LOG_FILE, Runner, gpu_slots, log_tail
from stylelora.ui.security import Guard
from stylelora.ui.store import ACTIVE, Run, Store

STATIC = Path(__file__).parent / "static"
PAGES = {"/": "index.html", "/new": "new.html", "/datasets": "datasets.html", "/try": "try.html"}
RUN_CONFIG = "config.toml"  # the file a UI run's `stylelora train` reads, in its run folder
POLL_SECONDS = 0.5
MAX_BODY = 2**20  # a request's body: a config, a caption; nothing the UI takes is larger
TRY_IMAGE = re.compile(r"try-[0-9]{1,20}\.png")  # what /api/try writes and serves
DRAIN_LIMIT = 256 * 2**20  # a larger body is read through (not kept) before the 413


@dataclass
class UI:
    roots: Roots
    data: Path  # the UI's own folder: the database and rendered comparisons
    store: Store
    runner: Runner


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
        Route("/api/form", lambda r: JSONResponse(form.form_description())),
        Route("/api/templates", api(templates)),
        Route("/api/config/check", api(check_config), methods=["POST"]),
        Route("/api/config/parse", api(parse_config), methods=["POST"]),
        Route("/api/runs", api(list_runs)),
        Route("/api/runs", api(new_run), methods=["POST"]),
        Route("/api/runs/import", api(import_run), methods=["POST"]),
        Route("/api/runs/{id:int}", api(run_detail)),
        Route("/api/runs/{id:int}/events", run_events),
        Route("/api/runs/{id:int}/stop", api(stop_run), methods=["POST"]),
        Route("/api/runs/{id:int}/resume", api(resume_run), methods=["POST"]),
        Route("/api/runs/{id:int}", api(remove_run), methods=["DELETE"]),
        Route("/api/runs/{id:int}/files/{path:path}", api(run_file)),
        Route("/api/models", api(models)),
        Route("/api/folders", api(folders)),
        Route("/api/dataset", api(dataset)),
        Route("/api/thumb", api(thumb)),
        Route("/api/caption", api(caption), methods=["POST"]),
        Route("/api/try", api(try_adapter), methods=["POST"]),
        Route("/api/try/{name}", api(try_image)),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.ui = ui
    app.add_middleware(Guard, token=token or secrets.token_urlsafe(24), local=local)
    return app


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


async def watch(ui: UI) -> None:
    """Notice ended runs and start queued ones, for as long as the UI runs."""
    while True:
        try:
            await asyncio.to_thread(ui.runner.poll)
        except Exception as exc:  # a broken run folder or a busy database: say so, go on
            print(f"stylelora ui: watching runs: {exc}", file=sys.stderr)
        await asyncio.sleep(POLL_SECONDS)


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


# --- the config form ---------------------------------------------------------------------------


async def templates(request: Request, ui: UI) -> dict[str, Any]:
    """Where a new run can start: the demo config (in a checkout) and each VRAM preset."""
    found = {}
    demo = Path(__file__).resolve().parents[2] / "configs" / "demo.toml"
    if demo.is_file():
        found["demo"] = await asyncio.to_thread(demo_template, ui, demo)
    for name in form.preset_names():
        found[name] = {"preset": name}
    return {"templates": found, "home": str(ui.roots.home)}


# The demo's files a run reads, and where in the first root the demo template finds its copy.
DEMO_FILES = {"data.dir": "demo-style", "sample.prompts_file": "demo-prompts.txt"}


def demo_template(ui: UI, demo: Path) -> dict[str, str]:
    """The demo config as a run under the roots: its dataset and prompts copied into the first
    root on first use (the checkout they ship in lies outside it), its output under runs/."""
    settings = form.raw_to_settings(_read_toml(demo))
    for key, name in DEMO_FILES.items():
        copy_once(Path(settings[key]), ui.roots.home / name)
        settings[key] = name
    settings["output_dir"] = f"runs/{settings['name']}"
    return settings


def copy_once(source: Path, target: Path) -> None:
    """`source` (a file or folder) at `target`, unless something is there: copied beside it,
    then renamed into place, so a half-copied folder is never taken for the dataset."""
    if target.exists() or target.is_symlink():
        return
    partial = target.with_name(f".{target.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    if source.is_dir():
        shutil.copytree(source, partial, ignore=shutil.ignore_patterns(".*"))
    else:
        shutil.copyfile(source, partial)
    partial.rename(target)


async def check_config(request: Request, ui: UI) -> dict[str, Any]:
    settings = settings_of(await body(request))
    checked = form.check_settings(settings, ui.roots)
    return {"problems": checked.problems, "toml": form.toml_of(checked.raw)}


async def parse_config(request: Request, ui: UI) -> dict[str, Any]:
    text = (await body(request)).get("toml", "")
    return {"settings": form.settings_from_toml(str(text))}


def settings_of(data: dict[str, Any]) -> dict[str, str]:
    settings = data.get("settings", {})
    if not isinstance(settings, dict):
        raise UserError("settings must be a map of keys to values")
    return {str(key): str(value) for key, value in settings.items() if str(value).strip() != ""}


# --- runs --------------------------------------------------------------------------------------


async def new_run(request: Request, ui: UI) -> Response:
    settings = settings_of(await body(request))
    checked = form.check_settings(settings, ui.roots)
    cfg = checked.config
    if cfg is not None:
        problems = await asyncio.to_thread(preflight, cfg)  # what train says before its 1st step
        if folder_problem := another_runs_folder(ui, cfg):
            problems["output_dir"] = folder_problem
        checked.problems.update(problems)
    if checked.problems:
        return JSONResponse({"problems": checked.problems}, status_code=400)
    config_path = cfg.output_dir / RUN_CONFIG
    with atomic_path(config_path) as tmp:
        tmp.write_text(form.toml_of(checked.raw), encoding="utf-8")
    run = ui.store.add(cfg.name, config_path, cfg.output_dir)
    await asyncio.to_thread(ui.runner.poll)
    return JSONResponse({"id": run.id})


def another_runs_folder(ui: UI, cfg: Config) -> str | None:
    """Why `cfg.output_dir` is not free for a new run: another run of the UI's, or the command
    line's, wrote into it (its config, progress and log would be mixed with the new run's)."""
    folder = cfg.output_dir.resolve()
    earlier = [run for run in ui.store.all() if run.folder.resolve() == folder]
    if earlier:
        run = earlier[0]
        return (
            f"run {run.id} ({run.name}, {run.status}) used this folder: choose another "
            "output_dir, or resume or remove that run"
        )
    adapter = folder / f"{cfg.name}.safetensors"
    if adapter.exists():
        return f"{adapter} holds an earlier run's adapter: choose another output_dir or name"
    if (folder / PROGRESS_FILE).exists():
        return (
            "holds a run the command line started: import it from the Runs page, or choose "
            "another output_dir"
        )
    return None


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
    finished = (folder / f"{run.name}.safetensors").exists()
    ui.store.update(run.id, status="finished" if finished else "stopped", resume=1,
                    message="imported from the command line", ended_at=time.time())  # fmt: skip
    return {"id": run.id}


def drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: drop_none(v) for k, v in value.items() if v is not None}
    return value


def run_summary(run: Run) -> dict[str, Any]:
    events, _ = read_events(run.folder / PROGRESS_FILE)
    steps = [event for event in events if event.get("event") == "step"]
    last = steps[-1] if steps else {}
    return {
        **asdict(run),
        "step": last.get("step", 0),
        "max_steps": last.get("max_steps")
        or next((e.get("max_steps") for e in events if e.get("event") == "start"), None),
        "loss": last.get("loss"),
        "can_resume": run.status in ("stopped", "interrupted", "failed")
        and any((run.folder / "checkpoints").glob("step-*")),
    }


async def list_runs(request: Request, ui: UI) -> dict[str, Any]:
    return {"runs": [run_summary(run) for run in ui.store.all()]}


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
        **run_summary(run),
        "config_text": config,
        "resolved": resolved.read_text(encoding="utf-8") if resolved.is_file() else "",
        "downloads": downloads,
        "resume_command": f"stylelora train {run.config} --resume latest",
    }


async def run_events(request: Request) -> Response:
    """Server-sent events: the run's progress lines as they are written, its status, and the
    log's tail when it changed."""
    ui: UI = request.app.state.ui
    run_id = request.path_params["id"]
    if ui.store.get(run_id) is None:
        return JSONResponse({"error": f"no run {run_id}"}, status_code=404)

    async def stream():
        offset, last_log, last_state = 0, None, None
        while not await request.is_disconnected():
            run = ui.store.get(run_id)
            if run is None:
                yield message({"removed": True})
                return
            events, offset = read_events(run.folder / PROGRESS_FILE, offset)
            log = log_tail(run.folder / LOG_FILE, 16384)
            state = (run.status, run.message)
            if events or log != last_log or state != last_state:
                yield message({"events": events, "status": run.status, "message": run.message,
                               "log": log if log != last_log else None})  # fmt: skip
                last_log, last_state = log, state
            await asyncio.sleep(POLL_SECONDS)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store"})  # fmt: skip


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


async def run_file(request: Request, ui: UI) -> Response:
    """A file of the run's folder: a preview, the adapter, the report, the curves."""
    run = get_run(ui, request.path_params["id"])
    name = request.path_params["path"]
    path = ui.roots.resolve(run.folder / name)
    if not path.is_relative_to(run.folder.resolve()) or not path.is_file():
        raise UserError(f"{name}: no such file in the run folder")
    download = request.query_params.get("download") == "1"
    return FileResponse(path, filename=path.name if download else None)


async def models(request: Request, ui: UI) -> dict[str, Any]:
    """The built-in models (each family's demo and tiny model), then the base models under the
    roots: diffusers folders and single files, a few levels down."""
    found = await asyncio.to_thread(find_models, ui.roots)
    return {"models": model_names() + found}


def find_models(roots: Roots, depth: int = 3, min_bytes: int = 50 * 2**20) -> list[str]:
    found = []

    def visit(folder: Path, level: int) -> None:
        try:
            children = sorted(folder.iterdir())
        except OSError:
            return
        for child in children:
            if child.name.startswith(".") or child.is_symlink():
                continue
            if child.is_dir():
                if (child / "model_index.json").is_file():
                    found.append(roots.relative(child))
                elif level < depth:
                    visit(child, level + 1)
            elif child.suffix in (".safetensors", ".ckpt") and child.stat().st_size >= min_bytes:
                found.append(roots.relative(child))

    for root in roots.folders:
        visit(root, 1)
    return found[:200]


# --- datasets ------------------------------------------------------------------------------


async def folders(request: Request, ui: UI) -> dict[str, Any]:
    where = request.query_params.get("path", "")
    folder = ui.roots.resolve(where) if where else ui.roots.home
    if not folder.is_dir():
        raise UserError(f"{where}: not a folder")
    parent = ui.roots.relative(folder.parent) if folder != ui.roots.home else None
    return {"folder": ui.roots.relative(folder), "parent": parent,
            "folders": await asyncio.to_thread(subfolders, folder, ui.roots),
            "roots": [str(root) for root in ui.roots.folders]}  # fmt: skip


async def dataset(request: Request, ui: UI) -> dict[str, Any]:
    query = request.query_params
    folder = ui.roots.resolve(query.get("path", ""))
    resolution = number(query.get("resolution") or 512, "resolution", int)
    extension = query.get("caption_extension", ".txt") or ".txt"
    return await asyncio.to_thread(dataset_listing, folder, ui.roots, resolution, extension)


async def thumb(request: Request, ui: UI) -> Response:
    path = ui.roots.resolve(request.query_params.get("path", ""))
    data = await asyncio.to_thread(thumbnail, path)
    return Response(data, media_type="image/png", headers={"Cache-Control": "no-store"})


async def caption(request: Request, ui: UI) -> dict[str, Any]:
    data = await body(request)
    image = ui.roots.resolve(str(data.get("path", "")))
    extension = str(data.get("caption_extension", ".txt"))
    written = write_caption(image, str(data.get("caption", "")), extension, ui.roots)
    return {"written": ui.roots.relative(written)}


# --- try an adapter ------------------------------------------------------------------------


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


def number(value: Any, name: str, kind: type):
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise UserError(f"{name}: expected a number (got {value!r})") from None


async def try_image(request: Request, ui: UI) -> Response:
    name = request.path_params["name"]
    path = ui.data / "try" / name
    if not TRY_IMAGE.fullmatch(name) or not path.is_file():
        raise NotFound(f"{name[:60]}: no such image")
    return FileResponse(path)
