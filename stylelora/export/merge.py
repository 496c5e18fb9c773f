"""Merge adapters into a base model at given strengths; write a diffusers folder or a single file.

Plain LoRA and LoCon files, ours or third-party (sgm- or diffusers-named SDXL, text encoders), go
through diffusers: `load_lora_weights`, `fuse_lora(lora_scale=s)`, `unload_lora_weights`. DoRA
files, whose `dora_scale` diffusers drops, are added by export/apply.py with the UIs' formula.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from stylelora.adapters.state import read_adapter
from stylelora.errors import UserError
from stylelora.export.atomic import atomic_dir
from stylelora.export.single_file import save_single_file
from stylelora.families.base import ModelFamily
from stylelora.sample.adapter import attach_adapter

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def parse_weighted(text: str) -> tuple[Path, float]:
    """`FILE` or `FILE:STRENGTH` (a path that exists as written wins over the split)."""
    if Path(text).exists() or ":" not in text:
        return Path(text), 1.0
    path, _, strength = text.rpartition(":")
    try:
        value = float(strength)
    except ValueError:
        raise UserError(
            f"{text}: strength {strength!r} is not a number (write FILE.safetensors:0.8)"
        ) from None
    if not math.isfinite(value):
        raise UserError(f"{text}: strength must be a finite number")
    return Path(path), value


def apply_weighted(family: ModelFamily, path: Path, strength: float, index: int = 0) -> None:
    """Add one adapter file into the family's weights at `strength`."""
    adapter = read_adapter(path)  # names what is wrong with a damaged file before any change
    name = f"merge_{index}"
    if attach_adapter(family, path, strength, name, adapter):
        family.pipe.fuse_lora(lora_scale=strength, adapter_names=[name])
        family.pipe.unload_lora_weights()


def merge_adapters(family: ModelFamily, adapters: list[tuple[Path, float]]) -> None:
    for index, (path, strength) in enumerate(adapters):
        apply_weighted(family, path, strength, index)


def save_merged(family: ModelFamily, out: Path, dtype: str, metadata: dict[str, str]) -> Path:
    """A `.safetensors` single file (AUTOMATIC1111 layout), or else a diffusers folder."""
    if out.suffix == ".ckpt":
        raise UserError(f"{out}: write .safetensors (a single file) or a folder, not .ckpt")
    if out.suffix == ".safetensors":
        return save_single_file(out, family, DTYPES[dtype], metadata)
    family.pipe.to(dtype=DTYPES[dtype])
    with atomic_dir(out) as tmp:
        family.pipe.save_pretrained(tmp, safe_serialization=True)
    return out
