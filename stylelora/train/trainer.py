"""The training run: set-up, one loop of steps with previews, then the export.

Everything random is drawn from generators derived from (seed, position), never from global
state, so the same config gives the same adapter and a later resume can land on any step.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from torch.utils.data import DataLoader

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
from stylelora.export.metadata import training_metadata
from stylelora.families import load_family
from stylelora.families.base import ModelFamily
from stylelora.sample.preview import Previewer
from stylelora.sample.prompts import SamplePrompt, parse_prompt_file
from stylelora.train.cache import TextCache, cache_latents
from stylelora.train.checkpoint import check_fresh_start
from stylelora.train.guard import NonFiniteStop, StopRequest
from stylelora.train.loss import draw_noise, training_loss
from stylelora.train.optim import build_lr_scheduler, build_optimizer, parameter_groups
from stylelora.train.session import RunResult, Session
from stylelora.train.validation import (
    FixedSet,
    fixed_timestep_set,
    held_out_items,
    split_records,
)

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def train(cfg: Config, resume: str | None = None) -> RunResult:
    """Train the adapter `cfg` describes and write it to `<output_dir>/<name>.safetensors`.

    `resume`: "latest" or a checkpoint folder to continue from. A SIGINT or SIGTERM saves a
    checkpoint and returns a result with `interrupted` set, without exporting.
    """
    started = time.time()
    scan = scan_dataset(cfg.data)
    records, held_out = split_records(scan.records, cfg)
    dataset = ImageCaptionDataset(records, data_options(cfg.data, cfg.seed))
    prompts = sample_prompts(cfg)
    check_writable(cfg.output_dir)
    if resume is None:
        check_fresh_start(cfg.output_dir)
    write_run_config(cfg)

    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        log_with=None if cfg.train.log_with == "none" else cfg.train.log_with,
        project_config=ProjectConfiguration(cfg.output_dir, cfg.output_dir / "logs"),
    )
    report_dataset(accelerator, scan, dataset, cfg)
    for line in held_out_line(held_out):
        accelerator.print(line)
    weight_dtype = WEIGHT_DTYPES[cfg.train.mixed_precision]
    family = load_family(
        cfg.model,
        dtype=weight_dtype,
        clip_skip=cfg.clip_skip - 1 if cfg.clip_skip else None,  # kohya's 2 is diffusers' 1
        prediction_type=cfg.prediction_type,
        zero_terminal_snr=cfg.train.zero_terminal_snr,
        config=str(cfg.single_file_config) if cfg.single_file_config else None,
    )
    family.pipe.to(accelerator.device)
    family.cast_vae(weight_dtype)
    configure_attention(family, cfg.train.attention)
    set_seed(cfg.seed)  # PEFT draws the adapters' initial weights from torch's global RNG
    adapted = inject_adapters(family, cfg.adapter)
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(adapted)

    optimizer = build_optimizer(parameter_groups(adapted, cfg.train), cfg.train)
    lr_scheduler = build_lr_scheduler(optimizer, cfg.train)
    validation = validation_set(family, held_out, cfg)  # while the VAE is surely on the device
    text_cache = prepare_caches(accelerator, family, dataset, cfg, bool(prompts))
    sampler = BucketBatchSampler(dataset, cfg.train.batch_size, cfg.seed)
    # Its own generator: every new iterator draws a seed, which must not come from the global
    # RNG that dropout uses, or a resumed run (one iterator more) would drop other units.
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=cfg.data.num_workers,
        generator=torch.Generator(),
    )
    *models, optimizer, loader = accelerator.prepare(*adapted.values(), optimizer, loader)
    unet = models[0]
    noise_scheduler = family.noise_scheduler()
    for model in models:
        model.train()

    session = Session(
        cfg=cfg,
        accelerator=accelerator,
        family=family,
        adapted=adapted,
        unet=unet,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        loader=loader,
        sampler=sampler,
        noise_scheduler=noise_scheduler,
        previewer=Previewer(family, prompts, cfg.sample.scheduler) if prompts else None,
        validation=validation,
        dataset_lines=describe(scan, dataset, cfg.data) + held_out_line(held_out),
        metadata=lambda steps, epochs: training_metadata(
            cfg, scan, family, steps, epochs, started, time.time()
        ),
    )
    try:
        return run(session, models, text_cache, resume)
    finally:
        session.close()


def run(
    session: Session, models: list[torch.nn.Module], text_cache: TextCache | None, resume: str
) -> RunResult:
    """Resume if asked, loop, then export; a signal returns early, after a checkpoint."""
    session.begin(resume)
    try:
        with StopRequest() as stop:
            loop(session, models, text_cache, stop)
    except NonFiniteStop as exc:
        session.export()
        session.report(f"stopped: {exc}")
        raise NonFiniteStop(f"{exc}; {session.adapter_path} holds the last good weights") from None
    return session.finish()


def loop(
    session: Session, models: list[torch.nn.Module], text_cache: TextCache | None, stop: StopRequest
) -> None:
    """Steps until `max_steps`, a stop signal, or too many non-finite steps in a row."""
    cfg, accelerator, state = session.cfg, session.accelerator, session.state
    family, unet, noise_scheduler = session.family, session.unet, session.noise_scheduler
    while not session.done:
        for batch in session.epoch_batches():
            with accelerator.accumulate(*models):
                generator = derived_generator(cfg.seed, state.draws, accelerator.process_index)
                if text_cache:
                    batch["text"] = text_cache.encode(batch["captions"])
                noised = draw_noise(family, noise_scheduler, batch, generator, cfg.train)
                loss = training_loss(family, unet, noise_scheduler, noised, batch, cfg.train)
                accelerator.backward(loss)
                stepped = session.optimizer_step(loss)
            state.draws += 1
            state.position += 1
            if stepped:
                session.after_step(stop)
            if session.done:
                break
        else:
            session.end_epoch()


def validation_set(family: ModelFamily, held_out: list, cfg: Config) -> FixedSet | None:
    """The fixed validation set; captions pre-encoded where the text encoders stay frozen."""
    if not held_out or not cfg.validation.enabled:
        return None
    settings = cfg.validation
    fixed = fixed_timestep_set(
        family,
        family.noise_scheduler(),
        held_out_items(held_out, cfg),
        settings.timesteps,
        settings.seed,
        cfg.train.batch_size,
    )
    if not cfg.adapter.text_encoder:
        with torch.no_grad():
            for _, batch in fixed.batches:
                batch["text"] = family.encode_prompts(batch["captions"])
    return fixed


def held_out_line(held_out: list) -> list[str]:
    return [f"validation: {len(held_out)} held-out image(s)"] if held_out else []


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


def write_run_config(cfg: Config) -> None:
    with atomic_path(cfg.output_dir / "config.json") as tmp:
        tmp.write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
