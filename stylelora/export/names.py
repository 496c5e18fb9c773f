"""kohya module names <-> modules of a model, and a file's family told from its names and shapes.

A file's names are matched against every Linear / Conv2d of the UNet and text encoders. SDXL's
UNet answers to kohya's sgm names (`lora_unet_input_blocks_4_1_...`) and to the diffusers-path
names some trainers write (`lora_unet_down_blocks_1_attentions_0_...`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from stylelora.adapters.state import Adapter
from stylelora.families import FAMILIES
from stylelora.families.base import ModelFamily

DENOISER_PREFIXES = ("lora_unet_", "unet.", "transformer.")


@dataclass(frozen=True)
class Target:
    component: str  # pipeline attribute: unet (the denoiser), text_encoder, text_encoder_2
    path: str  # module path inside it
    module: torch.nn.Module
    # Every module a fused kohya module covers, in output order (Flux's qkv), and their paths;
    # else just this one.
    members: tuple[torch.nn.Module, ...]
    member_paths: tuple[str, ...]


def family_targets(family: ModelFamily) -> dict[str, Target]:
    """Every kohya name a file may use for the family's Linear and Conv2d modules."""
    components = {"lora_unet": family.denoiser_attr, **family.text_encoder_attrs}
    names: dict[str, Target] = {}
    for prefix, attr in components.items():
        model = getattr(family.pipe, attr)
        for path, module in model.named_modules():
            if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            path = path.removeprefix("base_model.model.")
            target = Target(attr, path, module, (module,), (path,))
            names[f"{prefix}_{path.replace('.', '_')}"] = target
            with contextlib.suppress(ValueError):  # a UNet module with no sgm or BFL name
                name, paths = family.kohya_part(prefix, path)
                fused = tuple(model.get_submodule(member) for member in paths)
                names[name] = Target(attr, path, module, fused, paths)
    return names


def file_family(adapter: Adapter) -> type[ModelFamily]:
    """The family an adapter was made for: its `ss_base_model_version`, else its names, else
    its cross-attention width; SD1.x when nothing tells."""
    return adapter_family(
        adapter.metadata.get("ss_base_model_version", ""),
        list(adapter.modules),
        [m.in_width for n, m in adapter.modules.items() if n.endswith("attn2_to_k")],
    )


def adapter_family(version: str, names: list[str], context_widths: list[int]) -> type[ModelFamily]:
    """The family of an adapter file in any layout, from what it says of itself."""
    for family in FAMILIES:
        if version.startswith(family.kohya_version_prefix):
            return family
    claimed = claimed_family(names)
    if claimed is not None:
        return claimed
    by_width = {family.context_width: family for family in FAMILIES}
    return by_width.get(context_widths[0], FAMILIES[0]) if context_widths else FAMILIES[0]


def claimed_family(names: list[str]) -> type[ModelFamily] | None:
    """The family whose names these can only be; the denoiser's names are asked first, since a
    CLIP's `lora_te1_` is both SDXL's first text encoder and Flux's."""
    denoiser = [name for name in names if name.startswith(DENOISER_PREFIXES)]
    for subset in (denoiser, names):
        for family in FAMILIES:
            if family.claims_names(subset):
                return family
    return None


def diffusers_family(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> type[ModelFamily]:
    """The family of a diffusers-layout adapter (`unet.<path>.lora_A.weight` ...)."""
    widths = [v.shape[1] for k, v in tensors.items() if "attn2.to_k.lora_A" in k]
    return adapter_family(metadata.get("ss_base_model_version", ""), list(tensors), widths)
