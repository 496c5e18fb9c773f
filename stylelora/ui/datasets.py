"""A dataset folder as the UI shows it: each image with its caption and bucket at the settings
it trains with (a run's, the ones given, or the defaults), every problem and note `stylelora
dataset check` gives with its file, thumbnails as training sees them, the folders that hold
images, and caption edits written atomically. Adding, removing and bulk-editing files:
`dataset_edits`."""

from __future__ import annotations

import asyncio
import copy
import io
import json
from collections import Counter
from functools import cache
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps
from pydantic import ValidationError
from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from stylelora.caption.record import EDITED, ELSEWHERE, author, read_record
from stylelora.config import DataConfig, _layer_preset, _read_toml, describe_validation_error
from stylelora.data.dataset import ImageCaptionDataset
from stylelora.data.images import has_transparency, load_rgb
from stylelora.data.report import (
    collect_dataset,
    data_options,
    describe,
    file_notes,
    problem_lines,
)
from stylelora.data.scan import IMAGE_EXTENSIONS, REPEATS_FOLDER, ImageRecord, ScanResult
from stylelora.errors import UserError, first_line
from stylelora.export.atomic import atomic_path
from stylelora.families.registry import FAMILIES
from stylelora.train.progress import PROGRESS_FILE
from stylelora.ui import form
from stylelora.ui.http import UI, api, body, number
from stylelora.ui.roots import Roots

THUMB_SIDE = 160
CAPTION_SUFFIXES = (".txt", ".caption")  # kohya's two; `.tags.txt` ends as one
# [data] keys a listing does not take from a query or a run: folders, and what reads them
NOT_LISTING_KEYS = {"dir", "mask_dir", "reg_dir", "cache_dir"}
FOLDER_DEPTH = 4  # how far below a root `/api/folders?recursive=1` looks for images
FOLDER_LIMIT = 300
FOLDERS_VISITED = 5000  # and so many folders looked into at most, however wide the tree
RUNS_LOOKED_AT = 100  # the most recent runs searched for the ones that used a folder


def routes() -> list[Route]:
    from stylelora.ui import dataset_edits  # it builds on this module's scan and checks

    return [
        Route("/api/folders", api(folders)),
        Route("/api/dataset", api(dataset)),
        Route("/api/thumb", api(thumb)),
        Route("/api/caption", api(caption), methods=["POST"]),
        *dataset_edits.routes(),
    ]


# --- the settings a folder is listed with ------------------------------------------------------


def data_config(folder: Path, settings: dict[str, Any]) -> DataConfig:
    try:
        return DataConfig.model_validate({**settings, "dir": folder})
    except ValidationError as exc:
        raise UserError(describe_validation_error(exc)) from None


def query_value(text: str) -> Any:
    """A query value as TOML would give it: `64`, `true`, `512,768` (a list), else the text."""
    for candidate in (text, f"[{text}]"):
        try:
            return json.loads(candidate)
        except ValueError:
            pass
    return text


def given_settings(query: QueryParams) -> dict[str, Any]:
    """The [data] settings a query names (`resolution=512,768`, `bucket_step=32`, ...); an
    empty value is not given."""
    keys = set(DataConfig.model_fields) - NOT_LISTING_KEYS
    return {key: query_value(value) for key, value in query.items() if key in keys and value}


def run_data(ui: UI, config: Path) -> dict[str, Any] | None:
    """A run's [data] section as it trains (its preset's keys under its own), or None when the
    file is gone, unreadable or names a path outside the roots."""
    try:
        raw = _read_toml(config)
        if form.confine(raw, ui.roots, config.parent):
            return None
        layered = _layer_preset(copy.deepcopy(raw), config.parent)
        if form.confine(layered, ui.roots, config.parent):
            return None
    except UserError:
        return None
    data = layered.get("data")
    return data if isinstance(data, dict) and isinstance(data.get("dir"), str) else None


def runs_using(ui: UI, folder: Path) -> list[dict[str, Any]]:
    """The runs (most recent first) whose data.dir is `folder`, each with its [data] settings."""
    found = []
    for run in ui.store.all()[:RUNS_LOOKED_AT]:
        data = run_data(ui, Path(run.config))
        if data is None or Path(data["dir"]).resolve() != folder:
            continue
        settings = {k: v for k, v in data.items() if k not in NOT_LISTING_KEYS}
        try:
            resolution = data_config(folder, settings).resolution
        except UserError:
            continue
        use = {"run": run.id, "name": run.name, "resolution": resolution, "settings": settings}
        found.append(use)
    return found


@cache
def model_defaults() -> list[dict[str, Any]]:
    """Each family's usual resolution: the one its presets train at (a family without presets
    is left out)."""
    found = []
    for family in FAMILIES:
        sides = Counter()
        for preset in sorted((family.folder() / "presets").glob("*.toml")):
            side = _read_toml(preset).get("data", {}).get("resolution")
            if isinstance(side, int):
                sides[side] += 1
        if sides:
            found.append({"family": family.title, "resolution": sides.most_common(1)[0][0]})
    return found


def listing_settings(ui: UI, folder: Path, query: QueryParams) -> tuple[dict, dict, list]:
    """(the [data] settings to list `folder` with, where they come from, the runs that used
    it): a run's when the query names one; else the query's when it gives a resolution; else
    the most recent run's that used the folder; else the defaults."""
    given = given_settings(query)
    uses = runs_using(ui, folder)
    wanted = query.get("run")
    if wanted:
        run_id = number(wanted, "run", int)
        use = next((use for use in uses if use["run"] == run_id), None)
        if use is None:
            raise UserError(f"run {run_id}: no run here trains on {ui.roots.relative(folder)}")
    elif "resolution" in given or not uses:
        use = None
    else:
        use = uses[0]
    if use is None:
        return given, {"kind": "given" if "resolution" in given else "default"}, uses
    source = {"kind": "run", "run": use["run"], "name": use["name"]}
    return {**use["settings"], **given}, source, uses


# --- the listing ----------------------------------------------------------------------------


def dataset_listing(folder: Path, roots: Roots, settings: dict[str, Any]) -> dict[str, Any]:
    """Images with caption, buckets, concept and notes; the files that cannot be used; the
    notes on files that are no usable image (a caption with no image); the report's lines."""
    data = data_config(folder, settings)
    scan = without_links_out(collect_dataset(data), roots, data.caption_extension)
    dataset = ImageCaptionDataset(scan.records, data_options(data, 0))
    notes: dict[Path, list[str]] = {}
    for path, note in file_notes(scan, dataset, data):
        notes.setdefault(path, []).append(note)
    buckets = buckets_by_image(dataset)
    items = [listing_item(r, buckets[r.path], data, roots, notes) for r in scan.records]
    authors = read_record(folder)
    for record, item in zip(scan.records, items, strict=True):
        caption_file = record.path.with_suffix(data.caption_extension)
        written_by = author(caption_file, folder, authors) if item["has_caption_file"] else ""
        item["author"] = author_note(written_by)
    problems = [{"path": roots.relative(path), "problem": str(why)} for path, why in scan.problems]
    unplaced = [
        {"path": roots.relative(path), "note": note}
        for path, found in notes.items()
        for note in found
    ]
    lines = describe(scan, dataset, data) if scan.records else problem_lines(scan)
    return {
        "folder": roots.relative(folder),
        "items": items,
        "problems": problems,
        "notes": unplaced,
        "report": lines,
        "settings": {
            "resolution": data.resolution,
            "caption_extension": data.caption_extension,
            "trigger_word": data.trigger_word,
            "keep_tokens": data.keep_tokens,
            "alpha_background": list(data.alpha_background),
            "alpha_mask": data.alpha_mask,
        },
    }


def author_note(written_by: str) -> str:
    """A card's line on who wrote its caption file; none for a file no captioner wrote."""
    if written_by in ("", ELSEWHERE):
        return ""
    if written_by == EDITED:
        return "captioned by a model, edited by hand since"
    return f"captioned by {written_by}"


def buckets_by_image(dataset: ImageCaptionDataset) -> dict[Path, list[dict[str, Any]]]:
    """Each image's bucket at each resolution it trains at, smallest first."""
    found: dict[Path, list[dict[str, Any]]] = {}
    placed = zip(dataset.records, dataset.resolutions, dataset.buckets, strict=True)
    for record, resolution, bucket in placed:
        found.setdefault(record.path, []).append({"resolution": resolution, "bucket": list(bucket)})
    return found


def listing_item(
    record: ImageRecord,
    buckets: list[dict[str, Any]],
    data: DataConfig,
    roots: Roots,
    notes: dict[Path, list[str]],
) -> dict[str, Any]:
    """One image as a card shows it, with its bucket at each resolution it trains at; the notes
    on it and on its caption file taken out of `notes` (what is left belongs to no image)."""
    caption_file = record.path.with_suffix(data.caption_extension)
    return {
        "path": roots.relative(record.path),
        "caption": record.caption,
        "caption_file": roots.relative(caption_file),
        "has_caption_file": caption_file.is_file(),
        "size": list(record.size),
        "bucket": buckets[0]["bucket"],
        "buckets": buckets,
        "repeats": record.repeats,
        "concept": record.concept,
        "transparent": transparent(record.path),
        "notes": notes.pop(record.path, []) + notes.pop(caption_file, []),
    }


def transparent(image: Path) -> bool:
    try:
        with Image.open(image) as opened:
            return has_transparency(opened)
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


def without_links_out(scan: ScanResult, roots: Roots, caption_extension: str) -> ScanResult:
    """The scan without the images whose file, caption or metadata.jsonl is a link out of the
    roots (each listed as a problem instead): the UI shows nothing from outside them."""
    records = []
    for record in scan.records:
        files = (record.path, record.path.with_suffix(caption_extension),
                 record.path.parent / "metadata.jsonl")  # fmt: skip
        outside = [path for path in files if path.exists() and not roots.holds(path.resolve())]
        if outside:
            scan.problems.append((outside[0], "a link out of the folders this UI may use"))
        else:
            records.append(record)
    scan.records = records
    kept = {record.path for record in records}
    scan.uncaptioned = [path for path in scan.uncaptioned if path in kept]
    return scan


# --- folders ---------------------------------------------------------------------------------


def subfolders(folder: Path, roots: Roots) -> list[dict[str, Any]]:
    """The folders in `folder` (not hidden), each with how many images it holds."""
    result = []
    for child in sorted(folder.iterdir()):
        if child.name.startswith(".") or not child.is_dir():
            continue
        try:
            roots.resolve(child)  # a link out of the roots is not offered
        except UserError:
            continue
        images = count_images(child)
        result.append({"path": roots.relative(child), "name": child.name, "images": images})
    return result


def count_images(folder: Path) -> int:
    try:
        return sum(1 for path in folder.iterdir() if path.suffix.lower() in IMAGE_EXTENSIONS)
    except OSError:
        return 0


def enterable(child: Path) -> bool:
    return child.is_dir() and not child.is_symlink() and not child.name.startswith(".")


def dataset_folders(roots: Roots, depth: int = FOLDER_DEPTH) -> list[dict[str, Any]]:
    """Every folder under the roots, `depth` levels down at most, that holds images itself or
    in its `N_concept` folders: what `data.dir` may name. Links, hidden folders and run
    folders are not entered."""
    found: list[dict[str, Any]] = []
    visited = 0

    def visit(folder: Path, level: int) -> None:
        nonlocal visited
        visited += 1
        if visited > FOLDERS_VISITED or len(found) >= FOLDER_LIMIT:
            return
        try:
            children = sorted(child for child in folder.iterdir() if enterable(child))
        except OSError:
            return
        concepts = [child for child in children if REPEATS_FOLDER.match(child.name)]
        images = count_images(folder) + sum(count_images(child) for child in concepts)
        if images:
            found.append({"path": roots.relative(folder), "name": folder.name, "images": images})
        if level < depth:
            for child in children:
                if child not in concepts and not (child / PROGRESS_FILE).exists():
                    visit(child, level + 1)

    for root in roots.folders:
        visit(root, 0)
    return found


# --- captions and thumbnails -----------------------------------------------------------------


def caption_extension_of(value: Any) -> str:
    """A caption extension the UI may write: `.txt` or `.caption` at its end, as the config
    takes it."""
    try:
        extension = DataConfig.model_validate({"dir": ".", "caption_extension": value})
    except ValidationError as exc:
        raise UserError(describe_validation_error(exc)) from None
    if not extension.caption_extension.lower().endswith(CAPTION_SUFFIXES):
        raise UserError(
            f"caption_extension {value!r}: the UI writes captions to "
            f"{' or '.join(CAPTION_SUFFIXES)} files only"
        )
    return extension.caption_extension


def writable_caption(image: Path, caption_extension: str, roots: Roots) -> Path:
    """The caption file beside `image` the UI may write: never an image, a link or a folder."""
    caption = image.with_suffix(caption_extension)
    if caption.is_symlink() or (caption.exists() and not caption.is_file()):
        raise UserError(f"{roots.relative(caption)}: not a plain file; edit it by hand")
    return caption


def write_caption(image: Path, text: str, caption_extension: str, roots: Roots) -> Path:
    """The caption beside `image`, replaced in one rename (a crash leaves the old one); only
    ever a text file (`CAPTION_SUFFIXES`), never an image or a file a link points elsewhere."""
    if image.suffix.lower() not in IMAGE_EXTENSIONS or not image.is_file():
        raise UserError(f"{image}: not an image file")
    caption = writable_caption(image, caption_extension_of(caption_extension), roots)
    with atomic_path(caption) as tmp:
        tmp.write_text(text.strip() + "\n", encoding="utf-8")
    return caption


def background_of(value: str) -> tuple[int, int, int]:
    """`255,255,255`: a colour as data.alpha_background gives it."""
    try:
        colour = tuple(int(part) for part in value.split(","))
    except ValueError:
        colour = ()
    if len(colour) != 3 or not all(0 <= part <= 255 for part in colour):
        raise UserError(f"background {value[:40]!r}: expected red,green,blue from 0 to 255")
    return colour  # type: ignore[return-value]


def thumbnail(
    image: Path, background: tuple[int, int, int] | None, side: int = THUMB_SIDE
) -> bytes:
    """The image as training sees it (transparency over `background`, as data.alpha_background
    composites it), or with its transparency kept when `background` is None."""
    if image.suffix.lower() not in IMAGE_EXTENSIONS:
        raise UserError(f"{image}: not an image file")
    try:
        if background is not None:
            img = load_rgb(image, background)
        else:
            with Image.open(image) as opened:
                img = ImageOps.exif_transpose(opened).convert("RGBA")
        img.thumbnail((side, side))
        out = io.BytesIO()
        img.save(out, "PNG")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"{image}: cannot read the image ({first_line(exc)})") from None
    return out.getvalue()


# --- routes ----------------------------------------------------------------------------------


async def folders(request: Request, ui: UI) -> dict[str, Any]:
    """The folders in `path` (one level), or with `recursive=1` every folder that holds
    images, a few levels down every root (paths relative to the first root)."""
    roots = [str(root) for root in ui.roots.folders]
    if request.query_params.get("recursive") == "1":
        found = await asyncio.to_thread(dataset_folders, ui.roots)
        return {"folder": ".", "parent": None, "folders": found, "roots": roots}
    where = request.query_params.get("path", "")
    folder = ui.roots.resolve(where) if where else ui.roots.home
    if not folder.is_dir():
        raise UserError(f"{where}: not a folder")
    parent = ui.roots.relative(folder.parent) if folder != ui.roots.home else None
    return {"folder": ui.roots.relative(folder), "parent": parent,
            "folders": await asyncio.to_thread(subfolders, folder, ui.roots),
            "roots": roots}  # fmt: skip


async def dataset(request: Request, ui: UI) -> dict[str, Any]:
    folder = ui.roots.resolve(request.query_params.get("path", ""))
    if not folder.is_dir():
        raise UserError(f"{request.query_params.get('path', '')}: not a folder")

    def listed() -> dict[str, Any]:
        settings, source, uses = listing_settings(ui, folder, request.query_params)
        listing = dataset_listing(folder, ui.roots, settings)
        uses = [{key: use[key] for key in ("run", "name", "resolution")} for use in uses]
        return {**listing, "source": source, "uses": uses, "defaults": model_defaults()}

    return await asyncio.to_thread(listed)


async def thumb(request: Request, ui: UI) -> Response:
    query = request.query_params
    path = ui.roots.resolve(query.get("path", ""))
    colour = query.get("background") or "255,255,255"
    background = None if query.get("original") == "1" else background_of(colour)
    data = await asyncio.to_thread(thumbnail, path, background)
    return Response(data, media_type="image/png", headers={"Cache-Control": "no-store"})


async def caption(request: Request, ui: UI) -> dict[str, Any]:
    data = await body(request)
    image = ui.roots.resolve(str(data.get("path", "")))
    extension = str(data.get("caption_extension", ".txt"))
    written = write_caption(image, str(data.get("caption", "")), extension, ui.roots)
    return {"written": ui.roots.relative(written)}
