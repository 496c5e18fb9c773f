"""Tiny random pipelines with the real families' layout, for the demo and the tests: the parts
each family's `build_tiny` puts together, and the cached, atomically written folders.

They are saved with `save_pretrained` and loaded back through the same `from_pretrained` code a
user's real model takes, so the whole path is exercised offline.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    UNet2DConditionModel,
)
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE, Unigram
from transformers import (
    AutoTokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    PreTrainedTokenizerBase,
    Qwen2TokenizerFast,
    T5TokenizerFast,
)

from stylelora.errors import UserError
from stylelora.export.atomic import give_umask_modes
from stylelora.families.skeletons import cache_root

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


def write_tiny_t5_tokenizer(folder: Path) -> T5TokenizerFast:
    """A T5 tokenizer of single characters (a Unigram model, as T5's): nothing from a hub."""
    pieces = ["<pad>", "</s>", "<unk>", "\u2581", *(chr(c) for c in range(33, 127))]
    model = Unigram([(piece, 0.0 if i < 3 else -1.0) for i, piece in enumerate(pieces)], unk_id=2)
    tokenizer = T5TokenizerFast(
        tokenizer_object=Tokenizer(model),
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_ids=0,
    )
    tokenizer.save_pretrained(folder)
    return T5TokenizerFast.from_pretrained(folder)


# Qwen's chat template for plain text messages (Qwen3's: `enable_thinking=False` adds the
# empty thinking block), the form the pipelines apply to a caption.
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}{%- if enable_thinking is defined and enable_thinking is "
    "false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)


def write_tiny_qwen_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer without merges (each byte a token) with Qwen's special tokens
    and chat template: the shape of Qwen2's and Qwen3's tokenizers, nothing from a hub."""
    model = BPE(vocab={c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))},
                merges=[])  # fmt: skip
    backend = Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = Qwen2TokenizerFast(
        tokenizer_object=backend,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=32768,
    )
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


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


def tiny_flux_vae() -> AutoencoderKL:
    """Flux.1's 16-channel VAE (Z-Image's too) at tiny size: two blocks, no quant convs."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=16,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
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


def make_tiny_model(family: str, folder: Path, seed: int = 0) -> Path:
    """Write a complete diffusers-format tiny pipeline of `family` to `folder`, atomically."""
    from stylelora.families.registry import FAMILIES

    builders = {cls.name: cls.build_tiny for cls in FAMILIES}
    if family not in builders:
        raise UserError(f"tiny model family {family!r}: choose one of {', '.join(builders)}")
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise UserError(f"{folder}: folder is not empty; choose a new folder for the tiny model")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        torch.manual_seed(seed)
        builders[family](staging).save_pretrained(staging)
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
