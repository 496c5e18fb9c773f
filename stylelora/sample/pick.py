"""Which measured step to keep, and `NAME-best.safetensors`: the adapter of that step, its
header saying which step and why.

The rule: among the measured steps whose style reaches ENOUGH_STYLE of the highest style any
step reached (past them the style gains little), the one that keeps most of the base's content
less what it adds in copying of the training images.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from stylelora.adapters.state import read_tensors
from stylelora.errors import UserError
from stylelora.export.atomic import atomic_path, save_tensors

ENOUGH_STYLE = 0.9


def score(record: dict) -> float:
    """What the rule maximises among the steps with enough style."""
    return record["content"] - max(record["copying"] - record["base_copying"], 0.0)


def pick(records: list[dict]) -> tuple[dict, str]:
    """The measured step to keep (a record of `measure` events: step, style, content, copying,
    base_copying) and the reason, in one line."""
    if not records:
        raise ValueError("no measured steps to pick from")
    highest = max(record["style"] for record in records)
    if highest <= 0:
        chosen = max(records, key=score)
        return chosen, "no measured step moved the style toward the training images"
    candidates = [r for r in records if r["style"] >= ENOUGH_STYLE * highest]
    chosen = max(candidates, key=score)
    steps = ", ".join(str(r["step"]) for r in candidates)
    reason = (
        f"style {chosen['style']:.2f} is at least {ENOUGH_STYLE:.0%} of the highest "
        f"({highest:.2f}); of the steps that reach it ({steps}) it keeps the most content "
        f"({chosen['content']:.2f}) for its copying ({chosen['copying']:.2f}, base "
        f"{chosen['base_copying']:.2f})"
    )
    return chosen, reason


def best_path(output_dir: Path, name: str) -> Path:
    return Path(output_dir) / f"{name}-best.safetensors"


def write_best(source: Path, out: Path, record: dict, reason: str) -> Path:
    """`source`'s adapter as `out`, its header also naming the step, the reason and the
    measures."""
    tensors, metadata = read_tensors(source)
    header = {
        **metadata,
        "stylelora_best_step": str(record["step"]),
        "stylelora_best_reason": reason,
        "stylelora_best_measures": json.dumps(
            {k: record[k] for k in ("style", "content", "copying", "base_copying")}
        ),
        "stylelora_best_source": source.name,
    }
    return save_tensors(tensors, out, header)


def copy_file(source: Path, out: Path) -> None:
    """`source` copied onto `out` atomically."""
    with atomic_path(out) as tmp:
        shutil.copyfile(source, tmp)


def no_measures(folder: Path) -> UserError:
    return UserError(
        f"{folder}: no measured steps; train with validation.measure = true, or run "
        "`stylelora pick` on a run folder with checkpoints/step-N/"
    )
