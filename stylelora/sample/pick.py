"""Which measured step to keep, and `NAME-best.safetensors`: the adapter of that step, its
header saying which step and why.

The rule: the first measured step whose style (averaged with the steps beside it, so that one
noisy measurement does not decide) reaches ENOUGH_STYLE of the average style of the steps from
there to the end: past it the style gains little, while the adapter goes on copying the training
images and redrawing the subject. (Against the highest measurement instead, one high stray late
in the run moved the pick far later: benchmarks/checkpoint_pick.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

from stylelora.adapters.state import read_tensors
from stylelora.errors import UserError
from stylelora.export.atomic import save_tensors

ENOUGH_STYLE = 0.9


def beside(values: list[float]) -> list[float]:
    """Each value averaged with its neighbours (one on each side, where there is one)."""
    return [
        sum(values[max(0, i - 1) : i + 2]) / len(values[max(0, i - 1) : i + 2])
        for i in range(len(values))
    ]


def pick(records: list[dict]) -> tuple[dict, str]:
    """The measured step to keep (of `measure` records: step, style, content, copying,
    base_copying) and the reason, in one line."""
    if not records:
        raise ValueError("no measured steps to pick from")
    records = sorted(records, key=lambda record: record["step"])
    raw = [record["style"] for record in records]
    style = beside(raw)
    if max(style) <= 0:
        return records[-1], "no measured step moved the style toward the training images"
    ahead = [sum(raw[i:]) / len(raw[i:]) for i in range(len(raw))]  # from each step to the end
    index = next(
        (i for i, value in enumerate(style) if value >= ENOUGH_STYLE * ahead[i]), len(raw) - 1
    )
    chosen, later = records[index], records[index + 1 :]
    reason = (
        f"the first measured step whose style ({style[index]:.2f}, with the steps beside it) "
        f"reaches {ENOUGH_STYLE:.0%} of the average from there to the end ({ahead[index]:.2f})"
    )
    if later:
        copying = [r["copying"] for r in later]
        content = [r["content"] for r in later]
        reason += (
            f"; later steps gain at most {max(style[index + 1 :]) - style[index]:.2f} style, "
            f"copying {chosen['copying']:.2f} there, {min(copying):.2f} to {max(copying):.2f} "
            f"later, content {chosen['content']:.2f} there, {min(content):.2f} to "
            f"{max(content):.2f} later"
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


def no_measures(folder: Path) -> UserError:
    return UserError(
        f"{folder}: no measured steps; train with validation.measure = true, or run "
        "`stylelora pick` on a run folder with checkpoints/step-N/"
    )
