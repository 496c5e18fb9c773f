"""The training metadata kohya writes into a LoRA's safetensors header (all values strings)."""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime, timezone

from stylelora import __version__
from stylelora.config import Config, TrainConfig
from stylelora.data.scan import ScanResult
from stylelora.export.lora_file import format_number, network_metadata
from stylelora.families.base import ModelFamily
from stylelora.train.optim import optimizer_class


def tag_frequency(scan: ScanResult) -> dict[str, dict[str, int]]:
    """Per concept folder, how often each comma-separated tag occurs (kohya's ss_tag_frequency)."""
    counts: dict[str, Counter] = {}
    for record in scan.records:
        tags = (tag.strip() for tag in record.caption.split(","))
        counts.setdefault(f"{record.repeats}_{record.concept}", Counter()).update(
            t for t in tags if t
        )
    return {folder: dict(counter) for folder, counter in counts.items()}


def dataset_dirs(scan: ScanResult) -> dict[str, dict[str, int]]:
    dirs: dict[str, dict[str, int]] = {}
    for record in scan.records:
        entry = dirs.setdefault(
            record.path.parent.name, {"n_repeats": record.repeats, "img_count": 0}
        )
        entry["img_count"] += 1
    return dirs


def variant_args(adapter) -> dict:
    """kohya's / LyCORIS's network_args names for LoCon, DoRA, LoHa, LoKr and the dropouts."""
    args: dict = {}
    if adapter.type != "lora":
        args["algo"] = adapter.type
    if adapter.type == "lokr":
        args["factor"] = adapter.lokr_factor
        if adapter.decompose_both:
            args["decompose_both"] = True
    if adapter.unet_targets == "full":
        args["conv_dim"] = adapter.conv_rank or adapter.rank
        args["conv_alpha"] = adapter.conv_alpha or adapter.alpha
    if adapter.use_dora:
        args["dora_wd"] = True
    if adapter.dropout:
        args["dropout"] = adapter.dropout
    if adapter.module_dropout:
        args["module_dropout"] = adapter.module_dropout
    return args


def optimizer_description(train: TrainConfig) -> str:
    """As kohya writes it: the class actually used, and the user's arguments in brackets."""
    cls = optimizer_class(train.optimizer)
    args = ",".join(f"{key}={value}" for key, value in train.optimizer_args.items())
    return f"{cls.__module__}.{cls.__name__}" + (f"({args})" if args else "")


def number_or_none(value: float | None) -> str:
    """kohya writes "None" for an option that is off."""
    return format_number(value) if value else "None"


def resolutions_metadata(cfg: Config) -> dict[str, str]:
    """With several resolutions, all of them (ss_resolution, which tools read as one size,
    holds the largest); nothing with one, so its header stays kohya's."""
    resolutions = cfg.data.resolutions
    if len(resolutions) == 1:
        return {}
    return {"ss_resolutions": ", ".join(f"({side}, {side})" for side in resolutions)}


def bucket_metadata(cfg: Config) -> dict[str, str]:
    data = cfg.data
    low, high = data.bucket_sides()
    return {
        "ss_enable_bucket": str(data.enable_buckets),
        "ss_min_bucket_reso": str(low) if data.enable_buckets else "None",
        "ss_max_bucket_reso": str(high) if data.enable_buckets else "None",
        "ss_bucket_no_upscale": str(data.bucket_no_upscale),
    }


def block_value(value: str | float | list[float]) -> str:
    """A curve's name as it is, numbers as kohya's comma-separated text."""
    if isinstance(value, str):
        return value
    return ",".join(f"{v:g}" for v in value) if isinstance(value, list) else f"{value:g}"


def block_args(cfg: Config) -> dict[str, str]:
    """The block-wise options that are set, as kohya writes them in ss_network_args."""
    options = {
        "block_dims": cfg.adapter.block_dims,
        "block_alphas": cfg.adapter.block_alphas,
        "conv_block_dims": cfg.adapter.conv_block_dims,
        "conv_block_alphas": cfg.adapter.conv_block_alphas,
        "down_lr_weight": cfg.train.down_lr_weight,
        "mid_lr_weight": cfg.train.mid_lr_weight,
        "up_lr_weight": cfg.train.up_lr_weight,
    }
    args = {key: block_value(value) for key, value in options.items() if value is not None}
    if args and cfg.train.block_lr_zero_threshold:
        args["block_lr_zero_threshold"] = f"{cfg.train.block_lr_zero_threshold:g}"
    return args


def training_metadata(
    cfg: Config,
    scan: ScanResult,
    family: ModelFamily,
    steps: int,
    epochs: int,
    started: float,
    finished: float,
    latents_cached: bool,
    priors: ScanResult | None = None,
) -> dict[str, str]:
    train, adapter = cfg.train, cfg.adapter
    te_lr = (train.text_encoder_lr or train.learning_rate) if adapter.text_encoder else 0.0
    network_args = {"unet_targets": adapter.unet_targets, "init": adapter.init}
    if adapter.text_encoder:
        network_args["text_encoder_rank"] = adapter.text_encoder_rank or adapter.rank
        network_args["text_encoder_alpha"] = adapter.text_encoder_alpha or adapter.alpha
        network_args["text_encoder_targets"] = adapter.text_encoder_targets
    network_args.update(variant_args(adapter))
    network_args.update(block_args(cfg))
    # DoRA files carry alpha = rank (the scale is folded into lora_up; see adapters/kohya.py).
    alpha = adapter.rank if adapter.use_dora else adapter.alpha
    resolution = cfg.data.largest_resolution
    return {
        **network_metadata(adapter.rank, alpha, network_args, adapter.type),
        "ss_output_name": cfg.name,
        "ss_sd_model_name": cfg.model,
        "ss_training_started_at": repr(started),
        "ss_training_finished_at": repr(finished),
        "ss_steps": str(steps),
        "ss_max_train_steps": str(train.max_steps),
        "ss_epoch": str(epochs),
        "ss_learning_rate": format_number(train.learning_rate),
        "ss_unet_lr": format_number(train.learning_rate),
        "ss_text_encoder_lr": format_number(te_lr),
        "ss_network_train_unet_only": str(not adapter.text_encoder),
        "ss_lr_scheduler": train.lr_scheduler,
        "ss_lr_warmup_steps": str(train.lr_warmup_steps),
        "ss_optimizer": optimizer_description(train),
        "ss_mixed_precision": train.mixed_precision,
        "ss_gradient_checkpointing": str(train.gradient_checkpointing),
        "ss_gradient_accumulation_steps": str(train.gradient_accumulation_steps),
        "ss_batch_size_per_device": str(train.batch_size),
        "ss_max_grad_norm": format_number(train.max_grad_norm),
        "ss_resolution": f"({resolution}, {resolution})",
        **resolutions_metadata(cfg),
        "ss_num_train_images": str(sum(record.repeats for record in scan.records)),
        "ss_caption_extension": cfg.data.caption_extension,
        "ss_flip_aug": str(cfg.data.flip),
        "ss_seed": str(cfg.seed),
        "ss_noise_offset": number_or_none(train.noise_offset),
        "ss_min_snr_gamma": number_or_none(train.min_snr_gamma),
        "ss_multires_noise_iterations": number_or_none(train.multires_noise_iterations),
        "ss_multires_noise_discount": format_number(train.multires_noise_discount),
        "ss_loss_type": train.loss_type,
        "ss_huber_c": format_number(train.huber_c),
        "ss_cache_latents": str(latents_cached),
        "ss_masked_loss": str(train.masked_loss),
        "ss_shuffle_caption": str(cfg.data.shuffle_caption),
        "ss_keep_tokens": str(cfg.data.keep_tokens),
        "ss_caption_dropout_rate": format_number(cfg.data.caption_dropout_rate),
        "ss_caption_tag_dropout_rate": format_number(cfg.data.caption_tag_dropout_rate),
        "ss_random_crop": str(not cfg.data.center_crop),
        "ss_network_dropout": number_or_none(adapter.dropout),
        **bucket_metadata(cfg),
        "ss_tag_frequency": json.dumps(tag_frequency(scan)),
        "ss_dataset_dirs": json.dumps(dataset_dirs(scan)),
        "ss_num_reg_images": str(sum(r.repeats for r in priors.records) if priors else 0),
        "ss_reg_dataset_dirs": json.dumps(dataset_dirs(priors) if priors else {}),
        "ss_prior_loss_weight": format_number(train.prior_loss_weight),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{family.modelspec_architecture}/lora",
        "modelspec.implementation": "https://github.com/huggingface/diffusers",
        "modelspec.title": cfg.name,
        "modelspec.date": datetime.fromtimestamp(finished, tz=timezone.utc).isoformat(),
        "modelspec.resolution": f"{resolution}x{resolution}",
        "stylelora_version": __version__,
    }
