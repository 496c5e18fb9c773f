"""The denoising loss: noise the latents, ask the UNet, compare with the family's target.

The training loss takes the quality options of `[train]` (noise offset, multi-resolution noise,
a timestep range, Huber loss, min-SNR-gamma weighting); `denoising_loss` stays the plain mean
squared error, so validation losses compare between runs whatever options they trained with.
Options draw their randomness after the base draws and only when on, so turning none on keeps
every earlier run's numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from stylelora.config import TrainConfig
from stylelora.errors import UserError
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
    options: TrainConfig | None = None,
) -> NoisedBatch:
    """Encode `pixels` (or a batch: its pixels or cached posterior), then draw noise and
    timesteps, shaped by the `options` that are on. `generator`: one CPU generator for the batch,
    or one per sample, which makes each sample's draw independent of how a global batch is
    split between processes."""
    with torch.no_grad():
        latents = batch_latents(family, pixels, generator).float()
    if isinstance(generator, list):
        draws = [draw_one(scheduler, (1, *latents.shape[1:]), g, options) for g in generator]
        noise = torch.cat([noise for noise, _ in draws])
        timesteps = torch.cat([timesteps for _, timesteps in draws])
    else:
        noise, timesteps = draw_one(scheduler, latents.shape, generator, options)
    return NoisedBatch(latents, noise.to(latents), timesteps.to(latents.device))


def draw_one(
    scheduler: DDPMScheduler,
    shape: tuple[int, ...],
    generator: torch.Generator,
    options: TrainConfig | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise and timesteps of `shape[0]` images from one generator: base draws first."""
    noise = torch.randn(shape, generator=generator)
    low, high = timestep_range(scheduler, options)
    timesteps = torch.randint(low, high, (shape[0],), generator=generator)
    if options is not None and options.noise_offset:
        noise = offset_noise(noise, options.noise_offset, generator)
    if options is not None and options.multires_noise_iterations:
        noise = multires_noise(
            noise, options.multires_noise_iterations, options.multires_noise_discount, generator
        )
    return noise, timesteps


def timestep_range(scheduler: DDPMScheduler, options: TrainConfig | None) -> tuple[int, int]:
    """[low, high) of the training timesteps."""
    total = scheduler.config.num_train_timesteps
    if options is None:
        return 0, total
    high = options.max_timestep or total
    if high > total:
        raise UserError(
            f"train.max_timestep {high}: the model is trained on {total} timesteps (0 to "
            f"{total - 1}), so max_timestep can be at most {total}"
        )
    if options.min_timestep >= high:
        raise UserError(
            f"train.min_timestep {options.min_timestep}: must be below {high}, the top of the "
            f"timestep range (the model has {total} timesteps)"
        )
    return options.min_timestep, high


def offset_noise(noise: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Add a constant per image and channel, so the model learns to shift the mean brightness."""
    shift = torch.randn((*noise.shape[:2], 1, 1), generator=generator)
    return noise + strength * shift


def multires_noise(
    noise: torch.Tensor, iterations: int, discount: float, generator: torch.Generator
) -> torch.Tensor:
    """Pyramid noise: coarser noise upsampled and added with weight discount**i, renormalised."""
    batch, channels, height, width = noise.shape
    for i in range(1, iterations + 1):
        ratio = 2 + 2 * torch.rand(1, generator=generator).item()
        h, w = max(1, int(height / ratio**i)), max(1, int(width / ratio**i))
        coarse = torch.randn((batch, channels, h, w), generator=generator)
        noise = noise + F.interpolate(coarse, (height, width), mode="bilinear") * discount**i
        if h == 1 or w == 1:
            break
    return noise / noise.std()


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
    prediction, target = predict(family, unet, scheduler, noised, batch)
    return F.mse_loss(prediction, target)


def training_loss(
    family: ModelFamily,
    unet: torch.nn.Module,
    scheduler: DDPMScheduler,
    noised: NoisedBatch,
    batch: dict[str, Any],
    options: TrainConfig,
) -> torch.Tensor:
    """The loss the optimizer minimises: MSE or Huber per image, min-SNR weighted if set."""
    prediction, target = predict(family, unet, scheduler, noised, batch)
    per_image = elementwise_loss(prediction, target, options).mean(dim=(1, 2, 3))
    if options.min_snr_gamma:
        weights = min_snr_weights(
            scheduler, noised.timesteps, options.min_snr_gamma, family.prediction_type
        )
        per_image = per_image * weights.to(per_image)
    return per_image.mean()


def predict(
    family: ModelFamily,
    unet: torch.nn.Module,
    scheduler: DDPMScheduler,
    noised: NoisedBatch,
    batch: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The UNet's prediction for the noised latents and the target it should match, in fp32."""
    noisy = scheduler.add_noise(noised.latents, noised.noise, noised.timesteps)
    text = batch["text"] if "text" in batch else family.encode_prompts(batch["captions"])
    unet_dtype = next(unet.parameters()).dtype
    prediction = unet(
        noisy.to(unet_dtype), noised.timesteps, **family.unet_inputs(text, batch)
    ).sample
    target = prediction_target(scheduler, family.prediction_type, noised)
    return prediction.float(), target.float()


def elementwise_loss(
    prediction: torch.Tensor, target: torch.Tensor, options: TrainConfig
) -> torch.Tensor:
    """Squared error, or kohya's pseudo-Huber ("huber") and its unscaled form ("smooth_l1")."""
    if options.loss_type == "l2":
        return (prediction - target) ** 2
    c = options.huber_c
    huber = torch.sqrt((prediction - target) ** 2 + c**2) - c
    return 2 * c * huber if options.loss_type == "huber" else 2 * huber


def min_snr_weights(
    scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str
) -> torch.Tensor:
    """Min-SNR-gamma (Hang et al. 2023): min(SNR, gamma) / SNR for epsilon targets,
    min(SNR, gamma) / (SNR + 1) for v-prediction."""
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].double()
    snr = alphas / (1 - alphas)
    if prediction_type == "v_prediction":
        return (torch.clamp(snr, max=gamma) / (snr + 1)).float()
    # gamma / SNR, capped at 1: the same as min(SNR, gamma) / SNR, and 1 where SNR is 0.
    return torch.clamp(gamma / snr, max=1.0).float()


def prediction_target(
    scheduler: DDPMScheduler, prediction_type: str, noised: NoisedBatch
) -> torch.Tensor:
    if prediction_type == "epsilon":
        return noised.noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(noised.latents, noised.noise, noised.timesteps)
    raise ValueError(f"unsupported prediction type {prediction_type!r}")
