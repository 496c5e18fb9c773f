"""Find the training images in a folder, kohya-style: `N_concept` subfolders repeat N times.

Captions come from a file beside the image (`a.png` + `a.txt`), else from a Hugging Face
imagefolder `metadata.jsonl` (`file_name`, `text`) in the image's folder, else the concept name.
Caption files and `metadata.jsonl` are UTF-8; one that is not is read as cp1252 (Windows' Western
default) and reported, unless `data.strict`.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from stylelora.data.images import inspect_image
from stylelora.data.problems import (
    CAPTION_NOT_TEXT,
    CAPTION_NOT_UTF8,
    Problem,
    count_by_kind,
    too_small,
)
from stylelora.errors import UserError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
REPEATS_FOLDER = re.compile(r"^(\d+)_(.+)$")
METADATA_FILE = "metadata.jsonl"


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    caption: str
    repeats: int
    concept: str
    size: tuple[int, int] = (0, 0)  # upright (width, height); (0, 0) when unknown


@dataclass
class ScanResult:
    records: list[ImageRecord] = field(default_factory=list)
    problems: list[tuple[Path, Problem]] = field(default_factory=list)
    uncaptioned: list[Path] = field(default_factory=list)  # usable images with no caption
    cp1252_files: list[Path] = field(default_factory=list)  # captions that were not UTF-8
    orphan_captions: list[Path] = field(default_factory=list)  # caption files with no image

    @property
    def missing_captions(self) -> int:
        return len(self.uncaptioned)


def read_text(path: Path, strict: bool) -> tuple[str, bool] | None:
    """(text, whether it was read as cp1252); None when it is not UTF-8 and `strict`, or is
    neither UTF-8 nor cp1252. A UTF-8 byte order mark is dropped."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig"), False
    except UnicodeDecodeError:
        if strict:
            return None
    try:
        text = data.decode("cp1252")
    except UnicodeDecodeError:  # one of the five bytes cp1252 leaves undefined
        return None
    # NUL bytes mean UTF-16 or binary, which cp1252 would read as garbage without complaint
    return None if "\x00" in text else (text, True)


def clean(text: str) -> str:
    return " ".join(text.strip().split())


def read_metadata(folder: Path, strict: bool = False) -> tuple[dict[str, str], bool]:
    """(file_name -> caption from `folder/metadata.jsonl`, or {}; whether it was read as cp1252)."""
    path = folder / METADATA_FILE
    if not path.is_file():
        return {}, False
    read = read_text(path, strict)
    if read is None:
        why = "not UTF-8 (data.strict = true)" if strict else "neither UTF-8 nor cp1252 text"
        raise UserError(f"{path}: {why}; save it as UTF-8")
    text, as_cp1252 = read
    captions = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            captions[str(Path(entry["file_name"]))] = clean(str(entry.get("text", "")))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(
                f'{path}:{number}: expected a JSON object with "file_name" and "text"'
            ) from None
    return captions, as_cp1252


@dataclass
class CaptionReader:
    """The captions of one scan: files beside images, each folder's metadata.jsonl read once,
    and every file that had to be read as cp1252."""

    extension: str
    strict: bool
    cp1252_files: list[Path] = field(default_factory=list)
    metadata: dict[Path, dict[str, str]] = field(default_factory=dict)

    def beside(self, image: Path) -> tuple[str | None, Problem | None]:
        """(the caption file's text, or None without one; why it cannot be read)."""
        caption_file = image.with_suffix(self.extension)
        if not caption_file.is_file():
            return None, None
        read = read_text(caption_file, self.strict)
        if read is None:
            kind = CAPTION_NOT_UTF8 if self.strict else CAPTION_NOT_TEXT
            return None, Problem(kind, caption_file.name)
        text, as_cp1252 = read
        if as_cp1252:
            self.cp1252_files.append(caption_file)
        return clean(text), None

    def from_metadata(self, image: Path) -> str | None:
        folder = image.parent
        if folder not in self.metadata:
            self.metadata[folder], as_cp1252 = read_metadata(folder, self.strict)
            if as_cp1252:
                self.cp1252_files.append(folder / METADATA_FILE)
        return self.metadata[folder].get(image.name)


def folder_repeats(folder: Path, root: Path, default: int) -> tuple[int, str]:
    if folder != root:
        match = REPEATS_FOLDER.match(folder.name)
        if match:
            return int(match.group(1)), match.group(2)
    return default, folder.name


def image_files(root: Path) -> list[Path]:
    """The image files under `root`, sorted, outside folders and files whose name starts with '.'"""
    return sorted(
        path
        for path in root.rglob("*")
        if path.suffix.lower() in IMAGE_EXTENSIONS
        and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
    )


def orphan_captions(root: Path, caption_extension: str, images: list[Path]) -> list[Path]:
    """The caption files under `root` (outside hidden folders) with no image beside them: an
    image renamed or removed, its caption left behind."""
    captioned = {image.with_suffix(caption_extension) for image in images}
    return sorted(
        path
        for path in root.rglob(f"*{caption_extension}")
        if path not in captioned
        and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
    )


def collect_images(
    root: Path,
    caption_extension: str = ".txt",
    repeats: int = 1,
    *,
    min_image_size: int | None = None,
    strict: bool = False,
    trigger_word: str = "",
    key: str = "data.dir",
) -> ScanResult:
    """Every usable image under `root` with its caption, and every unusable one with why.

    `min_image_size`: an image whose shorter side is below it is unusable; smaller images are
    otherwise upscaled into their bucket.
    `strict`: a caption that is not UTF-8 is unusable instead of read as cp1252.
    An image with no caption is captioned with its `N_concept` name, else the trigger word,
    else its folder's name.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{key} {root}: folder not found")
    result = ScanResult()
    captions = CaptionReader(caption_extension, strict)
    images = image_files(root)
    for path in images:
        size, problem = inspect_image(path)
        if problem is None and min_image_size and min(size) < min_image_size:
            problem = too_small(size, min_image_size)
        caption = None
        if problem is None:
            caption, problem = captions.beside(path)
        if problem:
            result.problems.append((path, problem))
            continue
        times, concept = folder_repeats(path.parent, root, repeats)
        if caption is None:
            caption = captions.from_metadata(path)
        if caption is None:
            result.uncaptioned.append(path)
            in_concept = path.parent != root and REPEATS_FOLDER.match(path.parent.name)
            caption = concept if in_concept or not trigger_word else trigger_word
        result.records.append(ImageRecord(path, caption, times, concept, size))
    result.cp1252_files = captions.cp1252_files
    result.orphan_captions = orphan_captions(root, caption_extension, images)
    return result


def require_usable(
    result: ScanResult, root: Path, strict: bool, hint: str, key: str = "data.dir"
) -> None:
    """Raise UserError when nothing is usable (or, when `strict`, anything is not).

    `hint`: where the user sees each unusable file, ending the one-line error.
    """
    if strict and result.problems:
        path, why = result.problems[0]
        more = f" (and {len(result.problems) - 1} more)" if len(result.problems) > 1 else ""
        raise UserError(f"data.strict: {path}: {why}{more}; {hint}")
    if result.records:
        return
    if not result.problems:
        raise UserError(
            f"{key} {root}: no usable images: no {', '.join(sorted(IMAGE_EXTENSIONS))} files"
        )
    raise UserError(f"{key} {root}: no usable images: {count_by_kind(result.problems)}; {hint}")


def check_hint(root: Path) -> str:
    return f"stylelora dataset check {shlex.quote(str(root))} --config CONFIG lists each file"


def scan_folder(
    root: Path,
    caption_extension: str = ".txt",
    repeats: int = 1,
    *,
    min_image_size: int | None = None,
    strict: bool = False,
    trigger_word: str = "",
) -> ScanResult:
    """`collect_images`, raising UserError when nothing is usable (or anything is not, strict)."""
    result = collect_images(
        root,
        caption_extension,
        repeats,
        min_image_size=min_image_size,
        strict=strict,
        trigger_word=trigger_word,
    )
    require_usable(result, Path(root), strict, check_hint(Path(root)))
    return result
