"""Set up short training runs on the tiny SD1.5 and the demo images, through the real set-up."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import training_config

from stylelora.train.run import TrainingRun, build_run, training_step


def tiny_run(
    tmp_path: Path, model_dir: Path, data: Path, *overrides: str, prompts: tuple[str, ...] = ()
) -> TrainingRun:
    cfg = training_config(
        tmp_path,
        model_dir,
        data,
        "train.batch_size=2",
        "train.lr_warmup_steps=0",
        "train.lr_scheduler='constant'",
        *overrides,
    )
    cfg.sample.prompts = list(prompts)
    return build_run(cfg)


def overfit(run: TrainingRun, steps: int) -> list[float]:
    """Train `steps` times on one batch with one noise draw; the losses, first to last."""
    batch = next(iter(run.loader))
    return [training_step(run, dict(batch), draws=0).item() for _ in range(steps)]


def adapter_tensors(run: TrainingRun, prefix: str = "lora_unet") -> dict[str, torch.Tensor]:
    module = run.adapted[prefix]
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
