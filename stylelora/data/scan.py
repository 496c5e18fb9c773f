"""Find the training images in a folder, kohya-style: `N_concept` subfolders repeat N times."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from stylelora.data.images import image_problem
from stylelora.errors import UserError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
REPEATS_FOLDER = re.compile(r"^(\d+)_(.+)$")


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    caption: str
    repeats: int
    concept: str


@dataclass
class ScanResult:
    records: list[ImageRecord] = field(default_factory=list)
    problems: list[tuple[Path, str]] = field(default_factory=list)
    missing_captions: int = 0


def read_caption(image: Path, extension: str) -> str | None:
    caption_file = image.with_suffix(extension)
    if not caption_file.is_file():
        return None
    text = caption_file.read_text(encoding="utf-8").strip()
    return " ".join(text.split())


def folder_repeats(folder: Path, root: Path, default: int) -> tuple[int, str]:
    if folder != root:
        match = REPEATS_FOLDER.match(folder.name)
        if match:
            return int(match.group(1)), match.group(2)
    return default, folder.name


def scan_folder(root: Path, caption_extension: str = ".txt", repeats: int = 1) -> ScanResult:
    """Every usable image under `root` with its caption; unusable files are listed with why."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data.dir {root}: folder not found")
    result = ScanResult()
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS):
        if not path.is_file() or any(part.startswith(".") for part in path.relative_to(root).parts):
            continue
        problem = image_problem(path)
        if problem:
            result.problems.append((path, problem))
            continue
        times, concept = folder_repeats(path.parent, root, repeats)
        try:
            caption = read_caption(path, caption_extension)
        except UnicodeDecodeError:
            result.problems.append((path, f"caption {path.stem}{caption_extension} is not UTF-8"))
            continue
        if caption is None:
            result.missing_captions += 1
            caption = concept
        result.records.append(ImageRecord(path, caption, times, concept))
    if not result.records:
        why = f"; {len(result.problems)} unusable files" if result.problems else ""
        raise UserError(
            f"data.dir {root}: no usable images ({', '.join(sorted(IMAGE_EXTENSIONS))}){why}"
        )
    return result
