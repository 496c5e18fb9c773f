"""Which captioner wrote which caption file: `.stylelora-captions.json` beside the images.

A kohya caption file holds only its caption, so the record keeps, per caption file (its path
relative to the folder), the captioner, its settings and a digest of the text written. A caption
whose text no longer has that digest was edited by hand since. The record is rewritten
atomically; one that cannot be read counts every caption as written elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from pathlib import Path

from stylelora.export.atomic import atomic_path

RECORD_FILE = ".stylelora-captions.json"
EDITED = "edited by hand since"
ELSEWHERE = "written by hand or by another tool"


def digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def record_path(folder: Path) -> Path:
    return Path(folder) / RECORD_FILE


def read_record(folder: Path) -> dict[str, dict]:
    """{caption file relative to the folder: its entry}; empty when there is none to read."""
    try:
        files = json.loads(record_path(folder).read_text(encoding="utf-8")).get("files", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return {key: entry for key, entry in files.items() if isinstance(entry, dict)}


def write_record(folder: Path, files: dict[str, dict]) -> None:
    body = {"version": 1, "files": dict(sorted(files.items()))}
    with atomic_path(record_path(folder)) as tmp:
        tmp.write_text(json.dumps(body, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def entry(text: str, captioner: str, model: str, settings: dict) -> dict:
    return {
        "captioner": captioner,
        "model": model,
        "settings": settings,
        "sha256": digest(text),
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def author(caption_file: Path, folder: Path, files: dict[str, dict]) -> str:
    """Who wrote the caption file as it is now: a captioner's description, EDITED or ELSEWHERE."""
    known = files.get(caption_file.relative_to(folder).as_posix())
    if known is None:
        return ELSEWHERE
    try:
        text = caption_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return EDITED
    same = digest(text.strip()) == known.get("sha256")  # the file ends in a newline
    return known.get("captioner", ELSEWHERE) if same else EDITED


def count_authors(folder: Path, caption_files: list[Path]) -> Counter[str]:
    """How many of the caption files each captioner wrote (and how many were edited since, or
    written elsewhere)."""
    files = read_record(folder)
    return Counter(author(path, folder, files) for path in caption_files)


def author_lines(folder: Path, caption_files: list[Path]) -> list[str]:
    """`dataset check`'s lines on who wrote the captions; none when no captioner wrote any."""
    counts = count_authors(folder, caption_files)
    if set(counts) <= {ELSEWHERE}:
        return []
    order = sorted(counts, key=lambda who: (who in (EDITED, ELSEWHERE), who == ELSEWHERE, who))
    return ["  caption files by author:"] + [f"    {counts[who]} {who}" for who in order]
