"""Caption processing applied each time an image is drawn."""

from __future__ import annotations


def with_trigger(caption: str, trigger_word: str) -> str:
    """Prefix the trigger word unless the caption already starts with it."""
    if not trigger_word or caption.startswith(trigger_word):
        return caption
    return f"{trigger_word}, {caption}" if caption else trigger_word
