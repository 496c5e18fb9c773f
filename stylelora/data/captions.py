"""Caption processing applied each time an image is drawn: trigger word, tag shuffle, dropout.

Follows kohya's options: a caption is comma-separated tags; the first `keep_tokens` tags (after
the trigger word, put first in a caption that lacks it) keep their place, the rest may be
shuffled and dropped one by one (never the trigger word, wherever the caption has it), and the
whole caption may be dropped (trained as the empty prompt).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CaptionOptions:
    trigger_word: str = ""
    shuffle: bool = False
    keep_tokens: int = 0
    dropout_rate: float = 0.0
    tag_dropout_rate: float = 0.0


def word_pattern(word: str) -> re.Pattern[str]:
    """`word` as a whole word (not inside `zqxstyle2` or `my-zqxstyle`)."""
    return re.compile(rf"(?<![\w-]){re.escape(word)}(?![\w-])")


def with_trigger(caption: str, trigger_word: str) -> str:
    """Prefix the trigger word to a caption that lacks it (a caption that has it anywhere, as
    the demo's do at their end, is left as it is)."""
    if not trigger_word or word_pattern(trigger_word).search(caption):
        return caption
    return f"{trigger_word}, {caption}" if caption else trigger_word


def process_caption(caption: str, options: CaptionOptions, rng: torch.Generator) -> str:
    """The caption as drawn this time; draws from `rng` only for the options that are on."""
    caption = with_trigger(caption, options.trigger_word)
    if options.dropout_rate and torch.rand(1, generator=rng).item() < options.dropout_rate:
        return ""
    if not (options.shuffle or options.tag_dropout_rate):
        return caption
    tags = [tag.strip() for tag in caption.split(",") if tag.strip()]
    trigger = options.trigger_word
    keep = options.keep_tokens + (1 if trigger and tags[:1] == [trigger] else 0)
    fixed, rest = tags[:keep], tags[keep:]
    if options.tag_dropout_rate:
        draws = torch.rand(len(rest), generator=rng).tolist()
        rest = [
            tag
            for tag, u in zip(rest, draws, strict=True)
            if u >= options.tag_dropout_rate or tag == trigger
        ]
    if options.shuffle:
        rest = [rest[i] for i in torch.randperm(len(rest), generator=rng).tolist()]
    return ", ".join(fixed + rest)
