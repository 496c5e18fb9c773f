"""Model families: load a base model from wherever the user keeps it and say which family it is."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from stylelora.errors import UserError
from stylelora.families.base import ModelFamily
from stylelora.families.sd2 import SD2
from stylelora.families.sd15 import SD15
from stylelora.families.sdxl import SDXL
from stylelora.families.tiny import tiny_model_path

FAMILIES: list[type[ModelFamily]] = [SD15, SD2, SDXL]


def load_pipeline(model: str, dtype: torch.dtype = torch.float32) -> DiffusionPipeline:
    """A diffusers pipeline from `tiny:<family>`, a local diffusers folder, or a hub id."""
    if model.startswith("tiny:"):
        source = str(tiny_model_path(model.removeprefix("tiny:")))
    else:
        source = model
        path = Path(model).expanduser()
        if path.is_file():
            raise UserError(
                f"{model}: single-file checkpoints are not supported yet; "
                "convert it to a diffusers folder first"
            )
        if path.is_dir():
            if not (path / "model_index.json").exists():
                raise UserError(f"{model}: not a diffusers model folder (no model_index.json)")
            source = str(path)
        elif model.startswith((".", "/", "~")):
            raise UserError(f"{model}: model folder not found")
    try:
        pipe = DiffusionPipeline.from_pretrained(source, torch_dtype=dtype)
    except OSError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"model {model!r}: could not load it as a local folder or hub id ({first_line})"
        ) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def detect_family(pipe: DiffusionPipeline, clip_skip: int | None = None) -> ModelFamily:
    for family in FAMILIES:
        if family.matches(pipe):
            return family(pipe, clip_skip=clip_skip)
    known = ", ".join(f.name for f in FAMILIES)
    raise UserError(f"model of type {type(pipe).__name__} is of no supported family ({known})")


def load_family(
    model: str,
    dtype: torch.dtype = torch.float32,
    clip_skip: int | None = None,
    prediction_type: str = "auto",
    zero_terminal_snr: bool = False,
) -> ModelFamily:
    """Load `model` and wrap it in the family object the rest of stylelora talks to."""
    family = detect_family(load_pipeline(model, dtype), clip_skip=clip_skip)
    family.set_schedule(prediction_type, zero_terminal_snr)
    return family


__all__ = ["FAMILIES", "ModelFamily", "detect_family", "load_family", "load_pipeline"]
