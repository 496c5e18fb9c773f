"""SDXL: two text encoders (CLIP ViT-L and OpenCLIP bigG), size and crop conditioning, sgm names."""

from __future__ import annotations

import re
from typing import Any

import torch
from diffusers import DiffusionPipeline, StableDiffusionXLPipeline

from stylelora.families.base import ModelFamily

DOWN = re.compile(r"^down_blocks\.(\d+)\.attentions\.(\d+)\.")
UP = re.compile(r"^up_blocks\.(\d+)\.attentions\.(\d+)\.")
MID = "mid_block.attentions.0."


class SDXL(ModelFamily):
    name = "sdxl"
    kohya_base_version = "sdxl_base_v1-0"
    kohya_versions = ("sdxl_base_v1-0",)
    modelspec_architecture = "stable-diffusion-xl-v1-base"
    text_encoder_attrs = {"lora_te1": "text_encoder", "lora_te2": "text_encoder_2"}

    @classmethod
    def matches(cls, pipe: DiffusionPipeline) -> bool:
        return isinstance(pipe, StableDiffusionXLPipeline)

    def vae_dtype(self, weight_dtype: torch.dtype) -> torch.dtype:
        # The SDXL VAE overflows to NaN in fp16; bf16 has the range it needs.
        return torch.float32 if weight_dtype == torch.float16 else weight_dtype

    def encode_prompts(self, captions: list[str]) -> dict[str, torch.Tensor]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            captions,
            device=self.unet.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            clip_skip=self.clip_skip,
        )
        return {"encoder_hidden_states": embeds, "text_embeds": pooled}

    def unet_inputs(self, text: dict[str, torch.Tensor], batch: dict[str, Any]) -> dict[str, Any]:
        """Per image: original (h, w), crop (top, left), target (h, w) of the batch's pixels."""
        target = list(batch["pixel_values"].shape[-2:])
        time_ids = [
            list(original) + list(crop) + target
            for original, crop in zip(batch["original_sizes"], batch["crop_top_lefts"], strict=True)
        ]
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
            module_path = sgm_path(module_path, self.unet.config.layers_per_block)
        return super().kohya_name(prefix, module_path)


def sgm_path(path: str, layers_per_block: int) -> str:
    """The original (sgm) UNet path kohya writes for an SDXL transformer-block module.

    Each down block holds `layers_per_block` layers plus a downsampler, each up block one more
    layer, and input block 0 is conv_in: hence the offsets (3i+j+1 and 3i+j on the real SDXL).
    """
    step = layers_per_block + 1
    if match := DOWN.match(path):
        i, j = int(match[1]), int(match[2])
        return f"input_blocks.{step * i + j + 1}.1." + path[match.end() :]
    if match := UP.match(path):
        i, j = int(match[1]), int(match[2])
        return f"output_blocks.{step * i + j}.1." + path[match.end() :]
    if path.startswith(MID):
        return "middle_block.1." + path[len(MID) :]
    raise ValueError(f"no sgm name for UNet module {path!r}")
