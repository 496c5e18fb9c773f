"""SDXL: two text encoders (CLIP ViT-L and OpenCLIP bigG), size and crop conditioning, sgm names."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DiffusionPipeline, StableDiffusionXLPipeline

from stylelora.families.base import ModelFamily
from stylelora.families.ldm import original_unet_path


class SDXL(ModelFamily):
    name = "sdxl"
    kohya_base_version = "sdxl_base_v1-0"
    kohya_versions = ("sdxl_base_v1-0",)
    modelspec_architecture = "stable-diffusion-xl-v1-base"
    text_encoder_attrs = {"lora_te1": "text_encoder", "lora_te2": "text_encoder_2"}
    single_file_text_encoders = {
        "text_encoder": ("conditioner.embedders.0.transformer.", "clip"),
        "text_encoder_2": ("conditioner.embedders.1.model.", "openclip"),
    }

    def __init__(self, pipe: DiffusionPipeline, clip_skip: int | None = None):
        super().__init__(pipe)
        if clip_skip:
            # SDXL already conditions on both encoders' penultimate layers; kohya's trainer and
            # AUTOMATIC1111 ignore clip skip for it, so adapters trained here match theirs.
            self.notes.append(
                f"clip_skip = {clip_skip + 1} is ignored for SDXL, as kohya and AUTOMATIC1111 "
                "do: SDXL already uses the penultimate layers"
            )

    @classmethod
    def matches(cls, pipe: DiffusionPipeline) -> bool:
        return isinstance(pipe, StableDiffusionXLPipeline)

    def vae_dtype(self, weight_dtype: torch.dtype) -> torch.dtype:
        # The SDXL VAE overflows to NaN in fp16; bf16 has the range it needs.
        return torch.float32 if weight_dtype == torch.float16 else weight_dtype

    def encode_prompts(self, captions: list[str]) -> dict[str, torch.Tensor]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            captions,
            device=self.text_device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
        )
        return {"encoder_hidden_states": embeds, "text_embeds": pooled}

    def unet_inputs(self, text: dict[str, torch.Tensor], batch: dict[str, Any]) -> dict[str, Any]:
        """Per image: original (h, w), crop (top, left), target (h, w): its bucket's size."""
        sizes = zip(
            batch["original_sizes"], batch["crop_top_lefts"], batch["target_sizes"], strict=True
        )
        time_ids = [[*original, *crop, *target] for original, crop, target in sizes]
        embeds = text["encoder_hidden_states"]
        return {
            "encoder_hidden_states": embeds,
            "added_cond_kwargs": {
                "text_embeds": text["text_embeds"],
                "time_ids": torch.tensor(time_ids, dtype=embeds.dtype, device=embeds.device),
            },
        }

    def kohya_name(self, prefix: str, module_path: str) -> str:
        if prefix == "lora_unet":
            module_path = original_unet_path(module_path, self.unet.config)
        return super().kohya_name(prefix, module_path)
