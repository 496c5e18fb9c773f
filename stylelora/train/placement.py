"""Where the model's parts live and in which form: device, dtype, quantization, attention,
gradient checkpointing; which frozen parts wait on the CPU between previews."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from accelerate import Accelerator

from stylelora.config import Config
from stylelora.errors import UserError
from stylelora.families.base import ModelFamily
from stylelora.train.cache import CachePlan, TextCache
from stylelora.train.quantize import quantize_base
from stylelora.train.swap import BlockSwapper

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NON_REENTRANT = {"use_reentrant": False}


def has_accelerator() -> bool:
    if hasattr(torch, "accelerator"):  # torch >= 2.6: CUDA, ROCm, MPS, XPU, ...
        return torch.accelerator.is_available()
    return torch.cuda.is_available()


def prepare_model(family: ModelFamily, cfg: Config, accelerator: Accelerator) -> None:
    """Quantize the frozen base where asked, set dtypes and attention.

    The modules stay where they were loaded, on the CPU (bitsandbytes quantizes each layer on
    the device, so quantized layers are there already): the caches are filled with only the
    encoder at work on the device (`visiting`), and `place_for_training` moves the rest after.
    Caching SDXL latents beside the whole model would need more memory than training does.
    """
    weight_dtype = WEIGHT_DTYPES[cfg.train.mixed_precision]
    bases = {"lora_unet": family.unet, **family.text_encoders()}
    # Encoders that never take an adapter (Flux's T5) are quantized too: they fill the caches.
    adaptable = list(bases.values())
    bases |= {
        type(m).__name__: m for m in family.prompt_encoders() if all(m is not a for a in adaptable)
    }
    counts = quantize_base(bases, cfg.train.quantize_base, weight_dtype, accelerator.device)
    if counts:
        layers = ", ".join(f"{prefix} {count}" for prefix, count in counts.items())
        accelerator.print(f"base quantized to {cfg.train.quantize_base}: Linear layers {layers}")
    family.cast_vae(weight_dtype)
    configure_attention(family, cfg.train.attention)


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
    """Non-reentrant checkpointing: the reentrant kind gives adapters inside a checkpointed
    layer no gradient when the layer's input does not require one (frozen embeddings)."""
    for prefix, module in adapted.items():
        if prefix == "lora_unet":
            module.enable_gradient_checkpointing()
        elif hasattr(module, "activation_checkpointing_enable"):  # transformers >= 5
            module.activation_checkpointing_enable(activation_checkpointing_kwargs=NON_REENTRANT)
        else:
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=NON_REENTRANT)


def idle_modules(
    family: ModelFamily, latents_cached: bool, text_cache: TextCache | None
) -> list[torch.nn.Module]:
    """Frozen modules the training step no longer calls once the caches are filled."""
    idle = [family.vae] if latents_cached else []
    if text_cache is not None:
        idle += family.prompt_encoders()
    return idle


def place_for_training(
    accelerator: Accelerator,
    family: ModelFamily,
    cfg: Config,
    caches: CachePlan,
    text_cache: TextCache | None,
    swapper: BlockSwapper | None = None,
) -> list[torch.nn.Module]:
    """Move what the training step calls to the device; the idle modules wait on the CPU, and
    `visiting` brings them over for previews; the swapper's blocks stay parked. Returns the
    idle modules."""
    idle = idle_modules(family, caches.latents, text_cache)
    device = accelerator.device
    for module in family.modules():
        if any(module is i for i in idle):
            module.to("cpu")
        elif swapper and module is family.unet:
            move_except(module, device, swapper.parked_tensors())
        else:
            module.to(device)
    if swapper:
        accelerator.print(
            f"{cfg.train.blocks_to_swap} of the denoiser's blocks wait on the CPU and visit the "
            "device for their forward and backward"
        )
    if idle and device.type != "cpu":
        torch.cuda.empty_cache()
        waiting = [("the VAE", caches.latents), ("the text encoders", text_cache)]
        names = " and ".join(name for name, cached in waiting if cached)
        accelerator.print(f"{names} wait on the CPU; previews bring them over while they render")
    return idle


def move_except(module: torch.nn.Module, device: torch.device, kept: set[int]) -> None:
    """`module.to(device)` but for the tensors whose ids are in `kept`."""
    for tensor in [*module.parameters(), *module.buffers()]:
        if id(tensor) not in kept:
            tensor.data = tensor.data.to(device)


@contextmanager
def visiting(modules: list[torch.nn.Module], device: torch.device) -> Iterator[None]:
    """Put `modules` on `device` for the block, and back on the CPU after it."""
    if device.type == "cpu" or not modules:
        yield
        return
    for module in modules:
        module.to(device)
    try:
        yield
    finally:
        for module in modules:
            module.to("cpu")
        torch.cuda.empty_cache()
