"""Write a diffusers SD1.x pipeline as one AUTOMATIC1111-layout (original LDM) checkpoint.

Hand-written because diffusers ships its diffusers-to-original converter only as a script in
its repository (scripts/convert_diffusers_to_original_stable_diffusion.py), not in the package;
this follows the same key mapping, but derives block numbers from the UNet's layers_per_block so
the tiny models (one layer per block) convert as well as the real ones.
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline

UNET_RESNET = [
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("emb_layers.1", "time_emb_proj"),
    ("skip_connection", "conv_shortcut"),
]
UNET_TOP = [
    ("time_embed.0.", "time_embedding.linear_1."),
    ("time_embed.2.", "time_embedding.linear_2."),
    ("input_blocks.0.0.", "conv_in."),
    ("out.0.", "conv_norm_out."),
    ("out.2.", "conv_out."),
]
VAE_ATTENTION = [
    ("norm.", "group_norm."),
    ("q.", "to_q."),
    ("k.", "to_k."),
    ("v.", "to_v."),
    ("proj_out.", "to_out.0."),
]


def unet_prefixes(unet) -> list[tuple[str, str]]:
    """(original, diffusers) prefix pairs of every UNet block."""
    config = unet.config
    layers, step = config.layers_per_block, config.layers_per_block + 1
    levels = len(config.down_block_types)
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
        has_attention = config.up_block_types[i].startswith("CrossAttn")
        for j in range(layers + 1):
            pairs.append((f"output_blocks.{step * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            pairs.append((f"output_blocks.{step * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < levels - 1:
            index = 2 if has_attention else 1
            pairs.append(
                (f"output_blocks.{step * i + layers}.{index}.", f"up_blocks.{i}.upsamplers.0.")
            )
    pairs.append(("middle_block.1.", "mid_block.attentions.0."))
    pairs += [(f"middle_block.{2 * j}.", f"mid_block.resnets.{j}.") for j in range(2)]
    return pairs


def vae_prefixes(vae) -> list[tuple[str, str]]:
    config = vae.config
    levels, layers = len(config.down_block_types), config.layers_per_block
    pairs = [
        ("encoder.norm_out.", "encoder.conv_norm_out."),
        ("decoder.norm_out.", "decoder.conv_norm_out."),
    ]
    for i in range(levels):
        for j in range(layers):
            pairs.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}."))
        if i < levels - 1:
            pairs.append(
                (f"encoder.down.{i}.downsample.", f"encoder.down_blocks.{i}.downsamplers.0.")
            )
            pairs.append(
                (f"decoder.up.{levels - 1 - i}.upsample.", f"decoder.up_blocks.{i}.upsamplers.0.")
            )
        for j in range(layers + 1):
            pairs.append(
                (f"decoder.up.{levels - 1 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}.")
            )
    for part in ("encoder", "decoder"):
        pairs.append((f"{part}.mid.attn_1.", f"{part}.mid_block.attentions.0."))
        pairs += [
            (f"{part}.mid.block_{j + 1}.", f"{part}.mid_block.resnets.{j}.") for j in range(2)
        ]
    return pairs


def renamed(
    state: dict[str, torch.Tensor], pairs: list[tuple[str, str]]
) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for original, ours in sorted(pairs, key=lambda p: -len(p[1])):
            if key.startswith(ours):
                key = original + key[len(ours) :]
                break
        out[key] = value
    return out


def resnets_renamed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """UNet resnet layers under their original names (norm1 -> in_layers.0, ...)."""
    out = {}
    for key, value in state.items():
        head, sep, tail = key.partition(".resnets.")
        if sep:
            index, _, rest = tail.partition(".")
            for original, ours in UNET_RESNET:
                if rest.startswith(ours + "."):
                    rest = original + rest[len(ours) :]
            key = f"{head}{sep}{index}.{rest}"
        out[key] = value
    return out


def vae_state(vae) -> dict[str, torch.Tensor]:
    state = renamed(vae.state_dict(), vae_prefixes(vae))
    out = {}
    for key, value in state.items():
        key = key.replace("conv_shortcut", "nin_shortcut")
        if ".mid.attn_1." in key:
            head, _, tail = key.rpartition(".mid.attn_1.")
            for original, ours in VAE_ATTENTION:
                if tail.startswith(ours):
                    tail = original + tail[len(ours) :]
            key = f"{head}.mid.attn_1.{tail}"
            if value.ndim == 2:  # the original attention uses 1x1 convolutions
                value = value.reshape(*value.shape, 1, 1)
        out[key] = value
    return out


def sd1_checkpoint(pipe: DiffusionPipeline) -> dict[str, torch.Tensor]:
    """The pipeline's weights under AUTOMATIC1111's names (SD1.x layout)."""
    unet = renamed(resnets_renamed(pipe.unet.state_dict()), unet_prefixes(pipe.unet))
    tensors = {f"model.diffusion_model.{k}": v for k, v in unet.items()}
    tensors.update({f"first_stage_model.{k}": v for k, v in vae_state(pipe.vae).items()})
    for key, value in pipe.text_encoder.state_dict().items():
        key = key if key.startswith("text_model.") else f"text_model.{key}"
        tensors[f"cond_stage_model.transformer.{key}"] = value
    return {k: v.contiguous() for k, v in tensors.items()}
