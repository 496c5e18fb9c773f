"""PEFT adapter weights to kohya's LoRA layout, the one AUTOMATIC1111, ComfyUI and diffusers read.

Per module: `<name>.lora_down.weight` (PEFT's lora_A), `<name>.lora_up.weight` (lora_B) and
`<name>.alpha`. diffusers' `convert_state_dict_to_kohya` writes alpha = rank whatever the real
alpha was, so the conversion is done here with the alpha PEFT actually trained with. Each
module's rank is its tensors' (PEFT's rank_pattern gives LoCon's 3x3 convolutions their own).

Where kohya's module is a fusion of several (Flux's BFL layout: one `qkv` Linear where diffusers
has three), the parts are written as one module of their summed rank: the downs stacked, the ups
block-diagonal, each part's alpha/rank folded into its up and alpha = rank. Every reader (ComfyUI
and Forge apply up @ down to the fused weight; diffusers splits the up by output rows) then
computes exactly each part's delta.

DoRA modules also get `<name>.dora_scale` (see adapters/dora.py). AUTOMATIC1111 applies
alpha/rank after normalising `W + up @ down`, ComfyUI before, so a DoRA module is written with
alpha/rank folded into `lora_up` and alpha = rank: both UIs then compute the weight trained here.
A Linear with a block-wise alpha of its own is written with the adapter's alpha, the ratio
folded into `lora_up` (see `block_alpha`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from peft import get_peft_model_state_dict

from stylelora.adapters.inject import ADAPTER_NAME
from stylelora.adapters.lycoris import is_lycoris, peft_to_lycoris
from stylelora.errors import UserError

PEFT_TO_KOHYA = {
    "lora_A": "lora_down",
    "lora_B": "lora_up",
    "lora_magnitude_vector": "dora_scale",
}


def module_alpha(module: torch.nn.Module, module_path: str) -> float:
    """The lora_alpha PEFT uses for `module_path`, honouring its per-module alpha pattern."""
    config = module.peft_config[ADAPTER_NAME]
    for pattern, alpha in config.alpha_pattern.items():
        if module_path == pattern or module_path.endswith("." + pattern):
            return float(alpha)
    return float(config.lora_alpha)


def block_alpha(module: torch.nn.Module, alpha: float, down: torch.Tensor) -> float | None:
    """For a Linear or 1x1 module with an alpha of its own (block-wise alphas), the alpha to
    write instead: the adapter's, with the ratio folded into `lora_up` by the caller. diffusers'
    kohya loader drops per-module alphas of attention modules (it names them by an attention
    processor that no longer exists) and applies the most common one, so every such module
    carries the same alpha and each reader computes the trained weight. LoCon's 3x3
    convolutions keep their conv_alpha, which every reader takes. None: write it as it is."""
    common = float(module.peft_config[ADAPTER_NAME].lora_alpha)
    three_by_three = down.dim() == 4 and down.shape[-1] > 1
    return common if alpha != common and not three_by_three else None


def peft_to_kohya(
    module: torch.nn.Module,
    prefix: str,
    file_module: Callable[[str, str], tuple[str, tuple[str, ...]]],
) -> dict[str, torch.Tensor]:
    """kohya tensors for the adapters in `module`; `file_module(prefix, path)` names each one's
    module in the family's files and the paths of every module fused into it, in output order.
    LoHa and LoKr adapters are written in LyCORIS's layout (adapters/lycoris.py)."""
    if is_lycoris(module, ADAPTER_NAME):
        return peft_to_lycoris(module, prefix, file_module, ADAPTER_NAME)
    # No embedding check: it looks the base model up on the hub, and no embeddings are adapted.
    state = get_peft_model_state_dict(
        module, adapter_name=ADAPTER_NAME, save_embedding_layers=False
    )
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        module_path, _, rest = key.rpartition(".lora_")
        part = "lora_" + rest.split(".")[0]
        if part not in PEFT_TO_KOHYA:
            raise ValueError(f"unexpected adapter tensor {key!r}")
        grouped.setdefault(module_path, {})[PEFT_TO_KOHYA[part]] = value.detach().float()
    kohya_modules = dict(file_module(prefix, module_path) for module_path in grouped)
    tensors: dict[str, torch.Tensor] = {}
    for name, members in kohya_modules.items():
        if len(members) > 1:
            tensors.update(fused_adapters(name, module, members, grouped))
            continue
        module_path = members[0]
        parts = grouped[module_path]
        alpha = module_alpha(module, module_path)
        if common := block_alpha(module, alpha, parts["lora_down"]):
            parts["lora_up"] = parts["lora_up"] * (alpha / common)
            alpha = common
        if "dora_scale" in parts:
            rank = parts["lora_down"].shape[0]
            parts["lora_up"] = parts["lora_up"] * (alpha / rank)
            alpha = float(rank)
        for part, value in parts.items():
            suffix = part if part == "dora_scale" else f"{part}.weight"
            tensors[f"{name}.{suffix}"] = value.contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    return tensors


def fused_adapters(
    name: str,
    module: torch.nn.Module,
    members: tuple[str, ...],
    grouped: dict[str, dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """`fuse` for the PEFT adapters of `module`: their alphas, and the model's widths."""
    alphas = {path: module_alpha(module, path) for path in members if path in grouped}
    widths = {
        path: module.get_submodule(path).out_features for path in members if path not in grouped
    }
    return fuse(name, members, grouped, alphas, widths)


def fuse(
    name: str,
    members: tuple[str, ...],
    grouped: dict[str, dict[str, torch.Tensor]],
    alphas: dict[str, float],
    widths: dict[str, int],
) -> dict[str, torch.Tensor]:
    """One kohya module over the consecutive output slices of the `members` of a fused Linear,
    from each adapted member's `lora_down`/`lora_up` in `grouped` and its alpha in `alphas`;
    a member without an adapter gets zero rows of its output width in `widths`."""
    downs, ups = [], []
    for path in members:
        parts = grouped.get(path)
        if parts is None:
            ups.append(torch.zeros(widths[path], 0))
            continue
        if "dora_scale" in parts:
            raise UserError(f"{name}: DoRA on a fused module cannot be written in kohya's layout")
        rank = parts["lora_down"].shape[0]
        downs.append(parts["lora_down"])
        ups.append(parts["lora_up"] * (alphas[path] / rank))
    down = torch.cat(downs)
    return {
        f"{name}.lora_down.weight": down.contiguous(),
        f"{name}.lora_up.weight": torch.block_diag(*ups).contiguous(),
        f"{name}.alpha": torch.tensor(float(down.shape[0])),
    }
