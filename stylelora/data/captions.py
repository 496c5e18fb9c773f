"""Caption processing applied each time an image is drawn: trigger word, tag shuffle, dropout.

Follows kohya's options: a caption is comma-separated tags; the first `keep_tokens` tags (after
the trigger word, which always stays first) keep their place, the rest may be shuffled and
dropped one by one, and the whole caption may be dropped (trained as the empty prompt).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CaptionOptions:
    trigger_word: str = ""
    shuffle: bool = False
    keep_tokens: int = 0
    dropout_rate: float = 0.0
    tag_dropout_rate: float = 0.0


def with_trigger(caption: str, trigger_word: str) -> str:
    """Prefix the trigger word unless the caption already starts with it."""
    if not trigger_word or caption.startswith(trigger_word):
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
    keep = options.keep_tokens + (1 if options.trigger_word else 0)
    fixed, rest = tags[:keep], tags[keep:]
    if options.tag_dropout_rate:
        draws = torch.rand(len(rest), generator=rng).tolist()
        rest = [tag for tag, u in zip(rest, draws, strict=True) if u >= options.tag_dropout_rate]
    if options.shuffle:
        rest = [rest[i] for i in torch.randperm(len(rest), generator=rng).tolist()]
    return ", ".join(fixed + rest)
