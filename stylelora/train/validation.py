"""Loss on a fixed set of (image, timestep, noise) triples: comparable across steps and runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDPMScheduler

from stylelora.data.dataset import collate, derived_generator
from stylelora.families.base import ModelFamily
from stylelora.train.loss import NoisedBatch, denoising_loss, draw_noise


@dataclass
class FixedSet:
    batches: list[tuple[NoisedBatch, dict[str, Any]]]


def fixed_set(
    family: ModelFamily,
    scheduler: DDPMScheduler,
    items: list[dict[str, Any]],
    seed: int,
    batch_size: int = 4,
) -> FixedSet:
    """Encode `items` (dataset items) once and draw their noise and timesteps from `seed`."""
    batches = []
    for start in range(0, len(items), batch_size):
        batch = collate(items[start : start + batch_size])
        generator = derived_generator(seed, start)
        pixels = batch["pixel_values"].to(family.unet.device)
        batches.append((draw_noise(family, scheduler, pixels, generator), batch))
    return FixedSet(batches)


@torch.no_grad()
def validation_loss(
    family: ModelFamily, unet: torch.nn.Module, scheduler: DDPMScheduler, fixed: FixedSet
) -> float:
    """Mean denoising loss over the fixed set, weighted by batch size."""
    total, count = 0.0, 0
    for noised, batch in fixed.batches:
        size = noised.latents.shape[0]
        total += denoising_loss(family, unet, scheduler, noised, batch).item() * size
        count += size
    return total / count
