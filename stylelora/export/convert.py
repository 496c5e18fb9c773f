"""Convert adapters between kohya's format, diffusers' (`save_lora_weights`) and PEFT folders.

- kohya: `lora_unet_*` / `lora_te*_` keys, `.lora_down/.lora_up/.alpha` (what the UIs read).
- diffusers: `unet.<path>.lora_A.weight` … with each component's LoraConfig (r, lora_alpha,
  rank_pattern, alpha_pattern) in the `lora_adapter_metadata` header, as `save_lora_weights` writes.
- peft: a folder per component (`unet/`, `text_encoder/`…) holding `adapter_config.json` and
  `adapter_model.safetensors`, for `PeftModel.from_pretrained`.
kohya names map to module paths through the model (`--model`) or the family's real architecture.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from peft import LoraConfig

from stylelora.adapters.state import Adapter, LoraModule, read_tensors
from stylelora.errors import UserError
from stylelora.export.atomic import atomic_dir, save_tensors
from stylelora.export.names import Target, family_targets
from stylelora.families.base import ModelFamily

DIFFUSERS_METADATA = "lora_adapter_metadata"
PEFT_PARTS = {".lora_A.weight": "down", ".lora_B.weight": "up"}


def by_component(
    adapter: Adapter, family: ModelFamily, path: str
) -> dict[str, dict[str, LoraModule]]:
    """The adapter's modules grouped by pipeline component, keyed by module path."""
    if adapter.is_dora:
        raise UserError(
            f"{path}: DoRA's per-input dora_scale has no diffusers or PEFT equivalent "
            "(both keep per-output magnitudes); keep it in kohya's format"
        )
    targets: dict[str, Target] = family_targets(family)
    grouped: dict[str, dict[str, LoraModule]] = {}
    for name, module in adapter.modules.items():
        if name not in targets:
            raise UserError(f"{path}: module {name} is not in a {family.name} model")
        target = targets[name]
        grouped.setdefault(target.component, {})[target.path] = module
    return grouped


def lora_config_dict(modules: dict[str, LoraModule]) -> dict:
    """PEFT LoraConfig keywords: the commonest rank and alpha, patterns for the others."""
    rank = Counter(m.rank for m in modules.values()).most_common(1)[0][0]
    alpha = Counter(m.alpha for m in modules.values()).most_common(1)[0][0]
    return {
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": sorted(modules),
        "rank_pattern": {p: m.rank for p, m in modules.items() if m.rank != rank},
        "alpha_pattern": {p: m.alpha for p, m in modules.items() if m.alpha != alpha},
    }


def write_diffusers(out: Path, adapter: Adapter, family: ModelFamily, source: str) -> Path:
    """One safetensors file in diffusers' layout; kohya's metadata kept beside the config."""
    tensors, configs = {}, {}
    for component, modules in by_component(adapter, family, source).items():
        for path, module in modules.items():
            tensors[f"{component}.{path}.lora_A.weight"] = module.down.contiguous()
            tensors[f"{component}.{path}.lora_B.weight"] = module.up.contiguous()
        config = lora_config_dict(modules)
        configs.update({f"{component}.{key}": value for key, value in config.items()})
    header = {**adapter.metadata, "format": "pt", DIFFUSERS_METADATA: json.dumps(configs)}
    return save_tensors(tensors, out, header)


def write_peft(out: Path, adapter: Adapter, family: ModelFamily, source: str) -> Path:
    """A folder of PEFT adapter folders, one per component, written atomically."""
    grouped = by_component(adapter, family, source)
    with atomic_dir(out) as tmp:
        for component, modules in grouped.items():
            LoraConfig(**lora_config_dict(modules)).save_pretrained(tmp / component)
            tensors = {}
            for path, module in modules.items():
                tensors[f"base_model.model.{path}.lora_A.weight"] = module.down.contiguous()
                tensors[f"base_model.model.{path}.lora_B.weight"] = module.up.contiguous()
            save_tensors(tensors, tmp / component / "adapter_model.safetensors", adapter.metadata)
    return out


def pattern_value(config: dict, key: str, pattern: str, path: str, default):
    for name, value in config.get(pattern, {}).items():
        if path == name or path.endswith("." + name):
            return value
    return config.get(key, default)


def read_diffusers(path: str | Path, family: ModelFamily) -> Adapter:
    """A diffusers-layout file (`unet.<path>.lora_A.weight`) as kohya-named modules."""
    tensors, metadata = read_tensors(path)
    configs = json.loads(metadata.get(DIFFUSERS_METADATA, "{}"))
    prefixes = {"unet": "lora_unet", **{a: p for p, a in family.text_encoder_attrs.items()}}
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        suffix = next((s for s in PEFT_PARTS if key.endswith(s)), None)
        component, _, module_path = key.removesuffix(suffix or "").partition(".")
        if suffix is None or component not in prefixes:
            raise UserError(f"{path}: {key} is not a diffusers LoRA tensor of a {family.name}")
        parts.setdefault((component, module_path), {})[PEFT_PARTS[suffix]] = value.float()
    modules = {}
    for (component, module_path), pair in parts.items():
        if len(pair) != 2:
            raise UserError(f"{path}: {component}.{module_path} lacks lora_A or lora_B")
        config = {k.partition(".")[2]: v for k, v in configs.items() if k.startswith(component)}
        rank = pair["down"].shape[0]
        alpha = pattern_value(config, "lora_alpha", "alpha_pattern", module_path, rank)
        name = family.kohya_name(prefixes[component], module_path)
        modules[name] = LoraModule(pair["down"], pair["up"], float(alpha))
    kept = {k: v for k, v in metadata.items() if k not in (DIFFUSERS_METADATA, "format")}
    return Adapter(modules, {**family.metadata(), **kept})
