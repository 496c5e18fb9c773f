"""BFL's layout of Flux.1 (`double_blocks.N.img_attn.qkv`, `single_blocks.N.linear1`), the one
its own files, kohya, ComfyUI and Forge use, against diffusers' `FluxTransformer2DModel`, which
splits q, k and v (and the single blocks' MLP input) into separate Linears.

The weight conversion in both directions is written here because diffusers' own converter
(`convert_flux_transformer_checkpoint_to_diffusers`) fixes the model width at Flux.1's 3072,
so it cannot read a smaller model of this layout, and diffusers has no converter back to BFL's
layout, which `merge` writes. Both directions read the one table of modules below; a test checks
that diffusers' converter agrees on the real architecture.
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch

# diffusers module path (block index as N) -> (BFL module, place in its fused output).
DOUBLE_BLOCK = {
    "attn.to_q": ("img_attn.qkv", 0),
    "attn.to_k": ("img_attn.qkv", 1),
    "attn.to_v": ("img_attn.qkv", 2),
    "attn.to_out.0": ("img_attn.proj", 0),
    "attn.add_q_proj": ("txt_attn.qkv", 0),
    "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
    "attn.to_add_out": ("txt_attn.proj", 0),
    "ff.net.0.proj": ("img_mlp.0", 0),
    "ff.net.2": ("img_mlp.2", 0),
    "ff_context.net.0.proj": ("txt_mlp.0", 0),
    "ff_context.net.2": ("txt_mlp.2", 0),
    "norm1.linear": ("img_mod.lin", 0),
    "norm1_context.linear": ("txt_mod.lin", 0),
}
SINGLE_BLOCK = {
    "attn.to_q": ("linear1", 0),
    "attn.to_k": ("linear1", 1),
    "attn.to_v": ("linear1", 2),
    "proj_mlp": ("linear1", 3),
    "proj_out": ("linear2", 0),
    "norm.linear": ("modulation.lin", 0),
}
OUTSIDE_BLOCKS = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
    "proj_out": "final_layer.linear",
}
BLOCK_PATH = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)")
MODULATION = ("norm1.linear", "norm1_context.linear", "norm.linear")


def bfl_module(path: str) -> str:
    """The BFL module a diffusers transformer module belongs to."""
    if match := BLOCK_PATH.fullmatch(path):
        kind, index, inner = match.groups()
        table, bfl = (
            (DOUBLE_BLOCK, "double_blocks")
            if kind == "transformer_blocks"
            else (SINGLE_BLOCK, "single_blocks")
        )
        if inner in table:
            return f"{bfl}.{index}.{table[inner][0]}"
    elif path in OUTSIDE_BLOCKS:
        return OUTSIDE_BLOCKS[path]
    raise ValueError(f"no BFL name for transformer module {path!r}")


def fused_members(path: str) -> tuple[str, ...]:
    """Every diffusers module of the BFL module `path` belongs to, in its output order."""
    match = BLOCK_PATH.fullmatch(path)
    if not match:
        return (path,)
    kind, index, inner = match.groups()
    table = DOUBLE_BLOCK if kind == "transformer_blocks" else SINGLE_BLOCK
    module = table[inner][0]
    places = sorted((place, other) for other, (bfl, place) in table.items() if bfl == module)
    return tuple(f"{kind}.{index}.{other}" for _, other in places)


# diffusers' qk-norm modules -> BFL's, whose weight is called `scale`.
DOUBLE_NORMS = {
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
}
SINGLE_NORMS = {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}
# BFL's final modulation gives (shift, scale), diffusers' (scale, shift).
SWAPPED = ("final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias")


def bfl_parameter(key: str) -> tuple[str, int]:
    """The BFL tensor a diffusers transformer weight belongs to, and its place in it."""
    module, _, kind = key.rpartition(".")
    if match := BLOCK_PATH.fullmatch(module):
        block, index, inner = match.groups()
        double = block == "transformer_blocks"
        norms = DOUBLE_NORMS if double else SINGLE_NORMS
        if inner in norms:
            return f"{'double' if double else 'single'}_blocks.{index}.{norms[inner]}.scale", 0
        bfl = bfl_module(module)
        table = DOUBLE_BLOCK if double else SINGLE_BLOCK
        return f"{bfl}.{kind}", table[inner][1]
    return f"{bfl_module(module)}.{kind}", 0


def swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def to_bfl(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers transformer state dict in BFL's layout (fused members concatenated)."""
    groups: dict[str, list[tuple[int, torch.Tensor]]] = defaultdict(list)
    for key, value in state.items():
        name, place = bfl_parameter(key)
        groups[name].append((place, value))
    out = {}
    for name, parts in groups.items():
        parts.sort(key=lambda part: part[0])
        out[name] = torch.cat([value for _, value in parts]) if len(parts) > 1 else parts[0][1]
    for name in SWAPPED:
        out[name] = swap_halves(out[name])
    return out


def from_bfl(
    bfl: dict[str, torch.Tensor], shapes: dict[str, torch.Size]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """BFL tensors split into the diffusers weights of `shapes` (a model's state-dict shapes);
    and the BFL names a model of those shapes needs that `bfl` lacks or has in another size."""
    members: dict[str, list[tuple[int, str, int]]] = defaultdict(list)
    for key, shape in shapes.items():
        name, place = bfl_parameter(key)
        members[name].append((place, key, shape[0]))
    out, wrong = {}, []
    for name, parts in members.items():
        tensor = bfl.get(name)
        sizes = [size for _, _, size in sorted(parts)]
        if tensor is None or tensor.shape[0] != sum(sizes):
            wrong.append(name)
            continue
        if name in SWAPPED:
            tensor = swap_halves(tensor)
        for (_, key, _), piece in zip(sorted(parts), tensor.split(sizes), strict=True):
            out[key] = piece.reshape(shapes[key])
    return out, wrong
