"""Why a file cannot be trained on, and the counts by reason that one-line errors give."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

EMPTY = "empty file"
NOT_AN_IMAGE = "not an image"
DAMAGED = "truncated or damaged image"
TOO_LARGE = "too large"
CAPTION_NOT_UTF8 = "caption not UTF-8"
CAPTION_NOT_TEXT = "caption not text"
_PLURALS = {
    EMPTY: "empty files",
    NOT_AN_IMAGE: "not images",
    DAMAGED: "truncated or damaged images",
    CAPTION_NOT_UTF8: "captions not UTF-8",
    CAPTION_NOT_TEXT: "captions not text",
}


@dataclass(frozen=True)
class Problem:
    kind: str  # the same words for every file it applies to, e.g. "not an image"
    detail: str = ""  # this file's particulars, e.g. its size

    def __str__(self) -> str:
        return f"{self.kind} ({self.detail})" if self.detail else self.kind


def too_small(size: tuple[int, int], min_image_size: int) -> Problem:
    width, height = size
    return Problem(f"smaller than data.min_image_size {min_image_size}", f"{width}x{height}")


def counted(kind: str, count: int) -> str:
    """'1 not an image', '3 not images'."""
    return f"{count} {kind if count == 1 else _PLURALS.get(kind, kind)}"


def count_by_kind(problems: list[tuple[Path, Problem]]) -> str:
    """'12 smaller than data.min_image_size 256, 3 not images': the commonest first."""
    counts = Counter(problem.kind for _, problem in problems)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return ", ".join(counted(kind, count) for kind, count in ranked)
