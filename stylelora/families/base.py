"""The interface every model family implements; the trainer, sampler and exporter use only this.

A family wraps a loaded diffusers pipeline and answers what differs between SD1.x, SD2.x and
SDXL: how prompts are encoded, what extra conditioning the UNet takes, the prediction type, and
how kohya names the adapted modules.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from diffusers import DDPMScheduler, DiffusionPipeline


class ModelFamily:
    """Base class: SD1.x behaviour; subclasses override what their family changes."""

    name: ClassVar[str]
    # The `ss_base_model_version` AUTOMATIC1111 and ComfyUI read to tell families apart.
    kohya_base_version: ClassVar[str]
    # The SAI model-spec architecture id (`modelspec.architecture`, with "/lora" appended).
    modelspec_architecture: ClassVar[str]
    # kohya key prefix -> pipeline attribute of each text encoder.
    text_encoder_attrs: ClassVar[dict[str, str]] = {"lora_te": "text_encoder"}

    def __init__(self, pipe: DiffusionPipeline, clip_skip: int | None = None):
        self.pipe = pipe
        self.clip_skip = clip_skip

    @classmethod
    def matches(cls, pipe: DiffusionPipeline) -> bool:
        raise NotImplementedError

    @property
    def unet(self) -> torch.nn.Module:
        return self.pipe.unet

    @property
    def vae(self) -> torch.nn.Module:
        return self.pipe.vae

    def text_encoders(self) -> dict[str, torch.nn.Module]:
        """Text encoders keyed by their kohya prefix."""
        return {
            prefix: getattr(self.pipe, attr) for prefix, attr in self.text_encoder_attrs.items()
        }

    def noise_scheduler(self) -> DDPMScheduler:
        """The training-time scheduler, built from the model's own scheduler config."""
        return DDPMScheduler.from_config(self.pipe.scheduler.config)

    @property
    def prediction_type(self) -> str:
        return self.pipe.scheduler.config.get("prediction_type", "epsilon")

    @property
    def default_resolution(self) -> int:
        return self.unet.config.sample_size * self.pipe.vae_scale_factor

    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Pixels in [-1, 1] to scaled latents, sampling the VAE posterior with `generator`."""
        latents = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.sample(generator)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    def encode_posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels in [-1, 1] to the VAE posterior's (mean, std), unscaled: what a cache keeps."""
        posterior = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        return posterior.mean, posterior.std

    def sample_latents(
        self, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """Scaled latents from a cached posterior; the same draw `encode_images` makes."""
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (mean + std * noise - shift) * self.vae.config.scaling_factor

    def encode_prompts(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Captions to the UNet's text conditioning, through the pipeline's own encoder code."""
        embeds, _ = self.pipe.encode_prompt(
            captions,
            device=self.unet.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            clip_skip=self.clip_skip,
        )
        return {"encoder_hidden_states": embeds}

    def unet_inputs(self, text: dict[str, torch.Tensor], batch: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments for the UNet beyond the noisy latents and timesteps."""
        return {"encoder_hidden_states": text["encoder_hidden_states"]}

    def kohya_name(self, prefix: str, module_path: str) -> str:
        """kohya's name of an adapted module: prefix + dotted path with '_' for '.'.

        transformers 5 dropped the `text_model.` level from CLIPTextModel's module paths;
        kohya names (and the UIs that read them) still carry it.
        """
        if prefix != "lora_unet" and not module_path.startswith("text_model."):
            module_path = "text_model." + module_path
        return f"{prefix}_{module_path.replace('.', '_')}"

    def metadata(self) -> dict[str, str]:
        """Family-specific `ss_*` keys of an exported adapter."""
        return {"ss_base_model_version": self.kohya_base_version, "ss_v2": "False"}
