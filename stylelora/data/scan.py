"""Find the training images in a folder, kohya-style: `N_concept` subfolders repeat N times.

Captions come from a file beside the image (`a.png` + `a.txt`), else from a Hugging Face
imagefolder `metadata.jsonl` (`file_name`, `text`) in the image's folder, else the concept name.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from stylelora.data.images import inspect_image
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
    problems: list[tuple[Path, str]] = field(default_factory=list)
    missing_captions: int = 0


def read_caption(image: Path, extension: str) -> str | None:
    caption_file = image.with_suffix(extension)
    if not caption_file.is_file():
        return None
    return clean(caption_file.read_text(encoding="utf-8"))


def clean(text: str) -> str:
    return " ".join(text.strip().split())


def read_metadata(folder: Path) -> dict[str, str]:
    """file_name -> caption from `folder/metadata.jsonl`, or {} when there is none."""
    path = folder / METADATA_FILE
    if not path.is_file():
        return {}
    captions = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            captions[str(Path(entry["file_name"]))] = clean(str(entry.get("text", "")))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(
                f'{path}:{number}: expected a JSON object with "file_name" and "text"'
            ) from None
    return captions


def folder_repeats(folder: Path, root: Path, default: int) -> tuple[int, str]:
    if folder != root:
        match = REPEATS_FOLDER.match(folder.name)
        if match:
            return int(match.group(1)), match.group(2)
    return default, folder.name


def scan_folder(
    root: Path,
    caption_extension: str = ".txt",
    repeats: int = 1,
    *,
    min_side: int = 0,
    strict: bool = False,
    trigger_word: str = "",
) -> ScanResult:
    """Every usable image under `root` with its caption; unusable files are listed with why.

    `min_side`: an image smaller than this on both sides fits no bucket and is skipped.
    `strict`: any unusable file is an error instead.
    An image with no caption is captioned with its `N_concept` name, else the trigger word,
    else its folder's name.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data.dir {root}: folder not found")
    result = ScanResult()
    metadata: dict[Path, dict[str, str]] = {}
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS):
        if not path.is_file() or any(part.startswith(".") for part in path.relative_to(root).parts):
            continue
        size, problem = inspect_image(path)
        if problem is None and max(size) < min_side:
            problem = f"too small ({size[0]}x{size[1]}; the smallest bucket side is {min_side})"
        if problem is None:
            try:
                caption = read_caption(path, caption_extension)
            except UnicodeDecodeError:
                problem = f"caption {path.stem}{caption_extension} is not UTF-8"
        if problem:
            result.problems.append((path, problem))
            continue
        times, concept = folder_repeats(path.parent, root, repeats)
        if caption is None:
            if path.parent not in metadata:
                metadata[path.parent] = read_metadata(path.parent)
            caption = metadata[path.parent].get(path.name)
        if caption is None:
            result.missing_captions += 1
            in_concept = path.parent != root and REPEATS_FOLDER.match(path.parent.name)
            caption = concept if in_concept or not trigger_word else trigger_word
        result.records.append(ImageRecord(path, caption, times, concept, size))
    if strict and result.problems:
        path, why = result.problems[0]
        more = f" (and {len(result.problems) - 1} more)" if len(result.problems) > 1 else ""
        raise UserError(f"data.strict: {path}: {why}{more}")
    if not result.records:
        why = f"; {len(result.problems)} unusable files" if result.problems else ""
        raise UserError(
            f"data.dir {root}: no usable images ({', '.join(sorted(IMAGE_EXTENSIONS))}){why}"
        )
    return result
