"""Describe an adapter file: family, format, ranks, alphas, modules, metadata, size; and what is
broken in a damaged one (truncation, unpaired or mismatched up/down, NaN, a hash that disagrees).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from stylelora.adapters.state import (
    Adapter,
    Module,
    convert_command,
    modules_from_tensors,
    read_tensors,
)
from stylelora.errors import UserError
from stylelora.export.convert import UI_FORMATS, adapter_format, diffusers_parts
from stylelora.export.lora_file import file_hashes
from stylelora.export.names import diffusers_family, file_family
from stylelora.families.registry import adapter_prefixes

KINDS = (
    ("attn1", "self-attention"),
    ("attn2", "cross-attention"),
    ("self_attn", "self-attention"),
    ("_ff_", "feed-forward"),
    ("mlp", "feed-forward"),
    ("proj_", "proj in/out"),
    ("_attn_qkv", "q/k/v (fused)"),
    ("_attn_proj", "attention out"),
    ("_linear1", "q/k/v + MLP in (fused)"),
    ("_linear2", "attention + MLP out"),
    ("_mod_lin", "modulation"),
    ("_modulation_lin", "modulation"),
)
SHOWN_METADATA = (
    "ss_output_name",
    "ss_base_model_version",
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_args",
    "ss_steps",
    "ss_sd_model_name",
    "stylelora_resized",
    "stylelora_combined",
)


# A LoHa or LoKr file flattens a convolution's kernel into its inputs; its name tells it.
RESNET_CONV = re.compile(r"_(resnets_\d+_conv[12]|(down|up)samplers_0_conv)$")


def kind(name: str, module: Module) -> str:
    spatial = module.algo == "lora" and module.down.dim() == 4 and module.down.shape[-1] > 1
    if spatial or (module.algo != "lora" and RESNET_CONV.search(name)):
        return "3x3 conv (LoCon)"
    return next((label for key, label in KINDS if key in name), "resnet / other")


def counted(values, none: str = "full") -> str:
    """`value (count)` pairs; None counts as `none` (a LoKr of two full matrices has no rank)."""
    named = Counter(none if v is None else f"{v:g}" for v in values)
    return ", ".join(f"{v} ({n})" for v, n in sorted(named.items()))


def component(name: str) -> str:
    """The component a module's name puts it in: its prefix (`lora_te1`, `diffusion_model`)."""
    prefix = next((p for p in adapter_prefixes() if name.startswith(p)), name)
    return prefix.rstrip("_.")


def describe(path: Path, adapter: Adapter, fmt: str) -> list[str]:
    modules = adapter.modules
    components = Counter(component(name) for name in modules)
    lines = [
        f"file: {path} ({path.stat().st_size / 2**20:.2f} MiB)",
        f"format: {fmt}"
        + (" + DoRA (dora_scale)" if adapter.is_dora else "")
        + (f" (LyCORIS {adapter.algo})" if adapter.algo != "lora" else ""),
        f"family: {file_family(adapter).name}"
        + ("" if "ss_base_model_version" in adapter.metadata else " (told from names/shapes)"),
        f"modules: {len(modules)} ("
        + ", ".join(f"{c}: {n}" for c, n in sorted(components.items()))
        + ")",
        "kinds: "
        + ", ".join(
            f"{k}: {n}" for k, n in Counter(kind(n, m) for n, m in modules.items()).items()
        ),
        f"ranks: {counted(m.rank for m in modules.values())}",
        f"alphas: {counted((m.alpha for m in modules.values()), none='none (scale 1)')}",
    ]
    lines += [
        f"{key}: {adapter.metadata[key]}" for key in SHOWN_METADATA if key in adapter.metadata
    ]
    others = len(adapter.metadata) - sum(k in adapter.metadata for k in SHOWN_METADATA)
    return lines + [f"other metadata keys: {others}"]


def hash_problem(tensors, metadata) -> list[str]:
    stored = metadata.get("sshs_model_hash")
    if stored and file_hashes(tensors)["sshs_model_hash"] != stored:
        return ["sshs_model_hash does not match the tensors (changed or damaged after writing)"]
    return []


def other_layout(path: Path, fmt: str) -> list[str]:
    """A diffusers or PEFT layout: what it holds and the command that converts it to the
    layout the UIs read."""
    tensors, metadata, configs = diffusers_parts(path, fmt)
    components = Counter(key.partition(".")[0] for key in tensors)
    family = diffusers_family(tensors, metadata)
    return [
        f"file: {path}",
        f"format: {fmt}",
        f"family: {family.name}"
        + ("" if "ss_base_model_version" in metadata else " (told from names/shapes)"),
        "tensors: " + ", ".join(f"{c}: {n}" for c, n in sorted(components.items())),
        f"ranks: {counted(v.shape[0] for k, v in tensors.items() if k.endswith('lora_A.weight'))}",
        f"config keys: {len(configs)}",
        f"UIs read {family.native_format}'s layout; convert with: "
        + convert_command(path, family.native_format),
    ]


def inspect_file(path: str | Path) -> list[str]:
    """Report lines; a damaged file raises a UserError naming the problems."""
    path = Path(path)
    fmt = adapter_format(path)
    if fmt in ("diffusers", "peft"):
        return other_layout(path, fmt)
    tensors, metadata = read_tensors(path)
    if fmt not in UI_FORMATS:
        keys = sorted(tensors)[:3]
        return [
            f"file: {path}",
            "format: unknown (no kohya, ComfyUI, diffusers or PEFT LoRA keys)",
            f"tensors: {len(tensors)}, e.g. {keys}",
        ]
    modules, problems = modules_from_tensors(tensors)
    if problems:
        listed = "; ".join(problems[:5]) + (
            f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        )
        raise UserError(f"{path}: damaged: {listed}")
    warnings = [f"warning: {w}" for w in hash_problem(tensors, metadata)]
    return describe(path, Adapter(modules, metadata), fmt) + warnings
