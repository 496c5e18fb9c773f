"""Render with a finished adapter file, loaded through diffusers' own LoRA loader."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from stylelora.adapters.state import (
    Adapter,
    file_layout,
    nonfinite_problems,
    open_checked,
    read_adapter,
    read_tensors,
)
from stylelora.errors import UserError, first_line
from stylelora.export.apply import add_into_weights
from stylelora.export.atomic import atomic_path
from stylelora.export.convert import (
    UI_FORMATS,
    adapter_format,
    diffusers_adapter,
    diffusers_parts,
)
from stylelora.families.base import ModelFamily
from stylelora.families.registry import FAMILIES, adapter_prefixes
from stylelora.sample.prompts import SamplePrompt
from stylelora.sample.render import grid, render

ADAPTER_NAME = "stylelora"


def check_family(family: ModelFamily, path: Path, keys: list[str], metadata: dict) -> None:
    """Refuse an adapter made for another family, by its metadata or else by its key names."""
    trained_on = metadata.get("ss_base_model_version")
    if trained_on:
        if trained_on not in family.base_versions:
            raise UserError(
                f"{path}: adapter was trained for {trained_on}, "
                f"but the model is {family.name} ({family.base_version})"
            )
        return
    prefixes = {p for p in adapter_prefixes() if any(key.startswith(p) for key in keys)}
    if foreign := prefixes - set(family.file_prefixes()):
        owners = [cls.name for cls in FAMILIES if prefixes <= set(cls.file_prefixes())]
        named = "/".join(sorted(foreign))
        raise UserError(
            f"{path}: adapter has {named} keys (a {' or '.join(owners) or 'unknown'} adapter), "
            f"but the model is {family.name}"
        )


def attach_adapter(
    family: ModelFamily, path: Path, scale: float, name: str, adapter: Adapter | None = None
) -> bool:
    """Check that the file fits `family`, then put it on the pipeline; what sample and merge share.

    diffusers drops DoRA's `dora_scale`, does not read LyCORIS's LoHa and LoKr, and reads a
    family's fused modules (Flux's qkv) only at the real model's widths, so those files
    are added into the weights at `scale`, with the formula AUTOMATIC1111 and ComfyUI use
    (export/apply.py), and False is returned.
    Anything else is loaded by diffusers' own loader as adapter `name`, not yet weighted: True.
    A PEFT folder or file is converted to the family's UI layout first, as `stylelora export`
    does.
    `adapter`: the file already read, if the caller has it.
    """
    fmt = adapter_format(path)
    if fmt == "peft":
        adapter = peft_adapter(family, path)
        if not family.fuses_modules:
            return load_lora(family, path, file_layout(adapter.tensors()), name)
    elif fmt not in UI_FORMATS:  # diffusers' own layouts: its loader reads them; we check them
        tensors, metadata = read_tensors(path)
        check_family(family, path, list(tensors), metadata)
        refuse_nonfinite(path, tensors)
        return load_lora(family, path, str(path), name)
    adapter = adapter or read_adapter(path)  # names a bad pair or NaN before any change
    check_family(family, path, list(adapter.tensors()), adapter.metadata)
    if adapter.is_dora or adapter.algo != "lora" or family.fuses_modules:
        add_into_weights(family, adapter, scale, str(path))
        return False
    return load_lora(family, path, str(path), name)


def peft_adapter(family: ModelFamily, path: Path) -> Adapter:
    parts = diffusers_parts(path, "peft")
    check_family(family, path, [], parts[1])
    return diffusers_adapter(parts, family, path)


def refuse_nonfinite(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """NaN or infinite weights render a black image: the check inspect, merge and resize make."""
    problems = nonfinite_problems(tensors)
    if problems:
        raise UserError(f"{path}: {problems[0]}")


def load_lora(family: ModelFamily, path: Path, source: str | dict, name: str) -> bool:
    """diffusers' `load_lora_weights` of a file or a kohya state dict; its errors in one line."""
    try:
        family.pipe.load_lora_weights(source, adapter_name=name)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise UserError(
            f"{path}: cannot apply it to a {family.name} model ({first_line(exc)})"
        ) from None
    return True


def apply_adapter(family: ModelFamily, path: Path, scale: float) -> None:
    """Load an adapter file onto `family`'s pipeline at strength `scale`."""
    if attach_adapter(family, path, scale, ADAPTER_NAME):
        loaded = {name for names in family.pipe.get_list_adapters().values() for name in names}
        if ADAPTER_NAME not in loaded:
            raise UserError(
                f"{path}: none of its names is a module of this {family.title} model; is it "
                "an adapter for another model, or a training checkpoint's state?"
            )
        family.pipe.set_adapters([ADAPTER_NAME], adapter_weights=[scale])


def render_with_adapter(
    family: ModelFamily,
    adapter: Path | None,
    request: SamplePrompt,
    out: Path,
    scale: float = 1.0,
    compare: bool = False,
) -> Image.Image:
    """Render `request` with `adapter` at `scale`; with `compare`, the base image to its left."""
    if compare and adapter is None:
        raise UserError("--compare needs --adapter")
    if adapter is not None and Path(adapter).is_file():
        with open_checked(adapter):  # a damaged or empty file is named before the base renders
            pass
    images = [render(family.pipe, request, family=family)] if compare or adapter is None else []
    if adapter is not None:
        apply_adapter(family, adapter, scale)
        images.append(render(family.pipe, request, family=family))
    sheet = grid(images, columns=len(images))
    with atomic_path(out) as tmp:
        sheet.save(tmp, format="PNG")
    return sheet
