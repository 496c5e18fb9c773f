"""Write a pipeline as one AUTOMATIC1111-layout `.safetensors` checkpoint (what UIs load)."""

from __future__ import annotations

from pathlib import Path

import torch

from stylelora.export.atomic import save_tensors
from stylelora.families.base import ModelFamily
from stylelora.families.ldm import TEXT_ENCODER_LAYOUTS, unet_state, vae_state


def single_file_state(family: ModelFamily) -> dict[str, torch.Tensor]:
    """Every weight of the family's pipeline under its AUTOMATIC1111 checkpoint name."""
    tensors = {f"model.diffusion_model.{k}": v for k, v in unet_state(family.unet).items()}
    tensors.update({f"first_stage_model.{k}": v for k, v in vae_state(family.vae).items()})
    for attr, (prefix, layout) in family.single_file_text_encoders.items():
        state = TEXT_ENCODER_LAYOUTS[layout](getattr(family.pipe, attr))
        tensors.update({prefix + k: v for k, v in state.items()})
    return tensors


def save_single_file(
    path: Path,
    family: ModelFamily,
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write the checkpoint atomically, in `dtype` (default: as loaded)."""
    tensors = {
        key: (value.to(dtype) if dtype and value.is_floating_point() else value)
        .detach()
        .cpu()
        .contiguous()
        for key, value in single_file_state(family).items()
    }
    return save_tensors(tensors, path, metadata)
