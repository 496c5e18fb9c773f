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
from stylelora.families.skeletons import skeleton_dir
from stylelora.families.tiny import tiny_model_path

# Every family; adding one is its module (a ModelFamily subclass) plus its line here.
FAMILIES: list[type[ModelFamily]] = [SD15, SD2, SDXL, Flux]
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


def load_pipeline(
    model: str, dtype: torch.dtype = torch.float32, config: str | None = None
) -> DiffusionPipeline:
    """A diffusers pipeline from `tiny:<family>` (random weights), `demo:sd15` (the shipped
    pretrained demo base), a local diffusers folder, a single-file checkpoint (`config`: a
    diffusers folder of component configs, default the family's skeleton), or a hub id."""
    if model.startswith("tiny:"):
        source = str(tiny_model_path(model.removeprefix("tiny:")))
    elif model.startswith("demo:"):
        source = str(demo_model_path(model.removeprefix("demo:")))
    else:
        source = model
        path = Path(model).expanduser()
        if path.is_file():
            return load_single_file(path, dtype, config)
        if path.is_dir():
            if not (path / "model_index.json").exists():
                raise UserError(f"{model}: not a diffusers model folder (no model_index.json)")
            source = str(path)
        elif model.startswith((".", "/", "~")) or model.endswith(SINGLE_FILE_SUFFIXES):
            raise UserError(f"{model}: model file or folder not found")
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
    """The family of an AUTOMATIC1111-layout checkpoint, told by its keys."""
    keys = checkpoint_keys(path)
    if any(key.startswith("model.diffusion_model.") for key in keys):
        for family in FAMILIES:
            marker = family.single_file_marker
            if marker and any(key.startswith(marker) for key in keys):
                return family
    raise UserError(
        f"{path}: not an SD1.x, SD2.x or SDXL checkpoint in AUTOMATIC1111 layout "
        "(no model.diffusion_model.* with cond_stage_model.* or conditioner.* keys)"
    )


def load_single_file(path: Path, dtype: torch.dtype, config: str | None) -> DiffusionPipeline:
    """Load a single file offline, with component configs from `config` or the skeleton.

    diffusers reads .ckpt files with torch.load(weights_only=True), as checkpoint_keys does.
    """
    family = single_file_family(path)
    try:
        pipe = family.pipeline_class.from_single_file(
            str(path),
            config=str(config or skeleton_dir(family.name)),
            local_files_only=True,
            torch_dtype=dtype,
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise UserError(
            f"{path}: could not load this {family.name} checkpoint ({first_line(exc)})"
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
    config: str | None = None,
) -> ModelFamily:
    """Load `model` and wrap it in the family object the rest of stylelora talks to."""
    family = detect_family(load_pipeline(model, dtype, config), clip_skip=clip_skip)
    family.set_schedule(prediction_type, zero_terminal_snr)
    return family


__all__ = ["FAMILIES", "ModelFamily", "detect_family", "load_family", "load_pipeline"]
