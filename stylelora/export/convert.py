"""Convert adapters between the UI layouts, diffusers' (`save_lora_weights`) and PEFT folders.

- kohya: `lora_unet_*` / `lora_te*_` keys, `.lora_down/.lora_up/.alpha` (what the UIs read for
  SD1.x, SD2.x, SDXL and Flux.1).
- comfyui: `diffusion_model.<module>.lora_A/.lora_B` (what ComfyUI reads for the newer
  transformers, and their trainers write).
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

from stylelora.adapters.kohya import fuse
from stylelora.adapters.state import (
    Adapter,
    LoraModule,
    checked_adapter,
    read_header,
    read_tensors,
)
from stylelora.errors import UserError
from stylelora.export.atomic import atomic_dir, save_tensors
from stylelora.export.names import Target, family_targets
from stylelora.families.base import DENOISER, ModelFamily
from stylelora.families.registry import FAMILIES, adapter_components

DIFFUSERS_METADATA = "lora_adapter_metadata"
PEFT_PARTS = {".lora_A.weight": "lora_down", ".lora_B.weight": "lora_up"}
PEFT_PREFIX = "base_model.model."
PEFT_FILE = "adapter_model.safetensors"
CONFIG_KEYS = ("r", "lora_alpha", "rank_pattern", "alpha_pattern")


def by_component(
    adapter: Adapter, family: ModelFamily, path: str
) -> dict[str, dict[str, LoraModule]]:
    """The adapter's modules grouped by pipeline component, keyed by module path."""
    if adapter.algo != "lora":
        raise UserError(
            f"{path}: a {adapter.algo} (LyCORIS) file has no diffusers or PEFT LoRA layout "
            "(diffusers does not read LoHa or LoKr); keep it in kohya's (LyCORIS's) format"
        )
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
        component = grouped.setdefault(target.component, {})
        component.update(split_fused(module, target))
    return grouped


def split_fused(module: LoraModule, target: Target) -> dict[str, LoraModule]:
    """A kohya module per diffusers module: a fused one (Flux's qkv) gives each member its rows
    of `up` and the whole `down`, which is exact whatever the ranks inside (as diffusers' own
    converter splits it)."""
    if len(target.member_paths) == 1:
        return {target.path: module}
    rows = [member.weight.shape[0] for member in target.members]
    if sum(rows) != module.up.shape[0]:
        raise UserError(
            f"{target.path}: the adapter's fused module has {module.up.shape[0]} output rows, "
            f"the model's {sum(rows)}: pass --model with the base it was trained on"
        )
    ups = module.up.split(rows)
    return {
        path: LoraModule(module.down.clone(), up, module.alpha)
        for path, up in zip(target.member_paths, ups, strict=True)
    }


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
                tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = module.down.contiguous()
                tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = module.up.contiguous()
            save_tensors(tensors, tmp / component / PEFT_FILE, adapter.metadata)
    return out


def pattern_value(config: dict, key: str, pattern: str, path: str, default):
    for name, value in config.get(pattern, {}).items():
        if path == name or path.endswith("." + name):
            return value
    return config.get(key, default)


UI_FORMATS = ("kohya", "comfyui")


def file_format(keys: list[str]) -> str:
    """A UI layout (kohya, comfyui), diffusers (`unet.<path>.lora_A.weight`) or peft
    (`base_model.model.<path>...`)."""
    for family in FAMILIES:
        if any(k.startswith(family.file_prefixes()) for k in keys):
            return family.native_format
    if any(k.startswith(PEFT_PREFIX) for k in keys):
        return "peft"
    if any(k.endswith(".lora_A.weight") for k in keys):
        return "diffusers"
    return "unknown"


def adapter_format(path: Path) -> str:
    """The layout of an adapter file, or `peft` for a folder (what `--format peft` writes)."""
    return "peft" if Path(path).is_dir() else file_format(read_header(path)[0])


def peft_components(path: Path) -> dict[str, Path]:
    """Component -> PEFT adapter file, for a folder of component folders (what `export --format
    peft` writes), one component's folder, or its `adapter_model.safetensors`."""
    path = Path(path)
    if path.is_dir() and not (path / PEFT_FILE).is_file():
        components = adapter_components()
        found = {c: path / c / PEFT_FILE for c in components if (path / c / PEFT_FILE).is_file()}
        if not found:
            raise UserError(f"{path}: no component folder (unet/, text_encoder/) with {PEFT_FILE}")
    else:
        file = path / PEFT_FILE if path.is_dir() else path
        found = {file.parent.resolve().name: file}
    for component, file in found.items():
        if component not in adapter_components():
            raise UserError(
                f"{file}: a PEFT adapter file must be in a folder named for what it adapts "
                f"({', '.join(adapter_components())}), as `stylelora export --format peft` "
                "writes it"
            )
    return found


def peft_config(file: Path) -> dict:
    config_file = file.with_name("adapter_config.json")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(
            f"{config_file}: unreadable ({exc}); a PEFT adapter file needs its adapter_config.json "
            "(rank and alpha) beside it"
        ) from None
    if not isinstance(config, dict):
        raise UserError(f"{config_file}: not a PEFT adapter config (not a JSON object)")
    return config


def peft_as_diffusers(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], dict]:
    """A PEFT folder or file as a diffusers-layout file's tensors, metadata and configs."""
    tensors, metadata, configs = {}, {}, {}
    for component, file in peft_components(path).items():
        part, part_metadata = read_tensors(file)
        for key, value in part.items():
            if not key.startswith(PEFT_PREFIX):
                raise UserError(f"{file}: {key} is not a PEFT LoRA tensor ({PEFT_PREFIX}...)")
            tensors[f"{component}.{key.removeprefix(PEFT_PREFIX)}"] = value
        config = peft_config(file)
        configs.update({f"{component}.{k}": config[k] for k in CONFIG_KEYS if k in config})
        metadata.update(part_metadata)
    return tensors, metadata, configs


def diffusers_parts(path: Path, fmt: str) -> tuple[dict[str, torch.Tensor], dict[str, str], dict]:
    """Tensors, metadata and per-component LoRA configs of a diffusers file or a PEFT layout."""
    if fmt == "peft":
        return peft_as_diffusers(path)
    tensors, metadata = read_tensors(path)
    try:
        configs = json.loads(metadata.get(DIFFUSERS_METADATA, "{}"))
    except ValueError:
        configs = None
    if not isinstance(configs, dict):
        raise UserError(f"{path}: its {DIFFUSERS_METADATA} header is not a JSON object")
    return tensors, metadata, configs


Pairs = dict[tuple[str, str], dict[str, torch.Tensor]]  # (component, path) -> lora_down/up


def diffusers_adapter(
    parts: tuple[dict[str, torch.Tensor], dict[str, str], dict], family: ModelFamily, path: Path
) -> Adapter:
    """Diffusers-layout tensors (`unet.<path>.lora_A.weight`) as kohya-named, checked modules.

    Where kohya's module fuses several (Flux's qkv and linear1), their adapters are fused as the
    exporter fuses them (adapters/kohya.py): each member's alpha/rank folded into its up, zero
    rows for a member the file does not adapt, alpha = the fused rank.
    """
    tensors, metadata, configs = parts
    prefixes = {
        family.denoiser_attr: DENOISER,
        **{a: p for p, a in family.text_encoder_attrs.items()},
    }
    pairs = diffusers_pairs(tensors, prefixes, family, path)
    alphas = {
        key: pair_alpha(configs, key, pair["lora_down"].shape[0]) for key, pair in pairs.items()
    }
    targets: dict[str, Target] | None = None  # the model's modules, read only when fusing
    kohya: dict[str, torch.Tensor] = {}
    for name, (component, members) in kohya_groups(pairs, prefixes, family, path).items():
        if len(members) == 1:
            pair, alpha = pairs[component, members[0]], alphas[component, members[0]]
            kohya.update(LoraModule(pair["lora_down"], pair["lora_up"], alpha).tensors(name))
            continue
        targets = targets or family_targets(family)
        widths = member_widths(targets, name, component, pairs, family, path)
        adapted = {m: pairs[component, m] for m in members if (component, m) in pairs}
        member_alphas = {m: alphas[component, m] for m in adapted}
        kohya.update(fuse(name, members, adapted, member_alphas, widths))
    kept = {k: v for k, v in metadata.items() if k not in (DIFFUSERS_METADATA, "format")}
    return checked_adapter(path, kohya, {**family.metadata(), **kept})


def diffusers_pairs(
    tensors: dict[str, torch.Tensor], prefixes: dict[str, str], family: ModelFamily, path: Path
) -> Pairs:
    """Each adapted module's lora_A and lora_B, as kohya's lora_down and lora_up."""
    pairs: Pairs = {}
    for key, value in tensors.items():
        suffix = next((s for s in PEFT_PARTS if key.endswith(s)), None)
        component, _, module_path = key.removesuffix(suffix or "").partition(".")
        if suffix is None or component not in prefixes:
            raise UserError(f"{path}: {key} is not a diffusers LoRA tensor of a {family.name}")
        pairs.setdefault((component, module_path), {})[PEFT_PARTS[suffix]] = value.float()
    for (component, module_path), pair in pairs.items():
        if len(pair) != 2:
            raise UserError(f"{path}: {component}.{module_path} lacks lora_A or lora_B")
    return pairs


def pair_alpha(configs: dict, key: tuple[str, str], rank: int) -> float:
    """A module's lora_alpha from its component's LoraConfig; rank when the file has none."""
    component, module_path = key
    config = {k.partition(".")[2]: v for k, v in configs.items() if k.startswith(component + ".")}
    return float(pattern_value(config, "lora_alpha", "alpha_pattern", module_path, rank))


def kohya_groups(
    pairs: Pairs, prefixes: dict[str, str], family: ModelFamily, path: Path
) -> dict[str, tuple[str, tuple[str, ...]]]:
    """kohya name -> (component, every module path fused into it, in output order)."""
    groups = {}
    for component, module_path in pairs:
        try:
            name, members = family.file_module(prefixes[component], module_path)
        except ValueError:
            raise UserError(
                f"{path}: {component}.{module_path} is not a module the {family.title} "
                "layout names (an adapter for another model?)"
            ) from None
        groups[name] = (component, members)
    return groups


def member_widths(
    targets: dict[str, Target],
    name: str,
    component: str,
    pairs: Pairs,
    family: ModelFamily,
    path: Path,
) -> dict[str, int]:
    """The output width of each module fused into `name`, the adapted ones checked against
    the model (a member the file leaves out gets that many zero rows)."""
    target = targets.get(name)
    if target is None:
        raise UserError(f"{path}: module {name} is not in a {family.name} model")
    widths = {}
    for member_path, layer in zip(target.member_paths, target.members, strict=True):
        widths[member_path] = layer.weight.shape[0]
        pair = pairs.get((component, member_path))
        shape = (layer.weight.shape[0], layer.weight.shape[1])
        if pair and (pair["lora_up"].shape[0], pair["lora_down"].shape[1]) != shape:
            found = (pair["lora_up"].shape[0], pair["lora_down"].shape[1])
            raise UserError(
                f"{path}: {component}.{member_path} adapts a {found} weight, the model's is "
                f"{shape}: pass --model with the base it was trained on"
            )
    return widths


def read_diffusers(path: str | Path, family: ModelFamily) -> Adapter:
    """A diffusers-layout file, a PEFT folder or a PEFT file, as kohya-named modules."""
    return diffusers_adapter(diffusers_parts(Path(path), adapter_format(path)), family, path)
