"""Qwen-Image from the files users hold: the transformer as ComfyUI keeps it
(`qwen_image_bf16.safetensors`: diffusers' own names, maybe under ComfyUI's
`model.diffusion_model.`), its VAE (`qwen_image_vae.safetensors`, in Wan 2.1's original layout
as ComfyUI reads it, or in diffusers' names) and Qwen2.5-VL-7B (`qwen_2.5_vl_7b.safetensors`,
transformers' older `model.layers.N` / `visual.` names, the vision tower optional) from their
own files or diffusers folders: the config keys `vae` and `text_encoder`.

The transformer file needs no conversion (diffusers' single-file mapping for it is the
identity); its sizes are read off the file. The Wan layout of the VAE is converted by
diffusers' `convert_wan_vae_to_diffusers` (`AutoencoderKLQwenImage` has `AutoencoderKLWan`'s
names, and diffusers has no single-file loader for it). Qwen's tokenizer is not shipped: it
comes from `single_file_config`, the text encoder's folder, or the hub cache.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from stylelora.errors import UserError
from stylelora.families.base import TEXT_ENCODER_FILE, VAE_FILE
from stylelora.families.files import (
    COMFY_PREFIX,
    llm_tokenizer,
    load_part,
    load_text_encoder,
    read_weights,
)
from stylelora.families.skeletons import skeleton_dir

# Where Qwen2.5-VL's tokenizer may already sit in the hub cache (read offline only).
TOKENIZER_REPOS = (("Qwen/Qwen-Image", "tokenizer"), ("Qwen/Qwen2.5-VL-7B-Instruct", ""))
# What a text prompt never runs through, so a text-only file may lack it: the vision tower
# and the language-model head (the pipeline reads hidden states, not logits).
UNUSED_ENCODER = ("model.visual.", "lm_head.")
BLOCK = re.compile(r"transformer_blocks\.(\d+)\.")
# Names only the original (Wan 2.1) layout of the VAE has; diffusers' has `conv_in`, `mid_block`.
WAN_MARKS = ("encoder.conv1.", "encoder.downsamples.", "decoder.middle.")


def is_qwen_image_transformer(keys: list[str]) -> bool:
    """Qwen-Image's transformer (diffusers' and ComfyUI's names): a text-stream norm before
    its input projection and blocks modulating image and text apart."""
    names = {key.removeprefix(COMFY_PREFIX) for key in keys}
    return "txt_norm.weight" in names and "transformer_blocks.0.txt_mod.1.weight" in names


def transformer_config(state: dict[str, torch.Tensor], template: dict) -> dict:
    """The template's config with the sizes this file has."""
    img_in = state["img_in.weight"]
    head_dim = state["transformer_blocks.0.attn.norm_q.weight"].shape[0]
    patch = template.get("patch_size", 2)
    return {
        **template,
        "in_channels": img_in.shape[1],
        "out_channels": state["proj_out.weight"].shape[0] // patch**2,
        "num_layers": 1 + max(int(m[1]) for key in state if (m := BLOCK.match(key))),
        "attention_head_dim": head_dim,
        "num_attention_heads": img_in.shape[0] // head_dim,
        "joint_attention_dim": state["txt_in.weight"].shape[1],
    }


def load_transformer(path: Path, dtype: torch.dtype, folder: Path) -> QwenImageTransformer2DModel:
    """The transformer of a ComfyUI (or diffusers-named) file, its sizes read off it."""
    state = read_weights(path, dtype, under=COMFY_PREFIX)
    template = QwenImageTransformer2DModel.load_config(folder / "transformer")
    try:
        config = transformer_config(state, template)
    except (KeyError, ValueError):
        raise UserError(
            f"{path}: not a Qwen-Image transformer (img_in, txt_in, proj_out and the first "
            "block's attention are missing)"
        ) from None
    if sum(config["axes_dims_rope"]) != config["attention_head_dim"]:
        raise UserError(
            f"{path}: attention heads of width {config['attention_head_dim']} do not fit the "
            f"config's rotary axes {config['axes_dims_rope']}; set single_file_config to a "
            "diffusers folder of this model"
        )
    with init_empty_weights():
        model = QwenImageTransformer2DModel.from_config(config)
    return load_complete(model, state, path, "Qwen-Image transformer")


def load_complete(
    model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, what: str
) -> torch.nn.Module:
    """`model` (on the meta device) given every weight of `state`; a UserError naming the
    first weight the file lacks or has at another size."""
    expected = model.state_dict()
    wrong = [k for k, v in expected.items() if k not in state or state[k].shape != v.shape]
    if wrong:
        raise UserError(
            f"{path}: not a complete {what}: {wrong[0]} is missing or of another size "
            f"({len(wrong)} such tensors)"
        )
    model.load_state_dict({k: state[k] for k in expected}, assign=True)
    return model.eval()


def load_vae_file(path: Path, dtype: torch.dtype, folder: Path) -> AutoencoderKLQwenImage:
    """The VAE of a file in Wan 2.1's original layout (ComfyUI's) or in diffusers' names."""
    state = read_weights(path, dtype)
    if any(key.startswith(WAN_MARKS) for key in state):
        state = convert_wan_vae_to_diffusers(state)
    with init_empty_weights():
        vae = AutoencoderKLQwenImage.from_config(AutoencoderKLQwenImage.load_config(folder))
    return load_complete(vae, state, path, "Qwen-Image VAE")


def load_qwen_image_files(
    path: Path, dtype: torch.dtype, config: str | None, parts: dict[str, Path | None]
) -> QwenImagePipeline:
    """A QwenImagePipeline from a transformer file and the parts beside it."""
    folder = Path(config) if config else skeleton_dir("qwen_image")
    transformer = load_transformer(path, dtype, folder)

    def vae_folder(source: Path) -> torch.nn.Module:
        return AutoencoderKLQwenImage.from_pretrained(
            source, torch_dtype=dtype, local_files_only=True
        )

    def encoder_file(source: Path) -> torch.nn.Module:
        config = Qwen2_5_VLConfig.from_pretrained(folder / "text_encoder")
        return load_text_encoder(
            Qwen2_5_VLForConditionalGeneration, config, source, dtype, unused=UNUSED_ENCODER
        )

    def encoder_folder(source: Path) -> torch.nn.Module:
        return Qwen2_5_VLForConditionalGeneration.from_pretrained(
            source, torch_dtype=dtype, local_files_only=True
        )

    vae_source, encoder_source = parts.get(VAE_FILE.key), parts.get(TEXT_ENCODER_FILE.key)
    vae = load_part(
        VAE_FILE,
        vae_source,
        folder / "vae",
        lambda source: load_vae_file(source, dtype, folder / "vae"),
        vae_folder,
        path,
        "Qwen-Image",
    )
    text_encoder = load_part(
        TEXT_ENCODER_FILE,
        encoder_source,
        folder / "text_encoder",
        encoder_file,
        encoder_folder,
        path,
        "Qwen-Image",
    )
    tokenizer = llm_tokenizer(
        AutoTokenizer.from_pretrained,
        folder,
        encoder_source,
        TOKENIZER_REPOS,
        "Qwen-Image",
        "Qwen2.5-VL",
    )
    pipe = QwenImagePipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler"),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
