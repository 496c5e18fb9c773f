"""Peak GPU memory of a preset at full size (Flux.1 dev's 11.9 B parameter transformer with
T5-XXL's 4.7 B encoder, Qwen-Image's 20 B, ...), counted on the meta device: no weight is
allocated, so it runs on any machine in seconds, where the real model would not fit its memory.

The model is the preset's family's real architecture from its bundled configs
(`ModelFamily.on_meta_device`), set up by the trainer's own pieces as the preset says: the
adapters (`inject_adapters`), gradient checkpointing, block swapping (`swap_blocks`). One
training step at the preset's resolution and batch (`ModelFamily.example_inputs`) then runs on
meta tensors while `TensorBytes` (memory_speed.py) counts every tensor an accelerator would
hold, alive at once: the weights on the device, the adapters, activations and gradients.
Filling the caches is counted the same way: the text encoders encode one caption
(`example_prompt_pass`), the VAE one batch of images. Three things a meta run cannot do are
stood in for:

- bitsandbytes cannot quantize meta weights: each quantized Linear becomes a stand-in holding
  meta tensors of bitsandbytes' sizes (NF4: 4 bits a weight, its absmax per 64 in 8 bits with
  an fp32 one per 256 of those; int8: a byte a weight and an fp32 scale per row) that makes a
  bf16 copy of the weight for each matmul and drops it after, as bitsandbytes' kernels do.
- meta tensors take PyTorch's math attention, which holds the L x L scores: attention goes to
  the flash kernel's meta function instead, the kernel a GPU runs at these sizes.
- optimizer states are added by formula: AdamW's two fp32 states (8 bytes a weight);
  8-bit AdamW's two bytes a weight plus an fp32 absmax per 256 (tensors under 4096 elements
  keep 32-bit states, as bitsandbytes does).

    python benchmarks/preset_memory.py --preset flux-12gb
"""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.fx.experimental._config
import torch.nn.functional as F
from memory_speed import TensorBytes, gib

from stylelora.adapters.inject import inject_adapters
from stylelora.cli import quiet_libraries
from stylelora.config import Config, load_config, preset_path
from stylelora.families.base import ModelFamily
from stylelora.families.registry import family_named
from stylelora.train.placement import WEIGHT_DTYPES, enable_gradient_checkpointing
from stylelora.train.quantize import quantizable_linears
from stylelora.train.swap import check_block_swapping, swap_blocks

META = torch.device("meta")
# A caption's real tokens are picked out by its mask (Z-Image, Qwen-Image); the examples' masks
# are all true, which is what a meta tensor's nonzero() is then allowed to assume.
torch.fx.experimental._config.meta_nonzero_assume_all_nonzero = True


class DequantizedMatmul(torch.autograd.Function):
    """x @ W.T with W made (dequantized) for the matmul and dropped after, in backward too."""

    @staticmethod
    def forward(ctx, x, packed, bias, shape):
        ctx.shape = shape
        ctx.save_for_backward(packed)  # what bitsandbytes keeps: the quantized weight
        weight = torch.empty(shape, dtype=x.dtype, device=x.device)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        weight = torch.empty(ctx.shape, dtype=grad.dtype, device=grad.device)
        return grad @ weight, None, None, None


class QuantizedStandIn(torch.nn.Module):
    """A frozen Linear as bitsandbytes stores it (`kind`: nf4 or int8), on the meta device."""

    def __init__(self, linear: torch.nn.Linear, kind: str):
        super().__init__()
        self.shape = tuple(linear.weight.shape)
        count = linear.weight.numel()
        if kind == "nf4":
            packed = torch.empty((count + 1) // 2, dtype=torch.uint8, device=META)
            stats = [
                torch.empty(-(-count // 64), dtype=torch.uint8, device=META),
                torch.empty(-(-count // (64 * 256)), dtype=torch.float32, device=META),
            ]
        else:
            packed = torch.empty(count, dtype=torch.int8, device=META)
            stats = [torch.empty(self.shape[0], dtype=torch.float32, device=META)]
        self.packed = torch.nn.Parameter(packed, requires_grad=False)
        for index, tensor in enumerate(stats):
            self.register_buffer(f"stats{index}", tensor)
        self.bias = linear.bias

    @property
    def weight(self) -> torch.Tensor:
        """What bitsandbytes' layers call their weight: the packed one (T5 reads its dtype)."""
        return self.packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return DequantizedMatmul.apply(x, self.packed, bias, self.shape)


def quantize_on_meta(model: torch.nn.Module, kind: str) -> int:
    """Swap the Linear layers the trainer quantizes for stand-ins; return how many. (The
    trainer quantizes before adding adapters; here the adapters' own Linears, which train,
    are left out by the same rule.)"""
    targets = [(n, m) for n, m in quantizable_linears(model) if not m.weight.requires_grad]
    for name, linear in targets:
        parent, _, child = name.rpartition(".")
        setattr(
            model.get_submodule(parent) if parent else model, child, QuantizedStandIn(linear, kind)
        )
    return len(targets)


@contextmanager
def flash_attention():
    """SDPA through the flash kernel's meta function (meta tensors would take the math path)."""
    original = F.scaled_dot_product_attention

    def flash(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
        if attn_mask is not None:
            return original(query, key, value, attn_mask, dropout_p, is_causal, scale=scale)
        op = torch.ops.aten._scaled_dot_product_flash_attention
        return op(query, key, value, dropout_p, is_causal, scale=scale)[0]

    F.scaled_dot_product_attention = flash
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def optimizer_state_bytes(params: list[torch.nn.Parameter], optimizer: str) -> int:
    if optimizer == "adamw":
        return sum(8 * p.numel() for p in params)
    if optimizer == "adamw8bit":
        return sum(
            2 * p.numel() + 8 * -(-p.numel() // 256) if p.numel() >= 4096 else 8 * p.numel()
            for p in params
        )
    raise SystemExit(f"preset_memory: optimizer {optimizer!r} is not counted (adamw, adamw8bit)")


def device_tensors(modules: list[torch.nn.Module], parked: set[int]) -> list[torch.Tensor]:
    return [t for m in modules for t in (*m.parameters(), *m.buffers()) if id(t) not in parked]


def count_caching(family: ModelFamily, cfg: Config, dtype: torch.dtype) -> int:
    """The text encoders encoding one caption, then the VAE one batch: each visits the device
    alone."""
    encoders = family.prompt_encoders()
    with torch.no_grad(), flash_attention():
        with TensorBytes(device_tensors(encoders, set()), count_meta=True) as text:
            family.example_prompt_pass(META)
        vae = family.vae
        side = cfg.data.largest_resolution
        pixels = torch.empty(cfg.train.batch_size, 3, side, side, device=META, dtype=vae.dtype)
        with TensorBytes(device_tensors([vae], set()), count_meta=True) as latents:
            family.encode_posterior(pixels)
    print(f"caches: text {gib(text.peak)}, latents {gib(latents.peak)}")
    return max(text.peak, latents.peak)


def count_training(
    family: ModelFamily, cfg: Config, dtype: torch.dtype, device: torch.device = META
) -> tuple[int, int, int]:
    """Peak bytes of one training step, the resident weights' bytes, the optimizer's bytes.
    (`device`: where the model is; the tests count a small model on the CPU as well.)"""
    meta = device.type == "meta"
    swapper = swap_blocks(family.swappable_blocks(), cfg.train, device)
    parked = swapper.parked_tensors() if swapper else set()
    transformer = family.unet
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    side, count = cfg.data.largest_resolution, cfg.train.batch_size
    latents, text, batch = family.example_inputs(count, side, dtype, device)
    sigmas = torch.zeros(count, device=device, dtype=torch.float32)
    counter = TensorBytes(device_tensors([transformer], parked), count_meta=meta)
    resident = counter.live
    with counter, flash_attention() if meta else nullcontext():
        prediction = family.denoise(transformer, latents, sigmas, text, batch)
        F.mse_loss(prediction.float(), torch.zeros_like(prediction, dtype=torch.float32)).backward()
    return counter.peak, resident, optimizer_state_bytes(trainable, cfg.train.optimizer)


def family_on_meta(family_class: type[ModelFamily], cfg: Config) -> ModelFamily:
    """The family's real model on the meta device in the preset's dtype, quantized and
    adapted as it says."""
    dtype = WEIGHT_DTYPES[cfg.train.mixed_precision]
    family = family_class.variant_on_meta_device(cfg.model)
    family.configure(cfg.family_settings())
    for module in family.modules():
        module.to(dtype)
    check_block_swapping(cfg.train, len(family.swappable_blocks()))
    adapted = inject_adapters(family, cfg.adapter)
    for encoder in family.prompt_encoders():  # those without an adapter stay frozen
        if not any(encoder is module for module in adapted.values()):
            encoder.requires_grad_(False)
    if cfg.train.quantize_base != "no":
        for model in [family.unet, *family.prompt_encoders()]:
            quantize_on_meta(model, cfg.train.quantize_base)
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(adapted)
    family.unet.train()
    return family


def preset_config(name: str, overrides: list[str]) -> tuple[type[ModelFamily], Config]:
    """The preset's family (the one whose folder holds it) and config."""
    path = preset_path(name, Path.cwd())
    cfg = load_config(path, ["data.dir='.'", *overrides])
    if cfg.train.mixed_precision == "fp16":
        cfg.train.mixed_precision = "bf16"  # the same bytes; meta runs either
    family = family_named(path.parents[1].name)
    if family is None:
        raise SystemExit(f"preset_memory: {path} is not a family's preset")
    return family, cfg


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", required=True, help="a family's preset (flux-12gb, ...)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    quiet_libraries()
    family_class, cfg = preset_config(args.preset, args.overrides)
    dtype = WEIGHT_DTYPES[cfg.train.mixed_precision]
    family = family_on_meta(family_class, cfg)
    caching = count_caching(family, cfg, dtype)
    peak, resident, states = count_training(family, cfg, dtype)
    print(
        f"{args.preset}: {family.title} ({cfg.model}), {cfg.data.largest_resolution} px, "
        f"batch {cfg.train.batch_size}, "
        f"{cfg.train.mixed_precision}, base {cfg.train.quantize_base}, "
        f"checkpointing {cfg.train.gradient_checkpointing}, blocks swapped "
        f"{cfg.train.blocks_to_swap}, adapters {cfg.adapter.unet_targets} rank {cfg.adapter.rank}, "
        f"{cfg.train.optimizer}"
    )
    print(
        f"estimated peak, training: {gib(peak + states)}, of which weights on the device "
        f"{gib(resident)}, optimizer states {gib(states)}; filling the caches: {gib(caching)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
