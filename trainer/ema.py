"""Fused EMA of the weights: fp32 shadows, one multi-tensor lerp per decay.

shadow <- shadow + (1 - decay) * (param - shadow), for all tensors at once
(torch._foreach_lerp_), instead of a Python loop over parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


class EMA:
    """One or several exponential moving averages of a model's floating-point tensors."""

    def __init__(self, model: nn.Module, decays: Sequence[float], warmup: bool = False) -> None:
        self.decays = [float(d) for d in decays]
        self.warmup = warmup
        self.num_updates = 0
        # Parameters and floating buffers, by name; the unwrapped model, so no prefixes.
        self.names = [n for n, t in model.state_dict().items() if t.is_floating_point()]
        # (model, its source tensors): the parameter objects never change, and rebuilding a
        # state dict of hundreds of entries every step is pure Python overhead.
        self._cache: tuple[nn.Module, list[torch.Tensor]] | None = None
        src = self._sources(model)
        self.shadows: list[list[torch.Tensor]] = [
            [t.detach().to(torch.float32, copy=True) for t in src] for _ in self.decays
        ]

    def _sources(self, model: nn.Module) -> list[torch.Tensor]:
        if self._cache is not None and self._cache[0] is model:
            return self._cache[1]
        sd = model.state_dict(keep_vars=True)
        src = [sd[n].detach() for n in self.names]
        self._cache = (model, src)
        return src

    def decay_at(self, index: int) -> float:
        """The decay used for the next update (with the optional warm-up)."""
        d = self.decays[index]
        if self.warmup:
            n = self.num_updates
            d = min(d, (1 + n) / (10 + n))
        return d

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step for every decay: one fused foreach lerp each, no Python loop over tensors."""
        src = self._sources(model)
        if src and src[0].dtype != torch.float32:
            src = [s.float() for s in src]
        for i, shadow in enumerate(self.shadows):
            torch._foreach_lerp_(shadow, src, 1.0 - self.decay_at(i))
        self.num_updates += 1

    def state_dict_for(self, index: int = 0) -> dict[str, torch.Tensor]:
        """The shadow weights of one decay as a model state dict (names without prefixes)."""
        return dict(zip(self.names, self.shadows[index]))

    @torch.no_grad()
    def copy_to(self, model: nn.Module, index: int = 0) -> None:
        """Load one decay's shadow weights into ``model``."""
        model.load_state_dict(self.state_dict_for(index), strict=False)

    def state_dict(self) -> dict[str, Any]:
        """The EMA's state: decays, update counter, and one weight dict per decay."""
        return {
            "decays": list(self.decays),
            "warmup": self.warmup,
            "num_updates": self.num_updates,
            "shadows": [self.state_dict_for(i) for i in range(len(self.decays))],
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from ``state_dict()`` output; the decays must match."""
        if [float(d) for d in state["decays"]] != self.decays:
            raise ValueError(f"EMA decays differ: checkpoint {state['decays']} vs config {self.decays}")
        self.num_updates = int(state["num_updates"])
        for shadow, saved in zip(self.shadows, state["shadows"]):
            missing = [n for n in self.names if n not in saved]
            if missing:
                raise ValueError(f"EMA state lacks tensors: {missing[:5]}")
            torch._foreach_copy_(shadow, [saved[n].to(shadow[0].device) for n in self.names])

    def to(self, device: torch.device) -> EMA:
        """Move the shadows to ``device``."""
        self.shadows = [[t.to(device) for t in s] for s in self.shadows]
        return self
