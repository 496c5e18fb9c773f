"""BFL's layout of Flux.2 (`double_blocks.N.img_attn.qkv`, `single_blocks.N.linear1`,
`double_stream_modulation_img.lin`), the one its released files, ComfyUI, ai-toolkit and
musubi-tuner use, against diffusers' `Flux2Transformer2DModel`, which splits each double block's
q, k and v into separate Linears (its single blocks keep BFL's fused `linear1` and `linear2`,
as `attn.to_qkv_mlp_proj` and `attn.to_out`).

One table of modules serves the adapter names (`bfl_module`, `fused_members`) and the weights
`merge` writes (`to_bfl`). Reading BFL's files is diffusers' own converter
(`convert_flux2_transformer_checkpoint_to_diffusers`); the way back is written here because
diffusers has none, and a test checks that its converter reads it back exactly.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from stylelora.families.flux.bfl import BLOCK_PATH, swap_halves

# diffusers module path in a double block (block index as N) -> (BFL module, place in its
# fused output).
DOUBLE_BLOCK = {
    "attn.to_q": ("img_attn.qkv", 0),
    "attn.to_k": ("img_attn.qkv", 1),
    "attn.to_v": ("img_attn.qkv", 2),
    "attn.to_out.0": ("img_attn.proj", 0),
    "attn.add_q_proj": ("txt_attn.qkv", 0),
    "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
    "attn.to_add_out": ("txt_attn.proj", 0),
    "ff.linear_in": ("img_mlp.0", 0),
    "ff.linear_out": ("img_mlp.2", 0),
    "ff_context.linear_in": ("txt_mlp.0", 0),
    "ff_context.linear_out": ("txt_mlp.2", 0),
}
# A single block's attention and MLP share their input and output Linears in both layouts.
SINGLE_BLOCK = {
    "attn.to_qkv_mlp_proj": ("linear1", 0),
    "attn.to_out": ("linear2", 0),
}
# The modulations are shared by every block of a kind, outside the blocks.
MODULATION = {
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
}
OUTSIDE_BLOCKS = {
    **MODULATION,
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "proj_out": "final_layer.linear",
}
# Weights only: BFL's final modulation gives (shift, scale), diffusers' (scale, shift). No
# adapter is named for it: diffusers' LoRA converter maps it without the swap ComfyUI's
# weights need, so the two readers would disagree.
FINAL_MODULATION = ("norm_out.linear", "final_layer.adaLN_modulation.1")
# diffusers' qk-norm modules -> BFL's, whose weight is called `scale`.
DOUBLE_NORMS = {
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
}
SINGLE_NORMS = {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}
BLOCK_LISTS = {"transformer_blocks": "double_blocks", "single_transformer_blocks": "single_blocks"}


def block_table(kind: str) -> dict[str, tuple[str, int]]:
    return DOUBLE_BLOCK if kind == "transformer_blocks" else SINGLE_BLOCK


def bfl_module(path: str) -> str:
    """The BFL module a diffusers transformer module belongs to; a ValueError for a module
    without one."""
    if match := BLOCK_PATH.fullmatch(path):
        kind, index, inner = match.groups()
        if inner in block_table(kind):
            return f"{BLOCK_LISTS[kind]}.{index}.{block_table(kind)[inner][0]}"
    elif path in OUTSIDE_BLOCKS:
        return OUTSIDE_BLOCKS[path]
    raise ValueError(f"no BFL name for Flux.2 transformer module {path!r}")


def fused_members(path: str) -> tuple[str, ...]:
    """Every diffusers module of the BFL module `path` belongs to, in its output order."""
    match = BLOCK_PATH.fullmatch(path)
    if not match:
        return (path,)
    kind, index, inner = match.groups()
    table = block_table(kind)
    module = table[inner][0]
    places = sorted((place, other) for other, (bfl, place) in table.items() if bfl == module)
    return tuple(f"{kind}.{index}.{other}" for _, other in places)


def bfl_parameter(key: str) -> tuple[str, int]:
    """The BFL tensor a diffusers transformer weight belongs to, and its place in it."""
    module, _, kind = key.rpartition(".")
    if module == FINAL_MODULATION[0]:
        return f"{FINAL_MODULATION[1]}.{kind}", 0
    if match := BLOCK_PATH.fullmatch(module):
        block, index, inner = match.groups()
        norms = DOUBLE_NORMS if block == "transformer_blocks" else SINGLE_NORMS
        if inner in norms:
            return f"{BLOCK_LISTS[block]}.{index}.{norms[inner]}.scale", 0
        return f"{bfl_module(module)}.{kind}", block_table(block)[inner][1]
    return f"{bfl_module(module)}.{kind}", 0


def to_bfl(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers Flux.2 transformer state dict in BFL's layout (fused members concatenated,
    the final modulation's halves swapped)."""
    groups: dict[str, list[tuple[int, torch.Tensor]]] = defaultdict(list)
    for key, value in state.items():
        name, place = bfl_parameter(key)
        groups[name].append((place, value))
    out = {}
    for name, parts in groups.items():
        parts.sort(key=lambda part: part[0])
        out[name] = torch.cat([value for _, value in parts]) if len(parts) > 1 else parts[0][1]
    for name in [n for n in out if n.startswith(FINAL_MODULATION[1])]:
        out[name] = swap_halves(out[name])
    return out
