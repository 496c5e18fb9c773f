"""Optimizer and learning-rate schedule from the config.

Optimizers are named as kohya names them; each is built with the config's shared settings
(betas, epsilon, weight decay) where it takes them, then `train.optimizer_args` on top.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import torch
from diffusers.optimization import get_scheduler
from torch.optim.lr_scheduler import LRScheduler

from stylelora.adapters.inject import adapted_module, adapter_parameters
from stylelora.config import TrainConfig
from stylelora.errors import UserError

# name -> (module, class, pip extra that provides the module)
OPTIMIZERS: dict[str, tuple[str, str, str | None]] = {
    "adamw": ("torch.optim", "AdamW", None),
    "adamw8bit": ("bitsandbytes.optim", "AdamW8bit", "bitsandbytes"),
    "lion8bit": ("bitsandbytes.optim", "Lion8bit", "bitsandbytes"),
    "adafactor": ("transformers.optimization", "Adafactor", None),
    "prodigy": ("prodigyopt", "Prodigy", "prodigy"),
}


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    module, cls, extra = OPTIMIZERS[name]
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError:
        raise UserError(
            f"train.optimizer = {name!r} needs the {module.split('.')[0]} package: "
            f"pip install 'stylelora[{extra}]'"
        ) from None


def accepted_args(cls: type) -> list[str]:
    """The keyword arguments the optimizer's constructor takes, beyond params and lr."""
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return [
        p.name
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.name not in ("self", "params", "lr") and p.kind not in variadic
    ]


def check_optimizer(cfg: TrainConfig) -> type[torch.optim.Optimizer]:
    """The optimizer class, once its package imports and every optimizer_args name is known."""
    cls = optimizer_class(cfg.optimizer)
    accepted = accepted_args(cls)
    unknown = [name for name in cfg.optimizer_args if name not in accepted]
    if unknown:
        raise UserError(
            f"train.optimizer_args: {cfg.optimizer} takes no argument {unknown[0]!r} "
            f"(it takes: {', '.join(sorted(accepted))})"
        )
    return cls


def default_args(cfg: TrainConfig) -> dict[str, Any]:
    """What the config's shared keys mean for each optimizer."""
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    if cfg.optimizer in ("adamw", "adamw8bit", "prodigy"):
        return {"betas": betas, "eps": cfg.adam_epsilon, "weight_decay": cfg.weight_decay}
    if cfg.optimizer == "adafactor":
        # A fixed learning rate, as kohya configures it; Adafactor's own schedule is opt-in.
        return {
            "scale_parameter": False,
            "relative_step": False,
            "warmup_init": False,
            "weight_decay": cfg.weight_decay,
        }
    return {"weight_decay": cfg.weight_decay}  # lion8bit: Lion's own betas (0.9, 0.99)


def parameter_groups(
    adapted: dict[str, torch.nn.Module],
    cfg: TrainConfig,
    lr_weights: dict[str, float] | None = None,
) -> list[dict]:
    """One group per adapted component; text encoders may have their own learning rate.

    With LoRA+ (`loraplus_lr_ratio`), each component's up matrices (PEFT's `lora_B`) form a
    group of their own at the ratio times its learning rate. `lr_weights` (UNet module path ->
    weight, block-wise rates) splits the UNet's groups by weight.
    """
    groups = []
    for prefix, module in adapted.items():
        lr = (
            cfg.learning_rate if prefix == "lora_unet" else cfg.text_encoder_lr or cfg.learning_rate
        )
        weights = (lr_weights or {}) if prefix == "lora_unet" else {}
        if not cfg.loraplus_lr_ratio and not weights:
            groups.append({"params": adapter_parameters(module), "lr": lr, "name": prefix})
            continue
        split: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            weight = weights.get(adapted_module(name), 1.0)
            up = bool(cfg.loraplus_lr_ratio) and "lora_B" in name
            split.setdefault((weight, up), []).append(param)
        for (weight, up), params in sorted(split.items(), key=lambda item: item[0][1]):
            scale = weight * (cfg.loraplus_lr_ratio if up else 1.0)
            name = prefix + ("_up" if up else "") + (f"_x{weight:g}" if weight != 1.0 else "")
            groups.append({"params": params, "lr": lr * scale, "name": name})
    return groups


# The settings that give parameter groups learning rates of their own.
PER_GROUP_RATES = (
    "loraplus_lr_ratio",
    "text_encoder_lr",
    "down_lr_weight",
    "mid_lr_weight",
    "up_lr_weight",
)


def check_one_rate(groups: list[dict], cfg: TrainConfig) -> None:
    """Prodigy estimates one step size for all parameters and stops at its first step when a
    group has another learning rate (other than 0): refuse that before the model trains."""
    rates = {group.get("lr", cfg.learning_rate) for group in groups} - {0.0}
    if cfg.optimizer == "prodigy" and len(rates) > 1:
        causes = [f"train.{key}" for key in PER_GROUP_RATES if getattr(cfg, key) is not None]
        raise UserError(
            f"train.optimizer = 'prodigy' takes one learning rate for every parameter: remove "
            f"{' and '.join(causes)} (a learning rate per group), or choose another optimizer"
        )


def build_optimizer(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    cls = check_optimizer(cfg)
    check_one_rate(groups, cfg)
    try:
        return cls(groups, lr=cfg.learning_rate, **{**default_args(cfg), **cfg.optimizer_args})
    except (TypeError, ValueError) as exc:
        raise UserError(f"train.optimizer_args: {cfg.optimizer} refused them ({exc})") from None


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> LRScheduler:
    """Stepped once per optimizer step, so warmup and length count optimizer steps."""
    name = "constant_with_warmup" if cfg.lr_scheduler == "constant" else cfg.lr_scheduler
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=cfg.lr_warmup_steps,
        num_training_steps=cfg.max_steps,
        num_cycles=cfg.lr_cycles,
        power=cfg.lr_power,
    )
