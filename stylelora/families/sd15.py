"""SD1.x: one CLIP ViT-L text encoder, epsilon prediction, 512 px."""

from __future__ import annotations

from pathlib import Path

from diffusers import DiffusionPipeline, PNDMScheduler, StableDiffusionPipeline

from stylelora.families.base import ModelFamily
from stylelora.families.tiny import (
    SCHEDULER,
    tiny_text_encoder,
    tiny_unet,
    tiny_vae,
    write_tiny_tokenizer,
)


class SD15(ModelFamily):
    name = "sd15"
    pipeline_class = StableDiffusionPipeline
    kohya_base_version = "sd_v1"
    kohya_versions = ("sd_v1",)
    kohya_version_prefix = "sd_v1"
    modelspec_architecture = "stable-diffusion-v1"
    single_file_marker = "cond_stage_model.transformer."
    context_width = 768

    @classmethod
    def matches(cls, pipe: DiffusionPipeline) -> bool:
        if not isinstance(pipe, StableDiffusionPipeline):
            return False
        # SD1's CLIP uses quick_gelu; SD2's OpenCLIP text encoder uses gelu.
        return pipe.text_encoder.config.hidden_act == "quick_gelu"

    @classmethod
    def build_tiny(cls, folder: Path) -> DiffusionPipeline:
        tokenizer = write_tiny_tokenizer(folder / "tokenizer")
        return StableDiffusionPipeline(
            vae=tiny_vae(),
            text_encoder=tiny_text_encoder(len(tokenizer)),
            tokenizer=tokenizer,
            unet=tiny_unet(),
            scheduler=PNDMScheduler(**SCHEDULER),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
