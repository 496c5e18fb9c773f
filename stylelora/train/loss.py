"""The denoising loss: noise the latents, ask the denoiser, compare with the objective's target.

The family's objective (`stylelora.families.objective`) draws the noise and timesteps and says
what the denoiser should predict; the family says how the denoiser is called. The training loss
takes the quality options of `[train]` (noise offset, multi-resolution noise, a timestep range,
Huber loss, min-SNR-gamma weighting); `denoising_loss` stays the plain mean squared error, so
validation losses compare between runs whatever options they trained with.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from stylelora.config import TrainConfig
from stylelora.families.base import Generators, ModelFamily
from stylelora.families.objective import NoisedBatch, Objective
from stylelora.train.profile import phase


def draw_noise(
    family: ModelFamily,
    objective: Objective,
    pixels: torch.Tensor | dict[str, Any],
    generator: Generators,
    options: TrainConfig | None = None,
) -> NoisedBatch:
    """Encode `pixels` (or a batch: its pixels or cached posterior), then draw noise and
    timesteps, shaped by the `options` that are on. `generator`: one CPU generator for the batch,
    or one per sample, which makes each sample's draw independent of how a global batch is
    split between processes."""
    with torch.no_grad(), phase("vae"):
        latents = batch_latents(family, pixels, generator).float()
    with phase("noise draw"):
        if isinstance(generator, list):
            draws = [objective.draw((1, *latents.shape[1:]), g, options) for g in generator]
            noise = torch.cat([noise for noise, _ in draws])
            timesteps = torch.cat([timesteps for _, timesteps in draws])
        else:
            noise, timesteps = objective.draw(latents.shape, generator, options)
        noise, timesteps = upload(noise, latents), upload(timesteps, latents, keep_dtype=True)
    return NoisedBatch(latents, noise, timesteps)


def upload(tensor: torch.Tensor, like: torch.Tensor, keep_dtype: bool = False) -> torch.Tensor:
    """`tensor`, drawn on the CPU, on `like`'s device (in its dtype unless `keep_dtype`). To a
    GPU it goes from pinned memory without blocking: the host does not wait there for the
    kernels queued before the copy."""
    dtype = tensor.dtype if keep_dtype else like.dtype
    if like.device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(like.device, dtype)
    return tensor.pin_memory().to(like.device, dtype, non_blocking=True)


def batch_latents(
    family: ModelFamily, pixels: torch.Tensor | dict[str, Any], generator: Generators
) -> torch.Tensor:
    if isinstance(pixels, torch.Tensor):
        return family.encode_images(pixels, generator)
    if "latent_mean" in pixels:
        latents = family.sample_latents(pixels["latent_mean"], pixels["latent_std"], generator)
        if pixels.get("latent_layout") == "channels_last":
            return latents.contiguous(memory_format=torch.channels_last)
        return latents
    return family.encode_images(pixels["pixel_values"], generator)


def denoising_loss(
    family: ModelFamily,
    denoiser: torch.nn.Module,
    objective: Objective,
    noised: NoisedBatch,
    batch: dict[str, Any],
) -> torch.Tensor:
    """Mean squared error between the denoiser's prediction and the objective's target."""
    prediction, target = predict(family, denoiser, objective, noised, batch)
    return F.mse_loss(prediction, target)


def training_loss(
    family: ModelFamily,
    denoiser: torch.nn.Module,
    objective: Objective,
    noised: NoisedBatch,
    batch: dict[str, Any],
    options: TrainConfig,
) -> torch.Tensor:
    """The loss the optimizer minimises: MSE or Huber per image (masked, if set), weighted by
    `prior_loss_weight` for regularisation images and as the objective says (min-SNR, if set)."""
    prediction, target = predict(family, denoiser, objective, noised, batch)
    per_pixel = elementwise_loss(prediction, target, options)
    if options.masked_loss:
        per_pixel = per_pixel * mask_weights(batch["mask"], per_pixel, options.unmasked_weight)
    per_image = per_pixel.mean(dim=(1, 2, 3))
    if options.prior_loss_weight != 1.0 and "prior" in batch:
        prior = batch["prior"].to(per_image.device)
        per_image = per_image * torch.where(prior, options.prior_loss_weight, 1.0).to(per_image)
    weights = objective.loss_weights(noised.timesteps, options)
    if weights is not None:
        per_image = per_image * weights.to(per_image)
    return per_image.mean()


def predict(
    family: ModelFamily,
    denoiser: torch.nn.Module,
    objective: Objective,
    noised: NoisedBatch,
    batch: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The denoiser's prediction for the noised latents and the target it should match, in fp32."""
    noisy = objective.noisy(noised)
    with phase("text encoder"):
        text = batch["text"] if "text" in batch else family.encode_prompts(batch["captions"])
    with phase("denoiser forward"):
        prediction = family.denoise(denoiser, noisy, noised.timesteps, text, batch)
    return prediction.float(), objective.target(noised).float()


def mask_on_latents(mask: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    """Masks (N, 1, H, W) in pixels brought onto the latents' (h, w): each latent pixel takes
    the mean of the image pixels it stands for (as kohya does); a no-op at that size already."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return F.interpolate(mask, size=tuple(size), mode="area")


def mask_weights(mask: torch.Tensor, loss: torch.Tensor, unmasked_weight: float) -> torch.Tensor:
    """Each latent pixel's loss weight: 1 where the mask is white, `unmasked_weight` where it is
    black, in between where it is grey. Not renormalised, as in kohya: a mostly black mask
    trains with a smaller loss."""
    mask = mask_on_latents(mask.to(loss), loss.shape[-2:])
    return unmasked_weight + (1.0 - unmasked_weight) * mask


def elementwise_loss(
    prediction: torch.Tensor, target: torch.Tensor, options: TrainConfig
) -> torch.Tensor:
    """Squared error, or kohya's pseudo-Huber ("huber") and its unscaled form ("smooth_l1")."""
    if options.loss_type == "l2":
        return (prediction - target) ** 2
    c = options.huber_c
    huber = torch.sqrt((prediction - target) ** 2 + c**2) - c
    return 2 * c * huber if options.loss_type == "huber" else 2 * huber
