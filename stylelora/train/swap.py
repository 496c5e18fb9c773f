"""Block swapping (kohya's `blocks_to_swap`, OneTrainer's layer offloading): the frozen weights
of the denoiser's last N blocks wait on the CPU and visit the device for their forward, and
again for their recomputed forward in backward (gradient checkpointing re-runs each block
there, so it is required). The adapters' weights stay on the device with their gradients and
optimizer state; only the base's tensors move.

Written here because diffusers' group offloading (`apply_group_offloading`) sends a block's
weights back right after its forward, which is right for inference but not for training: the
backward of a recomputed block still reads weights its forward kept (a norm's scale). So in
backward a block stays on the device until the next block's recomputation sends it back.
Quantized NF4 weights move as their packed data; their small quantization state stays.
"""

from __future__ import annotations

import torch

from stylelora.config import TrainConfig
from stylelora.errors import UserError


def in_backward() -> bool:
    """Whether autograd is running a backward pass (where checkpointed blocks recompute)."""
    return torch._C._current_graph_task_id() != -1


class BlockSwapper:
    """Parks the frozen tensors of `blocks` off `device` and brings each block in for its own
    forward. A parked tensor is its CPU copy; with `poison` (for tests, where the device is the
    CPU too) it is a copy full of NaN (or 0xFF bytes), so that any use of a parked weight shows."""

    def __init__(self, blocks: list[torch.nn.Module], device: torch.device, poison: bool = False):
        self.device = torch.device(device)
        pin = self.device.type == "cuda"
        self.tensors, self.home, self.parked = {}, {}, {}
        self.present: set[int] = set()
        for block in blocks:  # one block at a time: at most one block's weights held twice
            key = id(block)
            self.tensors[key] = frozen_tensors(block)
            self.home[key] = [home_copy(t, pin) for t in self.tensors[key]]
            self.parked[key] = [poisoned(h) if poison else h for h in self.home[key]]
            self.park(key)
            block.register_forward_pre_hook(self.before)
            block.register_forward_hook(self.after)

    def park(self, key: int) -> None:
        for tensor, parked in zip(self.tensors[key], self.parked[key], strict=True):
            tensor.data = parked
        self.present.discard(key)

    def bring(self, key: int) -> None:
        for tensor, home in zip(self.tensors[key], self.home[key], strict=True):
            tensor.data = home.to(self.device, non_blocking=True, copy=True)
        self.present.add(key)

    def before(self, block: torch.nn.Module, args) -> None:
        for key in list(self.present - {id(block)}):
            self.park(key)
        if id(block) not in self.present:
            self.bring(id(block))

    def after(self, block: torch.nn.Module, args, output) -> None:
        if not in_backward():
            self.park(id(block))

    def parked_tensors(self) -> set[int]:
        """ids of the tensors this swapper moves: placement leaves them where they are."""
        return {id(t) for tensors in self.tensors.values() for t in tensors}


def frozen_tensors(block: torch.nn.Module) -> list[torch.Tensor]:
    """The block's tensors that never train: its frozen parameters and its buffers."""
    frozen = [p for p in block.parameters() if not p.requires_grad]
    return frozen + list(block.buffers())


def home_copy(tensor: torch.Tensor, pin: bool) -> torch.Tensor:
    """Its CPU copy: the tensor itself if it is on the CPU already (frozen, it never changes),
    pinned for fast, asynchronous copies to a CUDA device. A meta tensor (the memory benchmark
    counts a model without weights) stays one."""
    if tensor.is_meta or (tensor.device.type == "cpu" and not pin):
        return tensor.data
    home = tensor.data.to("cpu", copy=True)
    return home.pin_memory() if pin else home


def swap_blocks(
    blocks: list[torch.nn.Module], cfg: TrainConfig, device: torch.device
) -> BlockSwapper | None:
    """A swapper for the last `cfg.blocks_to_swap` of the denoiser's `blocks` (in the order
    they run), or None when no block is swapped."""
    if not cfg.blocks_to_swap:
        return None
    return BlockSwapper(blocks[-cfg.blocks_to_swap :], device)


def poisoned(tensor: torch.Tensor) -> torch.Tensor:
    fill = float("nan") if tensor.is_floating_point() else 255
    return torch.full_like(tensor, fill)


def check_block_swapping(cfg: TrainConfig, available: int) -> None:
    """One line for each setting block swapping cannot work with (checked before loading)."""
    blocks_to_swap = cfg.blocks_to_swap
    if not blocks_to_swap:
        return
    if not available:
        raise UserError(
            "train.blocks_to_swap: this model's denoiser has no blocks to swap (a UNet's differ "
            "too much in size; the transformers' have them); set it to 0"
        )
    if blocks_to_swap >= available:
        raise UserError(
            f"train.blocks_to_swap = {blocks_to_swap}: the denoiser has {available} blocks; "
            f"swap at most {available - 1}"
        )
    if not cfg.gradient_checkpointing:
        raise UserError(
            "train.blocks_to_swap needs train.gradient_checkpointing = true (each swapped block "
            "is brought back for its recomputation in backward)"
        )
    if cfg.quantize_base == "int8":
        raise UserError(
            'train.blocks_to_swap moves NF4 or unquantized weights; with quantize_base = "int8" '
            'use "nf4" or "no"'
        )
