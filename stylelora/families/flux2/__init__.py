"""Flux.2 (dev, klein 4B and 9B): a rectified-flow transformer on 128-channel latents (the
VAE's 32 channels in 2x2 patches, normalised by the VAE's batch-norm statistics), conditioned
on three hidden states of an LLM stacked: Mistral Small 3.1's layers 10, 20 and 30 for dev
(`Flux2Pipeline`, a guidance embedding), Qwen3's 9, 18 and 27 for klein (`Flux2KleinPipeline`:
4B with Qwen3-4B, 9B with Qwen3-8B; its distilled models sample without CFG, its base models
with true CFG against an empty prompt).

The variants are told apart by the pipeline class and the transformer's width; their adapters
do not fit each other, so each model accepts its own variant's (`base_versions` of a loaded
model). Adapters are written as ComfyUI reads Flux.2 adapters, by BFL's names only
(`diffusion_model.double_blocks.N.img_attn.qkv`, `diffusion_model.single_blocks.N.linear1`):
diffusers' q, k and v of a double block are fused into BFL's `qkv` (the up block-diagonal, the
downs stacked), which diffusers' own Flux.2 loader splits back exactly (bfl.py). `files.py`
loads the files users hold; `skeleton/` is black-forest-labs/FLUX.2-dev's folder without weights
or tokenizer, `skeleton_klein_4b/` and `skeleton_klein_9b/` klein's.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import (
    AutoencoderKLFlux2,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
)
from transformers import AutoConfig, Mistral3ForConditionalGeneration, Qwen3ForCausalLM

from stylelora.adapters.targets import Targets
from stylelora.errors import UserError
from stylelora.families.base import (
    DENOISER,
    MAX_SEQUENCE_LENGTH,
    ModelFamily,
    compute_dtype,
    no_block_wise,
)
from stylelora.families.flux import BLOCK_OPTIONS, chosen_blocks
from stylelora.families.flux2.bfl import bfl_module, fused_members, to_bfl
from stylelora.families.flux2.files import (
    is_flux2_transformer,
    load_flux2_files,
    skeleton_folder,
)
from stylelora.families.flux2.tiny import build_tiny_dev, build_tiny_klein
from stylelora.families.llm import LLMTransformerFamily
from stylelora.families.objective import FlowMatchObjective, Objective

if TYPE_CHECKING:
    from stylelora.config import AdapterConfig

# Module paths inside a block (diffusers' names) each preset adapts.
DOUBLE_ATTENTION = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)
DOUBLE_MLP = ("ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out")
# A single block's attention shares its Linears with its MLP (BFL's linear1 and linear2).
SINGLE_BLOCK = ("attn.to_qkv_mlp_proj", "attn.to_out")
PRESETS = ("attention", "attn-mlp", "full")
# The shared modulations `full` adds, by the kind of blocks they modulate.
MODULATION_OF = {
    "transformer_blocks": (
        "double_stream_modulation_img.linear",
        "double_stream_modulation_txt.linear",
    ),
    "single_transformer_blocks": ("single_stream_modulation.linear",),
}
# Each variant's ss_base_model_version and SAI model-spec architecture.
VERSIONS = {"dev": "flux2_dev", "klein_4b": "flux2_klein_4b", "klein_9b": "flux2_klein_9b"}
ARCHITECTURES = {"dev": "flux-2-dev", "klein_4b": "flux-2-klein-4b", "klein_9b": "flux-2-klein-9b"}


def variant_named(model: str | None) -> str:
    """The variant a hub id, a path or a base version names: klein 9B or 4B where it says
    klein, else dev."""
    text = (model or "").lower()
    if "klein" not in text:
        return "dev"
    return "klein_9b" if "9b" in text else "klein_4b"


def is_bfl_flux2(name: str) -> bool:
    """A block module in BFL's names under `diffusion_model.`, not Flux.1's per-block
    modulation (`img_mod.lin`, `modulation.lin`)."""
    bfl = name.removeprefix("diffusion_model.")
    blocks = bfl != name and bfl.startswith(("double_blocks.", "single_blocks."))
    return blocks and not any(mark in bfl for mark in ("_mod.", ".modulation."))


class Flux2(LLMTransformerFamily):
    name = "flux2"
    title = "Flux.2"
    options = (MAX_SEQUENCE_LENGTH, *BLOCK_OPTIONS)
    fuses_modules = True
    base_versions = tuple(VERSIONS.values())
    base_version_prefix = "flux2"
    # dev's guidance embedding is trained at 1.0, as Flux.1 dev's is: the adapter then renders
    # at whatever guidance the user samples with.
    training_guidance = 1.0

    def __init__(self, pipe: DiffusionPipeline):
        super().__init__(pipe)
        # A loaded model takes its own variant's adapters only (`sample` checks this).
        self.base_versions = (self.base_version,)
        if self.distilled:
            self.notes.append(
                "a distilled Flux.2 klein model samples without CFG: sample.guidance_scale "
                "and negative prompts do not apply"
            )

    # --- the model and its variant ------------------------------------------------------------

    @classmethod
    def matches(cls, pipe: DiffusionPipeline) -> bool:
        return isinstance(pipe, (Flux2Pipeline, Flux2KleinPipeline))

    @property
    def klein(self) -> bool:
        return isinstance(self.pipe, Flux2KleinPipeline)

    @property
    def variant(self) -> str:
        """dev, klein_4b or klein_9b (a tiny klein model: 4B, the narrower)."""
        if not self.klein:
            return "dev"
        config = self.unet.config
        width = config.num_attention_heads * config.attention_head_dim
        return "klein_9b" if width >= 4096 else "klein_4b"

    @property
    def distilled(self) -> bool:
        """A step-distilled klein model: its pipeline ignores CFG."""
        return self.klein and bool(self.pipe.config.is_distilled)

    @property
    def base_version(self) -> str:
        return VERSIONS[self.variant]

    @property
    def modelspec_architecture(self) -> str:
        return ARCHITECTURES[self.variant]

    # --- files --------------------------------------------------------------------------------

    @classmethod
    def reads_single_file(cls, keys: list[str]) -> bool:
        return is_flux2_transformer(keys)

    @classmethod
    def load_single_file(
        cls, path: Path, dtype: torch.dtype, config: str | None, parts: dict[str, Path | None]
    ) -> DiffusionPipeline:
        return load_flux2_files(path, dtype, config, parts)

    def single_file_state(self) -> dict[str, torch.Tensor]:
        """The transformer in BFL's layout, as its released files and ComfyUI's hold it."""
        return to_bfl(self.unet.state_dict())

    @classmethod
    def claims_names(cls, names: list[str]) -> bool:
        """BFL's names under `diffusion_model.` but Flux.1's per-block modulation, and the
        modules only Flux.2's diffusers transformer has."""
        marks = (
            "double_stream_modulation_",
            "single_stream_modulation.",
            ".attn.to_qkv_mlp_proj",
            ".ff.linear_in",
            ".ff_context.linear_in",
        )
        return any(any(mark in name for mark in marks) or is_bfl_flux2(name) for name in names)

    # --- latents, text and the denoiser -------------------------------------------------------

    @property
    def default_resolution(self) -> int:
        return self.pipe.default_sample_size * self.pipe.vae_scale_factor

    @property
    def size_step(self) -> int:
        """The pipelines round sides to the VAE's scale times the 2x2 patch."""
        return 2 * self.pipe.vae_scale_factor

    def scale_latents(self, sample: torch.Tensor) -> torch.Tensor:
        """As the pipelines encode an image: 2x2 patches into channels, normalised by the
        VAE's batch-norm running statistics."""
        latents = Flux2Pipeline._patchify_latents(sample)
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps)
        return (latents - mean) / std.to(latents.device, latents.dtype)

    def training_objective(self) -> Objective:
        # Latents are patchified already: one token per latent position.
        return FlowMatchObjective(dict(self.pipe.scheduler.config), patch_size=1)

    def encode_prompts(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """The pipeline's own encoding: the chat template, padded to max_sequence_length
        tokens, three hidden states stacked (the transformer attends to the padding too)."""
        embeds, _ = self.pipe.encode_prompt(
            prompt=list(captions), device=self.text_device, max_sequence_length=self.max_length
        )
        return {"prompt_embeds": embeds}

    def denoise(
        self,
        denoiser: torch.nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        text: dict[str, torch.Tensor],
        batch: dict[str, Any],
    ) -> torch.Tensor:
        """The pipeline's call: latents packed into a sequence with their 4D position ids,
        the text's ids, the timestep as it computes it (the scheduler's 1000 sigma in the
        latents' dtype, over 1000), dev's guidance at 1.0; the output unpacked."""
        dtype = compute_dtype(denoiser)
        count, _, height, width = noisy.shape
        latents = noisy.to(dtype)
        image_ids = Flux2Pipeline._prepare_latent_ids(latents).to(noisy.device)
        embeds = text["prompt_embeds"].to(dtype)
        text_ids = Flux2Pipeline._prepare_text_ids(embeds).to(noisy.device)
        guidance = None
        if denoiser.config.guidance_embeds:
            guidance = torch.full((count,), self.training_guidance, device=noisy.device)
        out = denoiser(
            hidden_states=Flux2Pipeline._pack_latents(latents),
            timestep=(timesteps.float() * 1000).to(dtype) / 1000,
            guidance=guidance,
            encoder_hidden_states=embeds,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        return Flux2KleinPipeline._unpack_latents_with_ids(out, image_ids, height, width)

    def pipeline_text_kwargs(
        self, prompt: str, negative: str, size: tuple[int, int]
    ) -> dict[str, Any]:
        """dev takes no negative prompt (its guidance is embedded); a base klein model's CFG
        contrasts with an empty prompt, or with `negative` encoded as the pipeline encodes."""
        kwargs: dict[str, Any] = {"prompt": prompt, "max_sequence_length": self.max_length}
        if self.klein and not self.distilled and negative:
            with torch.no_grad():
                kwargs["negative_prompt_embeds"] = self.pipe.encode_prompt(
                    prompt=[negative],
                    device=self.pipe._execution_device,
                    max_sequence_length=self.max_length,
                )[0]
        return kwargs

    def pipeline_guidance_kwargs(self, scale: float) -> dict[str, Any]:
        """dev: the embedded guidance; base klein: true CFG; distilled klein ignores it (1.0
        spares its pipeline's warning)."""
        return {"guidance_scale": 1.0 if self.distilled else scale}

    # --- adapters -----------------------------------------------------------------------------

    def denoiser_targets(self, cfg: AdapterConfig) -> Targets:
        """`attention`: the double blocks' attention projections and the single blocks'
        linear1 and linear2 (attention and MLP share them); `attn-mlp` (musubi-tuner's and
        ai-toolkit's choice): and the double blocks' MLPs; `full`: and the modulations the
        chosen blocks share. Only in the blocks `cfg.train_blocks` and the index lists choose."""
        preset = cfg.unet_targets
        if preset not in PRESETS:
            raise UserError(
                f"adapter.unet_targets = {preset!r}: Flux.2's attention is joint (no separate "
                "cross-attention); choose attention, attn-mlp or full"
            )
        inner = {
            "transformer_blocks": DOUBLE_ATTENTION + (DOUBLE_MLP if preset != "attention" else ()),
            "single_transformer_blocks": SINGLE_BLOCK,
        }
        paths = []
        for kind, indices in self.chosen_blocks(cfg).items():
            paths += [f"{kind}.{i}.{module}" for i in sorted(indices) for module in inner[kind]]
            if preset == "full" and indices:
                paths += list(MODULATION_OF[kind])
        return Targets(main=paths)

    def chosen_blocks(self, cfg: AdapterConfig) -> dict[str, set[int]]:
        config = self.unet.config
        counts = {
            "transformer_blocks": ("double", config.num_layers),
            "single_transformer_blocks": ("single", config.num_single_layers),
        }
        return chosen_blocks(cfg, counts)

    def file_module(self, prefix: str, module_path: str) -> tuple[str, tuple[str, ...]]:
        """BFL's module under `diffusion_model.`, the only names ComfyUI reads for Flux.2,
        with the diffusers modules fused into it."""
        if prefix != DENOISER:
            raise ValueError(f"a Flux.2 adapter has no {prefix} modules")
        return f"{self.denoiser_prefix}{bfl_module(module_path)}", fused_members(module_path)

    def swappable_blocks(self) -> list[torch.nn.Module]:
        return [*self.unet.transformer_blocks, *self.unet.single_transformer_blocks]

    def kohya_blocks(self) -> tuple[int, int, int, bool]:
        raise no_block_wise(
            self,
            "choose its blocks with adapter.train_blocks, double_block_indices and "
            "single_block_indices",
        )

    # --- memory counts ------------------------------------------------------------------------

    def example_inputs(
        self, batch: int, side: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
        config = self.unet.config
        latent = side // self.size_step
        latents = torch.zeros(batch, config.in_channels, latent, latent, dtype=dtype, device=device)
        embeds = torch.zeros(
            batch, self.max_length, config.joint_attention_dim, dtype=dtype, device=device
        )
        return latents, {"prompt_embeds": embeds}, {}

    def example_prompt_pass(self, device: torch.device) -> None:
        """The pipelines' call, logits included. Without their all-true attention mask and with
        a cache: transformers reads a mask's values to simplify it (which meta tensors cannot
        answer), and the cache (a few MiB at this length) spares a look at the positions."""
        ids = torch.zeros(1, self.max_length, dtype=torch.long, device=device)
        self.pipe.text_encoder(input_ids=ids, output_hidden_states=True)

    @classmethod
    def on_meta_device(cls) -> ModelFamily:
        """FLUX.2 dev (its configs bundled in `skeleton/`) on the meta device."""
        return cls.variant_on_meta_device("dev")

    @classmethod
    def variant_on_meta_device(cls, model: str | None) -> ModelFamily:
        """The variant `model` names (dev, or klein 4B or 9B by a hub id such as
        black-forest-labs/FLUX.2-klein-4B) on the meta device, from its bundled configs."""
        variant = variant_named(model)
        folder = skeleton_folder(variant)
        dev = variant == "dev"
        encoder = Mistral3ForConditionalGeneration if dev else Qwen3ForCausalLM
        with torch.device("meta"):
            transformer = Flux2Transformer2DModel.from_config(
                Flux2Transformer2DModel.load_config(folder / "transformer")
            )
            vae = AutoencoderKLFlux2.from_config(AutoencoderKLFlux2.load_config(folder / "vae"))
            text_encoder = encoder(AutoConfig.from_pretrained(folder / "text_encoder"))
        modules = dict(
            transformer=transformer,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=None,
            scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler"),
        )
        pipe = Flux2Pipeline(**modules) if dev else Flux2KleinPipeline(**modules, is_distilled=True)
        return cls(pipe)

    @classmethod
    def build_tiny(cls, folder: Path) -> DiffusionPipeline:
        """klein's layout at tiny size (tiny.py); `build_tiny_dev` builds dev's."""
        return build_tiny_klein(folder)

    @classmethod
    def build_tiny_dev(cls, folder: Path) -> DiffusionPipeline:
        """dev's layout at tiny size: Mistral3 with a Pixtral vision tower (tiny.py)."""
        return build_tiny_dev(folder)
