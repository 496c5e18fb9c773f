"""kohya module names <-> modules of a model, and a file's family told from its names and shapes.

A file's names are matched against every Linear / Conv2d of the UNet and text encoders. SDXL's
UNet answers to kohya's sgm names (`lora_unet_input_blocks_4_1_...`) and to the diffusers-path
names some trainers write (`lora_unet_down_blocks_1_attentions_0_...`).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from stylelora.adapters.state import Adapter
from stylelora.families import FAMILIES
from stylelora.families.base import ModelFamily

# ss_base_model_version prefix -> bundled skeleton; cross-attention width -> skeleton.
VERSION_SKELETONS = (("sdxl", "sdxl"), ("sd_v2", "sd21v"), ("sd_v1", "sd15"))
CONTEXT_SKELETONS = {768: "sd15", 1024: "sd21v", 2048: "sdxl"}
SKELETON_FAMILY = {"sd15": "sd15", "sd21v": "sd2", "sdxl": "sdxl"}


@dataclass(frozen=True)
class Target:
    component: str  # pipeline attribute: unet, text_encoder, text_encoder_2
    path: str  # module path inside it
    module: torch.nn.Module


def family_targets(family: ModelFamily) -> dict[str, Target]:
    """Every kohya name a file may use for the family's Linear and Conv2d modules."""
    components = {"lora_unet": "unet", **family.text_encoder_attrs}
    names: dict[str, Target] = {}
    for prefix, attr in components.items():
        model = getattr(family.pipe, attr)
        for path, module in model.named_modules():
            if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            path = path.removeprefix("base_model.model.")
            target = Target(attr, path, module)
            names[f"{prefix}_{path.replace('.', '_')}"] = target
            with contextlib.suppress(ValueError):  # a UNet module with no sgm name
                names[family.kohya_name(prefix, path)] = target
    return names


def file_skeleton(adapter: Adapter) -> str:
    """The bundled skeleton (sd15, sd21v, sdxl) of the family an adapter was made for."""
    version = adapter.metadata.get("ss_base_model_version", "")
    for prefix, skeleton in VERSION_SKELETONS:
        if version.startswith(prefix):
            return skeleton
    names = adapter.modules
    if any(n.startswith(("lora_te1_", "lora_te2_")) or "_input_blocks_" in n for n in names):
        return "sdxl"
    for name, module in names.items():
        if name.startswith("lora_unet_") and name.endswith("attn2_to_k"):
            return CONTEXT_SKELETONS.get(module.down.shape[1], "sd15")
    return "sd15"


def meta_family(skeleton: str) -> ModelFamily:
    """The real architecture of a bundled skeleton, on the meta device (no weights, no memory)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from stylelora.families.skeletons import skeleton_dir

    folder = skeleton_dir(skeleton)
    parts = {}
    with torch.device("meta"):
        config = UNet2DConditionModel.load_config(folder / "unet")
        parts["unet"] = UNet2DConditionModel.from_config(config)
        classes = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}
        for attr, cls in classes.items():
            if (folder / attr).is_dir():
                parts[attr] = cls(CLIPTextConfig.from_pretrained(folder / attr))
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    parts["scheduler"] = SimpleNamespace(config=scheduler)
    family_cls = next(f for f in FAMILIES if f.name == SKELETON_FAMILY[skeleton])
    return family_cls(SimpleNamespace(**parts))
