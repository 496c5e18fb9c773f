"""Render with a finished adapter file, loaded through diffusers' own LoRA loader."""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from safetensors import SafetensorError, safe_open

from stylelora.errors import UserError
from stylelora.export.atomic import atomic_path
from stylelora.families import FAMILIES
from stylelora.families.base import ModelFamily
from stylelora.sample.prompts import SamplePrompt
from stylelora.sample.render import grid, render

ADAPTER_NAME = "stylelora"


def read_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}
    except FileNotFoundError:
        raise UserError(f"{path}: adapter file not found") from None
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{path}: not a readable .safetensors file ({exc})") from None


def tensor_names(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())


def text_encoder_prefixes(path: Path) -> set[str]:
    """The kohya text-encoder prefixes (`lora_te`, `lora_te1`, ...) the file's keys use."""
    known = {prefix for cls in FAMILIES for prefix in cls.text_encoder_attrs}
    keys = tensor_names(path)
    return {p for p in known if any(key.startswith(p + "_") for key in keys)}


def check_family(family: ModelFamily, path: Path) -> None:
    """Refuse an adapter made for another family, by its metadata or else by its key names."""
    trained_on = read_metadata(path).get("ss_base_model_version")
    if trained_on:
        if trained_on not in family.kohya_versions:
            raise UserError(
                f"{path}: adapter was trained for {trained_on}, "
                f"but the model is {family.name} ({family.kohya_base_version})"
            )
        return
    prefixes = text_encoder_prefixes(path)
    if prefixes - set(family.text_encoder_attrs):
        owners = [cls.name for cls in FAMILIES if prefixes <= set(cls.text_encoder_attrs)]
        keys = "/".join(f"{p}_" for p in sorted(prefixes))
        raise UserError(
            f"{path}: adapter has {keys} keys (a {' or '.join(owners) or 'unknown'} adapter), "
            f"but the model is {family.name}"
        )


def apply_adapter(family: ModelFamily, path: Path, scale: float) -> None:
    """Load a kohya-format adapter onto `family`'s pipeline at strength `scale`.

    diffusers drops DoRA's `dora_scale`, so a DoRA file is added into the weights instead, with
    the formula AUTOMATIC1111 and ComfyUI use (export/apply.py).
    """
    check_family(family, path)
    if any(key.endswith(".dora_scale") for key in tensor_names(path)):
        from stylelora.adapters.state import read_adapter
        from stylelora.export.apply import add_into_weights

        add_into_weights(family, read_adapter(path), scale, str(path))
        return
    try:
        family.pipe.load_lora_weights(str(path), adapter_name=ADAPTER_NAME)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise UserError(
            f"{path}: cannot apply this adapter to a {family.name} model ({exc})"
        ) from None
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
    images = [render(family.pipe, request, family=family)] if compare or adapter is None else []
    if adapter is not None:
        apply_adapter(family, adapter, scale)
        images.append(render(family.pipe, request, family=family))
    sheet = grid(images, columns=len(images))
    with atomic_path(out) as tmp:
        sheet.save(tmp, format="PNG")
    return sheet
