"""A training run's set-up, and one training step: what the loop and the benchmarks share.

`build_run(cfg)` loads and places the model (quantized, mixed precision, checkpointing),
injects the adapters, fills the caches, parks what the step no longer needs off the
accelerator, and prepares the rest with accelerate; `training_step` is one micro-batch.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, ProjectConfiguration, send_to_device, set_seed
from torch.utils.data import DataLoader

from stylelora.adapters.blocks import plan_blocks, uses_blocks
from stylelora.adapters.inject import adapter_parameters, inject_adapters, rank_above_width
from stylelora.config import Config
from stylelora.data.dataset import (
    BucketBatchSampler,
    ImageCaptionDataset,
    collate,
    derived_generator,
)
from stylelora.data.regularisation import scan_regularisation
from stylelora.data.report import data_options, describe, prior_lines, scan_dataset
from stylelora.data.scan import ScanResult
from stylelora.errors import UserError
from stylelora.export.atomic import atomic_path, remove_stale_temporaries
from stylelora.families import load_family
from stylelora.families.base import ModelFamily
from stylelora.families.loading import check_model_name
from stylelora.families.objective import Objective
from stylelora.sample.prompts import SamplePrompt, on_size_grid, parse_prompt_file
from stylelora.train.cache import (
    CachedEntries,
    CachePlan,
    TextCache,
    cache_latents,
    cache_plan,
    latents_cache_dir,
)
from stylelora.train.loss import draw_noise, training_loss
from stylelora.train.optim import (
    build_lr_scheduler,
    build_optimizer,
    check_one_rate,
    check_optimizer,
    parameter_groups,
)
from stylelora.train.placement import (
    WEIGHT_DTYPES,
    enable_gradient_checkpointing,
    has_accelerator,
    place_for_training,
    prepare_model,
    visiting,
)
from stylelora.train.prior import class_captions, preservation_loss
from stylelora.train.profile import phase
from stylelora.train.progress import ProgressLog
from stylelora.train.swap import check_block_swapping, swap_blocks
from stylelora.train.validation import (
    FixedSet,
    held_out_line,
    split_records,
    validation_set,
)


@dataclass
class TrainingRun:
    """Everything a training step and the loop around it use."""

    cfg: Config
    accelerator: Accelerator
    family: ModelFamily
    adapted: dict[str, torch.nn.Module]  # kohya prefix -> adapted component, unwrapped
    unet: torch.nn.Module  # the UNet as accelerate prepared it (DDP-wrapped with several)
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: BucketBatchSampler
    loader: DataLoader
    objective: Objective  # the family's: noising, timesteps, target, loss weights
    caches: CachePlan
    text_cache: TextCache | None
    idle: list[torch.nn.Module]  # frozen modules parked off the accelerator between previews
    validation: FixedSet | None
    scan: ScanResult
    priors: ScanResult | None  # the regularisation images (data.reg_dir)
    dataset_lines: list[str]  # the dataset summary, for the report
    prompts: list[SamplePrompt]
    started: float


def build_run(cfg: Config, family: ModelFamily | None = None) -> TrainingRun:
    """Set up the run `cfg` describes; `family`: an already loaded model instead of cfg.model."""
    started = time.time()
    check_optimizer(cfg.train)
    scan = scan_dataset(cfg.data)
    priors = scan_regularisation(cfg.data)
    records, held_out = split_records(scan.records, cfg)
    dataset = ImageCaptionDataset(
        records, data_options(cfg.data, cfg.seed), priors.records if priors else ()
    )
    prompts = read_sample_prompts(cfg)  # read and checked before any model is loaded
    # accelerate keeps one mixed-precision setting per process; a second run (tests, the
    # benchmark) may ask for another. The process group (PartialState) is kept.
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        cpu=not has_accelerator(),  # accelerate joins CPU ranks (torchrun, gloo) only if told
        log_with=None if cfg.train.log_with == "none" else cfg.train.log_with,
        project_config=ProjectConfiguration(cfg.output_dir, cfg.output_dir / "logs"),
    )
    check_platform(accelerator, cfg)
    if note := fit_batch(cfg, dataset, accelerator.num_processes):
        accelerator.print(note)
    if accelerator.is_main_process:
        check_writable(cfg.output_dir)
        # checkpoints/ cleans up after itself (Checkpointer.remove_leftovers)
        for path in remove_stale_temporaries(cfg.output_dir, skip=("checkpoints",)):
            accelerator.print(f"removed {path}, left by an interrupted write")
        write_run_config(cfg)
    dataset_lines = (
        describe(scan, dataset, cfg.data) + held_out_line(held_out) + prior_lines(dataset, cfg)
    )
    report_dataset(accelerator, dataset_lines, cfg)
    family = family or load_model(cfg)
    check_previews(family, cfg)
    prompts, prompt_notes = fitted_prompts(prompts, family.size_step)
    for note in [*prompt_notes, *family.notes]:
        accelerator.print(note)
    objective = family.training_objective()
    objective.check(cfg.train)  # a range outside the schedule, an option it lacks: stop here
    check_block_swapping(cfg.train, len(family.swappable_blocks()))
    prepare_model(family, cfg, accelerator)
    set_seed(cfg.seed)  # PEFT draws the adapters' initial weights from torch's global RNG
    blocks = (
        plan_blocks(family, family.denoiser_targets(cfg.adapter), cfg.adapter, cfg.train)
        if uses_blocks(cfg.adapter, cfg.train)
        else None
    )
    adapted = inject_adapters(family, cfg.adapter, blocks)
    if note := rank_above_width(adapted):
        accelerator.print(note)
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(adapted)
    groups = parameter_groups(adapted, cfg.train, blocks.lr_weights if blocks else None)
    optimizer = build_optimizer(groups, cfg.train)
    lr_scheduler = build_lr_scheduler(optimizer, cfg.train)
    encoders = [family.vae, *family.prompt_encoders()] if held_out else []
    with visiting(encoders, accelerator.device):  # held-out images and captions, encoded once
        validation = validation_set(family, held_out, cfg)
    caches = cache_plan(cfg)
    text_cache = prepare_caches(accelerator, family, dataset, cfg, caches)
    swapper = swap_blocks(family.swappable_blocks(), cfg.train, accelerator.device)
    idle = place_for_training(accelerator, family, cfg, caches, text_cache, swapper)
    sampler = BucketBatchSampler(
        dataset,
        cfg.train.batch_size,
        cfg.seed,
        accelerator.num_processes,
        accelerator.process_index,
    )
    # Sharded by the sampler, not by accelerate: see BucketBatchSampler.
    # The loader's own generator: each new iterator draws a seed, which must not come from the
    # global RNG that dropout uses, or a resumed run (one iterator more) would drop other units.
    workers = loader_workers(cfg.data.num_workers, accelerator.device, dataset)
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=workers,
        persistent_workers=workers > 0,  # and their images in memory, epoch after epoch
        pin_memory=accelerator.device.type == "cuda",  # uploads that do not block the host
        generator=torch.Generator(),
    )
    # Only the UNet is wrapped: the pipeline calls the text encoders itself, so a DDP wrapper
    # around them would never run; their gradients are averaged in average_text_encoder_grads.
    # Placement put the UNet where it runs; accelerate would also move the swapped blocks.
    unet, optimizer = accelerator.prepare(
        adapted["lora_unet"], optimizer, device_placement=[swapper is None, True]
    )
    for module in adapted.values():
        module.train()
    return TrainingRun(
        cfg=cfg,
        accelerator=accelerator,
        family=family,
        adapted=adapted,
        unet=unet,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        sampler=sampler,
        loader=loader,
        objective=objective,
        caches=caches,
        text_cache=text_cache,
        idle=idle,
        validation=validation,
        scan=scan,
        priors=priors,
        dataset_lines=dataset_lines,
        prompts=prompts,
        started=started,
    )


def training_step(run: TrainingRun, batch: dict[str, Any], draws: int) -> torch.Tensor:
    """One micro-batch, then on a step's last micro-batch the optimizer step (the benchmarks'
    and tests' step; the trainer's Session.optimizer_step adds the non-finite guard)."""
    loss = backward_pass(run, batch, draws)
    if run.accelerator.sync_gradients:
        clip_gradients(run)
        optimizer_step(run)
    return loss


def clip_gradients(run: TrainingRun) -> torch.Tensor | None:
    """Clip the adapters' gradients to `max_grad_norm` and return their total norm, which also
    tells whether every gradient is finite (one pass over them for both). Without clipping the
    norm is computed for that alone; with a gradient scaler (fp16), which skips overflowing
    steps itself, it is not needed: None."""
    params = optimizer_params(run.optimizer)
    norm = None
    if run.cfg.train.max_grad_norm > 0:
        norm = run.accelerator.clip_grad_norm_(params, run.cfg.train.max_grad_norm)
    if run.accelerator.scaler is not None:
        return None
    if norm is not None:
        return norm
    grads = [p.grad for p in params if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else None


def optimizer_step(run: TrainingRun, finite: bool = True) -> bool:
    """At the end of an accumulation window, after `clip_gradients`: step if the step is
    `finite`, then zero the gradients. Whether the optimizer stepped: fp16's gradient scaler
    skips an overflow."""
    stepped = False
    if finite:
        run.optimizer.step()
        stepped = not run.accelerator.optimizer_step_was_skipped
    run.optimizer.zero_grad(set_to_none=True)
    return stepped


def backward_pass(run: TrainingRun, batch: dict[str, Any], draws: int) -> torch.Tensor:
    """The loss of one micro-batch and its backward pass; gradients synced on a step's last.

    Each sample's noise comes from (seed, draws, its place in the global batch), so a step
    draws the same noise whether one process trains the global batch or several share it.
    """
    accelerator, cfg = run.accelerator, run.cfg
    with accelerator.accumulate(run.unet):
        with phase("upload"):
            batch = send_to_device(batch, accelerator.device, non_blocking=True)
        first = accelerator.process_index * cfg.train.batch_size
        generators = [
            derived_generator(cfg.seed, draws, first + i) for i in range(len(batch["captions"]))
        ]
        if run.text_cache:
            batch["text"] = run.text_cache.encode(batch["captions"])
        noised = draw_noise(run.family, run.objective, batch, generators, cfg.train)
        with accelerator.autocast():  # covers the text encoders, which are not prepared
            loss = training_loss(run.family, run.unet, run.objective, noised, batch, cfg.train)
            if cfg.train.prior_preservation:
                loss = loss + preservation_loss(run, noised, batch)
        with phase("backward"):
            accelerator.backward(loss)
    if accelerator.sync_gradients:
        average_text_encoder_grads(run)
    return loss


def average_text_encoder_grads(run: TrainingRun) -> None:
    """Average the text-encoder adapters' gradients over the processes, in one all-reduce."""
    if run.accelerator.num_processes == 1:
        return
    grads = [
        param.grad
        for prefix, module in run.adapted.items()
        if prefix != "lora_unet"
        for param in adapter_parameters(module)
        if param.grad is not None
    ]
    if not grads:
        return
    flat = torch.cat([grad.flatten() for grad in grads])
    torch.distributed.all_reduce(flat)  # a sum: gloo has no average
    flat /= run.accelerator.num_processes
    for grad, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        grad.copy_(part.view_as(grad))


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def fit_batch(cfg: Config, dataset: ImageCaptionDataset, processes: int) -> str | None:
    """A global batch larger than an epoch's samples would only repeat them: the batch is cut
    to the samples (in `cfg`, so config.json and the header say so), and a note says so."""
    samples = sum(dataset.draws)
    most = max(1, samples // processes)
    if cfg.train.batch_size <= most:
        return None
    shared = f" over {processes} processes" if processes > 1 else ""
    note = (
        f"note: train.batch_size {cfg.train.batch_size} is more than the {samples} samples an "
        f"epoch of this dataset holds (images x repeats){shared}: training with batches of {most}"
    )
    cfg.train.batch_size = most
    return note


def preflight(cfg: Config) -> dict[str, str]:
    """What `build_run` would refuse before it loads the model, each problem by its key: for
    the UI to say before a run is queued, not when its turn comes."""
    checks = {
        "model": lambda: check_model_name(cfg.model),
        "data.dir": lambda: split_records(scan_dataset(cfg.data).records, cfg),
        "data.reg_dir": lambda: scan_regularisation(cfg.data),
        "sample.prompts_file": lambda: read_sample_prompts(cfg),
        "train.optimizer": lambda: check_optimizer(cfg.train),
        "train.mixed_precision": lambda: check_precision(cfg, on_cpu=not has_accelerator()),
        "train.loraplus_lr_ratio": lambda: check_one_rate(loraplus_rates(cfg), cfg.train),
    }
    problems = {}
    for key, check in checks.items():
        try:
            check()
        except UserError as exc:
            problems[key] = str(exc)
    return problems


def loraplus_rates(cfg: Config) -> list[dict[str, float]]:
    """The learning rates LoRA+ gives the down and up matrices, as parameter groups."""
    rate = cfg.train.learning_rate
    return [{"lr": rate}, {"lr": rate * (cfg.train.loraplus_lr_ratio or 1.0)}]


def check_precision(cfg: Config, on_cpu: bool) -> None:
    if cfg.train.mixed_precision == "fp16" and on_cpu:
        raise UserError(
            "train.mixed_precision = 'fp16' needs a GPU (its loss scaling runs there); "
            "use 'bf16' or 'no' on the CPU"
        )


def check_platform(accelerator: Accelerator, cfg: Config) -> None:
    """Refuse, in one line each, what this machine or launch cannot do."""
    check_precision(cfg, on_cpu=accelerator.device.type == "cpu")
    if cfg.train.prior_preservation and accelerator.num_processes > 1:
        raise UserError(
            "train.prior_preservation: one process only for now (its extra passes through the "
            "denoiser are not synchronised between processes)"
        )
    sharded = (DistributedType.DEEPSPEED, DistributedType.FSDP)
    if accelerator.distributed_type in sharded and cfg.adapter.text_encoder:
        raise UserError(
            "adapter.text_encoder: text-encoder adapters train only under plain multi-GPU (DDP), "
            f"not {accelerator.distributed_type.value}"
        )


def load_model(cfg: Config) -> ModelFamily:
    return load_family(
        cfg.model,
        dtype=WEIGHT_DTYPES[cfg.train.mixed_precision],
        settings=cfg.family_settings(),
        config=str(cfg.single_file_config) if cfg.single_file_config else None,
        parts=cfg.part_paths(),
    )


def fitted_prompts(prompts: list[SamplePrompt], step: int) -> tuple[list[SamplePrompt], list[str]]:
    """The preview prompts with their sizes on the model's grid (multiples of `step`); and a
    note for each size that had to be rounded."""
    fitted = [on_size_grid(prompt, step) for prompt in prompts]
    return [prompt for prompt, _ in fitted], [note for _, note in fitted if note]


def check_previews(family: ModelFamily, cfg: Config) -> None:
    """A preview sampler the family's models cannot use, named in one line."""
    if cfg.sample.scheduler not in family.sample_schedulers:
        raise UserError(
            f"sample.scheduler = {cfg.sample.scheduler!r}: a {family.title} model samples with "
            f"its own flow-matching scheduler; choose {', '.join(family.sample_schedulers)}"
        )


def read_sample_prompts(cfg: Config) -> list[SamplePrompt]:
    side = cfg.data.largest_resolution
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


def write_run_config(cfg: Config) -> None:
    with atomic_path(cfg.output_dir / "config.json") as tmp:
        tmp.write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))


def report_dataset(accelerator: Accelerator, lines: list[str], cfg: Config) -> None:
    global_batch = cfg.train.batch_size * cfg.train.gradient_accumulation_steps
    global_batch *= accelerator.num_processes
    for line in lines:
        accelerator.print(line)
    accelerator.print(
        f"global batch {global_batch} ({accelerator.num_processes} process(es) x batch "
        f"{cfg.train.batch_size} x accumulation {cfg.train.gradient_accumulation_steps}), "
        f"learning rate {cfg.train.learning_rate:g}"
    )


def prepare_caches(
    accelerator: Accelerator,
    family: ModelFamily,
    dataset: ImageCaptionDataset,
    cfg: Config,
    plan: CachePlan,
) -> TextCache | None:
    """Fill the caches the plan turns on; keep the data in memory if it fits the budget."""
    say = accelerator.print
    for note in plan.notes:
        say(note)
    if plan.latents:
        folder = latents_cache_dir(cfg)
        # the others then find the entries written
        events = ProgressLog(cfg.output_dir, enabled=accelerator.is_main_process)
        with (
            accelerator.main_process_first(),
            visiting([family.vae], accelerator.device),
            closing(events),
        ):
            stats = cache_latents(
                family, dataset, folder, cfg.train.batch_size,
                accelerator.is_local_main_process, events,
            )  # fmt: skip
        say(f"latents cache {folder}: {stats.encoded} encoded, {stats.reused} reused")
    keep_data_in_memory(dataset, cfg.data.memory_cache_mb, say)
    if not plan.text:
        return None
    captions = [dataset.fixed_caption(index) for index in range(len(dataset))]
    if cfg.train.prior_preservation:
        captions += class_captions(captions, cfg.data.trigger_word, cfg.train)
    say(f"text cache: {len(set(captions))} distinct captions encoded once")
    with visiting(family.prompt_encoders(), accelerator.device), accelerator.autocast():
        return TextCache(family, captions)


def keep_data_in_memory(dataset: ImageCaptionDataset, budget_mb: int, say) -> None:
    """Serve each image's latents (cached) or decoded, scaled pixels from memory after its
    first draw, when all of them fit in `budget_mb`; else read them at every draw."""
    cached = isinstance(dataset.cache, CachedEntries)
    what = "cached latents" if cached else "decoded images"
    size_mb = (dataset.cache.nbytes() if cached else dataset.scaled_bytes()) / 2**20
    if size_mb > budget_mb:
        say(f"{what} read at every draw: {size_mb:.1f} MB > data.memory_cache_mb {budget_mb}")
        return
    if cached:
        dataset.cache.keep_in_memory()
    else:
        dataset.keep_images_in_memory()


def loader_workers(setting: int | str, device: torch.device, dataset: ImageCaptionDataset) -> int:
    """`data.num_workers`; auto: none on the CPU, where the step keeps every core busy and a
    worker would take one, nor when cached latents are served from memory; else up to four
    processes (half the cores) that load the next batches while the device trains."""
    if setting != "auto":
        return int(setting)
    in_memory = isinstance(dataset.cache, CachedEntries) and dataset.cache.memory is not None
    if device.type == "cpu" or in_memory:
        return 0
    return max(1, min(4, (os.cpu_count() or 2) // 2))


@contextmanager
def full_adapter_weights(accelerator: Accelerator, unet: torch.nn.Module) -> Iterator[None]:
    """FSDP keeps each process's shard of the parameters only: gather them (every process
    takes part) while the main process reads the adapters out. A no-op otherwise."""
    if accelerator.distributed_type != DistributedType.FSDP:
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    with FullyShardedDataParallel.summon_full_params(unet, writeback=False):
        yield
