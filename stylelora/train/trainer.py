"""The training run: set-up, one loop of steps with previews, then the export.

Everything random is drawn from generators derived from (seed, position), never from global
state, so the same config gives the same adapter and a later resume can land on any step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from stylelora.config import Config
from stylelora.export.atomic import atomic_path
from stylelora.export.lora_file import save_lora_file
from stylelora.export.metadata import training_metadata
from stylelora.sample.render import grid, preview_pipeline, render_all
from stylelora.train.placement import visiting
from stylelora.train.run import (
    TrainingRun,
    build_run,
    full_adapter_weights,
    training_step,
)


@dataclass
class RunResult:
    adapter_path: Path
    steps: int
    losses: list[float] = field(default_factory=list)
    previews: list[Path] = field(default_factory=list)


def train(cfg: Config) -> RunResult:
    """Train the adapter `cfg` describes and write it to `<output_dir>/<name>.safetensors`."""
    run = build_run(cfg)
    accelerator, family, adapted = run.accelerator, run.family, run.adapted
    sampler, loader, lr_scheduler = run.sampler, run.loader, run.lr_scheduler
    scan, prompts, started = run.scan, run.prompts, run.started

    result = RunResult(adapter_path=cfg.output_dir / f"{cfg.name}.safetensors", steps=0)
    progress = tqdm(
        total=cfg.train.max_steps, desc="training", disable=not accelerator.is_local_main_process
    )
    draws, epoch, window = 0, 0, []
    while result.steps < cfg.train.max_steps:
        sampler.set_epoch(epoch)
        for batch in loader:
            loss = training_step(run, batch, draws)
            draws += 1
            window.append(loss.detach().float().item())
            if not accelerator.sync_gradients:
                continue
            lr_scheduler.step()
            result.steps += 1
            result.losses.append(sum(window) / len(window))
            window.clear()
            progress.update(1)
            progress.set_postfix(
                loss=f"{result.losses[-1]:.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.2e}"
            )
            if prompts and preview_due(result.steps, cfg):
                result.previews += write_preview(run, result.steps)
            if result.steps >= cfg.train.max_steps:
                break
        epoch += 1
    progress.close()

    accelerator.wait_for_everyone()
    with full_adapter_weights(run):
        if accelerator.is_main_process:
            metadata = training_metadata(
                cfg, scan, family, result.steps, epoch, started, time.time()
            )
            save_lora_file(result.adapter_path, family, adapted, metadata)
            accelerator.print(f"saved {result.adapter_path}")
    accelerator.end_training()
    return result


def preview_due(step: int, cfg: Config) -> bool:
    every = cfg.sample.every_n_steps
    return step == cfg.train.max_steps or (every > 0 and step % every == 0)


def write_preview(run: TrainingRun, step: int) -> list[Path]:
    """Render the preview prompts with the current adapter into one grid PNG."""
    accelerator, cfg, written = run.accelerator, run.cfg, []
    if accelerator.is_main_process:
        pipe = preview_pipeline(run.family.pipe, cfg.sample.scheduler)
        with visiting(run.idle, accelerator.device):
            sheet = grid(render_all(pipe, run.prompts, run.family))
        path = cfg.output_dir / "samples" / f"{cfg.name}_{step:06d}.png"
        with atomic_path(path) as tmp:
            sheet.save(tmp, format="PNG")
        written.append(path)
    accelerator.wait_for_everyone()
    return written
