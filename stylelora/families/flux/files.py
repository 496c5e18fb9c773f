"""Flux.1 from the files users hold: BFL's transformer file (as Civitai, ComfyUI and Forge keep
it: bf16, fp16, fp8 or ComfyUI's scaled fp8), and the VAE, CLIP-L and T5-XXL from their own
files or diffusers folders, as kohya's `--ae`, `--clip_l` and `--t5xxl` take them.

The component configs come from `single_file_config` (a diffusers Flux folder) or else the
bundled skeleton; the transformer's sizes are read off the file itself, so dev, schnell and
smaller models of the layout load alike. Only T5's tokenizer is not bundled (its SentencePiece
model is not ours to rebuild): it comes from the config folder, the T5 folder, or the hub cache.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from stylelora.errors import UserError
from stylelora.families.base import Part
from stylelora.families.files import (
    COMFY_PREFIX,
    find_tokenizer,
    load_part,
    load_text_encoder,
    read_weights,
)
from stylelora.families.flux.bfl import from_bfl
from stylelora.families.skeletons import skeleton_dir

# A transformer file's other parts, as kohya's --ae, --clip_l and --t5xxl take them.
PARTS = (
    Part("ae", "vae", "ae.safetensors", "Flux.1's VAE (a file or a diffusers folder)"),
    Part("clip_l", "text_encoder", "clip_l.safetensors", "Flux.1's CLIP-L text encoder"),
    Part("t5xxl", "text_encoder_2", "t5xxl_fp16.safetensors", "Flux.1's T5-XXL text encoder"),
)
# Where a T5 tokenizer may already sit in the hub cache (read offline only).
T5_TOKENIZER_REPOS = (("black-forest-labs/FLUX.1-dev", "tokenizer_2"), ("google/t5-v1_1-xxl", ""))
# schnell's scheduler: BFL sample it without the resolution-dependent shift.
SCHNELL_SCHEDULER = {"shift": 1.0, "use_dynamic_shifting": False}


def is_bfl_transformer(keys: list[str]) -> bool:
    """A Flux.1 transformer in BFL's layout: double blocks with their own modulation (Flux.2's
    blocks share theirs)."""
    return any(
        key.removeprefix(COMFY_PREFIX).startswith("double_blocks.0.img_mod.") for key in keys
    )


def transformer_config(bfl: dict[str, torch.Tensor], template: dict) -> dict:
    """The template's config with the sizes this file has (block counts, widths, guidance)."""
    head_dim = bfl["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]

    def blocks(kind: str) -> int:
        return 1 + max(int(k.split(".")[1]) for k in bfl if k.startswith(kind + "."))

    return {
        **template,
        "num_layers": blocks("double_blocks"),
        "num_single_layers": blocks("single_blocks"),
        "guidance_embeds": "guidance_in.in_layer.weight" in bfl,
        "in_channels": bfl["img_in.weight"].shape[1],
        "joint_attention_dim": bfl["txt_in.weight"].shape[1],
        "pooled_projection_dim": bfl["vector_in.in_layer.weight"].shape[1],
        "attention_head_dim": head_dim,
        "num_attention_heads": bfl["img_in.weight"].shape[0] // head_dim,
    }


def load_bfl_transformer(path: Path, dtype: torch.dtype, folder: Path) -> FluxTransformer2DModel:
    """The transformer of a BFL-layout file, its config's sizes read off the file."""
    bfl = read_weights(path, dtype, under=COMFY_PREFIX)
    template = FluxTransformer2DModel.load_config(folder / "transformer")
    try:
        config = transformer_config(bfl, template)
    except (KeyError, ValueError):
        raise UserError(
            f"{path}: not a Flux.1 transformer in BFL layout (img_in, txt_in, vector_in and "
            "double_blocks.0's norms are missing)"
        ) from None
    if sum(config["axes_dims_rope"]) != config["attention_head_dim"]:
        raise UserError(
            f"{path}: attention heads of width {config['attention_head_dim']} do not fit the "
            f"config's rotary axes {config['axes_dims_rope']}; set single_file_config to a "
            "diffusers folder of this model"
        )
    with init_empty_weights():
        model = FluxTransformer2DModel.from_config(config)
    state, wrong = from_bfl(bfl, {k: v.shape for k, v in model.state_dict().items()})
    if wrong:
        raise UserError(
            f"{path}: not a complete Flux.1 transformer: {wrong[0]} is missing or of another "
            f"size ({len(wrong)} such tensors); is it a Flux.1 dev or schnell file?"
        )
    model.load_state_dict(state, assign=True)
    return model.eval()


def config_folder(config: str | None) -> Path:
    """Where component configs come from: the user's diffusers folder, or the skeleton."""
    return Path(config) if config else skeleton_dir("flux")


def flux_part(
    part: Part, source: Path | None, folder: Path, dtype: torch.dtype, transformer_file: Path
) -> torch.nn.Module:
    """The VAE, CLIP-L or T5 from `source` (a file or a diffusers folder), else the config
    folder's own weights."""
    model_cls = {"vae": AutoencoderKL, "text_encoder": CLIPTextModel}.get(part.attr, T5EncoderModel)

    def from_folder(source: Path) -> torch.nn.Module:
        return model_cls.from_pretrained(source, torch_dtype=dtype, local_files_only=True)

    def from_file(source: Path) -> torch.nn.Module:
        if model_cls is AutoencoderKL:
            return AutoencoderKL.from_single_file(
                str(source), config=str(folder), subfolder="vae", torch_dtype=dtype
            )
        config_cls = CLIPTextConfig if model_cls is CLIPTextModel else T5Config
        return load_text_encoder(
            model_cls, config_cls.from_pretrained(folder / part.attr), source, dtype
        )

    fallback = folder / part.attr
    return load_part(part, source, fallback, from_file, from_folder, transformer_file, "Flux.1")


def t5_tokenizer(folder: Path, t5xxl: Path | None) -> T5TokenizerFast:
    """T5's tokenizer from the config folder, the T5 folder, or the hub cache (offline)."""
    local = [folder / "tokenizer_2"]
    if t5xxl is not None and t5xxl.is_dir():
        local += [t5xxl / "tokenizer_2", t5xxl]
    return find_tokenizer(
        T5TokenizerFast.from_pretrained,
        local,
        T5_TOKENIZER_REPOS,
        "Flux's T5 tokenizer was not found offline: set single_file_config to a diffusers Flux "
        "folder (one with tokenizer_2/), or t5xxl to a T5 folder with its tokenizer files",
    )


def load_flux_files(
    path: Path, dtype: torch.dtype, config: str | None, parts: dict[str, Path | None]
) -> FluxPipeline:
    """A FluxPipeline from a BFL transformer file and the parts beside it."""
    folder = config_folder(config)
    transformer = load_bfl_transformer(path, dtype, folder)
    modules = {p.attr: flux_part(p, parts.get(p.key), folder, dtype, path) for p in PARTS}
    tokenizer_dir = folder / "tokenizer"
    if not tokenizer_dir.is_dir():
        tokenizer_dir = skeleton_dir("flux") / "tokenizer"
    scheduler_config = FlowMatchEulerDiscreteScheduler.load_config(folder / "scheduler")
    if config is None and not transformer.config.guidance_embeds:
        scheduler_config = {**scheduler_config, **SCHNELL_SCHEDULER}
    pipe = FluxPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(scheduler_config),
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir),
        tokenizer_2=t5_tokenizer(folder, parts.get("t5xxl")),
        **modules,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
