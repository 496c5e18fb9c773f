"""A quantized frozen base (QLoRA): the UNet's and text encoders' Linear layers in NF4 or int8.

diffusers' and transformers' `from_pretrained(quantization_config=...)` refuse to run without a
GPU, and they cannot quantize a model that is already loaded (a single file, a tiny model). So
the Linear layers of the loaded model are swapped here for bitsandbytes' `Linear4bit` /
`Linear8bitLt`, one at a time (only one layer is ever held twice), before the adapters are
injected; PEFT then wraps its LoRA layers around the quantized ones as it does for models
loaded in 4 or 8 bit. Convolutions, norms and embeddings stay as they are.
"""

from __future__ import annotations

import torch
from packaging.version import Version

from stylelora.errors import UserError

# PEFT reads these model attributes to pick its bitsandbytes-aware LoRA layers.
PEFT_FLAGS = {"nf4": "is_loaded_in_4bit", "int8": "is_loaded_in_8bit"}


# From this version bitsandbytes moves quantized layers between devices with their
# quantization state (diffusers gates `.to()` of 8-bit models on it too): the frozen text
# encoders are parked on the CPU between previews.
MIN_BITSANDBYTES = Version("0.48")


def import_bitsandbytes():
    try:
        import bitsandbytes
    except ImportError:
        raise UserError(
            "train.quantize_base needs bitsandbytes: pip install 'stylelora[bitsandbytes]'"
        ) from None
    if Version(bitsandbytes.__version__) < MIN_BITSANDBYTES:
        raise UserError(
            f"train.quantize_base needs bitsandbytes >= 0.48 (found {bitsandbytes.__version__}): "
            "pip install -U 'stylelora[bitsandbytes]'"
        )
    return bitsandbytes


def quantized_linear(
    linear: torch.nn.Linear, kind: str, compute_dtype: torch.dtype, device: torch.device
) -> torch.nn.Module:
    """A bitsandbytes copy of `linear`, quantized on `device` (where `.to` quantizes)."""
    bnb = import_bitsandbytes()
    has_bias = linear.bias is not None
    weight = linear.weight.data
    if kind == "nf4":
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            compute_dtype=compute_dtype,
            quant_type="nf4",
            device="meta",
        )
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
        # On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight for a faster kernel the
        # first time the layer runs in eval mode without gradients (a preview, a validation
        # pass), in place; training on the repacked weight then fails, and a layer narrower
        # than a 64-weight block cannot be repacked at all. Training and previews alternate,
        # so every pass keeps the one format. GPUs never take that path.
        layer.support_avx512bf16_for_cpu = False
    else:
        layer = bnb.nn.Linear8bitLt(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            has_fp16_weights=False,
            device="meta",
        )
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    if has_bias:
        layer.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
    return layer.to(device)


def quantizable_linears(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """The model's Linear layers, but those transformers keeps unquantized
    (`_keep_in_fp32_modules`: T5's `wo`, whose input it casts to that layer's dtype)."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    return [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is torch.nn.Linear and name.rpartition(".")[2] not in keep
    ]


def quantize_linears(
    model: torch.nn.Module, kind: str, compute_dtype: torch.dtype, device: torch.device
) -> int:
    """Replace `model`'s Linear layers in place; return how many were quantized."""
    targets = quantizable_linears(model)
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, quantized_linear(linear, kind, compute_dtype, device))
    setattr(model, PEFT_FLAGS[kind], True)
    return len(targets)


def quantize_base(
    models: dict[str, torch.nn.Module],
    kind: str,
    compute_dtype: torch.dtype,
    device: torch.device,
) -> dict[str, int]:
    """Quantize each of `models` (keyed by kohya prefix); return the layer count of each."""
    if kind == "no":
        return {}
    return {
        prefix: quantize_linears(model, kind, compute_dtype, device)
        for prefix, model in models.items()
    }
