"""SD1.x: one CLIP ViT-L text encoder, epsilon prediction, 512 px."""

from __future__ import annotations

from diffusers import DiffusionPipeline, StableDiffusionPipeline

from stylelora.families.base import ModelFamily


class SD15(ModelFamily):
    name = "sd15"
    kohya_base_version = "sd_v1"
    kohya_versions = ("sd_v1",)
    modelspec_architecture = "stable-diffusion-v1"

    @classmethod
    def matches(cls, pipe: DiffusionPipeline) -> bool:
        if not isinstance(pipe, StableDiffusionPipeline):
            return False
        # SD1's CLIP uses quick_gelu; SD2's OpenCLIP text encoder uses gelu.
        return pipe.text_encoder.config.hidden_act == "quick_gelu"
