"""Target presets: which modules of a UNet or text encoder get an adapter, by kohya's rules.

`cross-attn` and `attention` name attention projections by suffix. `attn-mlp` is kohya's default
(networks/lora.py): every Linear and 1x1 Conv2d inside a `Transformer2DModel` (attention,
proj_in/proj_out, feed-forward). `full` adds LoCon's modules: every Linear and Conv2d inside a
`ResnetBlock2D`, `Downsample2D` or `Upsample2D`; the 3x3 convolutions take the conv rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# PEFT matches a target by module-path suffix.
UNET_TARGETS: dict[str, list[str]] = {
    "cross-attn": ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"],
    "attention": [
        f"{attn}.{proj}"
        for attn in ("attn1", "attn2")
        for proj in ("to_q", "to_k", "to_v", "to_out.0")
    ],
}
UNET_PRESETS = ("cross-attn", "attention", "attn-mlp", "full")
TRANSFORMER_BLOCKS = ("Transformer2DModel",)
LOCON_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")

# q, k, v and out_proj together: AUTOMATIC1111 skips an OpenCLIP layer that lacks any of them.
TEXT_ENCODER_TARGETS: dict[str, list[str]] = {
    "attention": [f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")],
}
TEXT_ENCODER_TARGETS["attn-mlp"] = TEXT_ENCODER_TARGETS["attention"] + ["mlp.fc1", "mlp.fc2"]


@dataclass
class Targets:
    """Module paths (or suffixes) at the main rank, and full paths at the conv rank."""

    main: list[str]
    conv: list[str] = field(default_factory=list)

    def peft_keywords(
        self, conv: tuple[int, float], ranks: dict[str, tuple[int, float]] | None = None
    ) -> dict:
        """PEFT's target_modules and rank/alpha patterns, the same for LoRA, LoHa and LoKr: the
        3x3 convolutions get rank and alpha `conv`, the modules in `ranks` (full paths) their
        own (block-wise dims)."""
        patterns = {path: conv for path in self.conv} | (ranks or {})
        return {
            "target_modules": self.main + self.conv,
            "rank_pattern": {path: value[0] for path, value in patterns.items()},
            "alpha_pattern": {path: value[1] for path, value in patterns.items()},
        }


def is_pointwise(module: torch.nn.Module) -> bool:
    """A Linear, or a Conv2d with a 1x1 kernel: kohya gives these the main rank."""
    if isinstance(module, torch.nn.Linear):
        return True
    return isinstance(module, torch.nn.Conv2d) and tuple(module.kernel_size) == (1, 1)


def modules_inside(
    root: torch.nn.Module, block_classes: tuple[str, ...]
) -> list[tuple[str, torch.nn.Module]]:
    """(path, module) of every Linear / Conv2d below a module whose class is in `block_classes`."""
    found: dict[str, torch.nn.Module] = {}
    for path, block in root.named_modules():
        if type(block).__name__ not in block_classes:
            continue
        for sub, module in block.named_modules():
            if sub and isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                found[f"{path}.{sub}"] = module
    return sorted(found.items())


def unet_targets(unet: torch.nn.Module, preset: str) -> Targets:
    """The UNet modules a preset adapts."""
    if preset in UNET_TARGETS:
        return Targets(main=list(UNET_TARGETS[preset]))
    if preset not in UNET_PRESETS:
        raise ValueError(f"unknown UNet target preset {preset!r}")
    targets = Targets(main=[path for path, _ in modules_inside(unet, TRANSFORMER_BLOCKS)])
    if preset == "full":
        for path, module in modules_inside(unet, LOCON_BLOCKS):
            (targets.main if is_pointwise(module) else targets.conv).append(path)
    return targets
