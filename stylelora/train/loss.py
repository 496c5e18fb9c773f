"""The denoising loss: noise the latents, ask the UNet, compare with the family's target."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

from stylelora.families.base import Generators, ModelFamily


@dataclass
class NoisedBatch:
    """Everything random about one step, drawn up front so it can be fixed for evaluation."""

    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor


def draw_noise(
    family: ModelFamily,
    scheduler: DDPMScheduler,
    pixels: torch.Tensor | dict[str, Any],
    generator: Generators,
) -> NoisedBatch:
    """Encode `pixels` (or a batch: its pixels or cached posterior), then draw noise and
    timesteps from `generator`: one CPU generator for the batch, or one per sample, which makes
    each sample's draw independent of how a global batch is split between processes."""
    with torch.no_grad():
        latents = batch_latents(family, pixels, generator).float()
    noise = randn_tensor(latents.shape, generator=generator, dtype=torch.float32).to(latents)
    steps = scheduler.config.num_train_timesteps
    if isinstance(generator, list):
        timesteps = torch.cat([torch.randint(0, steps, (1,), generator=g) for g in generator])
    else:
        timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator)
    return NoisedBatch(latents, noise, timesteps.to(latents.device))


def batch_latents(
    family: ModelFamily, pixels: torch.Tensor | dict[str, Any], generator: Generators
) -> torch.Tensor:
    if isinstance(pixels, torch.Tensor):
        return family.encode_images(pixels, generator)
    if "latent_mean" in pixels:
        return family.sample_latents(pixels["latent_mean"], pixels["latent_std"], generator)
    return family.encode_images(pixels["pixel_values"], generator)


def denoising_loss(
    family: ModelFamily,
    unet: torch.nn.Module,
    scheduler: DDPMScheduler,
    noised: NoisedBatch,
    batch: dict[str, Any],
) -> torch.Tensor:
    """Mean squared error between the UNet's prediction and the family's target."""
    noisy = scheduler.add_noise(noised.latents, noised.noise, noised.timesteps)
    text = batch["text"] if "text" in batch else family.encode_prompts(batch["captions"])
    unet_dtype = next(unet.parameters()).dtype
    prediction = unet(
        noisy.to(unet_dtype), noised.timesteps, **family.unet_inputs(text, batch)
    ).sample
    target = prediction_target(scheduler, family.prediction_type, noised)
    return F.mse_loss(prediction.float(), target.float())


def prediction_target(
    scheduler: DDPMScheduler, prediction_type: str, noised: NoisedBatch
) -> torch.Tensor:
    if prediction_type == "epsilon":
        return noised.noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(noised.latents, noised.noise, noised.timesteps)
    raise ValueError(f"unsupported prediction type {prediction_type!r}")
