"""Block-wise learning rates and ranks for UNets, as kohya's networks/lora.py defines them.

kohya numbers a UNet's blocks: for SD1.x and SD2, 0 (none), the down path 1 to 11, the middle 12
and the up path 13 to 24 (25 in all); for SDXL, 0 (time embedding), input blocks 1 to 9, middle
10 to 12, output blocks 13 to 21 and 22 (out): 23. `down_lr_weight`, `mid_lr_weight` and
`up_lr_weight` scale each block's learning rate (lists, or kohya's presets `cosine`, `sine`,
`linear`, `reverse_linear`, `zeros`, each with an optional `+offset`); a block at or below
`block_lr_zero_threshold` is not trained at all. `block_dims` and `block_alphas` (one value per
block) give each block's modules their rank and alpha (0: no adapter there); `conv_block_dims`
and `conv_block_alphas` do the same for the 3x3 convolutions of `full`. The file then holds
each module's own rank and alpha, which every UI and diffusers read from its tensors.

Written here because PEFT has per-module ranks (`rank_pattern`) but no notion of a UNet's blocks.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from stylelora.adapters.targets import Targets
from stylelora.config import AdapterConfig, TrainConfig
from stylelora.errors import UserError
from stylelora.families.base import DENOISER, ModelFamily

PRESET = re.compile(r"(cosine|sine|linear|reverse_linear|zeros)(?:\+([0-9.]+))?")


@dataclass
class BlockPlan:
    """What the block options do to one UNet: the modules kept, each one's (rank, alpha) where
    it differs from the config's, and each module's learning-rate weight."""

    main: list[str]
    conv: list[str]
    ranks: dict[str, tuple[int, float]] = field(default_factory=dict)
    lr_weights: dict[str, float] = field(default_factory=dict)

    def targets(self) -> Targets:
        return Targets(main=self.main, conv=self.conv)


def uses_blocks(adapter: AdapterConfig, train: TrainConfig) -> bool:
    return any(
        value is not None
        for value in (
            adapter.block_dims,
            adapter.block_alphas,
            adapter.conv_block_dims,
            adapter.conv_block_alphas,
            train.down_lr_weight,
            train.mid_lr_weight,
            train.up_lr_weight,
        )
    )


def preset_weights(spec: str, count: int) -> list[float]:
    """kohya's named curves over `count` blocks, shallow to deep, plus an optional offset."""
    match = PRESET.fullmatch(spec)
    if match is None:
        raise UserError(
            f"train.down_lr_weight / up_lr_weight: {spec!r} is not a list of numbers or one of "
            "cosine, sine, linear, reverse_linear, zeros (optionally +offset, e.g. sine+0.5)"
        )
    name, offset = match.group(1), float(match.group(2) or 0.0)
    steps = [i / (count - 1) for i in range(count)]
    curves = {
        "cosine": [math.sin(math.pi * s / 2) for s in reversed(steps)],
        "sine": [math.sin(math.pi * s / 2) for s in steps],
        "linear": steps,
        "reverse_linear": list(reversed(steps)),
        "zeros": [0.0] * count,
    }
    return [w + offset for w in curves[name]]


def block_lr_weights(family: ModelFamily, train: TrainConfig) -> list[float] | None:
    """One learning-rate weight per kohya block (None: no block rates asked for). A list shorter
    than its part is filled with 1, as kohya does; a longer one is an error here."""
    if train.down_lr_weight is None and train.mid_lr_weight is None and train.up_lr_weight is None:
        return None
    down, mid, up, ends = family.kohya_blocks()
    parts = []
    for key, value, count in (
        ("down_lr_weight", train.down_lr_weight, down),
        ("mid_lr_weight", train.mid_lr_weight, mid),
        ("up_lr_weight", train.up_lr_weight, up),
    ):
        if isinstance(value, str):
            value = preset_weights(value, count)
        elif isinstance(value, (int, float)):
            value = [float(value)]
        weights = list(value) if value is not None else []
        if len(weights) > count:
            raise UserError(f"train.{key}: {len(weights)} values, a {family.name} UNet has {count}")
        weights += [1.0] * (count - len(weights))
        parts += [w if w > train.block_lr_zero_threshold else 0.0 for w in weights]
    return [1.0, *parts, 1.0] if ends else parts


def per_block(values: list | None, key: str, total: int, family: ModelFamily) -> list | None:
    if values is not None and len(values) != total:
        raise UserError(
            f"adapter.{key}: {len(values)} values, a {family.name} UNet has {total} blocks "
            "(kohya's numbering: see the README)"
        )
    return values


def plan_blocks(
    family: ModelFamily, targets: Targets, adapter: AdapterConfig, train: TrainConfig
) -> BlockPlan:
    """The block options applied to the UNet's `targets`."""
    down, mid, up, ends = family.kohya_blocks()
    total = down + mid + up + (2 if ends else 0)
    dims = per_block(adapter.block_dims, "block_dims", total, family)
    alphas = per_block(adapter.block_alphas, "block_alphas", total, family)
    conv_dims = per_block(adapter.conv_block_dims, "conv_block_dims", total, family)
    conv_alphas = per_block(adapter.conv_block_alphas, "conv_block_alphas", total, family)
    for key, needs in (("block_alphas", dims), ("conv_block_alphas", conv_dims)):
        if getattr(adapter, key) is not None and needs is None:
            raise UserError(f"adapter.{key} needs adapter.{key.replace('alphas', 'dims')}")
    weights = block_lr_weights(family, train)
    plan = BlockPlan(main=[], conv=[])
    for conv, paths in ((False, full_paths(family.unet, targets.main)), (True, targets.conv)):
        for path in paths:
            block = family.kohya_block_index(family.file_module(DENOISER, path)[0])
            weight = weights[block] if weights is not None and block >= 0 else 1.0
            rank = module_rank(block, conv, adapter, dims, alphas, conv_dims, conv_alphas)
            if weight == 0.0 or rank[0] == 0:
                continue  # kohya creates no module where the rate or the rank is zero
            (plan.conv if conv else plan.main).append(path)
            plan.ranks[path] = rank
            plan.lr_weights[path] = weight
    if not plan.main and not plan.conv:
        raise UserError("the block options leave no module to train: raise a rate or a dim")
    return plan


def module_rank(
    block: int,
    conv: bool,
    adapter: AdapterConfig,
    dims: list[int] | None,
    alphas: list[float] | None,
    conv_dims: list[int] | None,
    conv_alphas: list[float] | None,
) -> tuple[int, float]:
    """(rank, alpha) of a module in `block`: its block's value where given, else the config's."""
    if conv:
        rank, alpha = adapter.conv_rank or adapter.rank, adapter.conv_alpha or adapter.alpha
        if conv_dims is not None and block >= 0:
            return conv_dims[block], conv_alphas[block] if conv_alphas else alpha
        return rank, alpha
    if dims is not None and block >= 0:
        return dims[block], alphas[block] if alphas else adapter.alpha
    return adapter.rank, adapter.alpha


def full_paths(unet: torch.nn.Module, patterns: list[str]) -> list[str]:
    """The module paths that PEFT's `target_modules` (full paths or suffixes) select."""
    return [
        name
        for name, _ in unet.named_modules()
        if any(name == p or name.endswith("." + p) for p in patterns)
    ]
