"""Resize an adapter by SVD: a fixed rank, or per module the smallest rank keeping an energy share.

Each module's ΔW = (alpha / rank) · up @ down is factored as U S Vᵀ; the first k singular pairs
are kept, split as up = U √S, down = √S Vᵀ, with alpha = k so that the file's ΔW is that of the
truncation (then one alpha for all, see Adapter.with_uniform_alpha). A DoRA module keeps its
`dora_scale`. Kept energy is Σ_k S² / Σ S²; the error printed
is ||ΔW − ΔW_k|| / ||ΔW|| (Frobenius), which is √(1 − energy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from stylelora.adapters.state import Adapter, LoraModule


@dataclass
class ResizeReport:
    name: str
    old_rank: int
    new_rank: int
    energy: float  # share of ΔW's squared Frobenius norm kept
    error: float  # relative Frobenius error of the kept ΔW

    def line(self) -> str:
        return (
            f"{self.name}: rank {self.old_rank} -> {self.new_rank}, "
            f"energy kept {100 * self.energy:.3f}%, error {100 * self.error:.3f}%"
        )


def chosen_rank(singular: torch.Tensor, rank: int | None, energy: float | None) -> int:
    """`rank`, or the smallest rank keeping `energy` of the squared singular values."""
    if rank is not None:
        return max(1, rank)
    share = torch.cumsum(singular.double() ** 2, 0) / (singular.double() ** 2).sum().clamp_min(
        1e-30
    )
    needed = int((share < energy - 1e-12).sum()) + 1
    return max(1, needed)


def resize_module(
    name: str, module: LoraModule, rank: int | None, energy: float | None
) -> tuple[LoraModule, ResizeReport]:
    """The module truncated by SVD, and what the truncation kept."""
    delta = module.delta().double().flatten(1)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(chosen_rank(s, rank, energy), module.rank)
    total = float((s**2).sum())
    kept = float((s[:k] ** 2).sum()) / total if total > 0 else 1.0
    root = s[:k].sqrt()
    up = (u[:, :k] * root).float()
    down = (root[:, None] * vh[:k]).float()
    up = up.reshape(module.up.shape[0], k, *module.up.shape[2:])
    down = down.reshape(k, *module.down.shape[1:])
    report = ResizeReport(name, module.rank, k, kept, math.sqrt(max(0.0, 1.0 - kept)))
    return LoraModule(down, up, float(k), module.dora_scale), report


def resize_adapter(
    adapter: Adapter, rank: int | None = None, energy: float | None = None
) -> tuple[Adapter, list[ResizeReport]]:
    """Every module resized; metadata says the new rank (the largest kept) and alpha."""
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank and energy")
    modules, reports = {}, []
    for name, module in adapter.modules.items():
        modules[name], report = resize_module(name, module, rank, energy)
        reports.append(report)
    ranks = [r.new_rank for r in reports]
    metadata = {
        **adapter.metadata,
        "ss_network_dim": str(max(ranks, default=0)),
        "ss_network_alpha": str(max(ranks, default=0)),
        "stylelora_resized": f"rank={rank}" if rank is not None else f"energy={energy}",
    }
    return Adapter(modules, metadata).with_uniform_alpha(), reports
