"""The training run: set-up, one loop of steps with previews, then the export.

Everything random is drawn from generators derived from (seed, position), never from global
state, so the same config gives the same adapter and a later resume can land on any step.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from stylelora.adapters.inject import inject_adapters
from stylelora.config import Config
from stylelora.data.captions import with_trigger
from stylelora.data.dataset import (
    BucketBatchSampler,
    ImageCaptionDataset,
    collate,
    derived_generator,
)
from stylelora.data.report import data_options, describe, scan_dataset
from stylelora.data.scan import ScanResult
from stylelora.errors import UserError
from stylelora.export.atomic import atomic_path
from stylelora.export.lora_file import save_lora_file
from stylelora.export.metadata import training_metadata
from stylelora.families import load_family
from stylelora.families.base import ModelFamily
from stylelora.sample.prompts import SamplePrompt, parse_prompt_file
from stylelora.sample.render import grid, preview_pipeline, render_all
from stylelora.train.cache import TextCache, cache_latents
from stylelora.train.loss import denoising_loss, draw_noise
from stylelora.train.optim import build_lr_scheduler, build_optimizer, parameter_groups

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class RunResult:
    adapter_path: Path
    steps: int
    losses: list[float] = field(default_factory=list)
    previews: list[Path] = field(default_factory=list)


def train(cfg: Config) -> RunResult:
    """Train the adapter `cfg` describes and write it to `<output_dir>/<name>.safetensors`."""
    started = time.time()
    scan = scan_dataset(cfg.data)
    dataset = ImageCaptionDataset(scan.records, data_options(cfg.data, cfg.seed))
    prompts = sample_prompts(cfg)
    check_writable(cfg.output_dir)
    write_run_config(cfg)

    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
    )
    report_dataset(accelerator, scan, dataset, cfg)
    weight_dtype = WEIGHT_DTYPES[cfg.train.mixed_precision]
    family = load_family(
        cfg.model,
        dtype=weight_dtype,
        clip_skip=cfg.clip_skip - 1 if cfg.clip_skip else None,  # kohya's 2 is diffusers' 1
        prediction_type=cfg.prediction_type,
        zero_terminal_snr=cfg.train.zero_terminal_snr,
        config=str(cfg.single_file_config) if cfg.single_file_config else None,
    )
    for note in family.notes:
        accelerator.print(note)
    family.pipe.to(accelerator.device)
    family.cast_vae(weight_dtype)
    configure_attention(family, cfg.train.attention)
    set_seed(cfg.seed)  # PEFT draws the adapters' initial weights from torch's global RNG
    adapted = inject_adapters(family, cfg.adapter)
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(adapted)

    optimizer = build_optimizer(parameter_groups(adapted, cfg.train), cfg.train)
    lr_scheduler = build_lr_scheduler(optimizer, cfg.train)
    text_cache = prepare_caches(accelerator, family, dataset, cfg, bool(prompts))
    sampler = BucketBatchSampler(dataset, cfg.train.batch_size, cfg.seed)
    loader = DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.data.num_workers
    )
    *models, optimizer, loader = accelerator.prepare(*adapted.values(), optimizer, loader)
    unet = models[0]
    noise_scheduler = family.noise_scheduler()
    for model in models:
        model.train()

    result = RunResult(adapter_path=cfg.output_dir / f"{cfg.name}.safetensors", steps=0)
    progress = tqdm(
        total=cfg.train.max_steps, desc="training", disable=not accelerator.is_local_main_process
    )
    draws, epoch, window = 0, 0, []
    while result.steps < cfg.train.max_steps:
        sampler.set_epoch(epoch)
        for batch in loader:
            with accelerator.accumulate(*models):
                generator = derived_generator(cfg.seed, draws, accelerator.process_index)
                if text_cache:
                    batch["text"] = text_cache.encode(batch["captions"])
                noised = draw_noise(family, noise_scheduler, batch, generator)
                loss = denoising_loss(family, unet, noise_scheduler, noised, batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.train.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(
                        optimizer_params(optimizer), cfg.train.max_grad_norm
                    )
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
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
                result.previews += write_preview(accelerator, family, prompts, cfg, result.steps)
            if result.steps >= cfg.train.max_steps:
                break
        epoch += 1
    progress.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        metadata = training_metadata(cfg, scan, family, result.steps, epoch, started, time.time())
        save_lora_file(result.adapter_path, family, adapted, metadata)
        accelerator.print(f"saved {result.adapter_path}")
    accelerator.end_training()
    return result


def sample_prompts(cfg: Config) -> list[SamplePrompt]:
    """The preview prompts, read and checked before any model is loaded."""
    side = cfg.data.resolution
    defaults = SamplePrompt(
        prompt="",
        negative_prompt=cfg.sample.negative_prompt,
        width=cfg.sample.width or side,
        height=cfg.sample.height or side,
        seed=cfg.sample.seed,
        guidance_scale=cfg.sample.guidance_scale,
        steps=cfg.sample.num_inference_steps,
    )
    if cfg.sample.prompts_file:
        return parse_prompt_file(cfg.sample.prompts_file, defaults)
    return [SamplePrompt(**{**defaults.__dict__, "prompt": p}) for p in cfg.sample.prompts]


def check_writable(folder: Path) -> None:
    with atomic_path(folder / ".write-test") as probe:
        probe.write_bytes(b"ok")
    (folder / ".write-test").unlink()


def report_dataset(
    accelerator: Accelerator, scan: ScanResult, dataset: ImageCaptionDataset, cfg: Config
) -> None:
    global_batch = cfg.train.batch_size * cfg.train.gradient_accumulation_steps
    global_batch *= accelerator.num_processes
    for line in describe(scan, dataset, cfg.data):
        accelerator.print(line)
    accelerator.print(
        f"global batch {global_batch} ({accelerator.num_processes} process(es) x batch "
        f"{cfg.train.batch_size} x accumulation {cfg.train.gradient_accumulation_steps}), "
        f"learning rate {cfg.train.learning_rate:g}"
    )


def latents_cache_dir(cfg: Config) -> Path:
    return cfg.data.cache_dir or cfg.data.dir / ".stylelora-cache"


def prepare_caches(
    accelerator: Accelerator,
    family: ModelFamily,
    dataset: ImageCaptionDataset,
    cfg: Config,
    previews: bool,
) -> TextCache | None:
    """Fill the latents cache and the text cache where the config asks and allows them."""
    say = accelerator.print
    if cfg.data.cache_latents:
        folder = latents_cache_dir(cfg)
        with accelerator.main_process_first():  # the others then find the entries written
            stats = cache_latents(
                family, dataset, folder, cfg.train.batch_size, accelerator.is_local_main_process
            )
        say(f"latents cache {folder}: {stats.encoded} encoded, {stats.reused} reused")
        if previews:
            say("  the VAE stays on the device: the previews decode with it")
        elif accelerator.device.type != "cpu":
            family.vae.to("cpu")
            say("  the VAE moved to the CPU: nothing needs it on the device any more")
    if not cfg.data.cache_text_encoder_outputs:
        return None
    if cfg.adapter.text_encoder:
        say("text cache off: adapter.text_encoder trains the text encoder")
        return None
    if cfg.data.caption_randomness:
        say("text cache off: shuffle_caption or caption dropout changes the captions every draw")
        return None
    captions = [with_trigger(r.caption, cfg.data.trigger_word) for r in dataset.records]
    say(f"text cache: {len(set(captions))} distinct captions encoded once")
    cache = TextCache(family, captions)
    if not previews and accelerator.device.type != "cpu":
        for encoder in family.text_encoders().values():
            encoder.to("cpu")
        say("  the text encoders moved to the CPU: nothing needs them on the device any more")
    return cache


def configure_attention(family: ModelFamily, attention: str) -> None:
    """PyTorch SDPA is diffusers' default; xformers only where it can run."""
    if attention != "xformers":
        return
    if not torch.cuda.is_available():
        raise UserError("train.attention = 'xformers' needs a CUDA GPU; use 'sdpa' here")
    try:
        family.unet.enable_xformers_memory_efficient_attention()
    except (ImportError, ModuleNotFoundError, ValueError, NotImplementedError) as exc:
        raise UserError(
            f"train.attention = 'xformers' is unavailable ({exc}); use 'sdpa'"
        ) from None


def enable_gradient_checkpointing(adapted: dict[str, torch.nn.Module]) -> None:
    for prefix, module in adapted.items():
        if prefix == "lora_unet":
            module.enable_gradient_checkpointing()
        else:
            module.gradient_checkpointing_enable()


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def preview_due(step: int, cfg: Config) -> bool:
    every = cfg.sample.every_n_steps
    return step == cfg.train.max_steps or (every > 0 and step % every == 0)


def write_preview(
    accelerator: Accelerator,
    family: ModelFamily,
    prompts: list[SamplePrompt],
    cfg: Config,
    step: int,
) -> list[Path]:
    """Render the preview prompts with the current adapter into one grid PNG."""
    written = []
    if accelerator.is_main_process:
        pipe = preview_pipeline(family.pipe, cfg.sample.scheduler)
        sheet = grid(render_all(pipe, prompts, family))
        path = cfg.output_dir / "samples" / f"{cfg.name}_{step:06d}.png"
        with atomic_path(path) as tmp:
            sheet.save(tmp, format="PNG")
        written.append(path)
    accelerator.wait_for_everyone()
    return written


def write_run_config(cfg: Config) -> None:
    with atomic_path(cfg.output_dir / "config.json") as tmp:
        tmp.write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
