"""SD1.x: one CLIP ViT-L text encoder, epsilon prediction, 512 px.

`skeleton/` is runwayml/stable-diffusion-v1-5's folder without weights (safety checker and
feature extractor left out); `demo/` the small SD1.5-layout model stylelora pretrained
(`demo:sd15`).
"""

from __future__ import annotations

from pathlib import Path

from diffusers import DiffusionPipeline, PNDMScheduler, StableDiffusionPipeline

from stylelora.families.tiny import (
    SCHEDULER,
    tiny_text_encoder,
    tiny_unet,
    tiny_vae,
    write_tiny_tokenizer,
)
from stylelora.families.unet import UNetFamily


class SD15(UNetFamily):
    name = "sd15"
    title = "SD1.x"
    pipeline_class = StableDiffusionPipeline
    base_versions = ("sd_v1",)
    base_version_prefix = "sd_v1"
    modelspec = "stable-diffusion-v1"
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
