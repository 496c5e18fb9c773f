"""The user-facing adapter file: safetensors in the layout the UIs read for the family (kohya's,
or ComfyUI's for the newer transformers), with kohya's metadata keys."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import torch
from safetensors.torch import save

from stylelora.adapters.kohya import peft_to_kohya
from stylelora.adapters.state import file_layout
from stylelora.export.atomic import save_tensors
from stylelora.families.base import ModelFamily


def kohya_state_dict(
    family: ModelFamily, adapted: dict[str, torch.nn.Module]
) -> dict[str, torch.Tensor]:
    """Every adapter of every adapted component, under the names of the family's files (with
    kohya's suffixes, as an Adapter holds them in memory)."""
    tensors: dict[str, torch.Tensor] = {}
    for prefix, module in adapted.items():
        tensors.update(peft_to_kohya(module, prefix, family.file_module))
    return tensors


def file_hashes(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """`sshs_model_hash` and `sshs_legacy_hash`, as kohya and the AddNet extension compute them.

    The model hash covers the bytes after the safetensors header, so it does not depend on the
    metadata; the legacy hash is of 64 KiB at offset 1 MiB of the file written without metadata.
    """
    data = save(tensors)
    (header_len,) = struct.unpack("<Q", data[:8])
    model_hash = hashlib.sha256(data[8 + header_len :]).hexdigest()
    legacy_hash = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    return {"sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash}


def save_lora_file(
    path: str | Path,
    family: ModelFamily,
    adapted: dict[str, torch.nn.Module],
    metadata: dict[str, str],
) -> Path:
    """Write the adapters of `adapted` in the family's UI layout, atomically."""
    return write_lora_tensors(
        path, kohya_state_dict(family, adapted), {**metadata, **family.metadata()}
    )


def write_lora_tensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> Path:
    """Write adapter tensors (kohya's suffixes) in their file layout, with `metadata` and fresh
    `sshs_*` hashes, atomically."""
    tensors = file_layout(tensors)
    header = {**metadata, **file_hashes(tensors)}
    bad = [key for key, value in header.items() if not isinstance(value, str)]
    if bad:
        raise TypeError(f"metadata values must be strings: {bad}")
    return save_tensors(tensors, path, header)


def network_metadata(rank: int, alpha: float, args: dict, algo: str = "lora") -> dict[str, str]:
    """The keys kohya keeps even with --no_metadata; LoHa and LoKr are LyCORIS's network."""
    return {
        "ss_network_module": "networks.lora" if algo == "lora" else "lycoris.kohya",
        "ss_network_dim": str(rank),
        "ss_network_alpha": format_number(alpha),
        "ss_network_args": json.dumps(args),
    }


def format_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
