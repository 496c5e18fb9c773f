"""Z-Image from the files users hold: the transformer as released and as ComfyUI keeps it
(`z_image_turbo_bf16.safetensors`: fused q/k/v, `x_embedder`, maybe under ComfyUI's
`model.diffusion_model.`), its VAE (Flux.1's `ae.safetensors`) and Qwen3-4B
(`qwen_3_4b.safetensors`) from their own files or diffusers folders: the config keys `vae` and
`text_encoder`.

The transformer's names are diffusers' own converter's (`convert_z_image_transformer_checkpoint_
to_diffusers`); its sizes are read off the file. The way back, for `merge`, is written here:
diffusers has none. Qwen's tokenizer is not shipped (its 150 000-entry vocabulary is not ours
to rebuild): it comes from `single_file_config`, the text encoder's folder, or the hub cache.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers
from transformers import AutoModel, AutoTokenizer, Qwen3Config, Qwen3Model

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

# Where Qwen3's tokenizer may already sit in the hub cache (read offline only).
TOKENIZER_REPOS = (("Tongyi-MAI/Z-Image-Turbo", "tokenizer"), ("Qwen/Qwen3-4B", ""))
# The released layout's names against diffusers' (the converter's table, the other way).
TO_ORIGINAL = (
    ("all_final_layer.2-1.", "final_layer."),
    ("all_x_embedder.2-1.", "x_embedder."),
    (".attention.to_out.0.", ".attention.out."),
    (".attention.norm_q.", ".attention.q_norm."),
    (".attention.norm_k.", ".attention.k_norm."),
)
BLOCK = re.compile(r"(layers|noise_refiner|context_refiner)\.(\d+)\.")


def is_zimage_transformer(keys: list[str]) -> bool:
    """Z-Image's transformer, in the released or diffusers' names: caption refiner blocks."""
    names = [key.removeprefix(COMFY_PREFIX) for key in keys]
    return any(n.startswith("context_refiner.") for n in names) and any(
        n.startswith("cap_embedder.") for n in names
    )


def transformer_config(state: dict[str, torch.Tensor], template: dict) -> dict:
    """The template's config with the sizes this file has (diffusers' names)."""
    embedder = state["all_x_embedder.2-1.weight"]
    head_dim = state["layers.0.attention.norm_q.weight"].shape[0]

    def count(blocks: str) -> int:
        return 1 + max(int(m[2]) for k in state if (m := BLOCK.match(k)) and m[1] == blocks)

    return {
        **template,
        "dim": embedder.shape[0],
        "in_channels": embedder.shape[1] // 4,  # 2 x 2 patches of one frame
        "n_layers": count("layers"),
        "n_refiner_layers": count("noise_refiner"),
        "n_heads": embedder.shape[0] // head_dim,
        "n_kv_heads": state["layers.0.attention.to_k.weight"].shape[0] // head_dim,
        "cap_feat_dim": state["cap_embedder.1.weight"].shape[1],
    }


def load_transformer(path: Path, dtype: torch.dtype, folder: Path) -> ZImageTransformer2DModel:
    """The transformer of a released-layout (or diffusers-named) file, its sizes read off it."""
    state = convert_z_image_transformer_checkpoint_to_diffusers(
        read_weights(path, dtype, under=COMFY_PREFIX)
    )
    template = ZImageTransformer2DModel.load_config(folder / "transformer")
    try:
        config = transformer_config(state, template)
    except (KeyError, ValueError):
        raise UserError(
            f"{path}: not a Z-Image transformer (x_embedder, cap_embedder and the first "
            "layer's attention are missing)"
        ) from None
    head_dim = config["dim"] // config["n_heads"]
    if sum(config["axes_dims"]) != head_dim:
        raise UserError(
            f"{path}: attention heads of width {head_dim} do not fit the config's rotary axes "
            f"{config['axes_dims']}; set single_file_config to a diffusers folder of this model"
        )
    with init_empty_weights():
        model = ZImageTransformer2DModel.from_config(config)
    expected = model.state_dict()
    wrong = [k for k, v in expected.items() if k not in state or state[k].shape != v.shape]
    if wrong:
        raise UserError(
            f"{path}: not a complete Z-Image transformer: {wrong[0]} is missing or of another "
            f"size ({len(wrong)} such tensors)"
        )
    model.load_state_dict({k: state[k] for k in expected}, assign=True)
    return model.eval()


def to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers Z-Image transformer's weights in the released layout: q, k and v fused
    into `qkv`, the embedder and final layer under their first names."""
    out = {}
    for key, value in state.items():
        if ".attention.to_k." in key or ".attention.to_v." in key:
            continue
        if ".attention.to_q." in key:
            fused = [state[key.replace(".to_q.", f".{name}.")] for name in ("to_q", "to_k", "to_v")]
            key, value = key.replace(".to_q.", ".qkv."), torch.cat(fused)
        for ours, original in TO_ORIGINAL:
            key = key.replace(ours, original)
        out[key] = value
    return out


def load_zimage_files(
    path: Path, dtype: torch.dtype, config: str | None, parts: dict[str, Path | None]
) -> ZImagePipeline:
    """A ZImagePipeline from a transformer file and the parts beside it."""
    folder = Path(config) if config else skeleton_dir("zimage")
    transformer = load_transformer(path, dtype, folder)

    def vae_file(source: Path) -> torch.nn.Module:
        return AutoencoderKL.from_single_file(
            str(source), config=str(folder), subfolder="vae", torch_dtype=dtype
        )

    def vae_folder(source: Path) -> torch.nn.Module:
        return AutoencoderKL.from_pretrained(source, torch_dtype=dtype, local_files_only=True)

    def encoder_file(source: Path) -> torch.nn.Module:
        config = Qwen3Config.from_pretrained(folder / "text_encoder")
        return load_text_encoder(Qwen3Model, config, source, dtype)

    def encoder_folder(source: Path) -> torch.nn.Module:
        return AutoModel.from_pretrained(source, torch_dtype=dtype, local_files_only=True)

    vae_source, encoder_source = parts.get(VAE_FILE.key), parts.get(TEXT_ENCODER_FILE.key)
    vae = load_part(VAE_FILE, vae_source, folder / "vae", vae_file, vae_folder, path, "Z-Image")
    text_encoder = load_part(
        TEXT_ENCODER_FILE,
        encoder_source,
        folder / "text_encoder",
        encoder_file,
        encoder_folder,
        path,
        "Z-Image",
    )
    tokenizer = llm_tokenizer(
        AutoTokenizer.from_pretrained, folder, encoder_source, TOKENIZER_REPOS, "Z-Image", "Qwen3"
    )
    pipe = ZImagePipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler"),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
