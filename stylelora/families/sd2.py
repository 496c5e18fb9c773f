"""SD2.x: one OpenCLIP ViT-H text encoder, v-prediction at 768 px (epsilon for the 512 base)."""

from __future__ import annotations

from diffusers import DiffusionPipeline, StableDiffusionPipeline

from stylelora.families.base import ModelFamily


class SD2(ModelFamily):
    name = "sd2"
    kohya_versions = ("sd_v2", "sd_v2_v")
    single_file_text_encoders = {"text_encoder": ("cond_stage_model.model.", "openclip")}

    @classmethod
    def matches(cls, pipe: DiffusionPipeline) -> bool:
        if not isinstance(pipe, StableDiffusionPipeline):
            return False
        # OpenCLIP's text tower uses gelu where OpenAI's CLIP (SD1) uses quick_gelu.
        return pipe.text_encoder.config.hidden_act == "gelu"

    @property
    def kohya_base_version(self) -> str:  # type: ignore[override]
        return "sd_v2_v" if self.prediction_type == "v_prediction" else "sd_v2"

    @property
    def modelspec_architecture(self) -> str:  # type: ignore[override]
        if self.prediction_type == "v_prediction":
            return "stable-diffusion-v2-768-v"
        return "stable-diffusion-v2-512"

    def metadata(self) -> dict[str, str]:
        return {**super().metadata(), "ss_v2": "True"}
