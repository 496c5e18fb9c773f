"""A new run: the templates it starts from, the form's checks, and Start (checked as `train`
checks before its first step)."""

from __future__ import annotations

import asyncio
import re
import shutil
from itertools import count
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from stylelora.config import Config, _read_toml
from stylelora.errors import UserError
from stylelora.export.atomic import atomic_path
from stylelora.families.registry import model_names
from stylelora.train.progress import PROGRESS_FILE
from stylelora.train.run import preflight
from stylelora.ui import form
from stylelora.ui.http import UI, api, body, get_run
from stylelora.ui.roots import OutsideRoots, Roots

RUN_CONFIG = "config.toml"  # the file a UI run's `stylelora train` reads, in its run folder


def routes() -> list[Route]:
    return [
        Route("/api/form", lambda r: JSONResponse(form.form_description())),
        Route("/api/templates", api(templates)),
        Route("/api/config/check", api(check_config), methods=["POST"]),
        Route("/api/config/parse", api(parse_config), methods=["POST"]),
        Route("/api/runs", api(new_run), methods=["POST"]),
        Route("/api/models", api(models)),
        Route("/api/runs/{id:int}/settings", api(run_settings)),
    ]


async def templates(request: Request, ui: UI) -> dict[str, Any]:
    """Where a new run can start: the demo config (in a checkout) and each VRAM preset."""
    found = {}
    demo = Path(__file__).resolve().parents[2] / "configs" / "demo.toml"
    if demo.is_file():
        found["demo"] = await asyncio.to_thread(demo_template, ui, demo)
    for name in form.preset_names():
        found[name] = {"preset": name, **free_run(ui, name, ui.roots.home / "runs", first=1)}
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
    return settings | free_run(ui, settings["name"], ui.roots.home / "runs", first=1)


def free_run(ui: UI, name: str, parent: Path, first: int = 2) -> dict[str, str]:
    """A name and output folder no run has used: `name`, else `name-2`, `name-3`, ... (from
    `name-<first>`, any `-N` it ends with replaced), the folder named so in `parent`."""
    stem = re.sub(r"-\d+$", "", name) if first > 1 else name
    used = {run.folder.resolve() for run in ui.store.all()}
    names = (stem if number == 1 else f"{stem}-{number}" for number in count(first))
    free = next(
        n for n in names if not (parent / n).exists() and (parent / n).resolve() not in used
    )
    return {"name": free, "output_dir": ui.roots.relative(parent / free)}


async def run_settings(request: Request, ui: UI) -> dict[str, Any]:
    """A run's settings to start a new run from (its config.toml, every path in it inside the
    roots), under a name and folder no run has used; what it failed of, by key where the
    message names one."""
    run = get_run(ui, request.path_params["id"])
    config = Path(run.config)
    if not config.is_file():
        raise UserError(f"{config}: the run's config file is gone")
    raw = _read_toml(ui.roots.resolve(config))
    if problems := form.confine(raw, ui.roots, config.parent):
        key, problem = next(iter(problems.items()))
        raise OutsideRoots(f"{config}: {key}: {problem}")
    settings = shown_paths(form.raw_to_settings(raw), ui.roots)
    parent = run.folder.parent if ui.roots.holds(run.folder.resolve()) else ui.roots.home
    settings |= free_run(ui, settings.get("name", run.name), parent)
    problems = failure_problems(run.message) if run.status == "failed" else {}
    return {"settings": settings, "run": {"id": run.id, "name": run.name,
            "status": run.status, "message": run.message}, "problems": problems}  # fmt: skip


def shown_paths(settings: dict[str, str], roots: Roots) -> dict[str, str]:
    """Absolute paths (as a run's file holds them) shown relative to the first root."""
    for key in (*form.PATH_KEYS, "model"):
        if key in settings and Path(settings[key]).is_absolute():
            settings[key] = roots.relative(Path(settings[key]))
    return settings


def failure_problems(message: str) -> dict[str, str]:
    """A failed run's last words by the key they name (`train.max_timestep 1200: ...`)."""
    text = re.sub(r"^stylelora: error: (\S+\.toml: )?", "", message)
    key = re.match(r"[\w.]+", text)
    if key and key.group().rstrip(".") in form.FIELDS:
        return {key.group().rstrip("."): text}
    return {}


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
    checked = await asyncio.to_thread(form.check_settings, settings, ui.roots)
    return {"problems": checked.problems, "toml": form.toml_of(checked.raw),
            "preset": checked.preset, "not_taken": checked.not_taken}  # fmt: skip


async def parse_config(request: Request, ui: UI) -> dict[str, Any]:
    text = (await body(request)).get("toml", "")
    return {"settings": form.settings_from_toml(str(text))}


def settings_of(data: dict[str, Any]) -> dict[str, str]:
    settings = data.get("settings", {})
    if not isinstance(settings, dict):
        raise UserError("settings must be a map of keys to values")
    return {str(key): str(value) for key, value in settings.items() if str(value).strip() != ""}


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
