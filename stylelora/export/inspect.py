"""Describe an adapter file: family, format, ranks, alphas, modules, metadata, size; and what is
broken in a damaged one (truncation, unpaired or mismatched up/down, NaN, a hash that disagrees).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from stylelora.adapters.state import (
    KOHYA_PREFIXES,
    Adapter,
    modules_from_tensors,
    read_tensors,
)
from stylelora.errors import UserError
from stylelora.export.lora_file import file_hashes
from stylelora.export.names import file_skeleton

KINDS = (
    ("attn1", "self-attention"),
    ("attn2", "cross-attention"),
    ("self_attn", "self-attention"),
    ("_ff_", "feed-forward"),
    ("mlp", "feed-forward"),
    ("proj_", "proj in/out"),
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


def file_format(keys: list[str]) -> str:
    if any(k.startswith(KOHYA_PREFIXES) for k in keys):
        return "kohya"
    if any(k.endswith(".lora_A.weight") for k in keys):
        return "diffusers"
    return "unknown"


def kind(name: str, module) -> str:
    if module.down.dim() == 4 and module.down.shape[-1] > 1:
        return "3x3 conv (LoCon)"
    return next((label for key, label in KINDS if key in name), "resnet / other")


def counted(values) -> str:
    return ", ".join(f"{v:g} ({n})" for v, n in sorted(Counter(values).items()))


def describe(path: Path, adapter: Adapter, fmt: str) -> list[str]:
    modules = adapter.modules
    components = Counter("_".join(name.split("_")[:2]) for name in modules)
    lines = [
        f"file: {path} ({path.stat().st_size / 2**20:.2f} MiB)",
        f"format: {fmt}" + (" + DoRA (dora_scale)" if adapter.is_dora else ""),
        f"family: {file_skeleton(adapter)}"
        + ("" if "ss_base_model_version" in adapter.metadata else " (told from names/shapes)"),
        f"modules: {len(modules)} ("
        + ", ".join(f"{c}: {n}" for c, n in sorted(components.items()))
        + ")",
        "kinds: "
        + ", ".join(
            f"{k}: {n}" for k, n in Counter(kind(n, m) for n, m in modules.items()).items()
        ),
        f"ranks: {counted(m.rank for m in modules.values())}",
        f"alphas: {counted(m.alpha for m in modules.values())}",
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


def inspect_file(path: str | Path) -> list[str]:
    """Report lines; a damaged file raises a UserError naming the problems."""
    path = Path(path)
    tensors, metadata = read_tensors(path)
    fmt = file_format(list(tensors))
    if fmt != "kohya":
        keys = sorted(tensors)[:3]
        meta = json.loads(metadata.get("lora_adapter_metadata", "{}"))
        return [
            f"file: {path}",
            f"format: {fmt}",
            f"tensors: {len(tensors)}, e.g. {keys}",
            f"diffusers config keys: {len(meta)}; convert with `stylelora export --format kohya`",
        ]
    modules, problems = modules_from_tensors(tensors)
    if problems:
        listed = "; ".join(problems[:5]) + (
            f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        )
        raise UserError(f"{path}: damaged: {listed}")
    warnings = [f"warning: {w}" for w in hash_problem(tensors, metadata)]
    return describe(path, Adapter(modules, metadata), fmt) + warnings
