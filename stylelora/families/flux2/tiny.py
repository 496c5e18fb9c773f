"""Flux.2's layouts at tiny size, built here with their tokenizers (nothing from a hub): klein's
(Qwen3, `tiny:flux2`) and dev's (Mistral3 with a Pixtral vision tower, built by the tests).

The text encoders are narrow but as deep as the layers the pipelines read (klein: 9, 18, 27;
dev: 10, 20, 30), with one layer more so the last one read is not the final, normed state.
dev's tokenizer is a byte-level one with Mistral's special tokens and a chat template that
formats the pipeline's batched `{"type": "text"}` messages as Mistral's does (`[SYSTEM_PROMPT]`,
`[INST]`): its PixtralProcessor needs torchvision, which stylelora does not.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
)
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE
from transformers import (
    AutoTokenizer,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    PixtralVisionConfig,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from stylelora.families.flux2.files import skeleton_folder
from stylelora.families.tiny import write_tiny_qwen_tokenizer

TEXT_WIDTH = 16
# Mistral's chat template for text messages, their content a string or a list of parts.
MISTRAL_CHAT_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}{%- set text = namespace(value='') %}"
    "{%- if message['content'] is string %}{%- set text.value = message['content'] %}"
    "{%- else %}{%- for part in message['content'] %}{%- if part['type'] == 'text' %}"
    "{%- set text.value = text.value + part['text'] %}{%- endif %}{%- endfor %}{%- endif %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + text.value + "
    "'[/SYSTEM_PROMPT]' }}{%- elif message['role'] == 'user' %}{{- '[INST]' + text.value + "
    "'[/INST]' }}{%- else %}{{- text.value + eos_token }}{%- endif %}{%- endfor %}"
)
MISTRAL_SPECIAL = ["[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]"]


def write_tiny_mistral_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer without merges with Mistral's special tokens and a chat
    template for the pipeline's messages."""
    model = BPE(vocab={c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))},
                merges=[])  # fmt: skip
    backend = Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=MISTRAL_SPECIAL,
        model_max_length=131072,
    )
    tokenizer.chat_template = MISTRAL_CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def tiny_vae() -> AutoencoderKLFlux2:
    """Flux.2's VAE layout (quant convolutions, the latents' batch norm) at tiny size, with
    running statistics away from 0 and 1 so the normalisation shows."""
    vae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=8,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=32,
    )
    with torch.no_grad():
        vae.bn.running_mean.copy_(0.3 * torch.randn(vae.bn.num_features))
        vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.num_features))
    return vae


def tiny_transformer(text_width: int, guidance: bool) -> Flux2Transformer2DModel:
    return Flux2Transformer2DModel(
        in_channels=32,  # 2 x 2 patches of the VAE's 8 channels
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * text_width,  # three hidden states stacked
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=guidance,
    )


def scheduler(variant: str) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler.from_pretrained(skeleton_folder(variant) / "scheduler")


def build_tiny_klein(folder: Path) -> Flux2KleinPipeline:
    """klein's layout: a 28-layer Qwen3 (layers 9, 18 and 27 read), distilled."""
    tokenizer = write_tiny_qwen_tokenizer(folder / "tokenizer")
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_WIDTH,
            intermediate_size=2 * TEXT_WIDTH,
            num_hidden_layers=28,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    return Flux2KleinPipeline(
        scheduler=scheduler("klein_4b"),
        vae=tiny_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=tiny_transformer(TEXT_WIDTH, guidance=False),
        is_distilled=True,
    )


def build_tiny_dev(folder: Path) -> Flux2Pipeline:
    """dev's layout: a 31-layer Mistral3 (layers 10, 20 and 30 read) with a one-layer Pixtral
    vision tower, and the guidance embedding."""
    tokenizer = write_tiny_mistral_tokenizer(folder / "tokenizer")
    text = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_WIDTH,
        intermediate_size=2 * TEXT_WIDTH,
        num_hidden_layers=31,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=1024,
        sliding_window=None,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = PixtralVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        head_dim=8,
        image_size=56,
        patch_size=14,
    )
    config = Mistral3Config(
        text_config=text,
        vision_config=vision,
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        projector_hidden_act="gelu",
        multimodal_projector_bias=False,
        spatial_merge_size=2,
        vision_feature_layer=-1,
        tie_word_embeddings=False,  # as the real model's (its skeleton says so too)
    )
    return Flux2Pipeline(
        scheduler=scheduler("dev"),
        vae=tiny_vae(),
        text_encoder=Mistral3ForConditionalGeneration(config),
        tokenizer=tokenizer,
        transformer=tiny_transformer(TEXT_WIDTH, guidance=True),
    )
