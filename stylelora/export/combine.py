"""Combine adapters at given strengths into one file, exactly: ranks are concatenated.

    Σ_i s_i (α_i / r_i) up_i @ down_i = [s_1 (α_1/r_1) up_1 | s_2 (α_2/r_2) up_2] @ [down_1; down_2]

so the combined module has rank Σ r_i and alpha = that rank (scale 1). With a target rank, the
combination is then reduced by SVD (export/resize.py).
"""

from __future__ import annotations

import torch

from stylelora.adapters.state import Adapter, LoraModule
from stylelora.errors import UserError


def combine_modules(parts: list[tuple[LoraModule, float]]) -> LoraModule:
    """One module whose ΔW is Σ strength · ΔW of `parts`."""
    shapes = {module.weight_shape for module, _ in parts}
    if len(shapes) > 1:
        raise ValueError(f"weight shapes differ: {sorted(shapes)}")
    ups = [
        module.up.float() * (strength * module.alpha / module.rank) for module, strength in parts
    ]
    down = torch.cat([module.down.float() for module, _ in parts])
    return LoraModule(down, torch.cat(ups, dim=1), float(down.shape[0]))


def combine_adapters(adapters: list[tuple[str, Adapter, float]]) -> Adapter:
    """`(path, adapter, strength)` combined; every module any of them adapts is kept."""
    grouped: dict[str, list[tuple[LoraModule, float]]] = {}
    versions = {a.metadata.get("ss_base_model_version") for _, a, _ in adapters} - {None}
    if len(versions) > 1:
        raise UserError(f"adapters for different models ({', '.join(sorted(versions))})")
    for path, adapter, strength in adapters:
        if adapter.is_dora:
            raise UserError(
                f"{path}: a DoRA adapter does not add linearly; merge it into the model "
                "instead (stylelora merge)"
            )
        for name, module in adapter.modules.items():
            grouped.setdefault(name, []).append((module, strength))
    modules = {}
    for name, parts in grouped.items():
        try:
            modules[name] = combine_modules(parts)
        except ValueError as exc:
            raise UserError(f"{name}: the adapters do not fit the same model ({exc})") from None
    first = adapters[0][1].metadata
    keep = ("ss_base_model_version", "ss_v2", "modelspec.architecture", "ss_network_module")
    ranks = [m.rank for m in modules.values()]
    metadata = {k: first[k] for k in keep if k in first}
    metadata.update(
        {
            "ss_network_dim": str(max(ranks, default=0)),
            "ss_network_alpha": str(max(ranks, default=0)),
            "stylelora_combined": ", ".join(f"{path}:{s:g}" for path, _, s in adapters),
        }
    )
    return Adapter(modules, metadata).with_uniform_alpha()
