"""Inject LoRA adapters into a family's UNet and text encoders through PEFT.

Through PEFT's own `inject_adapter_in_model`, not the `add_adapter` of diffusers' and transformers'
model classes: those wrap the same call in version checks of their own (transformers 5.24 refuses
every PEFT before 0.22), which must not stop a training run.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer

from stylelora.adapters.blocks import BlockPlan
from stylelora.adapters.dora import use_column_dora
from stylelora.adapters.dropout import add_module_dropout
from stylelora.adapters.lycoris import full_matrix_scale, lycoris_config
from stylelora.adapters.targets import TEXT_ENCODER_TARGETS, UNET_TARGETS, Targets
from stylelora.config import AdapterConfig
from stylelora.errors import UserError
from stylelora.families.base import ModelFamily

__all__ = ["ADAPTER_NAME", "TEXT_ENCODER_TARGETS", "UNET_TARGETS", "inject_adapters"]

ADAPTER_NAME = "default"

# Where an adapter parameter's name leaves its module's path: PEFT's LoRA (and DoRA), LoHa, LoKr.
ADAPTER_PART = re.compile(r"\.(?:lora|hada|lokr)_")

PEFT_INIT = {"kaiming": True, "gaussian": "gaussian"}  # True: kohya's Kaiming-uniform down, zero up


def adapter_config(
    cfg: AdapterConfig,
    rank: int,
    alpha: float,
    targets: Targets,
    conv: tuple[int, float],
    ranks: dict[str, tuple[int, float]] | None = None,
):
    """PEFT's config for `adapter.type`, LoRA's or LoHa's or LoKr's, with ranks and alphas per
    module (`Targets.peft_keywords`)."""
    keywords = targets.peft_keywords(conv, ranks)
    if cfg.type != "lora":
        return lycoris_config(cfg, rank, alpha, keywords)
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        **keywords,
        init_lora_weights=PEFT_INIT[cfg.init],
        lora_dropout=cfg.dropout,
        use_dora=cfg.use_dora,
    )


def add_adapter(module: torch.nn.Module, config, cfg: AdapterConfig) -> None:
    """Inject one component's adapters, with the DoRA orientation and module dropout asked for
    (PEFT's LoHa and LoKr drop modules themselves)."""
    inject_adapter_in_model(config, module, ADAPTER_NAME)  # also sets module.peft_config
    if cfg.type != "lora":
        full_matrix_scale(module, ADAPTER_NAME)
        return
    if cfg.use_dora:
        use_column_dora(module, ADAPTER_NAME)
    add_module_dropout(module, cfg.module_dropout)


def inject_adapters(
    family: ModelFamily, cfg: AdapterConfig, blocks: BlockPlan | None = None
) -> dict[str, torch.nn.Module]:
    """Add adapters in place; return the adapted modules keyed by kohya prefix. `blocks`: the
    UNet's modules and ranks as block-wise options chose them (adapters/blocks.py).

    Every base weight is frozen; adapter weights are kept in fp32 whatever the base dtype, so
    mixed-precision training updates them at full precision.
    """
    if cfg.type != "lora" and family.fuses_modules:
        raise UserError(
            f"adapter.type = {cfg.type!r}: {family.name}'s kohya layout fuses modules (q, k, v in "
            'one), which LyCORIS\'s layout cannot hold; use adapter.type = "lora"'
        )
    family.unet.requires_grad_(False)
    family.vae.requires_grad_(False)
    for encoder in family.text_encoders().values():
        encoder.requires_grad_(False)

    adapted = {"lora_unet": family.unet}
    conv = (cfg.conv_rank or cfg.rank, cfg.conv_alpha or cfg.alpha)
    targets = blocks.targets() if blocks else family.denoiser_targets(cfg)
    ranks = blocks.ranks if blocks else None
    add_adapter(family.unet, adapter_config(cfg, cfg.rank, cfg.alpha, targets, conv, ranks), cfg)
    if cfg.text_encoder:
        rank = cfg.text_encoder_rank or cfg.rank
        alpha = cfg.text_encoder_alpha or cfg.alpha
        te_targets = family.text_encoder_targets(cfg.text_encoder_targets)
        for prefix, encoder in family.text_encoders().items():
            add_adapter(encoder, adapter_config(cfg, rank, alpha, te_targets, conv), cfg)
            adapted[prefix] = encoder
    for module in adapted.values():
        for param in module.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    return adapted


def adapted_module(parameter_name: str) -> str:
    """The path of the module an adapter parameter belongs to: `x.lora_A.default.weight`,
    `x.hada_w1_a.default` and `x.lokr_w1.default` all give `x`."""
    return ADAPTER_PART.split(parameter_name, maxsplit=1)[0]


def adapter_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def rank_above_width(adapted: dict[str, torch.nn.Module]) -> str | None:
    """A note when some adapters have a rank above what their layer can use.

    A LoRA's update has rank at most min(inputs, outputs) of its layer (a conv's inputs count
    each kernel position); the rank beyond that costs memory and learns nothing.
    """
    over, total, narrowest = 0, 0, None
    for module in adapted.values():
        for layer in module.modules():
            if not isinstance(layer, LoraLayer) or ADAPTER_NAME not in layer.lora_A:
                continue
            down = layer.lora_A[ADAPTER_NAME].weight
            width = min(down[0].numel(), layer.lora_B[ADAPTER_NAME].weight.shape[0])
            total += 1
            if down.shape[0] > width:
                over += 1
                narrowest = min(width, narrowest or width)
    if not over:
        return None
    return (
        f"note: the adapter rank is above the width of {over} of the {total} adapted layers "
        f"(the narrowest is {narrowest}); there it adds memory, not capacity: lower adapter.rank"
    )


@contextlib.contextmanager
def adapters_disabled(modules: list[torch.nn.Module]) -> Iterator[None]:
    """Every PEFT adapter layer in `modules` acts as its base layer inside the block."""
    layers = [m for module in modules for m in module.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
