"""Z-Image (Turbo and Base): a 6 B single-stream rectified-flow transformer on 2x2 patches of
Flux.1's 16-channel latents, conditioned on Qwen3-4B's second-to-last hidden states (the
caption in Qwen's chat template, each caption as long as its tokens).

Its pipeline calls the transformer with lists (one latent with a frame axis, one caption per
image), the timestep as 1 - sigma, and negates its output: `denoise` does the same, so the
objective is Flux.1's (target noise - latents). Adapters are written as ComfyUI reads them for
this model (`diffusion_model.<diffusers path>.lora_A/lora_B`, what ai-toolkit writes); ComfyUI
maps those split q/k/v names onto its fused `qkv`, and diffusers' Z-Image loader reads them.
`files.py` loads the files users hold; `skeleton/` is Tongyi-MAI/Z-Image-Turbo's folder
without weights or tokenizer (Qwen's tokenizer is found offline, see files.py).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from transformers import Qwen3Config, Qwen3Model

from stylelora.adapters.targets import Targets
from stylelora.errors import UserError
from stylelora.families.base import ModelFamily, autoencoder_kl_latents, compute_dtype, padded
from stylelora.families.llm import LLMTransformerFamily
from stylelora.families.objective import FlowMatchObjective, Objective
from stylelora.families.skeletons import source_dir
from stylelora.families.tiny import tiny_flux_vae, write_tiny_qwen_tokenizer
from stylelora.families.zimage.files import is_zimage_transformer, load_zimage_files, to_original

if TYPE_CHECKING:
    from stylelora.config import AdapterConfig

BLOCK_LISTS = ("noise_refiner", "context_refiner", "layers")
ATTENTION = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0")
MLP = ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
MODULATION = ("adaLN_modulation.0",)
PRESETS = {
    "attention": ATTENTION,
    "attn-mlp": ATTENTION + MLP,
    "full": ATTENTION + MLP + MODULATION,
}


class ZImage(LLMTransformerFamily):
    name = "zimage"
    title = "Z-Image"
    denoiser_input = "x"
    demo_shares = ("sd15", ("vae",))
    base_versions = ("z_image",)
    base_version_prefix = "z_image"

    def default_max_length(self) -> int:
        """The pipeline's 512, or fewer where the model's tokenizer says so (the demo twin's
        40)."""
        tokenizer = getattr(self.pipe, "tokenizer", None)  # none on the meta device
        return min(self.default_tokens, tokenizer.model_max_length if tokenizer else 512)

    @classmethod
    def matches(cls, pipe: DiffusionPipeline) -> bool:
        return isinstance(pipe, ZImagePipeline)

    @classmethod
    def reads_single_file(cls, keys: list[str]) -> bool:
        return is_zimage_transformer(keys)

    @classmethod
    def load_single_file(
        cls, path: Path, dtype: torch.dtype, config: str | None, parts: dict[str, Path | None]
    ) -> DiffusionPipeline:
        return load_zimage_files(path, dtype, config, parts)

    def single_file_state(self) -> dict[str, torch.Tensor]:
        """The transformer in the layout of the released file (fused q/k/v, `x_embedder`),
        which ComfyUI's loader and diffusers' `from_single_file` read."""
        return to_original(self.unet.state_dict())

    @classmethod
    def claims_names(cls, names: list[str]) -> bool:
        marks = ("layers.", "noise_refiner.", "context_refiner.")
        return any(
            name.removeprefix(prefix).startswith(marks)
            for name in names
            for prefix in ("diffusion_model.", "transformer.")
            if name.startswith(prefix)
        )

    @property
    def default_resolution(self) -> int:
        return self.vae.config.sample_size

    @property
    def size_step(self) -> int:
        return 2 * self.pipe.vae_scale_factor

    @property
    def modelspec_architecture(self) -> str:
        return "z-image"

    def scale_latents(self, sample: torch.Tensor) -> torch.Tensor:
        return autoencoder_kl_latents(self.vae, sample)

    def training_objective(self) -> Objective:
        return FlowMatchObjective(dict(self.pipe.scheduler.config))

    def encode_prompts(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """As ZImagePipeline encodes them: each caption's real tokens only, padded here to a
        batch with a mask saying which are real."""
        embeds, _ = self.pipe.encode_prompt(
            list(captions),  # the pipeline writes the chat template into the list it gets
            device=self.text_device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_length,
        )
        features, mask = padded(embeds)
        return {"cap_feats": features, "cap_mask": mask}

    def denoise(
        self,
        denoiser: torch.nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        text: dict[str, torch.Tensor],
        batch: dict[str, Any],
    ) -> torch.Tensor:
        """The pipeline's call: a frame axis on each latent, the timestep as it computes it
        from the scheduler's (1000 - 1000 sigma) / 1000, each caption's real tokens; the
        output negated (the model predicts latents - noise)."""
        dtype = compute_dtype(denoiser)
        frames = list(noisy.to(dtype).unsqueeze(2).unbind(0))
        features = text["cap_feats"].to(dtype)
        captions = [row[mask] for row, mask in zip(features, text["cap_mask"], strict=True)]
        t = (1000 - timesteps.float() * 1000) / 1000
        out = denoiser(frames, t, captions, return_dict=False)[0]
        return -torch.stack(out).squeeze(2)

    def pipeline_text_kwargs(
        self, prompt: str, negative: str, size: tuple[int, int]
    ) -> dict[str, Any]:
        return {
            "prompt": prompt,
            "negative_prompt": negative or None,
            "max_sequence_length": self.max_length,
        }

    def denoiser_targets(self, cfg: AdapterConfig) -> Targets:
        """In every block (the refiners' too): `attention` (q, k, v, out), `attn-mlp` and the
        feed-forward (ai-toolkit's and musubi-tuner's modules), `full` and the modulation."""
        preset = cfg.unet_targets
        if preset not in PRESETS:
            raise UserError(
                f"adapter.unet_targets = {preset!r}: Z-Image's attention is joint (no separate "
                "cross-attention); choose attention, attn-mlp or full"
            )
        paths = [
            f"{blocks}.{index}.{inner}"
            for blocks in BLOCK_LISTS
            for index, block in enumerate(getattr(self.unet, blocks))
            for inner in PRESETS[preset]
            if hasattr_path(block, inner)
        ]
        return Targets(main=paths)

    def swappable_blocks(self) -> list[torch.nn.Module]:
        return list(self.unet.layers)

    def example_inputs(
        self, batch: int, side: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
        config = self.unet.config
        latent = side // self.pipe.vae_scale_factor
        latents = torch.zeros(batch, config.in_channels, latent, latent, dtype=dtype, device=device)
        features = torch.zeros(
            batch, self.max_length, config.cap_feat_dim, dtype=dtype, device=device
        )
        mask = torch.ones(batch, self.max_length, dtype=torch.bool, device=device)
        return latents, {"cap_feats": features, "cap_mask": mask}, {}

    def example_prompt_pass(self, device: torch.device) -> None:
        ids = torch.zeros(1, self.max_length, dtype=torch.long, device=device)
        self.pipe.text_encoder(input_ids=ids, output_hidden_states=True)

    @classmethod
    def on_meta_device(cls) -> ModelFamily:
        """Z-Image-Turbo (its configs bundled in `skeleton/`) on the meta device."""
        folder = source_dir(cls.name)
        with torch.device("meta"):
            transformer = ZImageTransformer2DModel.from_config(
                ZImageTransformer2DModel.load_config(folder / "transformer")
            )
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
            text_encoder = Qwen3Model(Qwen3Config.from_pretrained(folder / "text_encoder"))
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler")
        parts = dict(
            transformer=transformer,
            vae=vae,
            text_encoder=text_encoder,
            scheduler=scheduler,
            vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1),  # as the pipeline's
        )
        return cls(SimpleNamespace(**parts))

    @classmethod
    def build_tiny(cls, folder: Path) -> DiffusionPipeline:
        """Z-Image's layout at tiny size: two main blocks and one of each refiner, Flux.1's
        16-channel VAE shape, a two-layer Qwen3 with a byte-level tokenizer."""
        tokenizer = write_tiny_qwen_tokenizer(folder / "tokenizer")
        text_encoder = Qwen3Model(
            Qwen3Config(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=16,
                max_position_embeddings=1024,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        vae = tiny_flux_vae()
        transformer = ZImageTransformer2DModel(
            in_channels=16,
            dim=64,  # as wide as a patch's 2 x 2 x 16 values, so the output can fit any target
            n_layers=2,
            n_refiner_layers=1,
            n_heads=4,
            n_kv_heads=4,
            cap_feat_dim=32,
            axes_dims=[4, 6, 6],
            axes_lens=[256, 64, 64],
        )
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
            source_dir(cls.name) / "scheduler"  # Z-Image-Turbo's
        )
        return ZImagePipeline(
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            transformer=transformer,
        )


def hasattr_path(module: torch.nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True
