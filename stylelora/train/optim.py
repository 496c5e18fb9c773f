"""Optimizer and learning-rate schedule from the config."""

from __future__ import annotations

import torch
from diffusers.optimization import get_scheduler
from torch.optim.lr_scheduler import LRScheduler

from stylelora.adapters.inject import adapter_parameters
from stylelora.config import TrainConfig


def parameter_groups(adapted: dict[str, torch.nn.Module], cfg: TrainConfig) -> list[dict]:
    """One group per adapted component; text encoders may have their own learning rate.

    With LoRA+ (`loraplus_lr_ratio`), each component's up matrices (PEFT's `lora_B`) form a
    group of their own at the ratio times its learning rate.
    """
    groups = []
    for prefix, module in adapted.items():
        lr = (
            cfg.learning_rate if prefix == "lora_unet" else cfg.text_encoder_lr or cfg.learning_rate
        )
        if not cfg.loraplus_lr_ratio:
            groups.append({"params": adapter_parameters(module), "lr": lr, "name": prefix})
            continue
        trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        down = [p for n, p in trainable if "lora_B" not in n]
        up = [p for n, p in trainable if "lora_B" in n]
        groups.append({"params": down, "lr": lr, "name": prefix})
        groups.append({"params": up, "lr": lr * cfg.loraplus_lr_ratio, "name": f"{prefix}_up"})
    return groups


def build_optimizer(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        groups,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        weight_decay=cfg.weight_decay,
    )


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> LRScheduler:
    """Stepped once per optimizer step, so warmup and length count optimizer steps."""
    name = "constant_with_warmup" if cfg.lr_scheduler == "constant" else cfg.lr_scheduler
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=cfg.lr_warmup_steps,
        num_training_steps=cfg.max_steps,
    )
