"""Inject LoRA adapters into a family's UNet and text encoders through PEFT."""

from __future__ import annotations

import torch
from peft import LoraConfig

from stylelora.config import AdapterConfig
from stylelora.families.base import ModelFamily

ADAPTER_NAME = "default"

# PEFT matches a target by module-path suffix.
UNET_TARGETS: dict[str, list[str]] = {
    "cross-attn": ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"],
    "attention": [
        f"{attn}.{proj}"
        for attn in ("attn1", "attn2")
        for proj in ("to_q", "to_k", "to_v", "to_out.0")
    ],
}
# q, k, v and out_proj together: AUTOMATIC1111 skips an OpenCLIP layer that lacks any of them.
TEXT_ENCODER_TARGETS = [f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")]

PEFT_INIT = {"kaiming": True, "gaussian": "gaussian"}  # True: kohya's Kaiming-uniform down, zero up


def lora_config(rank: int, alpha: float, targets: list[str], cfg: AdapterConfig) -> LoraConfig:
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=targets,
        init_lora_weights=PEFT_INIT[cfg.init],
        lora_dropout=cfg.dropout,
    )


def inject_adapters(family: ModelFamily, cfg: AdapterConfig) -> dict[str, torch.nn.Module]:
    """Add adapters in place; return the adapted modules keyed by kohya prefix.

    Every base weight is frozen; adapter weights are kept in fp32 whatever the base dtype, so
    mixed-precision training updates them at full precision.
    """
    family.unet.requires_grad_(False)
    family.vae.requires_grad_(False)
    for encoder in family.text_encoders().values():
        encoder.requires_grad_(False)

    adapted = {"lora_unet": family.unet}
    family.unet.add_adapter(
        lora_config(cfg.rank, cfg.alpha, UNET_TARGETS[cfg.unet_targets], cfg), ADAPTER_NAME
    )
    if cfg.text_encoder:
        rank = cfg.text_encoder_rank or cfg.rank
        alpha = cfg.text_encoder_alpha or cfg.alpha
        for prefix, encoder in family.text_encoders().items():
            encoder.add_adapter(lora_config(rank, alpha, TEXT_ENCODER_TARGETS, cfg), ADAPTER_NAME)
            adapted[prefix] = encoder
    for module in adapted.values():
        for param in module.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    return adapted


def adapter_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]
