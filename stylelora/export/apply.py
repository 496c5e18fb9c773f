"""Add a kohya-format adapter into a model's weights: DoRA (diffusers drops `dora_scale`) and
LyCORIS's LoHa and LoKr (diffusers does not read them) included.

The arithmetic is the UIs': W += s * (alpha / rank) * up @ down (LoHa, LoKr: s * their ΔW, see
adapters/lycoris.py); for a DoRA module, ComfyUI's
`weight_decompose` (AUTOMATIC1111's `apply_weight_decompose` gives the same weight when
alpha = rank, which is how stylelora writes DoRA files):

    W_dora = dora_scale * (W + ΔW) / ||W + ΔW||_col,   W += s * (W_dora - W)
"""

from __future__ import annotations

import torch

from stylelora.adapters.dora import column_norm
from stylelora.adapters.state import Adapter, Module
from stylelora.errors import UserError
from stylelora.export.names import family_targets
from stylelora.families.base import ModelFamily


def merged_weight(weight: torch.Tensor, module: Module, strength: float) -> torch.Tensor:
    """The weight with `module` added at `strength`, in fp32."""
    weight = weight.float()
    delta = module.delta(tuple(weight.shape))
    if module.dora_scale is None:
        return weight + strength * delta
    combined = weight + delta
    scale = module.dora_scale.float().reshape(1, -1, *([1] * (weight.dim() - 2)))
    decomposed = combined * (scale / column_norm(combined))
    return weight + strength * (decomposed - weight)


def unmatched_error(path: str, names: list[str], family: ModelFamily) -> UserError:
    more = f" and {len(names) - 1} more" if len(names) > 1 else ""
    return UserError(
        f"{path}: module {names[0]}{more} is not in this {family.name} model "
        "(an adapter for another model?)"
    )


@torch.no_grad()
def add_into_weights(
    family: ModelFamily, adapter: Adapter, strength: float, path: str, saved: dict | None = None
) -> int:
    """Add `adapter` at `strength` into `family`'s weights in place; return the modules changed.
    `saved`: each layer's weight before the change is kept there (by the layer's id)."""
    targets = family_targets(family)
    unmatched = sorted(name for name in adapter.modules if name not in targets)
    if unmatched:
        raise unmatched_error(path, unmatched, family)
    for name, module in adapter.modules.items():
        layers = targets[name].members
        # A fused kohya module (Flux's qkv) covers its members' weights stacked by output rows.
        weight = torch.cat([layer.weight for layer in layers])
        if not module.fits(tuple(weight.shape)):
            raise UserError(
                f"{path}: {name} is {module.weight_shape} but the model's weight is "
                f"{tuple(weight.shape)} (an adapter for another model?)"
            )
        merged = merged_weight(weight, module, strength)
        rows = [layer.weight.shape[0] for layer in layers]
        for layer, part in zip(layers, merged.split(rows), strict=True):
            if saved is not None:
                saved.setdefault(id(layer), (layer, layer.weight.detach().clone()))
            layer.weight.copy_(part.to(layer.weight.dtype))
    return len(adapter.modules)
