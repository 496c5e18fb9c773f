"""Model families: load a base model from wherever the user keeps it and say which family it is."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from safetensors import SafetensorError, safe_open

from stylelora.errors import UserError, first_line
from stylelora.families.base import ModelFamily
from stylelora.families.demo import demo_model_path
from stylelora.families.flux import Flux
from stylelora.families.sd2 import SD2
from stylelora.families.sd15 import SD15
from stylelora.families.sdxl import SDXL
from stylelora.families.tiny import tiny_model_path

# Every family; adding one is its module (a ModelFamily subclass) plus its line here.
FAMILIES: list[type[ModelFamily]] = [SD15, SD2, SDXL, Flux]
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


def load_pipeline(
    model: str,
    dtype: torch.dtype = torch.float32,
    config: str | None = None,
    parts: dict[str, Path | None] | None = None,
) -> DiffusionPipeline:
    """A diffusers pipeline from `tiny:<family>` (random weights), `demo:sd15` (the shipped
    pretrained demo base), a local diffusers folder, a single-file checkpoint (`config`: a
    diffusers folder of component configs, default the family's skeleton; `parts`: the files
    of a Flux.1 transformer file's VAE and text encoders), or a hub id."""
    parts = parts or {}
    if model.startswith("tiny:"):
        source = str(tiny_model_path(model.removeprefix("tiny:")))
    elif model.startswith("demo:"):
        source = str(demo_model_path(model.removeprefix("demo:")))
    else:
        source = model
        path = Path(model).expanduser()
        if path.is_file():
            return single_file_family(path).load_single_file(path, dtype, config, parts)
        if path.is_dir():
            if not (path / "model_index.json").exists():
                raise UserError(f"{model}: not a diffusers model folder (no model_index.json)")
            source = str(path)
        elif model.startswith((".", "/", "~")) or model.endswith(SINGLE_FILE_SUFFIXES):
            raise UserError(f"{model}: model file or folder not found")
    if given := [key for key, value in parts.items() if value is not None]:
        raise UserError(
            f"{given[0]}: names a Flux.1 transformer file's other parts; {model} is not a "
            "single file, so remove it"
        )
    try:
        pipe = DiffusionPipeline.from_pretrained(source, torch_dtype=dtype)
    except OSError as exc:
        raise UserError(
            f"model {model!r}: could not load it as a local folder or hub id ({first_line(exc)})"
        ) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def checkpoint_keys(path: Path) -> list[str]:
    """Tensor names of a .safetensors or .ckpt file, without unpickling any code."""
    if path.suffix not in SINGLE_FILE_SUFFIXES:
        raise UserError(f"{path}: single-file models must be .safetensors or .ckpt")
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as handle:
                return list(handle.keys())
        state = torch.load(path, map_location="meta", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, pickle.UnpicklingError) as exc:
        raise UserError(
            f"{path}: not a readable weights-only checkpoint ({first_line(exc)})"
        ) from None
    state = state.get("state_dict", state) if isinstance(state, dict) else {}
    return list(state)


def single_file_family(path: Path) -> type[ModelFamily]:
    """The family of a single-file checkpoint, told by its tensor names."""
    keys = checkpoint_keys(path)
    for family in FAMILIES:
        if family.reads_single_file(keys):
            return family
    raise UserError(
        f"{path}: neither an SD1.x, SD2.x or SDXL checkpoint in AUTOMATIC1111 layout "
        "(model.diffusion_model.* with cond_stage_model.* or conditioner.* keys) nor a Flux.1 "
        "transformer in BFL layout (double_blocks.*)"
    )


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
    config: str | None = None,
    parts: dict[str, Path | None] | None = None,
) -> ModelFamily:
    """Load `model` and wrap it in the family object the rest of stylelora talks to."""
    pipe = load_pipeline(model, dtype, config, parts)
    family = detect_family(pipe, clip_skip=clip_skip)
    family.set_schedule(prediction_type, zero_terminal_snr)
    return family


__all__ = ["FAMILIES", "ModelFamily", "detect_family", "load_family", "load_pipeline"]
