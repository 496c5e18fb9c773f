"""Training objectives: how latents are noised, which timesteps are drawn, what the denoiser
must predict and how each image's loss is weighted.

A family chooses its objective (`ModelFamily.training_objective`); the trainer, validation and
the benchmarks ask the objective and never look at a scheduler or a prediction type themselves.
`DDPMObjective` is SD1.x, SD2.x and SDXL's (epsilon or v-prediction, min-SNR weighting);
`FlowMatchObjective` is rectified flow, the transformer models' (Flux.1, SD3).
Options draw their randomness after the base draws and only when on, so turning none on keeps
every earlier run's numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.training_utils import (
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
)

from stylelora.errors import UserError

if TYPE_CHECKING:  # config builds its models from the families, which import this module
    from stylelora.config import TrainConfig


@dataclass
class NoisedBatch:
    """Everything random about one step, drawn up front so it can be fixed for evaluation."""

    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor


class Objective(Protocol):
    """What a family's denoiser is trained on."""

    # The `[train]` keys only this objective acts on (another objective refuses or ignores them).
    own_keys: ClassVar[tuple[str, ...]]

    num_timesteps: int

    def check(self, options: TrainConfig) -> None:
        """A UserError for an option this objective does not take."""

    def timestep_range(self, options: TrainConfig | None) -> tuple[int, int]:
        """[low, high) of the training timesteps; a bad range is a UserError."""

    def draw(
        self, shape: tuple[int, ...], generator: torch.Generator, options: TrainConfig | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise and timesteps for `shape[0]` images from one generator."""

    def noisy(self, noised: NoisedBatch) -> torch.Tensor:
        """The denoiser's input."""

    def target(self, noised: NoisedBatch) -> torch.Tensor:
        """What the denoiser should output."""

    def loss_weights(self, timesteps: torch.Tensor, options: TrainConfig) -> torch.Tensor | None:
        """Each image's loss weight, or None for equal weights."""


class DDPMObjective:
    """The DDPM objective of the Stable Diffusion UNets: noise added by the model's own
    betas, uniform integer timesteps, an epsilon or v target, optional min-SNR-gamma weights."""

    own_keys: ClassVar[tuple[str, ...]] = ("train.min_snr_gamma",)

    def __init__(self, scheduler: DDPMScheduler):
        self.scheduler = scheduler
        self.num_timesteps: int = scheduler.config.num_train_timesteps
        self.prediction_type: str = scheduler.config.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise UserError(
                f"prediction type {self.prediction_type!r}: stylelora trains epsilon or "
                'v_prediction models (set prediction_type = "epsilon" or "v_prediction")'
            )

    def check(self, options: TrainConfig) -> None:
        self.timestep_range(options)
        if options.timestep_sampling not in ("auto", "uniform"):
            raise UserError(
                f"train.timestep_sampling = {options.timestep_sampling!r} is for flow-matching "
                "models (Flux); this model draws timesteps uniformly: leave it at auto"
            )
        if options.flow_weighting != "none":
            raise UserError(
                f"train.flow_weighting = {options.flow_weighting!r} is for flow-matching models "
                "(Flux); for this model use train.min_snr_gamma"
            )

    def timestep_range(self, options: TrainConfig | None) -> tuple[int, int]:
        return timestep_bounds(self.num_timesteps, options)

    def draw(
        self, shape: tuple[int, ...], generator: torch.Generator, options: TrainConfig | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        noise = torch.randn(shape, generator=generator)
        low, high = self.timestep_range(options)
        timesteps = torch.randint(low, high, (shape[0],), generator=generator)
        return shaped_noise(noise, generator, options), timesteps

    def noisy(self, noised: NoisedBatch) -> torch.Tensor:
        return self.scheduler.add_noise(noised.latents, noised.noise, noised.timesteps)

    def target(self, noised: NoisedBatch) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noised.noise
        return self.scheduler.get_velocity(noised.latents, noised.noise, noised.timesteps)

    def loss_weights(self, timesteps: torch.Tensor, options: TrainConfig) -> torch.Tensor | None:
        if not options.min_snr_gamma:
            return None
        return min_snr_weights(
            self.scheduler, timesteps, options.min_snr_gamma, self.prediction_type
        )


class FlowMatchObjective:
    """Rectified flow: x_t = (1 - sigma) x_0 + sigma noise, target noise - x_0, sigma in (0, 1).

    Sigmas are drawn as kohya's `--timestep_sampling` does: `uniform`; `logit_normal` (the
    sigmoid of a normal, `logit_mean` / `logit_std`, diffusers' density); `shift`, that shifted
    by `discrete_flow_shift` (s u / (1 + (s - 1) u)); `flux_shift`, shifted by the image's
    token count as Flux's sampler shifts its schedule (mu from the scheduler config's
    base/max shift). The timesteps handed to the denoiser are the sigmas.
    """

    num_timesteps = 1000  # what train.min_timestep / max_timestep count in
    own_keys: ClassVar[tuple[str, ...]] = (
        "train.timestep_sampling",
        "train.logit_mean",
        "train.logit_std",
        "train.discrete_flow_shift",
        "train.flow_weighting",
    )

    def __init__(self, scheduler_config: dict[str, Any], patch_size: int = 2):
        self.config = scheduler_config
        self.patch_size = patch_size

    def check(self, options: TrainConfig) -> None:
        self.timestep_range(options)
        if options.min_snr_gamma:
            raise UserError(
                "train.min_snr_gamma is for DDPM models (SD1.x, SD2.x, SDXL); a flow-matching "
                "model weights its loss by train.flow_weighting (none, sigma_sqrt or cosmap)"
            )

    def timestep_range(self, options: TrainConfig | None) -> tuple[int, int]:
        return timestep_bounds(self.num_timesteps, options)

    def sampling(self, options: TrainConfig) -> str:
        chosen = options.timestep_sampling
        return "shift" if chosen == "auto" else chosen

    def draw(
        self, shape: tuple[int, ...], generator: torch.Generator, options: TrainConfig | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if options is None:  # validation's fixed draws: the defaults
            from stylelora.config import TrainConfig

            options = TrainConfig()
        noise = torch.randn(shape, generator=generator)
        sampling = self.sampling(options)
        u = compute_density_for_timestep_sampling(
            "none" if sampling == "uniform" else "logit_normal",
            shape[0],
            logit_mean=options.logit_mean,
            logit_std=options.logit_std,
            generator=generator,
        )
        if sampling == "shift":
            shift = options.discrete_flow_shift
            u = shift * u / (1 + (shift - 1) * u)
        elif sampling == "flux_shift":
            u = self.resolution_shift(u, shape[-2] * shape[-1] // self.patch_size**2)
        low, high = self.timestep_range(options)
        sigmas = low / self.num_timesteps + (high - low) / self.num_timesteps * u
        return shaped_noise(noise, generator, options), sigmas

    def resolution_shift(self, u: torch.Tensor, tokens: int) -> torch.Tensor:
        """Flux's time shift for an image of `tokens` tokens: exp(mu) / (exp(mu) + 1/u - 1)."""
        mu = calculate_shift(
            tokens,
            self.config.get("base_image_seq_len", 256),
            self.config.get("max_image_seq_len", 4096),
            self.config.get("base_shift", 0.5),
            self.config.get("max_shift", 1.15),
        )
        return math.exp(mu) / (math.exp(mu) + (1 / u - 1))

    def noisy(self, noised: NoisedBatch) -> torch.Tensor:
        sigmas = noised.timesteps.view(-1, *[1] * (noised.latents.dim() - 1)).to(noised.latents)
        return (1 - sigmas) * noised.latents + sigmas * noised.noise

    def target(self, noised: NoisedBatch) -> torch.Tensor:
        return noised.noise - noised.latents

    def loss_weights(self, timesteps: torch.Tensor, options: TrainConfig) -> torch.Tensor | None:
        if options.flow_weighting == "none":
            return None
        return compute_loss_weighting_for_sd3(options.flow_weighting, timesteps.float())


def timestep_bounds(total: int, options: TrainConfig | None) -> tuple[int, int]:
    """[low, high) of the training timesteps, out of `total`, as `options` narrow them."""
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
            f"train.min_timestep {options.min_timestep}: must be below {high}, the top of "
            f"the timestep range (the model has {total} timesteps)"
        )
    return options.min_timestep, high


def shaped_noise(
    noise: torch.Tensor, generator: torch.Generator, options: TrainConfig | None
) -> torch.Tensor:
    """`noise` with the options that shape it (noise offset, multi-resolution) applied."""
    if options is not None and options.noise_offset:
        noise = offset_noise(noise, options.noise_offset, generator)
    if options is not None and options.multires_noise_iterations:
        noise = multires_noise(
            noise, options.multires_noise_iterations, options.multires_noise_discount, generator
        )
    return noise


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


def min_snr_weights(
    scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str
) -> torch.Tensor:
    """Min-SNR-gamma (Hang et al. 2023): min(SNR, gamma) / SNR for epsilon targets,
    min(SNR, gamma) / (SNR + 1) for v-prediction.

    The SNR is computed here in float64, not by diffusers' `compute_snr`: its float32 sqrt
    and square round 657 of SD's 1000 SNRs differently (73 min-SNR-5 weights), and the
    weights every earlier run trained with stay as they were.
    """
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].double()
    snr = alphas / (1 - alphas)
    if prediction_type == "v_prediction":
        return (torch.clamp(snr, max=gamma) / (snr + 1)).float()
    # gamma / SNR, capped at 1: the same as min(SNR, gamma) / SNR, and 1 where SNR is 0.
    return torch.clamp(gamma / snr, max=1.0).float()
