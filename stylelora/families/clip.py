"""CLIP text encoders, as the Stable Diffusion UNets and Flux.1 use them: kohya's names for their
modules, the target presets of their adapters, and clip skip."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from stylelora.adapters.targets import TEXT_ENCODER_TARGETS, Targets
from stylelora.errors import UserError


def clip_targets(preset: str) -> Targets:
    """The CLIP modules a text-encoder target preset adapts."""
    return Targets(main=list(TEXT_ENCODER_TARGETS[preset]))


def kohya_clip_name(prefix: str, module_path: str) -> str:
    """kohya's name of a CLIP module: prefix + dotted path with '_' for '.'.

    transformers 5 dropped the `text_model.` level from CLIPTextModel's module paths;
    kohya names (and the UIs that read them) still carry it.
    """
    if not module_path.startswith("text_model."):
        module_path = "text_model." + module_path
    return f"{prefix}_{module_path.replace('.', '_')}"


def check_clip_skip(clip_skip: int, encoders: Iterable[torch.nn.Module]) -> None:
    """kohya's clip_skip N takes the output N-1 layers before the last: it must leave one."""
    layers = min(encoder.config.num_hidden_layers for encoder in encoders)
    if clip_skip >= layers:
        raise UserError(
            f"clip_skip = {clip_skip + 1}: the text encoder has {layers} layers, so clip_skip "
            f"can be 1 to {layers} (2 = penultimate, the usual choice)"
        )
