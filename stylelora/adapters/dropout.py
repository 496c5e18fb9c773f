"""kohya's module dropout: in training, skip a whole adapter module's output with probability p.

Hand-written because PEFT has only `lora_dropout` (dropout on the adapter's input features), no
option to drop whole modules. Two hooks per PEFT LoRA layer turn its adapters off for one forward
call, through PEFT's own `_disable_adapters` switch, and back on after it; in eval mode (previews,
export, sampling) they do nothing. The draw uses torch's global RNG, which gradient checkpointing
saves and restores, so a recomputed forward drops the same modules.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer

SAVED = "_stylelora_adapters_were_disabled"


def add_module_dropout(model: torch.nn.Module, p: float) -> int:
    """Hook every LoRA layer of `model`; return how many were hooked."""
    if p <= 0:
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.register_forward_pre_hook(_make_pre_hook(p))
            module.register_forward_hook(_restore)
            count += 1
    return count


def _make_pre_hook(p: float):
    def maybe_drop(module: LoraLayer, args) -> None:
        setattr(module, SAVED, module._disable_adapters)
        if module.training and not module._disable_adapters:
            module._disable_adapters = bool(torch.rand(()) < p)

    return maybe_drop


def _restore(module: LoraLayer, args, output) -> None:
    module._disable_adapters = getattr(module, SAVED)
