"""Load a base model from wherever the user keeps it, and say which family it is."""

from __future__ import annotations

import json
import pickle
from functools import cache
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.utils import HFValidationError, validate_repo_id
from safetensors import SafetensorError, safe_open

from stylelora.errors import UserError, first_line
from stylelora.families.base import ModelFamily
from stylelora.families.demo import demo_model_path
from stylelora.families.registry import (
    FAMILIES,
    declared_options,
    family_named,
    model_names,
    owner_titles,
    preset_files,
)
from stylelora.families.tiny import tiny_model_path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
BUILT_IN = ("tiny:", "demo:")  # the tiny random and the shipped demo models


def load_pipeline(
    model: str,
    dtype: torch.dtype = torch.float32,
    config: str | None = None,
    parts: dict[str, Path | None] | None = None,
) -> DiffusionPipeline:
    """A diffusers pipeline from `tiny:<family>` (random weights), `demo:<family>` (a shipped
    pretrained demo model), a local diffusers folder, a single-file checkpoint (`config`: a
    diffusers folder of component configs, default the family's skeleton; `parts`: the files
    the family keeps apart from it, by config key), or a hub id."""
    parts = {key: path for key, path in (parts or {}).items() if path is not None}
    check_model_name(model)
    if model.startswith("tiny:"):
        source = str(tiny_model_path(model.removeprefix("tiny:")))
    elif model.startswith("demo:"):
        source = str(demo_model_path(model.removeprefix("demo:")))
    else:
        source = model
        path = Path(model).expanduser()
        if path.is_file():
            family = single_file_family(path)
            refuse_parts(parts, family, f"{path} is a {family.title} file")
            return family.load_single_file(path, dtype, config, parts)
        if path.is_dir():
            if not (path / "model_index.json").exists():
                raise UserError(f"{model}: not a diffusers model folder (no model_index.json)")
            source = str(path)
    refuse_parts(parts, None, f"{model} is not a single file")
    try:
        pipe = DiffusionPipeline.from_pretrained(source, torch_dtype=dtype)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"model {model!r}: could not load it as a local folder or hub id ({first_line(exc)})"
        ) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_model_name(model: str) -> None:
    """That `model` names a built-in model, a file or folder that exists, or a valid hub id:
    what `load_pipeline` checks before it loads anything."""
    if model.startswith(BUILT_IN):
        if model not in model_names():
            kind, name = model.split(":", 1)
            names = [known.split(":", 1)[1] for known in model_names() if known.startswith(kind)]
            raise UserError(f"{kind} model {name!r}: choose one of {', '.join(names)}")
        return
    if Path(model).expanduser().exists():
        return
    if model.startswith((".", "/", "~")) or model.endswith(SINGLE_FILE_SUFFIXES):
        raise UserError(f"{model}: model file or folder not found")
    if not is_hub_id(model):
        raise UserError(f"model {model!r}: no such file or folder, and not a hub id (org/name)")


def is_hub_id(text: str) -> bool:
    """Whether `text` is a valid hub repository id (`org/name`), as the hub's client says."""
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def refuse_parts(parts: dict[str, Path], family: type[ModelFamily] | None, why: str) -> None:
    """A part given for a model that does not take it, named in one line."""
    taken = {part.key for part in family.parts} if family else set()
    if given := [key for key in parts if key not in taken]:
        raise UserError(
            f"{given[0]}: names a file of a {owner_titles(given[0])} model kept apart from its "
            f"transformer; {why}, so remove it"
        )


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
    known = ", ".join(family.title for family in FAMILIES)
    raise UserError(
        f"{path}: not a checkpoint of any family stylelora knows ({known}); AUTOMATIC1111 "
        "layout for SD models, a transformer file for the others"
    )


def families_of(model: str) -> list[type[ModelFamily]]:
    """The families `model` may be of, told without loading it: a built-in model's, a
    .safetensors file's by its tensor names, a diffusers folder's or a hub id's by its pipeline
    class (from the hub's cache, else from the presets that train it); [] where it cannot be
    told. Several where a pipeline class serves several families."""
    if model.startswith(BUILT_IN):
        family = family_named(model.partition(":")[2])
        return [family] if family else []
    path = Path(model).expanduser()
    if path.suffix == ".safetensors" and path.is_file():
        try:
            return [single_file_family(path)]
        except UserError:
            return []
    if path.is_dir():
        return families_of_index(path / "model_index.json")
    if not is_hub_id(model):
        return []
    cached = try_to_load_from_cache(model, "model_index.json")
    if isinstance(cached, str):
        return families_of_index(Path(cached))
    return [family for family in FAMILIES if model in preset_models(family)]


def families_of_index(index: Path) -> list[type[ModelFamily]]:
    """The families whose pipelines have the class a diffusers `model_index.json` names."""
    try:
        pipeline = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return []
    return [family for family in FAMILIES if pipeline in pipeline_classes(family)]


@cache
def pipeline_classes(family: type[ModelFamily]) -> frozenset[str]:
    """The pipeline classes of a family's bundled configs (one per variant)."""
    indexes = family.folder().glob("skeleton*/model_index.json")
    return frozenset(json.loads(index.read_text())["_class_name"] for index in indexes)


@cache
def preset_models(family: type[ModelFamily]) -> frozenset[str]:
    """The models the family's presets train."""
    models = set()
    for path in preset_files().values():
        if path.is_relative_to(family.folder()):
            models.add(tomllib.loads(path.read_text(encoding="utf-8")).get("model"))
    return frozenset(models)


def detect_family(pipe: DiffusionPipeline) -> ModelFamily:
    for family in FAMILIES:
        if family.matches(pipe):
            return family(pipe)
    known = ", ".join(f.name for f in FAMILIES)
    raise UserError(f"model of type {type(pipe).__name__} is of no supported family ({known})")


def check_settings(family: ModelFamily, settings: dict[str, Any]) -> None:
    """An option that is set (not at its default) but not this family's, named in one line."""
    options = declared_options()
    taken = {option.key for option in family.options}
    for key, value in settings.items():
        if key not in taken and value != options[key].default:
            raise UserError(
                f"{key}: a setting of {owner_titles(key)} models; a {family.title} model does "
                "not take it, so remove it"
            )


def load_family(
    model: str,
    dtype: torch.dtype = torch.float32,
    settings: dict[str, Any] | None = None,
    config: str | None = None,
    parts: dict[str, Path | None] | None = None,
) -> ModelFamily:
    """Load `model` and wrap it in the family object the rest of stylelora talks to, with the
    family options in `settings` (dotted config key -> value, any family's)."""
    pipe = load_pipeline(model, dtype, config, parts)
    family = detect_family(pipe)
    check_settings(family, settings or {})
    family.configure(settings or {})
    return family
