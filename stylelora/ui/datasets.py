"""A dataset folder as the UI shows it: each image with its caption and bucket, every problem
`stylelora dataset check` finds with its file, thumbnails, and caption edits written atomically."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from stylelora.config import DataConfig, describe_validation_error
from stylelora.data.dataset import ImageCaptionDataset
from stylelora.data.report import collect_dataset, data_options, describe, problem_lines
from stylelora.data.scan import IMAGE_EXTENSIONS, ScanResult
from stylelora.errors import UserError, first_line
from stylelora.export.atomic import atomic_path
from stylelora.ui.http import UI, api, body, number
from stylelora.ui.roots import Roots

THUMB_SIDE = 160
CAPTION_SUFFIXES = (".txt", ".caption")  # kohya's two; `.tags.txt` ends as one


def routes() -> list[Route]:
    return [
        Route("/api/folders", api(folders)),
        Route("/api/dataset", api(dataset)),
        Route("/api/thumb", api(thumb)),
        Route("/api/caption", api(caption), methods=["POST"]),
    ]


def dataset_listing(folder: Path, roots: Roots, resolution: int = 512,
                    caption_extension: str = ".txt") -> dict[str, Any]:  # fmt: skip
    """Images with caption, bucket and concept; problems; the report's lines."""
    try:
        data = DataConfig(dir=folder, resolution=resolution, caption_extension=caption_extension)
    except ValidationError as exc:
        raise UserError(describe_validation_error(exc)) from None
    scan = without_links_out(collect_dataset(data), roots, data.caption_extension)
    dataset = ImageCaptionDataset(scan.records, data_options(data, 0))
    items = [
        {
            "path": roots.relative(record.path),
            "caption": record.caption,
            "caption_file": roots.relative(record.path.with_suffix(data.caption_extension)),
            "has_caption_file": record.path.with_suffix(data.caption_extension).is_file(),
            "size": list(record.size),
            "bucket": list(dataset.bucket(index)),
            "repeats": record.repeats,
            "concept": record.concept,
        }
        for index, record in enumerate(scan.records)
    ]
    problems = [{"path": roots.relative(path), "problem": str(why)} for path, why in scan.problems]
    lines = describe(scan, dataset, data) if scan.records else problem_lines(scan)
    return {"folder": roots.relative(folder), "items": items, "problems": problems,
            "report": lines}  # fmt: skip


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
    return scan


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
        images = sum(1 for path in child.iterdir() if path.suffix.lower() in IMAGE_EXTENSIONS)
        result.append({"path": roots.relative(child), "name": child.name, "images": images})
    return result


def write_caption(image: Path, text: str, caption_extension: str, roots: Roots) -> Path:
    """The caption beside `image`, replaced in one rename (a crash leaves the old one); only
    ever a text file (`CAPTION_SUFFIXES`), never an image or a file a link points elsewhere."""
    if image.suffix.lower() not in IMAGE_EXTENSIONS or not image.is_file():
        raise UserError(f"{image}: not an image file")
    try:
        extension = DataConfig.model_validate(
            {"dir": image.parent, "caption_extension": caption_extension}
        ).caption_extension
    except ValidationError as exc:
        raise UserError(describe_validation_error(exc)) from None
    if not extension.lower().endswith(CAPTION_SUFFIXES):
        raise UserError(
            f"caption_extension {caption_extension!r}: the UI writes captions to "
            f"{' or '.join(CAPTION_SUFFIXES)} files only"
        )
    caption = image.with_suffix(extension)
    if caption.is_symlink() or (caption.exists() and not caption.is_file()):
        raise UserError(f"{roots.relative(caption)}: not a plain file; edit it by hand")
    with atomic_path(caption) as tmp:
        tmp.write_text(text.strip() + "\n", encoding="utf-8")
    return caption


def thumbnail(image: Path, side: int = THUMB_SIDE) -> bytes:
    if image.suffix.lower() not in IMAGE_EXTENSIONS:
        raise UserError(f"{image}: not an image file")
    try:
        with Image.open(image) as img:
            img = ImageOps.exif_transpose(img)
            img.thumbnail((side, side))
            out = io.BytesIO()
            img.convert("RGBA" if img.mode in ("RGBA", "LA", "P") else "RGB").save(out, "PNG")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"{image}: cannot read the image ({first_line(exc)})") from None
    return out.getvalue()


# --- routes ----------------------------------------------------------------------------------


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
