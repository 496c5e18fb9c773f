"""Tiny random pipelines with the real families' layout, for the demo and the tests.

They are saved with `save_pretrained` and loaded back through the same `from_pretrained` code a
user's real model takes, so the whole path is exercised offline.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from stylelora.errors import UserError
from stylelora.export.atomic import give_umask_modes

TINY_VERSION = 3  # bump when a builder changes, so cached folders are rebuilt
SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    steps_offset=1,
    skip_prk_steps=True,
    set_alpha_to_one=False,
)


def cache_root() -> Path:
    return Path(os.environ.get("STYLELORA_CACHE", Path.home() / ".cache" / "stylelora"))


def write_tiny_tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIP tokenizer of single characters: real CLIP BPE files are too large to ship."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = [chr(c) for c in range(33, 127)]
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=77)
    tokenizer.save_pretrained(folder)
    return tokenizer


def tiny_text_config(
    vocab_size: int, hidden_act: str = "quick_gelu", hidden_size: int = 32
) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=hidden_act,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=32,
    )


def tiny_text_encoder(vocab_size: int, hidden_act: str = "quick_gelu") -> CLIPTextModel:
    return CLIPTextModel(tiny_text_config(vocab_size, hidden_act))


def tiny_vae(**config) -> AutoencoderKL:
    # Four blocks, so latents are 1/8 of the image side as in the real VAE.
    return AutoencoderKL(
        block_out_channels=(32, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        **config,
    )


def tiny_unet(**layout) -> UNet2DConditionModel:
    """The SD1.5 layout at tiny size; `layout` changes what another family's UNet differs in."""
    base = dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    return UNet2DConditionModel(**{**base, **layout})


def build_tiny_sd15(folder: Path) -> DiffusionPipeline:
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


def build_tiny_sd2v(folder: Path) -> DiffusionPipeline:
    """SD2.x-v layout: gelu (OpenCLIP) text encoder, linear projections, v-prediction."""
    tokenizer = write_tiny_tokenizer(folder / "tokenizer")
    unet = tiny_unet(attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True)
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


def build_tiny_sdxl(folder: Path) -> DiffusionPipeline:
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
        projection_class_embeddings_input_dim=6 * time_dim + text_encoder_2.config.projection_dim,
    )
    scheduler = EulerDiscreteScheduler(
        **{k: v for k, v in SCHEDULER.items() if k not in ("skip_prk_steps", "set_alpha_to_one")},
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


BUILDERS: dict[str, Callable[[Path], DiffusionPipeline]] = {
    "sd15": build_tiny_sd15,
    "sd2v": build_tiny_sd2v,
    "sdxl": build_tiny_sdxl,
}


def make_tiny_model(family: str, folder: Path, seed: int = 0) -> Path:
    """Write a complete diffusers-format tiny pipeline of `family` to `folder`, atomically."""
    if family not in BUILDERS:
        raise UserError(f"tiny model family {family!r}: choose one of {', '.join(BUILDERS)}")
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise UserError(f"{folder}: folder is not empty; choose a new folder for the tiny model")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        torch.manual_seed(seed)
        BUILDERS[family](staging).save_pretrained(staging)
        give_umask_modes(staging)  # mkdtemp made it 0700, save_pretrained's safetensors 0600
        if folder.exists():
            folder.rmdir()
        staging.rename(folder)
    except OSError:
        # Another process may have built the same cached model first; theirs is as good.
        if not (folder / "model_index.json").exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def tiny_model_path(family: str) -> Path:
    """The cached tiny pipeline of `family`, built on first use."""
    folder = cache_root() / "tiny" / f"{family}-v{TINY_VERSION}"
    if not (folder / "model_index.json").exists():
        make_tiny_model(family, folder)
    return folder
