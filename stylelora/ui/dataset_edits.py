"""Changing a dataset folder from the UI: images added by upload (streamed to a temporary file
beside their place, checked as training checks them, then renamed in, never over a file unless
asked to), images removed into the folder's `.trash` with their captions and other files,
captions changed all at once (the trigger word put first or taken out, find and replace), and
the undo of a folder's last change.

Removing moves rather than deletes: a misclick on a hand-picked image loses nothing, training
and the UI skip hidden folders, so `.trash` is out of the dataset at once, and deleting it is
left to the user."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import tempfile
import threading
import time
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.routing import Route

from stylelora.config import DataConfig
from stylelora.data.captions import word_pattern
from stylelora.data.images import inspect_image
from stylelora.data.report import collect_dataset
from stylelora.data.scan import IMAGE_EXTENSIONS
from stylelora.errors import UserError
from stylelora.export.atomic import atomic_path, give_umask_modes
from stylelora.ui.datasets import caption_extension_of, without_links_out, writable_caption
from stylelora.ui.http import DRAIN_LIMIT, UI, TooLarge, api, body
from stylelora.ui.roots import Roots

UPLOAD_LIMIT = 64 * 2**20  # one image; the other routes take at most http.MAX_BODY
TRASH = ".trash"
UNDO_FOLDER = "dataset-undo"  # in the UI's data folder: each dataset folder's last change
UNSAFE_NAME = re.compile(r"[^\w\-. ()+,]")  # separators, control characters, quotes, ...
MAX_STEM_BYTES = 180
# One change to dataset files at a time: each reads what the one before it wrote.
CHANGING = threading.Lock()


class Exists(UserError):
    status = 409


def routes() -> list[Route]:
    return [
        Route("/api/dataset/upload", api(upload), methods=["POST"]),
        Route("/api/dataset/remove", api(remove), methods=["POST"]),
        Route("/api/dataset/captions", api(change_captions), methods=["POST"]),
        Route("/api/dataset/undo", api(undo_state)),
        Route("/api/dataset/undo", api(undo), methods=["POST"]),
    ]


# --- upload ----------------------------------------------------------------------------------


def upload_name(name: str) -> str:
    """The name an uploaded file is saved as: its last part, without what a file name should
    not hold, not hidden (the scan skips names starting with '.'), its extension one the
    trainer reads, in lower case."""
    base = unicodedata.normalize("NFC", name.replace("\\", "/").rsplit("/", 1)[-1])
    base = UNSAFE_NAME.sub("_", base).strip(" .")
    stem, dot, extension = base.rpartition(".")
    extension = f".{extension.lower()}"
    if not dot or not stem.strip(" ._") or extension not in IMAGE_EXTENSIONS:
        raise UserError(
            f"{name[:80]!r}: not an image the trainer reads "
            f"({', '.join(sorted(IMAGE_EXTENSIONS))}); not added"
        )
    return stem.encode()[:MAX_STEM_BYTES].decode(errors="ignore").rstrip(" .") + extension


def upload_target(query: QueryParams, roots: Roots, declared: str | None) -> tuple[Path, bool]:
    """(where the upload goes, whether it may replace a file there); refused before a byte of
    it is kept."""
    if declared is not None and (not declared.isdigit() or int(declared) > UPLOAD_LIMIT):
        raise TooLarge(
            f"{query.get('name', 'the file')[:80]}: over {UPLOAD_LIMIT // 2**20} MiB, the most "
            "an uploaded image may have; copy it into the folder by hand"
        )
    where = query.get("path", "")
    folder = roots.resolve(where)
    if not folder.is_dir():
        raise UserError(f"{where}: not a folder")
    target = folder / upload_name(query.get("name", ""))
    shown = roots.relative(target)
    if target.is_symlink() or (target.exists() and not target.is_file()):
        raise UserError(f"{shown}: not a plain file; it stays as it is")
    replace = query.get("replace") == "1"
    if target.exists() and not replace:
        raise Exists(f"{shown}: a file of that name is in the folder; replace it?")
    return target, replace


async def drain(request: Request) -> None:
    """Read the rest of a refused body (unkept), so that the client hears the answer."""
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > DRAIN_LIMIT:
            break


async def receive(request: Request, target: Path) -> Path:
    """The body streamed into a temporary file beside `target` (a hidden `.NAME.*.tmp`, as
    `atomic_path` names its own), at most UPLOAD_LIMIT bytes."""
    try:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        await drain(request)
        raise UserError(f"{target.parent}: cannot write here ({exc.strerror})") from None
    tmp, size = Path(name), 0
    try:
        with os.fdopen(fd, "wb") as out:
            async for chunk in request.stream():
                size += len(chunk)
                if size <= UPLOAD_LIMIT:
                    out.write(chunk)
                elif size > DRAIN_LIMIT:
                    break
            out.flush()
            os.fsync(out.fileno())
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"{target.name}: could not write the file ({exc.strerror})") from None
    if size > UPLOAD_LIMIT:
        tmp.unlink(missing_ok=True)
        raise TooLarge(f"{target.name}: over {UPLOAD_LIMIT // 2**20} MiB; copy it in by hand")
    return tmp


def place(tmp: Path, target: Path, replace: bool, roots: Roots) -> None:
    """`tmp` in `target`'s place in one step: over it only when `replace`; else linked there,
    which fails when a file took the name since it was checked."""
    problem = inspect_image(tmp)[1]
    if problem is not None:
        raise UserError(f"{target.name}: {problem}; not added")
    give_umask_modes(tmp)
    if replace:
        os.replace(tmp, target)
        return
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise Exists(f"{roots.relative(target)}: a file of that name is in the folder") from None
    except OSError:  # a file system without hard links
        if target.exists():
            raise Exists(
                f"{roots.relative(target)}: a file of that name is in the folder"
            ) from None
        os.replace(tmp, target)


async def upload(request: Request, ui: UI) -> dict[str, Any]:
    """One image, the request's body, into the folder `path` as `name` (`replace=1`: over the
    file of that name)."""
    try:
        declared = request.headers.get("content-length")
        target, replace = upload_target(request.query_params, ui.roots, declared)
    except UserError:
        await drain(request)
        raise
    tmp = await receive(request, target)
    try:
        await asyncio.to_thread(place, tmp, target, replace, ui.roots)
    finally:
        tmp.unlink(missing_ok=True)
    return {"written": ui.roots.relative(target)}


# --- remove ----------------------------------------------------------------------------------


def entry(roots: Roots, text: str) -> Path:
    """The file `text` names, inside the roots, as the entry it is (a link not followed)."""
    given = Path(text)
    if given.name in ("", ".", ".."):
        raise UserError(f"{text!r}: not a file")
    return roots.resolve(given.parent) / given.name


def sidecars(image: Path) -> list[Path]:
    """The files beside `image` named after it (`a.png`: `a.txt`, `a.caption`, `a.npz`, ...),
    but not another image, nor a file another image shares (`a.jpg` beside `a.png`) or has a
    longer claim on (`a.b.txt` is `a.b.png`'s)."""
    around = list(image.parent.iterdir())
    images = [path for path in around if path.suffix.lower() in IMAGE_EXTENSIONS]
    found = []
    for path in around:
        if path in images or not (path.is_file() or path.is_symlink()):
            continue
        claims = [other for other in images if path.name.startswith(other.stem + ".")]
        longest = max((len(other.stem) for other in claims), default=0)
        if [other for other in claims if len(other.stem) == longest] == [image]:
            found.append(path)
    return sorted(found)


def removable(ui: UI, folder: Path, image: Path) -> Path:
    """`image`, checked to be an image of `folder` (in it or its subfolders, not hidden)."""
    shown = ui.roots.relative(image)
    if not (image.is_file() or image.is_symlink()) or image.suffix.lower() not in IMAGE_EXTENSIONS:
        raise UserError(f"{shown}: not an image file")
    inner = image.parent.relative_to(folder) if image.parent.is_relative_to(folder) else None
    if inner is None or any(part.startswith(".") for part in inner.parts):
        raise UserError(f"{shown}: not an image of {ui.roots.relative(folder)}")
    return image


def move_to_trash(ui: UI, folder: Path, images: list[Path]) -> dict[str, Any]:
    """The images, each with its sidecars, moved into one new `.trash/<time>-*` folder (laid
    out as the dataset is), remembered for undo."""
    with CHANGING:
        images = [removable(ui, folder, image) for image in dict.fromkeys(images)]
        (folder / TRASH).mkdir(exist_ok=True)
        trash = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=folder / TRASH))
        give_umask_modes(trash)
        moves = []
        for image in images:
            into = trash / image.parent.relative_to(folder)
            files = [image, *sidecars(image)]
            moves += [{"from": str(into / path.name), "to": str(path)} for path in files]
        names = ", ".join(image.name for image in images[:3])
        what = f"remove {names}" + (f" and {len(images) - 3} more" if len(images) > 3 else "")
        remember(ui, folder, what, moves=moves)
        for move in moves:
            Path(move["from"]).parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(move["to"], move["from"])
            except OSError as exc:
                raise UserError(
                    f"{ui.roots.relative(Path(move['to']))}: could not move it into the trash "
                    f"({exc.strerror}); Undo puts back what was moved"
                ) from None
    removed = [ui.roots.relative(Path(move["to"])) for move in moves]
    return {"removed": removed, "trash": ui.roots.relative(trash), "what": what}


async def remove(request: Request, ui: UI) -> dict[str, Any]:
    """The images `paths` of the folder `folder`, with their captions and other files, moved
    into `folder/.trash/<time>-*/`."""
    data = await body(request)
    folder = ui.roots.resolve(str(data.get("folder", "")))
    if not folder.is_dir():
        raise UserError(f"{data.get('folder')}: not a folder")
    paths = data.get("paths")
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
        raise UserError("paths: expected a list of the images to remove")
    images = [entry(ui.roots, path) for path in paths]
    return await asyncio.to_thread(move_to_trash, ui, folder, images)


# --- captions all at once --------------------------------------------------------------------


def without_word(caption: str, word: str) -> str:
    """The caption without `word` wherever it stands as a word; a tag left empty goes too."""
    if not word_pattern(word).search(caption):
        return caption
    tags = (" ".join(word_pattern(word).sub(" ", tag).split()) for tag in caption.split(","))
    return ", ".join(tag for tag in tags if tag)


def trigger_first(caption: str, word: str) -> str:
    """The caption with `word` as its first tag, kohya's way: the tags `keep_tokens` keeps in
    place when captions are shuffled are counted from the front, so `keep_tokens = 1` keeps the
    trigger word there. A caption that has it elsewhere has it moved to the front."""
    rest = without_word(caption, word)
    return f"{word}, {rest}" if rest else word


def text_of(data: dict[str, Any], key: str, empty: bool = False) -> str:
    value = data.get(key, "" if empty else None)
    if not isinstance(value, str):
        raise UserError(f"{key}: expected text (got {value!r})"[:120])
    text = value.strip()
    if "\n" in text or "\r" in text:
        raise UserError(f"{key}: one line of text only")
    if not text and not empty:
        raise UserError(f"{key}: empty; give the text")
    if len(text) > 200:
        raise UserError(f"{key}: longer than 200 characters")
    return text


def caption_change(data: dict[str, Any]) -> tuple[Callable[[str], str], str]:
    """(what the action does to one caption, the action in words)."""
    action = data.get("action")
    if action in ("add_trigger", "remove_trigger"):
        word = text_of(data, "word")
        if "," in word:
            raise UserError(f"word {word!r}: a trigger word is one tag, without a comma")
        if action == "add_trigger":
            return (
                lambda caption: trigger_first(caption, word)
            ), f"add the trigger word {word!r} at the front"
        return (lambda caption: without_word(caption, word)), f"remove the trigger word {word!r}"
    if action == "replace":
        find, replacement = text_of(data, "find"), text_of(data, "replace", empty=True)
        return (
            lambda caption: " ".join(caption.replace(find, replacement).split()),
            f"replace {find!r} with {replacement!r}",
        )
    raise UserError(f"action {str(action)[:40]!r}: expected add_trigger, remove_trigger or replace")


def apply_caption_change(
    ui: UI, folder: Path, extension: str, change: Callable[[str], str], what: str
) -> dict[str, Any]:
    """`change` on every image's caption as training reads it; each caption it changes written
    to the image's caption file (made where there was none), each file atomically, the whole
    remembered for undo first."""
    with CHANGING:
        data = DataConfig(dir=folder, caption_extension=extension)
        scan = without_links_out(collect_dataset(data), ui.roots, extension)
        writes = []
        for record in scan.records:
            changed = change(record.caption)
            if changed != record.caption:
                writes.append((writable_caption(record.path, extension, ui.roots), changed))
        files = [undo_entry(path, f"{text}\n") for path, text in writes]
        if writes:
            remember(ui, folder, what, files=files)
        for path, text in writes:
            with atomic_path(path) as tmp:
                tmp.write_text(f"{text}\n", encoding="utf-8")
    created = sum(1 for file in files if file["before"] is None)
    return {"changed": len(writes), "created": created, "what": what}


async def change_captions(request: Request, ui: UI) -> dict[str, Any]:
    """`action` (add_trigger or remove_trigger with `word`, replace with `find` and `replace`)
    on every caption of the folder `path`."""
    data = await body(request)
    folder = ui.roots.resolve(str(data.get("path", "")))
    if not folder.is_dir():
        raise UserError(f"{data.get('path')}: not a folder")
    change, what = caption_change(data)
    extension = caption_extension_of(data.get("caption_extension", ".txt"))
    return await asyncio.to_thread(apply_caption_change, ui, folder, extension, change, what)


# --- undo ------------------------------------------------------------------------------------


def undo_entry(path: Path, written: str) -> dict[str, Any]:
    """What undo needs of a file about to be written: its bytes before (None: it is made now)
    and a digest of what is written."""
    before = base64.b64encode(path.read_bytes()).decode() if path.exists() else None
    return {"path": str(path), "before": before, "after": digest(written.encode())}


def digest(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


def record_path(ui: UI, folder: Path) -> Path:
    return ui.data / UNDO_FOLDER / f"{hashlib.sha256(str(folder).encode()).hexdigest()[:32]}.json"


def remember(
    ui: UI, folder: Path, what: str, files: Sequence[dict] = (), moves: Sequence[dict] = ()
) -> None:
    """The folder's last change, in words, with each file written (`undo_entry`) and each
    move; it replaces the one before."""
    record = {
        "folder": str(folder),
        "what": what,
        "at": time.time(),
        "files": list(files),
        "moves": list(moves),
    }
    with atomic_path(record_path(ui, folder)) as tmp:
        tmp.write_text(json.dumps(record), encoding="utf-8")


def last_change(ui: UI, folder: Path) -> dict[str, Any] | None:
    path = record_path(ui, folder)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("folder") == str(folder) else None


def owned(ui: UI, text: str) -> Path:
    """A path from an undo record, still a plain entry inside the roots."""
    path = Path(text)
    if not ui.roots.holds(path.parent.resolve()) or path.is_symlink():
        raise UserError(f"{path}: no longer a file inside the roots; nothing undone")
    return path


def restorations(ui: UI, record: dict[str, Any]) -> list[tuple[Path, bytes | None]]:
    """(file, its bytes before the change) for each file to restore; UserError, before anything
    is touched, when one changed since."""
    found = []
    for file in record["files"]:
        path = owned(ui, file["path"])
        before = None if file["before"] is None else base64.b64decode(file["before"])
        now = digest(path.read_bytes()) if path.is_file() else None
        if now == digest(before):
            continue
        if now != file["after"]:
            raise UserError(
                f"{ui.roots.relative(path)}: changed since {record['what']}; undo would lose "
                "that change, so nothing was undone"
            )
        found.append((path, before))
    return found


def moves_back(ui: UI, record: dict[str, Any]) -> list[tuple[Path, Path]]:
    found = []
    for move in record["moves"]:
        source, back = owned(ui, move["from"]), owned(ui, move["to"])
        if not (source.exists() or source.is_symlink()):
            continue  # never moved
        if back.exists() or back.is_symlink():
            raise UserError(
                f"{ui.roots.relative(back)}: a file of that name is in the folder again; move it "
                "away first (nothing was undone)"
            )
        found.append((source, back))
    return found


def remove_empty_folders(folder: Path, top: Path) -> None:
    """`folder` and the folders above it up to `top` (kept), while they are empty."""
    while folder != top and folder.is_relative_to(top):
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


def undo_last(ui: UI, folder: Path) -> dict[str, Any]:
    with CHANGING:
        record = last_change(ui, folder)
        if record is None:
            raise UserError(f"{ui.roots.relative(folder)}: nothing to undo")
        files, moves = restorations(ui, record), moves_back(ui, record)
        for path, before in files:
            if before is None:
                path.unlink()
            else:
                with atomic_path(path) as tmp:
                    tmp.write_bytes(before)
        for source, back in moves:
            os.rename(source, back)
            remove_empty_folders(source.parent, folder)
        record_path(ui, folder).unlink()
    return {"undone": record["what"], "files": len(files) + len(moves)}


async def undo_state(request: Request, ui: UI) -> dict[str, Any]:
    """The folder `path`'s last change that can be undone, in words (None: none)."""
    folder = ui.roots.resolve(request.query_params.get("path", ""))
    record = await asyncio.to_thread(last_change, ui, folder)
    return {"undo": record["what"] if record else None}


async def undo(request: Request, ui: UI) -> dict[str, Any]:
    """The folder `path`'s last change undone: every file as it was, the files it made gone,
    the files it moved back."""
    data = await body(request)
    folder = ui.roots.resolve(str(data.get("path", "")))
    return await asyncio.to_thread(undo_last, ui, folder)
