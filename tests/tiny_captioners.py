"""Tiny random vision-language models, written to a folder as a real download is laid out.

Each builder makes the architecture's real config class with tiny sizes, random weights from a
fixed seed, and a working processor (byte-level tokenizer with the special tokens the real one
has, image processor, chat template) saved with `save_pretrained`, so `AutoProcessor` and the
model class load the folder exactly as they load a real model. Their captions are noise.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers.pre_tokenizers import ByteLevel

# the image size every tiny model works at: a few patches, so generation takes milliseconds
IMAGE_SIZE = 32


def byte_vocab(specials: list[str]) -> dict[str, int]:
    """A byte-level BPE vocabulary without merges: the special tokens, then the 256 byte
    symbols. Any text encodes (one token a byte) and decodes back."""
    tokens = specials + sorted(ByteLevel.alphabet())
    return {token: index for index, token in enumerate(tokens)}


def _save(model: torch.nn.Module, processor, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _generation(
    folder: Path, vocab: dict[str, int], specials: list[str], ends: list[str], **kwargs
) -> None:
    """A generation config for a random model: it could end at once or write only special
    tokens, which decode to an empty caption; here it writes a few ordinary tokens first."""
    from transformers import GenerationConfig

    end_ids = [vocab[token] for token in ends]
    suppress = [vocab[token] for token in specials if vocab[token] not in end_ids]
    config = GenerationConfig(
        eos_token_id=end_ids, suppress_tokens=suppress, min_new_tokens=3, **kwargs
    )
    config.save_pretrained(folder)


def _text_sizes() -> dict:
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)


# --- Florence-2: DaViT vision tower + BART encoder-decoder ---------------------------------


def tiny_florence2(folder: Path) -> Path:
    from transformers import (
        BartConfig,
        BartTokenizer,
        CLIPImageProcessorPil,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
        Florence2VisionConfig,
    )

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>", "<image>"]
    vocab = byte_vocab(specials)
    tokenizer = BartTokenizer(
        vocab=vocab, merges=[], extra_special_tokens={"image_token": "<image>"}
    )
    text = BartConfig(
        vocab_size=len(vocab),
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=128,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=2,
    )
    vision = Florence2VisionConfig(
        depths=[1, 1],
        patch_size=[7, 3],
        patch_stride=[4, 2],
        patch_padding=[3, 1],
        patch_prenorm=[False, True],
        embed_dim=[16, 32],
        num_heads=[2, 2],
        num_groups=[2, 2],
        window_size=2,
        projection_dim=32,
        max_position_embeddings=8,
    )
    config = Florence2Config(
        text_config=text, vision_config=vision, image_token_id=vocab["<image>"]
    )
    torch.manual_seed(0)
    model = Florence2ForConditionalGeneration(config).eval()
    # the vision tower downsamples by 8 here: (32 / 8)² patches and one pooled token
    seq_length = (IMAGE_SIZE // 8) ** 2 + 1
    images = CLIPImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=False,
        image_seq_length=seq_length,
    )
    processor = Florence2Processor(image_processor=images, tokenizer=tokenizer)
    _save(model, processor, folder)
    _generation(folder, vocab, specials, ["</s>"], decoder_start_token_id=2, pad_token_id=1)
    return folder


# --- Qwen2.5-VL and Qwen3-VL: ViT with 2×2 patch merging + Qwen decoder, M-RoPE ----------

QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# the real Qwen2-VL / Qwen2.5-VL template (a default system turn, then image placeholders)
QWEN2_5_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# the real Qwen3-VL template, without its tool-calling and video branches: no default system turn
QWEN3_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen's image processors resize to a multiple of patch × merge (8 px here) within these pixels
QWEN_PIXELS = {"shortest_edge": 16 * 16, "longest_edge": 48 * 48}


def _qwen_tokenizer():
    from transformers import Qwen2Tokenizer

    vocab = byte_vocab(QWEN_SPECIALS)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None)
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS[1:]})
    return tokenizer, vocab


class _QwenParts:
    """The files a Qwen-VL processor is loaded from (its class needs torchvision for the video
    processor, so it is not made here): tokenizer with chat template, image processor."""

    def __init__(self, tokenizer, template: str) -> None:
        from transformers import Qwen2VLImageProcessorPil

        self.tokenizer = tokenizer
        self.tokenizer.chat_template = template
        self.images = Qwen2VLImageProcessorPil(
            size=QWEN_PIXELS, patch_size=4, merge_size=2, temporal_patch_size=2
        )

    def save_pretrained(self, folder: Path) -> None:
        self.tokenizer.save_pretrained(folder)
        self.images.save_pretrained(folder)


def _qwen_ids(vocab: dict[str, int]) -> dict:
    return dict(
        image_token_id=vocab["<|image_pad|>"],
        video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"],
        vision_end_token_id=vocab["<|vision_end|>"],
    )


def _qwen_generation(folder: Path, vocab: dict[str, int]) -> None:
    ends = ["<|im_end|>", "<|endoftext|>"]
    _generation(folder, vocab, QWEN_SPECIALS, ends, pad_token_id=vocab["<|endoftext|>"])


def tiny_qwen2_5_vl(folder: Path) -> Path:
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
    )

    tokenizer, vocab = _qwen_tokenizer()
    text = dict(
        vocab_size=len(vocab),
        bos_token_id=vocab["<|endoftext|>"],
        eos_token_id=vocab["<|im_end|>"],
        num_key_value_heads=1,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        **_text_sizes(),
    )
    vision = dict(
        depth=1,
        hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        patch_size=4,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=16,
        out_hidden_size=32,
        fullatt_block_indexes=[0],
    )
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **_qwen_ids(vocab))
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    processor = _QwenParts(tokenizer, QWEN2_5_TEMPLATE)
    _save(model, processor, folder)
    _qwen_generation(folder, vocab)
    return folder


def tiny_qwen3_vl(folder: Path) -> Path:
    from transformers import (
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
    )

    tokenizer, vocab = _qwen_tokenizer()
    text = dict(
        vocab_size=len(vocab),
        bos_token_id=vocab["<|endoftext|>"],
        eos_token_id=vocab["<|im_end|>"],
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=512,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [2, 3, 3],
            "mrope_interleaved": True,
        },
        **_text_sizes(),
    )
    vision = dict(
        depth=1,
        hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        patch_size=4,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=32,
        num_position_embeddings=144,
        deepstack_visual_indexes=[0],
    )
    config = Qwen3VLConfig(text_config=text, vision_config=vision, **_qwen_ids(vocab))
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(config).eval()
    processor = _QwenParts(tokenizer, QWEN3_TEMPLATE)
    _save(model, processor, folder)
    _qwen_generation(folder, vocab)
    return folder


# --- JoyCaption: SigLIP vision tower + Llama 3 decoder in the LLaVA layout ----------------

LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|finetune_right_pad_id|>",
    "<image>",
]

# Llama 3's chat template as JoyCaption ships it: the image goes first in the first user turn
JOYCAPTION_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(image=false) %}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['role'] == 'user' and not ns.image %}<image>{% set ns.image = true %}{% endif %}"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def _llama3_tokenizer():
    """Llama 3's tokenizer layout: byte-level BPE that puts <|begin_of_text|> first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = byte_vocab(LLAMA3_SPECIALS)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    bos = "<|begin_of_text|>"
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        additional_special_tokens=LLAMA3_SPECIALS[2:4] + ["<image>"],
    )
    return tokenizer, vocab


def tiny_joycaption(folder: Path) -> Path:
    from transformers import (
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        SiglipImageProcessorPil,
        SiglipVisionConfig,
    )

    tokenizer, vocab = _llama3_tokenizer()
    text = LlamaConfig(
        vocab_size=len(vocab),
        num_key_value_heads=1,
        max_position_embeddings=512,
        bos_token_id=vocab["<|begin_of_text|>"],
        eos_token_id=vocab["<|eot_id|>"],
        pad_token_id=vocab["<|finetune_right_pad_id|>"],
        **_text_sizes(),
    )
    patch = 8
    vision = SiglipVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=patch,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=vocab["<image>"],
        image_seq_length=(IMAGE_SIZE // patch) ** 2,
        vision_feature_select_strategy="full",
        vision_feature_layer=-2,
        multimodal_projector_bias=True,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    images = SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="full",
        chat_template=JOYCAPTION_TEMPLATE,
        image_token="<image>",
    )
    _save(model, processor, folder)
    ends = ["<|eot_id|>", "<|end_of_text|>"]
    pad = vocab["<|finetune_right_pad_id|>"]
    _generation(folder, vocab, LLAMA3_SPECIALS, ends, pad_token_id=pad, bos_token_id=0)
    return folder
