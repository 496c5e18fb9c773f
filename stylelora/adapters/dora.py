"""DoRA with the magnitude per input channel: the orientation of kohya's `dora_scale`.

AUTOMATIC1111 (`NetworkModule.apply_weight_decompose`), ComfyUI (`weight_adapter.base.
weight_decompose`) and Forge normalise `W + ΔW` over its output axis, once per *input* channel
(column), and multiply by `dora_scale` of shape (1, in) or (1, in, 1, 1):

    W' = dora_scale * (W + ΔW) / ||W + ΔW||_col

PEFT's `use_dora` keeps one magnitude per *output* channel (row) instead; the two give different
weights and neither converts to the other. So DoRA is trained with PEFT's `use_dora` machinery
(the variant, its parameter bookkeeping and optimiser wiring) and each layer's PEFT magnitude
module is swapped for `ColumnDora` below, whose parameter *is* the `dora_scale` the UIs read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer


def column_norm(weight: torch.Tensor) -> torch.Tensor:
    """Norm of each input channel's column, shaped (1, in, 1, ...) to broadcast over `weight`."""
    dims = (0, *range(2, weight.dim()))
    return torch.linalg.vector_norm(weight, dim=dims, keepdim=True)


def dense_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The layer's weight as a plain tensor; a bitsandbytes layer's dequantized (QDoRA).

    Not PEFT's `dequantize_module_weight`: on the CPU it re-assigns an 8-bit layer's weight,
    which drops the scales the layer's next forward pass reads.
    """
    weight = layer.weight
    kind = type(weight).__name__
    if kind not in ("Params4bit", "Int8Params"):
        return weight
    import bitsandbytes as bnb  # an optional dependency, present when the base is quantized

    if kind == "Params4bit":
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    scales = layer.state.SCB if layer.state.SCB is not None else weight.SCB
    return bnb.functional.int8_vectorwise_dequant(weight.data, scales)


def lora_delta(lora_a: torch.nn.Module, lora_b: torch.nn.Module, shape: torch.Size) -> torch.Tensor:
    """up @ down reshaped to the base weight's shape (conv downs flattened first)."""
    down, up = lora_a.weight, lora_b.weight
    return (up.flatten(1) @ down.flatten(1)).reshape(shape)


class ColumnDora(torch.nn.Module):
    """A PEFT `lora_magnitude_vector` entry with one magnitude per input channel.

    PEFT calls it as it calls its own DoRA layers and adds what it returns to the base output:
    x ↦ (W + sΔ)(c ⊙ x) − W x with c = m / ||W + sΔ||_col (the norm detached, as PEFT does).
    """

    def __init__(self, base_layer: torch.nn.Module, lora_a, lora_b, scaling: float):
        super().__init__()
        weight = dense_weight(base_layer).detach().float()
        delta = lora_delta(lora_a, lora_b, weight.shape).detach().float()
        self.weight = torch.nn.Parameter(column_norm(weight + scaling * delta))

    def scale(self, weight: torch.Tensor, lora_a, lora_b, scaling: float) -> torch.Tensor:
        delta = lora_delta(lora_a, lora_b, weight.shape).detach().to(weight.dtype)
        norm = column_norm(weight + scaling * delta).detach()
        return (self.weight / norm).flatten()

    def forward(
        self, x, *, lora_A, lora_B, scaling, base_layer, base_result=None, adapter_name=None
    ):  # noqa: N803 (PEFT's keywords)
        weight = dense_weight(base_layer).to(x.dtype)
        c = self.scale(weight, lora_A, lora_B, scaling).to(x.dtype)
        if isinstance(base_layer, torch.nn.Conv2d):
            c = c.view(1, -1, 1, 1)
            extra = F.conv2d(
                x * (c - 1),
                weight,
                stride=base_layer.stride,
                padding=base_layer.padding,
                dilation=base_layer.dilation,
                groups=base_layer.groups,
            )
        else:
            extra = F.linear(x * (c - 1), weight)
        return extra + lora_B(lora_A(x * c)) * scaling

    def get_weight_norm(self, *args, **kwargs):
        raise NotImplementedError(
            "PEFT's merge assumes per-output magnitudes; merge stylelora's DoRA through its "
            "exported kohya file (stylelora merge)"
        )


def use_column_dora(model: torch.nn.Module, adapter_name: str) -> int:
    """Swap every PEFT DoRA magnitude in `model` for a `ColumnDora`; return how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_magnitude_vector:
            module.lora_magnitude_vector[adapter_name] = ColumnDora(
                module.get_base_layer(),
                module.lora_A[adapter_name],
                module.lora_B[adapter_name],
                module.scaling[adapter_name],
            )
            count += 1
    return count
