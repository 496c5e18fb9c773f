"""SDXL: two text encoders (CLIP ViT-L and OpenCLIP bigG), size and crop conditioning, sgm names.

`skeleton/` is stabilityai/stable-diffusion-xl-base-1.0's folder without weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline, EulerDiscreteScheduler, StableDiffusionXLPipeline
from transformers import CLIPTextModelWithProjection

from stylelora.families.base import DENOISER
from stylelora.families.ldm import original_unet_path
from stylelora.families.tiny import (
    SCHEDULER,
    tiny_text_config,
    tiny_text_encoder,
    tiny_unet,
    tiny_vae,
    write_tiny_tokenizer,
)
from stylelora.families.unet import UNetFamily


class SDXL(UNetFamily):
    name = "sdxl"
    title = "SDXL"
    pipeline_class = StableDiffusionXLPipeline
    base_versions = ("sdxl_base_v1-0",)
    base_version_prefix = "sdxl"
    modelspec = "stable-diffusion-xl-v1-base"
    text_encoder_attrs = {"lora_te1": "text_encoder", "lora_te2": "text_encoder_2"}
    prompt_encoder_attrs = ("text_encoder", "text_encoder_2")
    single_file_text_encoders = {
        "text_encoder": ("conditioner.embedders.0.transformer.", "clip"),
        "text_encoder_2": ("conditioner.embedders.1.model.", "openclip"),
    }
    single_file_marker = "conditioner.embedders.1."
    context_width = 2048

    def layers_skipped(self, clip_skip: int | None) -> None:
        """None: SDXL already conditions on both encoders' penultimate layers; kohya's trainer
        and AUTOMATIC1111 ignore clip skip for it, so adapters trained here match theirs."""
        if clip_skip and clip_skip > 1:
            self.notes.append(
                f"clip_skip = {clip_skip} is ignored for SDXL, as kohya and AUTOMATIC1111 "
                "do: SDXL already uses the penultimate layers"
            )
        return None

    @classmethod
    def matches(cls, pipe: DiffusionPipeline) -> bool:
        return isinstance(pipe, StableDiffusionXLPipeline)

    @classmethod
    def claims_names(cls, names: list[str]) -> bool:
        """Two text encoders (kohya's or diffusers' names), or the UNet's sgm names."""
        marks = ("lora_te1_", "lora_te2_", "text_encoder_2.")
        return any(n.startswith(marks) or "_input_blocks_" in n for n in names)

    @classmethod
    def build_tiny(cls, folder: Path) -> DiffusionPipeline:
        """SDXL layout: CLIP and OpenCLIP-with-projection text encoders, size/crop time ids."""
        tokenizer = write_tiny_tokenizer(folder / "tokenizer")
        tokenizer_2 = write_tiny_tokenizer(folder / "tokenizer_2")
        # Widths differ as in the real model (768, 1280): single-file loading tells them apart so.
        text_encoder_2 = CLIPTextModelWithProjection(
            tiny_text_config(len(tokenizer_2), "gelu", hidden_size=48)
        )
        time_dim = 8
        unet = tiny_unet(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2),
            cross_attention_dim=32 + 48,  # both encoders' hidden states side by side
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=6 * time_dim
            + text_encoder_2.config.projection_dim,
        )
        scheduler = EulerDiscreteScheduler(
            **{
                k: v
                for k, v in SCHEDULER.items()
                if k not in ("skip_prk_steps", "set_alpha_to_one")
            },
            timestep_spacing="leading",
        )
        return StableDiffusionXLPipeline(
            vae=tiny_vae(scaling_factor=0.13025, force_upcast=True),
            text_encoder=tiny_text_encoder(len(tokenizer)),
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
        )

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

    def example_inputs(
        self, batch: int, side: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
        latents, text, _ = super().example_inputs(batch, side, dtype, device)
        width = self.pipe.text_encoder_2.config.projection_dim
        text["text_embeds"] = torch.zeros(batch, width, dtype=dtype, device=device)
        sizes = {
            "original_sizes": [(side, side)] * batch,
            "crop_top_lefts": [(0, 0)] * batch,
            "target_sizes": [(side, side)] * batch,
        }
        return latents, text, sizes

    def kohya_name(self, prefix: str, module_path: str) -> str:
        if prefix == DENOISER:
            module_path = original_unet_path(module_path, self.unet.config)
        return super().kohya_name(prefix, module_path)

    def kohya_blocks(self) -> tuple[int, int, int, bool]:
        """kohya's SDXL layout: 9 input, 3 middle, 9 output blocks, and one at each end."""
        return 9, 3, 9, True

    def kohya_block_index(self, name: str) -> int:
        """By the original UNet's names: time embedding 0, input_blocks_N 1 + N, middle_block_N
        10 + N, output_blocks_N 13 + N, out 22."""
        name = name.removeprefix("lora_unet_")
        for start, first in (("input_blocks_", 1), ("middle_block_", 10), ("output_blocks_", 13)):
            if name.startswith(start):
                return first + int(name[len(start) :].split("_")[0])
        if name.startswith(("time_embed_", "label_emb_")):
            return 0
        return 22 if name.startswith("out_") else -1
