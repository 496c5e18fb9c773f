"""Render with a finished adapter file, loaded through diffusers' own LoRA loader; a training
checkpoint's `adapter.safetensors` is converted first, as the run's export would have written
it at that step."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from PIL import Image
from pydantic import ValidationError

from stylelora.adapters.state import (
    Adapter,
    checked_adapter,
    file_layout,
    nonfinite_problems,
    open_checked,
    read_adapter,
    read_tensors,
)
from stylelora.config import AdapterConfig, TrainConfig
from stylelora.errors import UserError, first_line
from stylelora.export.apply import add_into_weights
from stylelora.export.atomic import atomic_path
from stylelora.export.convert import (
    UI_FORMATS,
    adapter_format,
    diffusers_adapter,
    diffusers_parts,
)
from stylelora.export.lora_file import kohya_state_dict, network_metadata
from stylelora.families.base import ModelFamily
from stylelora.families.registry import FAMILIES, adapter_prefixes
from stylelora.sample.prompts import SamplePrompt
from stylelora.sample.render import grid, render

ADAPTER_NAME = "stylelora"
CHECKPOINT_ADAPTER = "adapter.safetensors"  # train/checkpoint.py's names
CHECKPOINT_STATE = "trainer_state.json"


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
    family: ModelFamily,
    path: Path,
    scale: float,
    name: str,
    adapter: Adapter | None = None,
    saved: dict | None = None,
) -> bool:
    """Check that the file fits `family`, then put it on the pipeline; what sample and merge share.

    diffusers drops DoRA's `dora_scale`, does not read LyCORIS's LoHa and LoKr, and reads a
    family's fused modules (Flux's qkv) only at the real model's widths, so those files
    are added into the weights at `scale`, with the formula AUTOMATIC1111 and ComfyUI use
    (export/apply.py), and False is returned.
    Anything else is loaded by diffusers' own loader as adapter `name`, not yet weighted: True.
    A PEFT folder or file is converted to the family's UI layout first, as `stylelora export`
    does.
    `adapter`: the file already read (or a checkpoint's, converted), if the caller has it.
    `saved`: where the weights changed are kept first, to be put back (`restore_weights`).
    """
    fmt = "kohya" if adapter is not None else adapter_format(path)
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
        add_into_weights(family, adapter, scale, str(path), saved)
        return False
    source = file_layout(adapter.tensors()) if is_checkpoint_adapter(path) else str(path)
    return load_lora(family, path, source, name)


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
    if attach_adapter(family, path, scale, ADAPTER_NAME, checkpoint_adapter(family, path)):
        weigh_adapter(family, path, scale)


def weigh_adapter(family: ModelFamily, path: Path, scale: float) -> None:
    """Set the strength of the adapter diffusers loaded as ADAPTER_NAME."""
    loaded = {name for names in family.pipe.get_list_adapters().values() for name in names}
    if ADAPTER_NAME not in loaded:
        raise UserError(
            f"{path}: none of its names is a module of this {family.title} model; is it "
            "an adapter for another model?"
        )
    family.pipe.set_adapters([ADAPTER_NAME], adapter_weights=[scale])


def is_checkpoint_adapter(path: Path) -> bool:
    path = Path(path)
    return path.name == CHECKPOINT_ADAPTER and (path.parent / CHECKPOINT_STATE).is_file()


def checkpoint_adapter(family: ModelFamily, path: Path) -> Adapter | None:
    """A training checkpoint's `adapter.safetensors` (the trainer's PEFT parameters: no alphas,
    no metadata) as the file the run's export would have written at that step: the run's
    adapter settings, saved beside it, injected into `family`, the parameters loaded and
    converted as the export converts them, the injection taken out again. None for any other
    file."""
    if not is_checkpoint_adapter(path):
        return None
    from stylelora.adapters.blocks import plan_blocks, uses_blocks
    from stylelora.adapters.inject import inject_adapters
    from stylelora.train.session import trainable

    state = Path(path).parent / CHECKPOINT_STATE
    try:
        saved = json.loads(state.read_text(encoding="utf-8"))["config"]
        settings = AdapterConfig.model_validate(saved["adapter"])
        train = TrainConfig.model_validate(saved["train"])
    except (OSError, ValueError, KeyError, TypeError, ValidationError) as exc:
        raise UserError(f"{state}: not a checkpoint's state ({first_line(exc)})") from None
    tensors, _ = read_tensors(path)
    blocks = None
    if uses_blocks(settings, train):
        blocks = plan_blocks(family, family.denoiser_targets(settings), settings, train)
    adapted = inject_adapters(family, settings, blocks)
    try:
        params = trainable(adapted)
        if params.keys() != tensors.keys():
            raise UserError(
                f"{path}: a checkpoint of a run on {saved.get('model')}; its adapters do not fit "
                f"this {family.title} model"
            )
        with torch.no_grad():
            for key, param in params.items():
                param.copy_(tensors[key])
        kohya = kohya_state_dict(family, adapted)
    finally:
        take_out_adapters(adapted)
    metadata = {
        **network_metadata(settings.rank, settings.alpha, {}, settings.type),
        **family.metadata(),
        "ss_output_name": f"{saved.get('name', 'checkpoint')}-{Path(path).parent.name}",
    }
    return checked_adapter(path, kohya, metadata)


def take_out_adapters(adapted: dict[str, torch.nn.Module]) -> None:
    """Each PEFT layer replaced by the layer it wraps: the components as they were loaded."""
    for component in adapted.values():
        for name, layer in list(component.named_modules()):
            if isinstance(layer, BaseTunerLayer):
                parent, _, child = name.rpartition(".")
                setattr(component.get_submodule(parent), child, layer.get_base_layer())
        if "peft_config" in vars(component):
            del component.peft_config


def restore_weights(saved: dict) -> None:
    """Put back the weights `add_into_weights` changed and kept in `saved`."""
    with torch.no_grad():
        for layer, weight in saved.values():
            layer.weight.copy_(weight)


def check_adapter_file(path: Path) -> None:
    """Refuse, before any model loads, a path that is no adapter: a missing or damaged file,
    or tensors that are no LoRA's."""
    path = Path(path)
    if path.is_dir():
        return  # a PEFT folder: its files are checked as they are read
    with open_checked(path):
        pass
    if not is_checkpoint_adapter(path) and adapter_format(path) == "unknown":
        raise UserError(
            f"{path}: not an adapter (none of its tensors is a LoRA's); give a .safetensors "
            "file that training, export, resize or combine wrote"
        )


def render_strengths(
    family: ModelFamily,
    path: Path,
    request: SamplePrompt,
    scales: Sequence[float],
    on_step: Callable[[int, int], None] | None = None,
) -> list[Image.Image]:
    """`request` rendered with the adapter at each of `scales`, the adapter read once."""
    converted = checkpoint_adapter(family, path)
    saved: dict = {}
    images, loaded = [], None
    for scale in scales:
        if loaded is None or not loaded:  # added into the weights: again from the base's
            restore_weights(saved)
            loaded = attach_adapter(family, path, scale, ADAPTER_NAME, converted, saved)
        if loaded:
            weigh_adapter(family, path, scale)
        images.append(render(family.pipe, request, family=family, on_step=on_step))
    return images


def render_with_adapter(
    family: ModelFamily,
    adapter: Path | None,
    request: SamplePrompt,
    out: Path,
    scales: Sequence[float] = (1.0,),
    compare: bool = False,
    on_step: Callable[[int, int], None] | None = None,
) -> Image.Image:
    """Render `request` with `adapter` at each of `scales`, left to right; with `compare`, the
    base image to their left. `on_step(n, total)`: after each denoising step of each image."""
    if compare and adapter is None:
        raise UserError("--compare needs --adapter")
    if adapter is not None:
        check_adapter_file(adapter)  # named before the base renders
    images = []
    if compare or adapter is None:
        images.append(render(family.pipe, request, family=family, on_step=on_step))
    if adapter is not None:
        images += render_strengths(family, Path(adapter), request, scales, on_step)
    sheet = grid(images, columns=len(images))
    with atomic_path(out) as tmp:
        sheet.save(tmp, format="PNG")
    return sheet
