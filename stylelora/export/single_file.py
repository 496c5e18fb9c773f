"""Write a pipeline as one `.safetensors` checkpoint in its family's single-file layout (what UIs
load): AUTOMATIC1111's for SD1.x, SD2.x and SDXL, BFL's transformer file for Flux.1."""

from __future__ import annotations

from pathlib import Path

import torch

from stylelora.export.atomic import save_tensors
from stylelora.families.base import ModelFamily


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
        for key, value in family.single_file_state().items()
    }
    return save_tensors(tensors, path, metadata)
