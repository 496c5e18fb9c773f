"""The Datasets page's Caption button: `stylelora caption` on the open folder, in a process of
its own (one at a time), its progress bar's last state as progress, Cancel stopping it between
files; the captioners offered are the supported ones in the local Hugging Face cache."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.routing import Route

from stylelora.caption.command import DEFAULT_MODELS
from stylelora.caption.models import cached_captioners
from stylelora.errors import UserError
from stylelora.ui.datasets import caption_extension_of
from stylelora.ui.http import UI, api, body
from stylelora.ui.jobs import Job, cli
from stylelora.ui.runner import last_log_line

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}")
STYLES = ("", "natural", "tags")
MAX_WORDS = 500  # characters of a trigger word, prefix, suffix or instruction


def routes() -> list[Route]:
    return [
        Route("/api/captioners", api(captioners)),
        Route("/api/caption/start", api(start_captioning), methods=["POST"]),
        Route("/api/caption/status", api(caption_status)),
        Route("/api/caption/cancel", api(cancel_captioning), methods=["POST"]),
    ]


def words(data: dict[str, Any], key: str) -> str:
    """A one-line text field of the request, bounded."""
    text = str(data.get(key) or "").strip()
    if len(text) > MAX_WORDS or any(c in text for c in "\r\n"):
        raise UserError(f"{key}: one line of at most {MAX_WORDS} characters")
    return text


def captioner_source(ui: UI, text: str) -> str:
    """A hub id as it is (the command finds it in the cache), or a folder inside the roots."""
    if not text:
        raise UserError("model: choose a captioner (a hub id in the local cache, or a folder)")
    if HUB_ID.fullmatch(text) and not (ui.roots.home / text).exists():
        return text
    folder = ui.roots.resolve(text)
    if not folder.is_dir():
        raise UserError(f"model {text}: no such folder, and no hub id (OWNER/NAME)")
    return str(folder)


def caption_arguments(ui: UI, data: dict[str, Any]) -> tuple[Path, list[str]]:
    if not str(data.get("path") or "").strip():
        raise UserError("path: open the folder to caption")
    folder = ui.roots.resolve(str(data["path"]))
    if not folder.is_dir():
        raise UserError(f"{data.get('path', '')}: not a folder")
    style = str(data.get("style") or "")
    if style not in STYLES:
        raise UserError(f"style: natural, tags or empty for the model's own (got {style[:20]!r})")
    extension = caption_extension_of(data.get("caption_extension") or ".txt")
    model = captioner_source(ui, words(data, "model"))
    # `--key=value`: a value that starts with '-' stays a value
    args = ["caption", str(folder), f"--model={model}", f"--extension={extension}"]
    args.append("--overwrite" if data.get("overwrite") is True else "--skip-existing")
    if style:
        args.append(f"--style={style}")
    for key in ("trigger", "prefix", "suffix", "prompt"):
        if value := words(data, key):
            args.append(f"--{key}={value}")
    return folder, args


async def captioners(request: Request, ui: UI) -> dict[str, Any]:
    found = await asyncio.to_thread(cached_captioners)
    return {"captioners": found, "defaults": DEFAULT_MODELS}


async def start_captioning(request: Request, ui: UI) -> dict[str, Any]:
    data = await body(request)
    folder, args = caption_arguments(ui, data)
    what = f"captioning {ui.roots.relative(folder)}"
    # done when the command ends well: the folder it writes into is what it leaves
    job = Job(cli(*args), folder, ui.data / "caption" / "caption.log", {"what": what})
    job.info["path"] = ui.roots.relative(folder)
    await asyncio.to_thread(ui.jobs.start, "caption", job, ui.data)
    return status_of(job)


def status_of(job: Job) -> dict[str, Any]:
    """The job's summary, with the command's last line (its summary of what it wrote) once
    it has ended."""
    summary = job.summary()
    if summary["state"] != "running":
        summary["said"] = last_log_line(job.log, 4096).removeprefix("stylelora caption: ")
    return summary


async def caption_status(request: Request, ui: UI) -> dict[str, Any]:
    job = ui.jobs.get("caption")
    return status_of(job) if job else {"state": "idle"}


async def cancel_captioning(request: Request, ui: UI) -> dict[str, Any]:
    await body(request)
    return status_of(await asyncio.to_thread(ui.jobs.cancel, "caption"))
