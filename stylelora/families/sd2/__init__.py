"""SD2.x: one OpenCLIP ViT-H text encoder, v-prediction at 768 px (epsilon for the 512 base).

`skeleton/` is stabilityai/stable-diffusion-2-1's folder without weights (768 px, v-prediction).
"""

from __future__ import annotations

from pathlib import Path

from diffusers import DDIMScheduler, DiffusionPipeline, StableDiffusionPipeline

from stylelora.families.tiny import (
    SCHEDULER,
    tiny_text_encoder,
    tiny_unet,
    tiny_vae,
    write_tiny_tokenizer,
)
from stylelora.families.unet import UNetFamily


class SD2(UNetFamily):
    name = "sd2"
    title = "SD2.x"
    pipeline_class = StableDiffusionPipeline
    base_versions = ("sd_v2", "sd_v2_v")
    base_version_prefix = "sd_v2"
    single_file_marker = "cond_stage_model.model."  # OpenCLIP
    single_file_text_encoders = {"text_encoder": ("cond_stage_model.model.", "openclip")}
    context_width = 1024

    @classmethod
    def matches(cls, pipe: DiffusionPipeline) -> bool:
        if not isinstance(pipe, StableDiffusionPipeline):
            return False
        # OpenCLIP's text tower uses gelu where OpenAI's CLIP (SD1) uses quick_gelu.
        return pipe.text_encoder.config.hidden_act == "gelu"

    @classmethod
    def build_tiny(cls, folder: Path) -> DiffusionPipeline:
        """SD2.x-v layout: gelu (OpenCLIP) text encoder, linear projections, v-prediction."""
        tokenizer = write_tiny_tokenizer(folder / "tokenizer")
        unet = tiny_unet(
            attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True
        )
        scheduler = DDIMScheduler(
            **{k: v for k, v in SCHEDULER.items() if k != "skip_prk_steps"},
            clip_sample=False,
            prediction_type="v_prediction",
        )
        return StableDiffusionPipeline(
            vae=tiny_vae(),
            text_encoder=tiny_text_encoder(len(tokenizer), hidden_act="gelu"),
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    @property
    def base_version(self) -> str:
        return "sd_v2_v" if self.prediction_type == "v_prediction" else "sd_v2"

    @property
    def modelspec_architecture(self) -> str:
        if self.prediction_type == "v_prediction":
            return "stable-diffusion-v2-768-v"
        return "stable-diffusion-v2-512"

    def metadata(self) -> dict[str, str]:
        return {**super().metadata(), "ss_v2": "True"}
