"""Loss on a fixed set of (image, timestep, noise) triples: comparable across steps and runs.

The held-out images come from `validation.dir` or a `validation.split` of the training folder
chosen by `validation.seed`, not the training seed; each is noised once per timestep of
`validation.timesteps` with noise from `validation.seed`. Two runs with the same held-out images
and validation settings so measure the same thing, whatever else differs between them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from stylelora.config import Config
from stylelora.data.dataset import DataOptions, ImageCaptionDataset, collate, derived_generator
from stylelora.data.report import scan_dataset
from stylelora.data.scan import ImageRecord
from stylelora.errors import UserError
from stylelora.families.base import ModelFamily
from stylelora.families.objective import NoisedBatch, Objective
from stylelora.train.loss import denoising_loss, draw_noise


@dataclass
class FixedSet:
    batches: list[tuple[NoisedBatch, dict[str, Any]]]


def fixed_set(
    family: ModelFamily,
    objective: Objective,
    items: list[dict[str, Any]],
    seed: int,
    batch_size: int = 4,
) -> FixedSet:
    """Encode `items` (dataset items) once and draw their noise and timesteps from `seed`."""
    batches = []
    for start in range(0, len(items), batch_size):
        batch = collate(items[start : start + batch_size])
        generator = derived_generator(seed, start)
        pixels = batch["pixel_values"].to(family.vae.device)
        batches.append((draw_noise(family, objective, pixels, generator), batch))
    return FixedSet(batches)


def fixed_timestep_set(
    family: ModelFamily,
    objective: Objective,
    items: list[dict[str, Any]],
    timesteps: list[int],
    seed: int,
    batch_size: int = 4,
) -> FixedSet:
    """Every item at every one of `timesteps`, with noise drawn from `seed`."""
    total = objective.num_timesteps
    if any(t >= total for t in timesteps):
        raise UserError(f"validation.timesteps: each must be below {total} (got {timesteps})")
    batches = []
    for start in range(0, len(items), batch_size):
        batch = collate(items[start : start + batch_size])
        pixels = batch["pixel_values"].to(family.vae.device)
        with torch.no_grad():
            base = draw_noise(family, objective, pixels, derived_generator(seed, start))
        for t in timesteps:
            noise = torch.randn(base.latents.shape, generator=derived_generator(seed, start, t))
            steps = torch.full((len(pixels),), t, dtype=torch.long, device=pixels.device)
            batches.append((NoisedBatch(base.latents, noise.to(base.latents), steps), batch))
    return FixedSet(batches)


def split_records(
    records: list[ImageRecord], cfg: Config
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(training records, held-out records) as `[validation]` asks."""
    settings = cfg.validation
    if settings.dir:
        held_out = scan_dataset(
            cfg.data.model_copy(update={"dir": settings.dir}), "validation.dir"
        ).records
        return records, held_out
    if not settings.split:
        return records, []
    count = round(len(records) * settings.split)
    if not 0 < count < len(records):
        raise UserError(
            f"validation.split {settings.split} of {len(records)} images holds out {count}; "
            "it must leave at least one image on each side"
        )
    order = torch.randperm(len(records), generator=derived_generator(settings.seed)).tolist()
    chosen = set(order[:count])
    return (
        [r for i, r in enumerate(records) if i not in chosen],
        [r for i, r in enumerate(records) if i in chosen],
    )


def held_out_items(records: list[ImageRecord], cfg: Config) -> list[dict[str, Any]]:
    """The held-out images at the (largest) training resolution, centre-cropped square,
    unflipped."""
    options = DataOptions(
        resolution=cfg.data.largest_resolution,
        trigger_word=cfg.data.trigger_word,
        alpha_background=cfg.data.alpha_background,
    )
    dataset = ImageCaptionDataset(records, options)
    return [dataset[(index, 0)] for index in range(len(dataset))]


@contextlib.contextmanager
def eval_mode(modules: list[torch.nn.Module]) -> Iterator[None]:
    """Dropout off inside the block; each module's own mode after it."""
    was_training = [module.training for module in modules]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, training in zip(modules, was_training, strict=True):
            module.train(training)


@torch.no_grad()
def validation_loss(
    family: ModelFamily, denoiser: torch.nn.Module, objective: Objective, fixed: FixedSet
) -> float:
    """Mean denoising loss over the fixed set, weighted by batch size, with dropout off."""
    total, count = 0.0, 0
    with eval_mode([denoiser, *family.text_encoders().values()]):
        for noised, batch in fixed.batches:
            size = noised.latents.shape[0]
            total += denoising_loss(family, denoiser, objective, noised, batch).item() * size
            count += size
    return total / count


def validation_set(family: ModelFamily, held_out: list, cfg: Config) -> FixedSet | None:
    """The fixed validation set; captions pre-encoded where the text encoders stay frozen."""
    if not held_out or not cfg.validation.enabled:
        return None
    settings = cfg.validation
    fixed = fixed_timestep_set(
        family,
        family.training_objective(),
        held_out_items(held_out, cfg),
        settings.timesteps,
        settings.seed,
        cfg.train.batch_size,
    )
    if not cfg.adapter.text_encoder:
        with torch.no_grad():
            for _, batch in fixed.batches:
                batch["text"] = family.encode_prompts(batch["captions"])
    return fixed


def held_out_line(held_out: list) -> list[str]:
    return [f"validation: {len(held_out)} held-out image(s)"] if held_out else []
