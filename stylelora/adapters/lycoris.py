"""LyCORIS's LoHa and LoKr: PEFT's layers to train them, LyCORIS's key layout to write them.

PEFT's LoHa and LoKr parameters carry LyCORIS's names and orientation (`hada_w1_a` (out, r),
`hada_w1_b` (r, in), ...; a 3x3 convolution's input side flattened with its kernel), so each
module's tensors go into the file as they are, under kohya's module name, with its `alpha`.

What a file's module adds to a weight is written down once here (`LycorisModule.delta`), as
AUTOMATIC1111 (`network_hada.py`, `network_lokr.py`) and ComfyUI (`weight_adapter/loha.py`,
`lokr.py`) compute it, and the tools (sample, merge, inspect) use that:

    LoHa: ΔW = alpha / dim * (w1_a @ w1_b) ⊙ (w2_a @ w2_b),    dim = rows of w1_b
    LoKr: ΔW = scale * kron(w1, w2),  w1 = lokr_w1 or w1_a @ w1_b, w2 likewise,
          scale = alpha / dim where w1 or w2 is a product (dim: rows of its `_b`), else 1

PEFT scales every module by alpha / r, also a LoKr of two full matrices, where LyCORIS and the
UIs take 1: such a module is trained at scale 1 (`full_matrix_scale`), as LyCORIS trains it, and
the writer folds whatever scale the layer has into `lokr_w1`. Tucker factors (`hada_t1`,
`hada_t2`, `lokr_t2`) are read from other trainers' files; stylelora does not train them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import torch
from peft import LoHaConfig, LoKrConfig, get_peft_model_state_dict
from peft.tuners.lycoris_utils import LycorisConfig

from stylelora.config import AdapterConfig
from stylelora.errors import UserError

LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
ALGOS = {"loha": LOHA_PARTS, "lokr": LOKR_PARTS}


def lycoris_config(cfg: AdapterConfig, rank: int, alpha: float, keywords: dict) -> LycorisConfig:
    """PEFT's LoHa or LoKr config; `keywords`: the targets and per-module ranks and alphas."""
    common = {"r": rank, "alpha": alpha, **keywords, "module_dropout": cfg.module_dropout}
    if cfg.type == "loha":
        return LoHaConfig(**common)
    # LyCORIS's initialisation (w2 zero, w1 random), as LyCORIS users train LoKr.
    return LoKrConfig(
        **common,
        decompose_factor=cfg.lokr_factor,
        decompose_both=cfg.decompose_both,
        init_weights="lycoris",
    )


def full_matrix_scale(module: torch.nn.Module, adapter_name: str) -> None:
    """Scale 1 for each LoKr layer in `module` whose w1 and w2 are both full matrices (LyCORIS
    ignores alpha there; PEFT would shrink such a module by alpha / r)."""
    for layer in module.modules():
        if adapter_name in getattr(layer, "lokr_w1", {}) and adapter_name in layer.lokr_w2:
            layer.scaling[adapter_name] = 1.0


def is_lycoris(module: torch.nn.Module, adapter_name: str) -> bool:
    return isinstance(module.peft_config[adapter_name], LycorisConfig)


def cp_weight(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """A Tucker factor's weight (out, in, k, k) from its core and its two mode matrices."""
    return torch.einsum("i j k l, j r, i p -> p r k l", t, wb, wa)


@dataclass
class LycorisModule:
    """One LoHa or LoKr module of a file: its tensors by LyCORIS name, and its alpha."""

    algo: str  # "loha" or "lokr"
    parts: dict[str, torch.Tensor]
    alpha: float | None
    dora_scale: ClassVar[None] = None

    @property
    def rank(self) -> int | None:
        """The `dim` the UIs divide alpha by; None for a LoKr of two full matrices (scale 1)."""
        if self.algo == "loha":
            return self.parts["hada_w1_b"].shape[0]
        dim = None
        for key in ("lokr_w1_b", "lokr_w2_b"):  # w2's wins, as in both UIs
            if key in self.parts:
                dim = self.parts[key].shape[0]
        return dim

    def scale(self) -> float:
        return self.alpha / self.rank if self.alpha is not None and self.rank else 1.0

    def factor(self, side: str) -> torch.Tensor:
        """LoHa's `w1`/`w2` product or LoKr's `w1`/`w2` matrix, unscaled, in fp32."""
        name = ("hada_" if self.algo == "loha" else "lokr_") + side
        if name in self.parts:
            return self.parts[name].float()
        a, b = self.parts[f"{name}_a"].float(), self.parts[f"{name}_b"].float()
        core = self.parts.get(name.replace("_w", "_t"))  # hada_t1, hada_t2, lokr_t2
        return cp_weight(core.float(), a, b) if core is not None else a @ b

    @cached_property
    def product(self) -> torch.Tensor:
        """The unscaled ΔW, computed once (a module's parts do not change once it is made)."""
        w1, w2 = self.factor("w1"), self.factor("w2")
        if self.algo == "loha":
            return w1 * w2
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        return torch.kron(w1, w2)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The product's shape; a convolution's may be flattened to (out, in * k * k)."""
        return tuple(self.product.shape)

    def fits(self, shape: tuple[int, ...]) -> bool:
        return self.product.shape[0] == shape[0] and self.product.numel() == math.prod(shape)

    def delta(self, shape: tuple[int, ...]) -> torch.Tensor:
        """What the module adds to a weight of `shape` at strength 1, in fp32."""
        return (self.scale() * self.product).reshape(shape)

    @property
    def in_width(self) -> int:
        """The adapted layer's inputs (times its kernel, for a convolution)."""
        return self.product[0].numel()

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        out = {f"{name}.{key}": value.contiguous() for key, value in self.parts.items()}
        if self.alpha is not None:
            out[f"{name}.alpha"] = torch.tensor(float(self.alpha))
        return out


def lycoris_problems(name: str, module: LycorisModule) -> list[str]:
    """What is wrong with one module's tensors (missing parts, shapes that do not multiply)."""
    parts = module.parts
    if module.algo == "loha":
        missing = [k for k in LOHA_PARTS[:4] if k not in parts]
    else:
        missing = [
            f"lokr_{side}"
            for side in ("w1", "w2")
            if f"lokr_{side}" not in parts
            and not (f"lokr_{side}_a" in parts and f"lokr_{side}_b" in parts)
        ]
    if missing:
        return [f"{name}: {', '.join(missing)} missing"]
    try:
        module.product  # noqa: B018 (computing it is the check)
    except (RuntimeError, KeyError):
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in sorted(parts.items()))
        return [f"{name}: its {module.algo} tensors do not multiply ({shapes})"]
    return []


def peft_to_lycoris(
    module: torch.nn.Module, prefix: str, file_module, adapter_name: str
) -> dict[str, torch.Tensor]:
    """LyCORIS tensors, under kohya's names, for the LoHa or LoKr adapters in `module`."""
    algo = "loha" if isinstance(module.peft_config[adapter_name], LoHaConfig) else "lokr"
    state = get_peft_model_state_dict(
        module, adapter_name=adapter_name, save_embedding_layers=False
    )
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        path, _, part = key.rpartition(".")
        if part not in ALGOS[algo]:
            raise ValueError(f"unexpected {algo} tensor {key!r}")
        grouped.setdefault(path, {})[part] = value.detach().float()
    tensors: dict[str, torch.Tensor] = {}
    for path, parts in grouped.items():
        name, members = file_module(prefix, path)
        if len(members) > 1:
            raise UserError(
                f"{name}: {algo} on a fused module cannot be written in LyCORIS's layout"
            )
        layer = module.get_submodule(path)
        alpha = float(layer.alpha[adapter_name])
        if LycorisModule(algo, parts, alpha).rank is None:  # two full matrices: the UIs scale by 1
            parts["lokr_w1"] = parts["lokr_w1"] * layer.scaling[adapter_name]
        tensors.update(LycorisModule(algo, parts, alpha).tensors(name))
    return tensors
