"""Sample prompts in kohya's syntax: `a prompt --n neg --w 512 --h 512 --d 42 --l 7.5 --s 28`."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

from stylelora.errors import UserError


@dataclass(frozen=True)
class SamplePrompt:
    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    seed: int = 0
    guidance_scale: float = 7.5
    steps: int = 20


FLAGS = {
    "n": ("negative_prompt", str),
    "w": ("width", int),
    "h": ("height", int),
    "d": ("seed", int),
    "l": ("guidance_scale", float),
    "s": ("steps", int),
}
# Flags are case-insensitive, as in kohya (`--W 512` is a width).
FLAG = re.compile(r"(?:^|\s)--([a-zA-Z]+)(?=\s|$)")


def parse_prompt_line(line: str, defaults: SamplePrompt) -> SamplePrompt:
    """One prompt line; flags override `defaults`. ValueError says which flag is wrong."""
    parts = FLAG.split(line.strip())
    prompt, flags = parts[0].strip(), parts[1:]
    if not prompt:
        raise ValueError("the line has flags but no prompt")
    result = replace(defaults, prompt=prompt)
    for flag, value in zip(flags[::2], flags[1::2], strict=True):
        flag = flag.lower()
        if flag not in FLAGS:
            raise ValueError(f"unknown flag --{flag} (known: {', '.join('--' + f for f in FLAGS)})")
        field, kind = FLAGS[flag]
        try:
            parsed = kind(value.strip())
        except ValueError:
            parsed = None
        if parsed is None or (kind is float and not math.isfinite(parsed)):
            raise ValueError(f"--{flag} needs a {kind.__name__}, got {value.strip()!r}")
        result = replace(result, **{field: parsed})
    return result


# The VAE halves each side three times, so the pipelines take sides in multiples of 8 (a
# family whose pipeline needs more says so: ModelFamily.size_step).
SIDE_STEP, MIN_SIDE = 8, 64


def on_size_grid(prompt: SamplePrompt, step: int = SIDE_STEP) -> tuple[SamplePrompt, str | None]:
    """`prompt` with its sides rounded down to a multiple of `step` (at least 64), as kohya's
    sampler does, and a note saying so when that changed them."""
    least = max(MIN_SIDE, step)
    width, height = (max(least, side - side % step) for side in (prompt.width, prompt.height))
    if (width, height) == (prompt.width, prompt.height):
        return prompt, None
    note = (
        f"sample size {prompt.width}x{prompt.height} rounded to {width}x{height} (sides are "
        f"multiples of {step}, at least {least}) for {prompt.prompt!r}"
    )
    return replace(prompt, width=width, height=height), note


def parse_prompt_file(path: Path, defaults: SamplePrompt) -> list[SamplePrompt]:
    """Every non-empty, non-`#` line of `path`; errors name the file and line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"sample.prompts_file {path}: file not found") from None
    except IsADirectoryError:
        raise UserError(
            f"sample.prompts_file {path}: is a folder; give a text file of prompts"
        ) from None
    except UnicodeDecodeError:
        raise UserError(f"sample.prompts_file {path}: not UTF-8 text") from None
    prompts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            prompts.append(parse_prompt_line(line, defaults))
        except ValueError as exc:
            raise UserError(f"{path}:{number}: {exc}") from None
    return prompts
