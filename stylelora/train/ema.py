"""An exponential moving average of the adapter weights, exported beside or instead of them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class AdapterEMA:
    """Shadow copies of the trainable parameters, moved toward them after every optimizer step.

    The decay warms up as (1 + n) / (10 + n) until it reaches `decay`, so the average is not
    dominated by the untrained initial weights in a short run.
    """

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params = params
        self.decay = decay
        self.updates = 0
        self.shadow = [p.detach().clone() for p in params]

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        weight = 1 - self.current_decay()
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], weight)
        self.updates += 1

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The parameters hold the averaged weights inside the block, their own ones after."""
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for param, average in zip(self.params, self.shadow, strict=True):
                param.copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, own in zip(self.params, saved, strict=True):
                    param.copy_(own)

    def state_dict(self) -> dict[str, torch.Tensor]:
        tensors = {f"shadow.{i}": t.contiguous() for i, t in enumerate(self.shadow)}
        tensors["updates"] = torch.tensor(self.updates)
        return tensors

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        if len(tensors) - 1 != len(self.shadow):
            raise ValueError(
                f"EMA state has {len(tensors) - 1} tensors, expected {len(self.shadow)}"
            )
        for i, shadow in enumerate(self.shadow):
            shadow.copy_(tensors[f"shadow.{i}"])
        self.updates = int(tensors["updates"])
