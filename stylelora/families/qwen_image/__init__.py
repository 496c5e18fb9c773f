"""Qwen-Image: a 20 B double-stream (MMDiT) rectified-flow transformer on 2x2 patches of a
16-channel video VAE's latents (one frame, normalised per channel), conditioned on
Qwen2.5-VL-7B's last hidden states (the caption in the pipeline's chat template, the template's
first 34 tokens dropped, each caption as long as its tokens).

`denoise` is the pipeline's call: latents packed into patches, the timestep as sigma, the image
shape for its rotary positions, the caption mask where a caption is padded; it predicts
noise - latents, Flux.1's objective. Previews use true CFG (`true_cfg_scale`, with a negative
prompt, " " where none is given); there is no guidance embedding. ComfyUI's module names for
this model are diffusers' own, so adapters are written as `diffusion_model.<diffusers path>`
(what ai-toolkit writes), which ComfyUI and diffusers' Qwen-Image loader read. `files.py` loads
the files users hold; `skeleton/` is Qwen/Qwen-Image's folder without weights or tokenizer.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from stylelora.adapters.targets import Targets
from stylelora.errors import UserError
from stylelora.families.base import ModelFamily, compute_dtype
from stylelora.families.llm import LLMTransformerFamily
from stylelora.families.objective import FlowMatchObjective, Objective
from stylelora.families.qwen_image.files import is_qwen_image_transformer, load_qwen_image_files
from stylelora.families.skeletons import source_dir
from stylelora.families.tiny import write_tiny_qwen_tokenizer

if TYPE_CHECKING:
    from stylelora.config import AdapterConfig

ATTENTION = tuple(
    f"attn.{name}"
    for name in (
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "to_add_out",
    )
)
MLP = tuple(f"{stream}_mlp.{name}" for stream in ("img", "txt") for name in ("net.0.proj", "net.2"))
MODULATION = ("img_mod.1", "txt_mod.1")
PRESETS = {
    "attention": ATTENTION,
    "attn-mlp": ATTENTION + MLP,
    "full": ATTENTION + MLP + MODULATION,
}
# A block's image and text streams' own MLPs and modulations, by diffusers' names in any layout
# (dotted, or kohya's underscored `lora_unet_transformer_blocks_0_img_mlp_...`): Flux's have
# these names in BFL's `double_blocks`, never in `transformer_blocks`.
OWN_MODULES = re.compile(r"transformer_blocks[._]\d+[._](img|txt)_(mlp|mod)[._]")
# The tokens of the prompt template the pipeline drops (prompt_template_encode_start_idx).
TEMPLATE_TOKENS = 34


class QwenImage(LLMTransformerFamily):
    name = "qwen_image"
    title = "Qwen-Image"
    base_versions = ("qwen_image",)
    base_version_prefix = "qwen_image"
    most_tokens = 1024  # the pipeline's tokenizer_max_length

    @classmethod
    def matches(cls, pipe: DiffusionPipeline) -> bool:
        return isinstance(pipe, QwenImagePipeline)

    @classmethod
    def reads_single_file(cls, keys: list[str]) -> bool:
        return is_qwen_image_transformer(keys)

    @classmethod
    def load_single_file(
        cls, path: Path, dtype: torch.dtype, config: str | None, parts: dict[str, Path | None]
    ) -> DiffusionPipeline:
        return load_qwen_image_files(path, dtype, config, parts)

    def single_file_state(self) -> dict[str, torch.Tensor]:
        """The transformer under diffusers' names: ComfyUI's file has the same, and diffusers'
        `from_single_file` maps them as they are."""
        return dict(self.unet.state_dict())

    @classmethod
    def claims_names(cls, names: list[str]) -> bool:
        """Its blocks under ComfyUI's prefix (Flux's are BFL's there; a Flux transformer has
        single-stream blocks too), or any layout's names of its streams' own MLPs and
        modulations."""
        if any(OWN_MODULES.search(name) for name in names):
            return True
        blocks = [name.startswith("diffusion_model.transformer_blocks.") for name in names]
        return any(blocks) and not any("single_transformer_blocks" in name for name in names)

    @property
    def default_resolution(self) -> int:
        """What the pipeline renders when no size is given (1024)."""
        return self.pipe.default_sample_size * self.pipe.vae_scale_factor

    @property
    def size_step(self) -> int:
        return 2 * self.pipe.vae_scale_factor

    @property
    def modelspec_architecture(self) -> str:
        return "qwen-image"

    # --- latents ----------------------------------------------------------------------------

    def vae_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """A video VAE: each image a clip of one frame."""
        return pixels.to(self.vae.dtype).unsqueeze(2)

    def scale_latents(self, sample: torch.Tensor) -> torch.Tensor:
        """(B, 16, 1, h, w) posterior samples normalised per channel by the VAE's latents_mean
        and latents_std (the pipeline decodes latents * std + mean), the frame axis dropped:
        what the pipeline packs into patches."""
        config = self.vae.config
        mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1, 1).to(sample)
        std = torch.tensor(config.latents_std).view(1, -1, 1, 1, 1).to(sample)
        return ((sample - mean) / std).squeeze(2)

    def training_objective(self) -> Objective:
        return FlowMatchObjective(dict(self.pipe.scheduler.config))

    # --- conditioning and the denoiser ------------------------------------------------------

    def encode_prompts(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """As QwenImagePipeline encodes them: each caption's real tokens only (after the
        template's first 34), padded to a batch with a mask saying which are real."""
        embeds, mask = self.pipe.encode_prompt(
            list(captions), device=self.text_device, max_sequence_length=self.max_length
        )
        if mask is None:  # the pipeline drops a mask that is all true
            mask = torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask.bool()}

    def denoise(
        self,
        denoiser: torch.nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        text: dict[str, torch.Tensor],
        batch: dict[str, Any],
    ) -> torch.Tensor:
        """The pipeline's call on (B, 16, h, w) latents: packed into 2x2 patches, the timestep
        as it computes it from the scheduler's (1000 sigma) / 1000, the image's shape in
        patches, the caption mask (none where no caption is padded, as the pipeline passes
        it); the output unpacked. The model predicts noise - latents."""
        dtype = compute_dtype(denoiser)
        latents = noisy.to(dtype)
        count, channels, height, width = latents.shape
        packed = QwenImagePipeline._pack_latents(latents, count, channels, height, width)
        t = (timesteps.float() * 1000).to(dtype) / 1000
        mask = padding_mask(text["prompt_embeds_mask"])
        out = denoiser(
            hidden_states=packed,
            timestep=t,
            guidance=None,
            encoder_hidden_states_mask=mask,
            encoder_hidden_states=text["prompt_embeds"].to(dtype),
            img_shapes=[[(1, height // 2, width // 2)]] * count,
            attention_kwargs={},
            return_dict=False,
        )[0]
        scale = self.pipe.vae_scale_factor
        return QwenImagePipeline._unpack_latents(out, height * scale, width * scale, scale)[:, :, 0]

    def pipeline_text_kwargs(
        self, prompt: str, negative: str, size: tuple[int, int]
    ) -> dict[str, Any]:
        """The pipeline guides only with a negative prompt: " " where none is given (what
        diffusers' docs advise for true CFG without one)."""
        return {
            "prompt": prompt,
            "negative_prompt": negative or " ",
            "max_sequence_length": self.max_length,
        }

    def pipeline_guidance_kwargs(self, scale: float) -> dict[str, Any]:
        """True CFG: Qwen-Image has no guidance embedding (the pipeline warns at
        guidance_scale)."""
        return {"true_cfg_scale": scale}

    # --- adapters ---------------------------------------------------------------------------

    def denoiser_targets(self, cfg: AdapterConfig) -> Targets:
        """In every block: `attention` (the image and text streams' q, k, v and outputs),
        `attn-mlp` and both streams' MLPs, `full` and both streams' modulations."""
        preset = cfg.unet_targets
        if preset not in PRESETS:
            raise UserError(
                f"adapter.unet_targets = {preset!r}: Qwen-Image's attention is joint (no "
                "separate cross-attention); choose attention, attn-mlp or full"
            )
        paths = [
            f"transformer_blocks.{index}.{inner}"
            for index in range(len(self.unet.transformer_blocks))
            for inner in PRESETS[preset]
        ]
        return Targets(main=paths)

    def swappable_blocks(self) -> list[torch.nn.Module]:
        return list(self.unet.transformer_blocks)

    # --- what memory is counted on ----------------------------------------------------------

    def example_inputs(
        self, batch: int, side: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
        config = self.unet.config
        latent = side // self.pipe.vae_scale_factor
        channels = config.in_channels // 4
        latents = torch.zeros(batch, channels, latent, latent, dtype=dtype, device=device)
        embeds = torch.zeros(
            batch, self.max_length, config.joint_attention_dim, dtype=dtype, device=device
        )
        mask = torch.ones(batch, self.max_length, dtype=torch.bool, device=device)
        return latents, {"prompt_embeds": embeds, "prompt_embeds_mask": mask}, {}

    def example_prompt_pass(self, device: torch.device) -> None:
        """The pipeline's encoder call on a caption as long as training keeps (and the
        template's dropped tokens): every layer's hidden states, and the logits it computes.
        (No attention mask: one caption's is all true, and a meta tensor's cannot be read.)"""
        ids = torch.zeros(1, self.max_length + TEMPLATE_TOKENS, dtype=torch.long, device=device)
        self.pipe.text_encoder(input_ids=ids, output_hidden_states=True)

    # --- the real model and the tiny one ----------------------------------------------------

    @classmethod
    def on_meta_device(cls) -> ModelFamily:
        """Qwen/Qwen-Image (its configs bundled in `skeleton/`) on the meta device."""
        folder = source_dir(cls.name)
        with torch.device("meta"):
            transformer = QwenImageTransformer2DModel.from_config(
                QwenImageTransformer2DModel.load_config(folder / "transformer")
            )
            vae = AutoencoderKLQwenImage.from_config(
                AutoencoderKLQwenImage.load_config(folder / "vae")
            )
            text_encoder = Qwen2_5_VLForConditionalGeneration(
                Qwen2_5_VLConfig.from_pretrained(folder / "text_encoder")
            )
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler")
        parts = dict(
            transformer=transformer,
            vae=vae,
            text_encoder=text_encoder,
            scheduler=scheduler,
            vae_scale_factor=2 ** len(vae.temperal_downsample),  # as the pipeline's
            default_sample_size=128,
        )
        return cls(SimpleNamespace(**parts))

    @classmethod
    def build_tiny(cls, folder: Path) -> DiffusionPipeline:
        """Qwen-Image's layout at tiny size: two blocks, the VAE's real block layout (so the
        Wan layout converts) at narrow widths, a two-layer Qwen2.5-VL with a one-block vision
        tower and a byte-level tokenizer (whose template is longer than the 34 tokens the
        pipeline drops, so a caption still follows part of it)."""
        tokenizer = write_tiny_qwen_tokenizer(folder / "tokenizer")
        text_config = dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=2048,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3]},
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        vision_config = dict(
            depth=1,
            hidden_size=16,
            intermediate_size=32,
            num_heads=2,
            out_hidden_size=32,
            patch_size=2,
            temporal_patch_size=1,
            spatial_merge_size=2,
            window_size=4,
            fullatt_block_indexes=[0],
        )
        text_encoder = Qwen2_5_VLForConditionalGeneration(
            Qwen2_5_VLConfig(text_config=text_config, vision_config=vision_config)
        )
        skeleton = source_dir(cls.name)
        vae = AutoencoderKLQwenImage.from_config(
            AutoencoderKLQwenImage.load_config(skeleton / "vae"), base_dim=8
        )
        transformer = QwenImageTransformer2DModel(
            in_channels=64,
            out_channels=16,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=4,
            joint_attention_dim=32,
            axes_dims_rope=(4, 6, 6),
        )
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(skeleton / "scheduler")
        return QwenImagePipeline(
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            transformer=transformer,
        )


def padding_mask(mask: torch.Tensor) -> torch.Tensor | None:
    """The caption mask where some caption is padded, else None, as the pipeline passes it
    (attention then takes no mask). A meta tensor's values cannot be read: the memory count's
    examples are all true."""
    if mask.is_meta or mask.all():
        return None
    return mask
