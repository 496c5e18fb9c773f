"""Diffusers -> original (ldm / sgm) names of UNet, VAE and text-encoder weights.

AUTOMATIC1111-layout checkpoints, and kohya's SDXL LoRA names, use the block layout of the
original code (`input_blocks.4.1.…`, `in_layers.2`) where diffusers has `down_blocks.1.…`,
`conv1`. Written by hand because diffusers ships only the original-to-diffusers direction in the
package (its reverse converter is a script in its repository, for SD1.x only). Block numbers
follow from the UNet config, so the tiny models convert as the real ones do.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

UNET_TOP = [
    ("time_embed.0.", "time_embedding.linear_1."),
    ("time_embed.2.", "time_embedding.linear_2."),
    ("label_emb.0.0.", "add_embedding.linear_1."),  # SDXL's size/crop and pooled-text input
    ("label_emb.0.2.", "add_embedding.linear_2."),
    ("input_blocks.0.0.", "conv_in."),
    ("out.0.", "conv_norm_out."),
    ("out.2.", "conv_out."),
]
RESNET_LAYERS = [
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("emb_layers.1.", "time_emb_proj."),
    ("skip_connection.", "conv_shortcut."),
]
VAE_ATTENTION = [
    ("norm.", "group_norm."),
    ("q.", "to_q."),
    ("k.", "to_k."),
    ("v.", "to_v."),
    ("proj_out.", "to_out.0."),
]


def unet_block_pairs(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(original, diffusers) prefix of every UNet block, longest diffusers prefix first.

    Each down level holds `layers_per_block` layers then a downsampler; each up level one layer
    more, then an upsampler after the last layer's attention (if it has one).
    """
    layers = config["layers_per_block"]
    step, levels = layers + 1, len(config["down_block_types"])
    pairs = list(UNET_TOP)
    for i in range(levels):
        for j in range(layers):
            pairs.append((f"input_blocks.{step * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            pairs.append(
                (f"input_blocks.{step * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}.")
            )
        if i < levels - 1:
            pairs.append(
                (f"input_blocks.{step * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv.")
            )
        for j in range(layers + 1):
            pairs.append((f"output_blocks.{step * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            pairs.append((f"output_blocks.{step * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < levels - 1:
            index = 2 if config["up_block_types"][i].startswith("CrossAttn") else 1
            pairs.append(
                (f"output_blocks.{step * i + layers}.{index}.", f"up_blocks.{i}.upsamplers.0.")
            )
    pairs.append(("middle_block.1.", "mid_block.attentions.0."))
    pairs += [(f"middle_block.{2 * j}.", f"mid_block.resnets.{j}.") for j in range(2)]
    return sorted(pairs, key=lambda pair: -len(pair[1]))


def original_unet_path(path: str, config: Mapping[str, Any]) -> str:
    """The original name of a diffusers UNet weight or module path (no trailing dot needed)."""
    dotted = path + "."
    for original, ours in unet_block_pairs(config):
        if dotted.startswith(ours):
            rest = dotted[len(ours) :]
            if ".resnets." in ours:
                rest = _renamed_prefix(rest, RESNET_LAYERS)
            return (original + rest)[:-1]
    raise ValueError(f"no original (sgm) name for UNet path {path!r}")


def _renamed_prefix(text: str, pairs: list[tuple[str, str]]) -> str:
    for original, ours in pairs:
        if text.startswith(ours):
            return original + text[len(ours) :]
    return text


def unet_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The UNet's weights under their original names."""
    config = unet.config
    return {original_unet_path(k, config): v for k, v in unet.state_dict().items()}


def vae_block_pairs(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(original, diffusers) prefixes of the VAE's blocks; the decoder counts levels upwards."""
    levels, layers = len(config["down_block_types"]), config["layers_per_block"]
    pairs = [
        ("encoder.norm_out.", "encoder.conv_norm_out."),
        ("decoder.norm_out.", "decoder.conv_norm_out."),
    ]
    for i in range(levels):
        up = levels - 1 - i
        for j in range(layers):
            pairs.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}."))
        if i < levels - 1:
            pairs.append(
                (f"encoder.down.{i}.downsample.", f"encoder.down_blocks.{i}.downsamplers.0.")
            )
            pairs.append((f"decoder.up.{up}.upsample.", f"decoder.up_blocks.{i}.upsamplers.0."))
        for j in range(layers + 1):
            pairs.append((f"decoder.up.{up}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}."))
    for part in ("encoder", "decoder"):
        pairs.append((f"{part}.mid.attn_1.", f"{part}.mid_block.attentions.0."))
        pairs += [
            (f"{part}.mid.block_{j + 1}.", f"{part}.mid_block.resnets.{j}.") for j in range(2)
        ]
    return sorted(pairs, key=lambda pair: -len(pair[1]))


def vae_state(vae: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The VAE's weights under their original names; mid attention as 1x1 convolutions."""
    pairs = vae_block_pairs(vae.config)
    out = {}
    for key, value in vae.state_dict().items():
        key = _renamed_prefix(key, pairs).replace("conv_shortcut", "nin_shortcut")
        head, attention, tail = key.rpartition(".mid.attn_1.")
        if attention:
            key = head + attention + _renamed_prefix(tail, VAE_ATTENTION)
            if value.ndim == 2:
                value = value.reshape(*value.shape, 1, 1)
        out[key] = value
    return out


OPENCLIP_LAYER = [
    ("ln_1.", "layer_norm1."),
    ("ln_2.", "layer_norm2."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
    ("attn.out_proj.", "self_attn.out_proj."),
]
OPENCLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}


def text_model_state(encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The encoder's weights, with the `text_model.` level CLIPTextModel lost in transformers 5."""
    state = {}
    for key, value in encoder.state_dict().items():
        if not key.startswith(("text_model.", "text_projection.")):
            key = "text_model." + key
        state[key] = value
    return state


def clip_state(encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """OpenAI CLIP (SD1.x, SDXL's first encoder): the original keeps transformers' names."""
    return {k: v for k, v in text_model_state(encoder).items() if "position_ids" not in k}


def openclip_state(encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """OpenCLIP (SD2.x, SDXL's second encoder): fused q/k/v, `resblocks`, transposed projection."""
    state = {k.removeprefix("text_model."): v for k, v in text_model_state(encoder).items()}
    out = {}
    for key, value in state.items():
        if key in OPENCLIP_TOP:
            out[OPENCLIP_TOP[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif key.startswith("encoder.layers."):
            index, _, rest = key.removeprefix("encoder.layers.").partition(".")
            block = f"transformer.resblocks.{index}."
            if rest.startswith("self_attn.q_proj."):
                kind = rest.rpartition(".")[2]  # weight or bias
                fused = [
                    state[key.replace("q_proj", name)] for name in ("q_proj", "k_proj", "v_proj")
                ]
                out[f"{block}attn.in_proj_{kind}"] = torch.cat(fused)
            elif not rest.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
                out[block + _renamed_prefix(rest, OPENCLIP_LAYER)] = value
        elif "position_ids" not in key:
            raise ValueError(f"no OpenCLIP name for text-encoder weight {key!r}")
    return out


TEXT_ENCODER_LAYOUTS = {"clip": clip_state, "openclip": openclip_state}
