"""Adapter module names <-> modules of a model, and a file's family told from its names and shapes.

A file's names are matched against every Linear / Conv2d of the denoiser and text encoders:
the names of the family's own layout (`ModelFamily.file_module`: SDXL's UNet by kohya's sgm
names `lora_unet_input_blocks_4_1_...`, Flux's by BFL's, the newer transformers by
`diffusion_model.<path>`) and kohya-style names of the diffusers paths, which some trainers
write (`lora_unet_down_blocks_1_attentions_0_...`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from stylelora.adapters.state import Adapter
from stylelora.families.base import DENOISER, ModelFamily
from stylelora.families.registry import FAMILIES, denoiser_prefixes


@dataclass(frozen=True)
class Target:
    component: str  # pipeline attribute: the denoiser (unet, transformer) or a text encoder
    path: str  # module path inside it
    module: torch.nn.Module
    # Every module a fused kohya module covers, in output order (Flux's qkv), and their paths;
    # else just this one.
    members: tuple[torch.nn.Module, ...]
    member_paths: tuple[str, ...]


def family_targets(family: ModelFamily) -> dict[str, Target]:
    """Every name a file may use for the family's Linear and Conv2d modules."""
    components = {DENOISER: family.denoiser_attr, **family.text_encoder_attrs}
    names: dict[str, Target] = {}
    for prefix, attr in components.items():
        model = getattr(family.pipe, attr)
        for path, module in model.named_modules():
            if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            path = path.removeprefix("base_model.model.")
            target = Target(attr, path, module, (module,), (path,))
            names[f"{prefix}_{path.replace('.', '_')}"] = target
            with contextlib.suppress(ValueError):  # a module with no sgm or BFL name
                name, paths = family.file_module(prefix, path)
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
        if version.startswith(family.base_version_prefix):
            return family
    claimed = claimed_family(names)
    if claimed is not None:
        return claimed
    by_width = {getattr(family, "context_width", None): family for family in FAMILIES}
    return by_width.get(context_widths[0], FAMILIES[0]) if context_widths else FAMILIES[0]


def claimed_family(names: list[str]) -> type[ModelFamily] | None:
    """The family whose names these can only be; the denoiser's names are asked first, since a
    CLIP's `lora_te1_` is both SDXL's first text encoder and Flux's."""
    denoiser = [name for name in names if name.startswith(denoiser_prefixes())]
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
