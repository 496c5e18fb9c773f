"""Flux.1 (dev and schnell): a rectified-flow transformer on 2x2 patches of 16-channel latents,
conditioned on CLIP-L's pooled output and T5-XXL's sequence; dev also embeds a guidance value.

kohya, ComfyUI and Forge name its modules after BFL's layout (`double_blocks.N.img_attn.qkv`,
`single_blocks.N.linear1`), where diffusers splits q, k and v (and the single blocks' MLP input)
into separate Linears: `file_module` maps each diffusers module to its BFL module and its place
in that module's fused output (bfl.py). `files.py` loads the files users hold. `skeleton/` is
black-forest-labs/FLUX.1-dev's folder without weights (the transformer's sizes are read off a
BFL file, so schnell loads from it too; T5's SentencePiece tokenizer is not shipped, see
files.py); `demo/` the small Flux-layout twin of `demo:sd15` (`demo:flux`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)
from pydantic import Field
from transformers import T5Config, T5EncoderModel

from stylelora.adapters.targets import Targets
from stylelora.errors import UserError
from stylelora.families.base import (
    DENOISER,
    ModelFamily,
    Option,
    autoencoder_kl_latents,
    compute_dtype,
    no_block_wise,
)
from stylelora.families.clip import clip_targets, kohya_clip_name
from stylelora.families.flux.bfl import (
    BLOCK_PATH,
    MODULATION,
    bfl_module,
    fused_members,
    to_bfl,
)
from stylelora.families.flux.files import PARTS, is_bfl_transformer, load_flux_files
from stylelora.families.objective import FlowMatchObjective, Objective
from stylelora.families.skeletons import source_dir
from stylelora.families.tiny import (
    tiny_flux_vae,
    tiny_text_encoder,
    write_tiny_t5_tokenizer,
    write_tiny_tokenizer,
)

if TYPE_CHECKING:
    from stylelora.config import AdapterConfig

T5_MAX_LENGTH = Option(
    "t5_max_length",
    Annotated[int, Field(ge=1, le=512)] | None,
    None,
    "T5 tokens per prompt (kohya's t5xxl_max_token_length); unset: what the model was trained "
    "with, 512 for Flux.1 dev, 256 for schnell",
    flag={"type": int, "help": "Flux.1: T5 tokens per prompt (default 512 dev, 256 schnell)"},
)
APPLY_T5_ATTN_MASK = Option(
    "apply_t5_attn_mask",
    bool,
    False,
    "mask T5's padding in T5 and in the transformer's joint attention (kohya's option; BFL "
    "trained without it)",
    flag={"action": "store_true", "help": "Flux.1: mask T5's padding, as trained"},
)
# kohya's train_blocks, train_double_block_indices and train_single_block_indices (Flux.2 too).
TRAIN_BLOCKS = Option(
    "adapter.train_blocks",
    Literal["all", "double", "single"],
    "all",
    "which transformer blocks get adapters: all, the double-stream or the single-stream ones",
)
DOUBLE_BLOCK_INDICES = Option(
    "adapter.double_block_indices",
    list[Annotated[int, Field(ge=0)]] | None,
    None,
    "the double-stream blocks that get adapters (unset: every one)",
)
SINGLE_BLOCK_INDICES = Option(
    "adapter.single_block_indices",
    list[Annotated[int, Field(ge=0)]] | None,
    None,
    "the single-stream blocks that get adapters (unset: every one)",
)
BLOCK_OPTIONS = (TRAIN_BLOCKS, DOUBLE_BLOCK_INDICES, SINGLE_BLOCK_INDICES)


def chosen_blocks(cfg: AdapterConfig, counts: dict[str, tuple[str, int]]) -> dict[str, set[int]]:
    """The block indices that get adapters, per block list of the transformer (`counts`: its
    attribute -> ("double" or "single", how many blocks it holds)), as `cfg.train_blocks` and
    the index lists choose them."""
    chosen = {}
    for attr, (kind, count) in counts.items():
        field = f"{kind}_block_indices"
        indices = getattr(cfg, field)
        if bad := [i for i in indices or [] if i >= count]:
            raise UserError(
                f"adapter.{field}: block {bad[0]} does not exist; this model's {kind} "
                f"blocks are 0 to {count - 1}"
            )
        wanted = cfg.train_blocks in ("all", kind)
        chosen[attr] = set(range(count) if indices is None else indices) if wanted else set()
    return chosen


def joint_mask(t5_mask: torch.Tensor, image_tokens: int) -> torch.Tensor:
    """The joint attention's key mask: T5's real tokens, then every image token (B, 1, 1, L)."""
    image = torch.ones(t5_mask.shape[0], image_tokens, dtype=torch.bool, device=t5_mask.device)
    return torch.cat([t5_mask.bool(), image], dim=1)[:, None, None, :]


class Flux(ModelFamily):
    name = "flux"
    title = "Flux.1"
    denoiser_input = "hidden_states"
    denoiser_attr = "transformer"
    # CLIP-L only: kohya and ComfyUI call it te1; T5 stays frozen (it is 4.7 B parameters).
    text_encoder_attrs = {"lora_te1": "text_encoder"}
    prompt_encoder_attrs = ("text_encoder", "text_encoder_2")
    parts = PARTS
    options = (T5_MAX_LENGTH, APPLY_T5_ATTN_MASK, *BLOCK_OPTIONS)
    native_format = "kohya"
    denoiser_prefix = "lora_unet_"
    fuses_modules = True
    objective_type = FlowMatchObjective
    block_wise = False
    swaps_blocks = True
    demo_shares = ("sd15", ("vae", "text_encoder", "tokenizer"))
    base_versions = ("flux1",)
    base_version_prefix = "flux1"
    # dev's guidance embedding is trained at 1.0, as kohya advises: the LoRA then renders at any
    # guidance the user samples with.
    training_guidance = 1.0

    def apply_settings(self) -> None:
        self.t5_tokens = self.settings[T5_MAX_LENGTH.key]
        self.t5_mask = self.settings[APPLY_T5_ATTN_MASK.key]

    @classmethod
    def matches(cls, pipe: DiffusionPipeline) -> bool:
        return isinstance(pipe, FluxPipeline)

    @classmethod
    def reads_single_file(cls, keys: list[str]) -> bool:
        return is_bfl_transformer(keys)

    @classmethod
    def load_single_file(
        cls, path: Path, dtype: torch.dtype, config: str | None, parts: dict[str, Path | None]
    ) -> DiffusionPipeline:
        """BFL's transformer file, with the VAE and text encoders from `parts` (`ae`, `clip_l`,
        `t5xxl`) or the config folder."""
        return load_flux_files(path, dtype, config, parts)

    def single_file_state(self) -> dict[str, torch.Tensor]:
        """The transformer in BFL's layout: what Flux checkpoints on Civitai hold and ComfyUI's
        and Forge's model loaders read (the VAE and text encoders stay separate files)."""
        return to_bfl(self.unet.state_dict())

    @classmethod
    def claims_names(cls, names: list[str]) -> bool:
        """kohya's BFL names, or any transformer's diffusers names: the registry asks the
        families with narrower claims first."""
        marks = ("lora_unet_double_blocks_", "lora_unet_single_blocks_", "transformer.")
        return any(n.startswith(marks) for n in names)

    @property
    def guidance_distilled(self) -> bool:
        """dev embeds a guidance value; schnell does not."""
        return bool(self.unet.config.guidance_embeds)

    @property
    def modelspec_architecture(self) -> str:
        return "flux-1-dev" if self.guidance_distilled else "flux-1-schnell"

    @property
    def base_version(self) -> str:
        return "flux1"

    @property
    def max_sequence_length(self) -> int:
        """T5 tokens per prompt: `t5_max_length`, else 512 for dev, 256 for schnell, as BFL
        trained them, or fewer where the model's T5 tokenizer says so (the demo twin's 96)."""
        default = 512 if self.guidance_distilled else 256
        tokenizer = getattr(self.pipe, "tokenizer_2", None)  # none on the meta device
        return self.t5_tokens or min(default, tokenizer.model_max_length if tokenizer else default)

    def pipeline_text_kwargs(
        self, prompt: str, negative: str, size: tuple[int, int]
    ) -> dict[str, Any]:
        """Previews encode prompts as training does: the same T5 length, and with the T5 mask,
        the same embeddings and the joint attention's mask for an image of `size`."""
        if not self.t5_mask:
            return {
                "prompt": prompt,
                "negative_prompt": negative or None,
                "max_sequence_length": self.max_sequence_length,
            }
        with torch.no_grad():
            text = self.encode_prompts([prompt])
        patch = 2 * self.pipe.vae_scale_factor
        tokens = (size[0] // patch) * (size[1] // patch)
        return {
            "prompt_embeds": text["encoder_hidden_states"],
            "pooled_prompt_embeds": text["pooled_projections"],
            "max_sequence_length": self.max_sequence_length,
            "joint_attention_kwargs": {"attention_mask": joint_mask(text["t5_mask"], tokens)},
        }

    @property
    def default_resolution(self) -> int:
        return self.pipe.default_sample_size * self.pipe.vae_scale_factor

    def scale_latents(self, sample: torch.Tensor) -> torch.Tensor:
        return autoencoder_kl_latents(self.vae, sample)

    def training_objective(self) -> Objective:
        return FlowMatchObjective(dict(self.pipe.scheduler.config))

    def encode_prompts(self, captions: list[str]) -> dict[str, torch.Tensor]:
        if self.t5_mask:
            return self.masked_prompts(captions)
        embeds, pooled, _ = self.pipe.encode_prompt(
            captions,
            prompt_2=None,
            device=self.text_device,
            num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def masked_prompts(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """As FluxPipeline encodes them, but T5 attends only to the real tokens (its own
        attention mask, which FluxPipeline does not pass), and the mask is kept for the
        transformer's joint attention, as kohya's apply_t5_attn_mask does."""
        tokens = self.pipe.tokenizer_2(
            captions,
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            return_tensors="pt",
        )
        ids = tokens.input_ids.to(self.text_device)
        mask = tokens.attention_mask.to(self.text_device)
        embeds = self.pipe.text_encoder_2(ids, attention_mask=mask)[0]
        pooled = self.pipe._get_clip_prompt_embeds(captions, device=self.text_device)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled, "t5_mask": mask}

    def denoise(
        self,
        denoiser: torch.nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        text: dict[str, torch.Tensor],
        batch: dict[str, Any],
    ) -> torch.Tensor:
        """Pack the latents into 2x2 patches with their position ids, call the transformer
        (sigmas as its timesteps, as FluxPipeline does), unpack its output."""
        dtype = compute_dtype(denoiser)
        count, channels, height, width = noisy.shape
        packed = FluxPipeline._pack_latents(noisy.to(dtype), count, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(
            count, height // 2, width // 2, noisy.device, dtype
        )
        embeds = text["encoder_hidden_states"].to(dtype)
        text_ids = torch.zeros(embeds.shape[1], 3, device=noisy.device, dtype=dtype)
        guidance = None
        if self.guidance_distilled:
            guidance = torch.full((count,), self.training_guidance, device=noisy.device)
        attention = {}
        if "t5_mask" in text:
            image_tokens = packed.shape[1]
            attention = {"attention_mask": joint_mask(text["t5_mask"], image_tokens)}
        out = denoiser(
            hidden_states=packed,
            timestep=timesteps.to(dtype),
            guidance=guidance,
            pooled_projections=text["pooled_projections"].to(dtype),
            encoder_hidden_states=embeds,
            txt_ids=text_ids,
            img_ids=image_ids,
            joint_attention_kwargs=attention or None,
            return_dict=False,
        )[0]
        scale = self.pipe.vae_scale_factor
        return FluxPipeline._unpack_latents(out, height * scale, width * scale, scale)

    def denoiser_targets(self, cfg: AdapterConfig) -> Targets:
        """`attention`: every attention projection; `attn-mlp` (kohya's default): and the
        MLPs, all of the blocks but their modulation; `full`: every Linear of the blocks. Only
        in the blocks `cfg.train_blocks` and the index lists choose."""
        preset = cfg.unet_targets
        if preset not in ("attention", "attn-mlp", "full"):
            raise UserError(
                f"adapter.unet_targets = {preset!r}: Flux's attention is joint (no separate "
                "cross-attention); choose attention, attn-mlp or full"
            )
        chosen = self.chosen_blocks(cfg)
        paths = []
        for path, module in self.unet.named_modules():
            match = BLOCK_PATH.fullmatch(path)
            if not match or not isinstance(module, torch.nn.Linear):
                continue
            kind, index, inner = match.groups()
            if int(index) not in chosen[kind]:
                continue
            if preset == "attention" and not inner.startswith("attn."):
                continue
            if preset == "attn-mlp" and inner in MODULATION:
                continue
            paths.append(path)
        return Targets(main=paths)

    def swappable_blocks(self) -> list[torch.nn.Module]:
        return [*self.unet.transformer_blocks, *self.unet.single_transformer_blocks]

    def chosen_blocks(self, cfg: AdapterConfig) -> dict[str, set[int]]:
        """Block indices that get adapters, per kind (diffusers' names for double and single)."""
        config = self.unet.config
        counts = {
            "transformer_blocks": ("double", config.num_layers),
            "single_transformer_blocks": ("single", config.num_single_layers),
        }
        return chosen_blocks(cfg, counts)

    def text_encoder_targets(self, preset: str) -> Targets:
        return clip_targets(preset)

    def file_module(self, prefix: str, module_path: str) -> tuple[str, tuple[str, ...]]:
        """kohya's names: BFL's modules for the transformer (q, k, v fused), CLIP's for te1."""
        if prefix != DENOISER:
            return kohya_clip_name(prefix, module_path), (module_path,)
        name = "lora_unet_" + bfl_module(module_path).replace(".", "_")
        return name, fused_members(module_path)

    def kohya_blocks(self) -> tuple[int, int, int, bool]:
        raise no_block_wise(
            self,
            "choose its blocks with adapter.train_blocks, double_block_indices and "
            "single_block_indices",
        )

    def kohya_block_index(self, name: str) -> int:
        raise no_block_wise(self)

    def metadata(self) -> dict[str, str]:
        """kohya's Flux network module, as its Flux LoRAs say (ComfyUI reads the names)."""
        return {
            "ss_base_model_version": self.base_version,
            "ss_network_module": "networks.lora_flux",
        }

    def example_inputs(
        self, batch: int, side: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
        config = self.unet.config
        latent = side // self.pipe.vae_scale_factor
        shape = (batch, config.in_channels // 4, latent, latent)
        latents = torch.zeros(shape, dtype=dtype, device=device)
        tokens = self.max_sequence_length
        text = {
            "encoder_hidden_states": torch.zeros(
                batch, tokens, config.joint_attention_dim, dtype=dtype, device=device
            ),
            "pooled_projections": torch.zeros(
                batch, config.pooled_projection_dim, dtype=dtype, device=device
            ),
        }
        return latents, text, {}

    def example_prompt_pass(self, device: torch.device) -> None:
        tokens = self.max_sequence_length
        self.pipe.text_encoder_2(torch.zeros(1, tokens, dtype=torch.long, device=device))
        self.pipe.text_encoder(torch.zeros(1, 77, dtype=torch.long, device=device))

    @classmethod
    def on_meta_device(cls) -> ModelFamily:
        """Flux.1 dev (its configs bundled in `skeleton/`) on the meta device: what kohya
        names are checked against, and what the memory benchmark counts."""
        from types import SimpleNamespace

        from transformers import CLIPTextConfig, CLIPTextModel

        folder = source_dir(cls.name)
        with torch.device("meta"):
            transformer = FluxTransformer2DModel.from_config(
                FluxTransformer2DModel.load_config(folder / "transformer")
            )
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
            text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
            text_encoder_2 = T5EncoderModel(T5Config.from_pretrained(folder / "text_encoder_2"))
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler")
        parts = dict(
            transformer=transformer,
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            scheduler=scheduler,
            vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1),  # as FluxPipeline's
        )
        return cls(SimpleNamespace(**parts))

    @classmethod
    def build_tiny(cls, folder: Path) -> DiffusionPipeline:
        """Flux.1 dev's layout at tiny size: one double and one single block, 16 latent
        channels, CLIP and T5 text encoders, the guidance embedding."""
        tokenizer = write_tiny_tokenizer(folder / "tokenizer")
        tokenizer_2 = write_tiny_t5_tokenizer(folder / "tokenizer_2")
        text_encoder_2 = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer_2),
                d_model=32,
                d_kv=8,
                d_ff=64,
                num_layers=2,
                num_heads=4,
                feed_forward_proj="gated-gelu",
                decoder_start_token_id=0,
            )
        )
        vae = tiny_flux_vae()
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        )
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
            source_dir("flux") / "scheduler"  # Flux.1 dev's
        )
        return FluxPipeline(
            scheduler=scheduler,
            vae=vae,
            text_encoder=tiny_text_encoder(len(tokenizer)),
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            transformer=transformer,
        )
