"""Flux.2 from the files users hold: the transformer as BFL releases it and ComfyUI keeps it
(`flux2-dev.safetensors`, `flux-2-klein-4b.safetensors`: BFL's names, maybe under ComfyUI's
`model.diffusion_model.`, any dtype; diffusers-named files load too), its VAE (BFL's
`ae.safetensors`, ComfyUI's `flux2-vae.safetensors`, or a diffusers VAE file or folder) and its
text encoder (klein: Qwen3-4B or Qwen3-8B, `qwen_3_4b.safetensors`; dev: Mistral Small 3.1,
ComfyUI's `mistral_3_small_flux2_bf16.safetensors`, whose 30-layer pruned version loads too)
from their own files or diffusers folders: the config keys `vae` and `text_encoder`.

The transformer's names are diffusers' own converter's
(`convert_flux2_transformer_checkpoint_to_diffusers`), its sizes read off the file, and the
variant with them: guidance embedding -> dev, else klein 9B or 4B by width; its configs are that
variant's skeleton unless `single_file_config` names a diffusers folder. diffusers has no
single-file loader for the VAE: its BFL names go through diffusers' LDM VAE converter
(`convert_ldm_vae_checkpoint`, the layout but for BFL's quant convolutions inside the encoder and
decoder). The tokenizers are not shipped: they come from `single_file_config`, the text
encoder's folder, or the hub cache.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
)
from diffusers.loaders.single_file_utils import (
    convert_flux2_transformer_checkpoint_to_diffusers,
    convert_ldm_vae_checkpoint,
)
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    Mistral3ForConditionalGeneration,
    Qwen3ForCausalLM,
)

from stylelora.errors import UserError
from stylelora.families.base import TEXT_ENCODER_FILE, VAE_FILE
from stylelora.families.files import (
    COMFY_PREFIX,
    bare,
    llm_tokenizer,
    load_part,
    load_text_encoder,
    read_weights,
    tensor_names,
)

# Each variant's bundled configs (a folder beside this file), and where its tokenizer may sit
# in the hub cache (read offline only).
SKELETONS = {"dev": "skeleton", "klein_4b": "skeleton_klein_4b", "klein_9b": "skeleton_klein_9b"}
TOKENIZER_REPOS = {
    "dev": (
        ("black-forest-labs/FLUX.2-dev", "tokenizer"),
        ("mistralai/Mistral-Small-3.1-24B-Instruct-2503", ""),
    ),
    "klein_4b": (("black-forest-labs/FLUX.2-klein-4B", "tokenizer"), ("Qwen/Qwen3-4B", "")),
    "klein_9b": (("black-forest-labs/FLUX.2-klein-9B", "tokenizer"), ("Qwen/Qwen3-8B", "")),
}
# The text encoders' hidden states the pipelines read (their default text_encoder_out_layers).
DEV_LAYERS = (10, 20, 30)
KLEIN_LAYERS = (9, 18, 27)
BLOCK = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.")
LAYER = re.compile(r"layers\.(\d+)\.")
# Mistral3's parts a text prompt never runs through: ComfyUI's file leaves them out.
MISTRAL_UNUSED = ("model.vision_tower.", "model.multi_modal_projector.")


def skeleton_folder(variant: str) -> Path:
    return Path(__file__).resolve().parent / SKELETONS[variant]


def is_flux2_transformer(keys: list[str]) -> bool:
    """Flux.2's transformer, in BFL's or diffusers' names: the modulations its blocks share
    (Flux.1's blocks each have their own, which is what tells its files)."""
    marks = ("double_stream_modulation_img.", "single_stream_modulation.")
    return any(key.removeprefix(COMFY_PREFIX).startswith(marks) for key in keys)


def variant_of(config: dict) -> str:
    """dev embeds a guidance value; klein 9B is 4096 wide, klein 4B 3072."""
    if config["guidance_embeds"]:
        return "dev"
    width = config["num_attention_heads"] * config["attention_head_dim"]
    return "klein_9b" if width >= 4096 else "klein_4b"


def transformer_config(state: dict[str, torch.Tensor], template: dict) -> dict:
    """The template's config with the sizes this file has (diffusers' names)."""
    embedder = state["x_embedder.weight"]
    head_dim = state["transformer_blocks.0.attn.norm_q.weight"].shape[0]
    time_in = state["time_guidance_embed.timestep_embedder.linear_1.weight"]

    def count(blocks: str) -> int:
        return 1 + max(int(m[2]) for k in state if (m := BLOCK.match(k)) and m[1] == blocks)

    return {
        **template,
        "in_channels": embedder.shape[1],
        "num_layers": count("transformer_blocks"),
        "num_single_layers": count("single_transformer_blocks"),
        "attention_head_dim": head_dim,
        "num_attention_heads": embedder.shape[0] // head_dim,
        "joint_attention_dim": state["context_embedder.weight"].shape[1],
        "timestep_guidance_channels": time_in.shape[1],
        "mlp_ratio": state["transformer_blocks.0.ff.linear_out.weight"].shape[1]
        / embedder.shape[0],
        "guidance_embeds": "time_guidance_embed.guidance_embedder.linear_1.weight" in state,
    }


def diffusers_state(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The transformer's weights under diffusers' names, whichever of the two the file has
    (diffusers' converter renames by substring, so it is given BFL's names only)."""
    state = read_weights(path, dtype, under=COMFY_PREFIX)
    if any(key.startswith(("double_blocks.", "single_blocks.")) for key in state):
        state = convert_flux2_transformer_checkpoint_to_diffusers(state)
    return state


def load_transformer(
    path: Path, dtype: torch.dtype, config: str | None
) -> tuple[Flux2Transformer2DModel, str]:
    """The transformer of a Flux.2 file, its sizes read off it, and its variant."""
    state = diffusers_state(path, dtype)
    try:
        sizes = transformer_config(state, {})
    except (KeyError, ValueError):
        raise UserError(
            f"{path}: not a Flux.2 transformer (img_in, txt_in, time_in and double_blocks.0's "
            "norms are missing)"
        ) from None
    variant = variant_of(sizes)
    folder = Path(config) if config else skeleton_folder(variant)
    template = Flux2Transformer2DModel.load_config(folder / "transformer")
    settings = {**template, **sizes}
    if sum(settings["axes_dims_rope"]) != settings["attention_head_dim"]:
        raise UserError(
            f"{path}: attention heads of width {settings['attention_head_dim']} do not fit the "
            f"config's rotary axes {settings['axes_dims_rope']}; set single_file_config to a "
            "diffusers folder of this model"
        )
    with init_empty_weights():
        model = Flux2Transformer2DModel.from_config(settings)
    expected = model.state_dict()
    wrong = [k for k, v in expected.items() if k not in state or state[k].shape != v.shape]
    if wrong:
        raise UserError(
            f"{path}: not a complete Flux.2 transformer: {wrong[0]} is missing or of another "
            f"size ({len(wrong)} such tensors)"
        )
    model.load_state_dict({k: state[k] for k in expected}, assign=True)
    return model.eval(), variant


def vae_from_bfl(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """BFL's VAE names (LDM's, with the quant convolutions inside the encoder and decoder and
    the latents' batch norm beside them) as diffusers' AutoencoderKLFlux2 names them."""
    moved = {"encoder.quant_conv.": "quant_conv.", "decoder.post_quant_conv.": "post_quant_conv."}
    ldm = {}
    for key, value in state.items():
        for bfl, ldm_name in moved.items():
            if key.startswith(bfl):
                key = ldm_name + key.removeprefix(bfl)
        ldm[key] = value
    out = convert_ldm_vae_checkpoint(ldm, config)
    out.update({key: value for key, value in state.items() if key.startswith("bn.")})
    return out


def load_vae_file(path: Path, dtype: torch.dtype, folder: Path) -> AutoencoderKLFlux2:
    """The VAE from a file in BFL's names or diffusers'."""
    config = AutoencoderKLFlux2.load_config(folder / "vae")
    state = read_weights(path, dtype, under="vae.")
    if any(key.startswith("encoder.down.") for key in state):
        state = vae_from_bfl(state, config)
    with init_empty_weights():
        model = AutoencoderKLFlux2.from_config(config)
    expected = model.state_dict()
    optional = "bn.num_batches_tracked"  # a counter only training the batch norm reads
    wrong = [
        k
        for k, v in expected.items()
        if k != optional and (k not in state or state[k].shape != v.shape)
    ]
    if wrong:
        raise ValueError(f"not a Flux.2 VAE: {wrong[0]} is missing or of another size")
    model.load_state_dict({k: state[k] for k in expected if k in state}, strict=False, assign=True)
    return model


def load_encoder_file(path: Path, dtype: torch.dtype, folder: Path, dev: bool) -> torch.nn.Module:
    """Mistral3 (dev) or Qwen3 (klein) from a file of its weights.

    A file cut short (ComfyUI keeps Mistral's first 30 layers only) gives a model of the layers
    it has: enough while the pipeline's last hidden state is among them. transformers hands
    back the last layer's output after the final norm, so where that output is one the
    pipeline reads, the final norm is left out (it runs on nothing else). A file without the
    LM head (ComfyUI's) gets the embedding tied in its place: the pipelines never read logits.
    """
    config = AutoConfig.from_pretrained(folder / "text_encoder")
    text = config.text_config if dev else config
    names = [bare(key) for key in tensor_names(path)]
    needed = max(DEV_LAYERS if dev else KLEIN_LAYERS)
    present = 1 + max((int(m[1]) for name in names if (m := LAYER.match(name))), default=-1)
    if present < text.num_hidden_layers:
        if present < needed:
            raise ValueError(f"holds {present} layers; Flux.2 reads the output of layer {needed}")
        text.num_hidden_layers = present
    if not any(name.startswith("lm_head.") for name in names):
        config.tie_word_embeddings = True
    cls = Mistral3ForConditionalGeneration if dev else Qwen3ForCausalLM
    model = load_text_encoder(cls, config, path, dtype, MISTRAL_UNUSED if dev else ())
    if text.num_hidden_layers == needed:
        language = model.model.language_model if dev else model.model
        language.norm = torch.nn.Identity()
    return model


def load_processor(source: str, subfolder: str = "", local_files_only: bool = True):
    """dev's tokenizer: its PixtralProcessor (which needs torchvision), else the tokenizer
    alone (its chat template formats the pipeline's text messages)."""
    try:
        return AutoProcessor.from_pretrained(
            source, subfolder=subfolder, local_files_only=local_files_only
        )
    except (ImportError, ValueError, OSError):
        return AutoTokenizer.from_pretrained(
            source, subfolder=subfolder, local_files_only=local_files_only
        )


def is_distilled(path: Path, config: str | None) -> bool:
    """Whether a klein model is step-distilled: the config folder says so; else its file's
    name (BFL's and ComfyUI's base models are `flux-2-klein-base-*`)."""
    if config and (Path(config) / "model_index.json").is_file():
        index = json.loads((Path(config) / "model_index.json").read_text())
        return bool(index.get("is_distilled", False))
    return "base" not in path.name.lower()


def load_flux2_files(
    path: Path, dtype: torch.dtype, config: str | None, parts: dict[str, Path | None]
) -> Flux2Pipeline | Flux2KleinPipeline:
    """A Flux2Pipeline (dev) or Flux2KleinPipeline from a transformer file and the parts
    beside it."""
    transformer, variant = load_transformer(path, dtype, config)
    folder = Path(config) if config else skeleton_folder(variant)
    dev = variant == "dev"

    def vae_folder(source: Path) -> torch.nn.Module:
        return AutoencoderKLFlux2.from_pretrained(source, torch_dtype=dtype, local_files_only=True)

    def encoder_folder(source: Path) -> torch.nn.Module:
        auto = AutoModelForImageTextToText if dev else AutoModelForCausalLM
        return auto.from_pretrained(source, torch_dtype=dtype, local_files_only=True)

    vae_source, encoder_source = parts.get(VAE_FILE.key), parts.get(TEXT_ENCODER_FILE.key)
    vae = load_part(
        VAE_FILE,
        vae_source,
        folder / "vae",
        lambda source: load_vae_file(source, dtype, folder),
        vae_folder,
        path,
        "Flux.2",
    )
    text_encoder = load_part(
        TEXT_ENCODER_FILE,
        encoder_source,
        folder / "text_encoder",
        lambda source: load_encoder_file(source, dtype, folder, dev),
        encoder_folder,
        path,
        "Flux.2",
    )
    tokenizer = llm_tokenizer(
        load_processor if dev else AutoTokenizer.from_pretrained,
        folder,
        encoder_source,
        TOKENIZER_REPOS[variant],
        "Flux.2",
        "Mistral" if dev else "Qwen3",
    )
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler")
    modules = dict(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
    )
    if dev:
        pipe = Flux2Pipeline(**modules)
    else:
        pipe = Flux2KleinPipeline(**modules, is_distilled=is_distilled(path, config))
    pipe.set_progress_bar_config(disable=True)
    return pipe
