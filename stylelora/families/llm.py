"""What the transformers conditioned on an LLM share (Z-Image, Qwen-Image, Flux.2), as the SD
UNets share `UNetFamily`: the LLM frozen (the UIs and diffusers load these families' adapters
into the transformer only), adapter files in ComfyUI's layout under `diffusion_model.`, the VAE
and the text encoder as files of their own, the LLM's tokens per prompt, no kohya block numbering.
"""

from __future__ import annotations

from typing import ClassVar

from stylelora.adapters.targets import Targets
from stylelora.errors import UserError
from stylelora.families.base import (
    DENOISER,
    MAX_SEQUENCE_LENGTH,
    TEXT_ENCODER_FILE,
    VAE_FILE,
    ModelFamily,
    no_block_wise,
    no_text_encoder_adapters,
)
from stylelora.families.objective import FlowMatchObjective


class LLMTransformerFamily(ModelFamily):
    denoiser_attr = "transformer"
    denoiser_input = "hidden_states"
    text_encoder_attrs: ClassVar[dict[str, str]] = {}
    prompt_encoder_attrs: ClassVar[tuple[str, ...]] = ("text_encoder",)
    parts = (VAE_FILE, TEXT_ENCODER_FILE)
    options = (MAX_SEQUENCE_LENGTH,)
    native_format = "comfyui"
    objective_type = FlowMatchObjective
    block_wise = False
    swaps_blocks = True
    denoiser_prefix = "diffusion_model."
    # The most LLM tokens the pipeline encodes a prompt in, and how many it takes by default.
    most_tokens: ClassVar[int] = 512
    default_tokens: ClassVar[int] = 512

    def apply_settings(self) -> None:
        """`max_sequence_length`: the LLM's tokens per prompt, at most `most_tokens`."""
        tokens = self.settings[MAX_SEQUENCE_LENGTH.key]
        if tokens is not None and tokens > self.most_tokens:
            raise UserError(
                f"max_sequence_length = {tokens}: {self.title} encodes prompts in at most "
                f"{self.most_tokens} tokens"
            )
        self.max_length = tokens or self.default_max_length()

    def default_max_length(self) -> int:
        """The tokens per prompt the pipeline encodes when none are set."""
        return self.default_tokens

    @property
    def base_version(self) -> str:
        return self.base_versions[0]

    def text_encoder_targets(self, preset: str) -> Targets:
        raise no_text_encoder_adapters(self)

    def file_module(self, prefix: str, module_path: str) -> tuple[str, tuple[str, ...]]:
        """`diffusion_model.<diffusers path>`, where ComfyUI's key map reads diffusers' names."""
        if prefix != DENOISER:
            raise ValueError(f"a {self.title} adapter has no {prefix} modules")
        return f"{self.denoiser_prefix}{module_path}", (module_path,)

    def metadata(self) -> dict[str, str]:
        return {"ss_base_model_version": self.base_version, "ss_network_module": "networks.lora"}

    def kohya_blocks(self) -> tuple[int, int, int, bool]:
        raise no_block_wise(self)

    def kohya_block_index(self, name: str) -> int:
        raise no_block_wise(self)
