"""Fused EMA of the weights: fp32 shadows, one multi-tensor lerp per profile.

shadow <- shadow + (1 - beta) * (param - shadow), for all tensors at once (torch._foreach_lerp_),
instead of a Python loop over parameters. Two kinds of profile, in this order (the index that
``copy_to``, checkpoints' ``ema.shadows`` and ``--ema-index`` use):

* fixed decays (``ema.decays``): beta = decay per optimizer step (optionally warmed up);
* power-function profiles (``ema.sigma_rels``, EDM2 section 3): beta = (t_prev / t_next)^(gamma + 1)
  with t the training images seen (trainer.ema_math), so the profile is the same at any batch
  size, world size or accumulation. Their fp16 snapshots (trainer.ema_snapshots) let ``ddpm-ema``
  reconstruct any sigma_rel after training.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from trainer.ema_math import beta as power_beta
from trainer.ema_math import gamma_from_sigma_rel


class EMA:
    """Fixed-decay and power-function moving averages of a model's floating-point tensors."""

    def __init__(self, model: nn.Module, decays: Sequence[float], warmup: bool = False,
                 sigma_rels: Sequence[float] = ()) -> None:
        self.decays = [float(d) for d in decays]
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.gammas = [gamma_from_sigma_rel(s) for s in self.sigma_rels]
        self.warmup = warmup
        self.num_updates = 0
        self.nimg = 0  # training images at the last update: the power profiles' clock
        # Parameters and floating buffers, by name; the unwrapped model, so no prefixes.
        self.names = [n for n, t in model.state_dict().items() if t.is_floating_point()]
        # (model, its source tensors): the parameter objects never change, and rebuilding a
        # state dict of hundreds of entries every step is pure Python overhead.
        self._cache: tuple[nn.Module, list[torch.Tensor]] | None = None
        src = self._sources(model)
        # Fixed decays first, then power profiles: index 0 is the first fixed decay (the paper's 0.9999).
        self.shadows: list[list[torch.Tensor]] = [
            [t.detach().to(torch.float32, copy=True) for t in src] for _ in range(self.num_profiles)
        ]

    @property
    def num_profiles(self) -> int:
        """Fixed decays plus power profiles."""
        return len(self.decays) + len(self.sigma_rels)

    @property
    def power_shadows(self) -> list[list[torch.Tensor]]:
        """The shadows of the power profiles, in ``sigma_rels`` order (what snapshots store)."""
        return self.shadows[len(self.decays):]

    def labels(self) -> list[str]:
        """One name per profile, in index order: 'decay 0.9999', 'sigma_rel 0.05', ..."""
        return [f"decay {d:g}" for d in self.decays] + [f"sigma_rel {s:g}" for s in self.sigma_rels]

    def _sources(self, model: nn.Module) -> list[torch.Tensor]:
        if self._cache is not None and self._cache[0] is model:
            return self._cache[1]
        sd = model.state_dict(keep_vars=True)
        src = [sd[n].detach() for n in self.names]
        self._cache = (model, src)
        return src

    def decay_at(self, index: int) -> float:
        """The decay of fixed profile ``index`` for the next update (with the optional warm-up)."""
        d = self.decays[index]
        if self.warmup:
            n = self.num_updates
            d = min(d, (1 + n) / (10 + n))
        return d

    def betas(self, nimg: int | None) -> list[float]:
        """The decay of every profile for an update that brings training to ``nimg`` images."""
        out = [self.decay_at(i) for i in range(len(self.decays))]
        if self.sigma_rels:
            if nimg is None:
                raise ValueError("power-function EMA profiles need the training images seen (nimg) at each update")
            out += [power_beta(g, self.nimg, nimg) for g in self.gammas]
        return out

    @torch.no_grad()
    def update(self, model: nn.Module, nimg: int | None = None) -> None:
        """One EMA step for every profile: one fused foreach lerp each, no Python loop over tensors.

        ``nimg``: training images seen after this optimizer step (needed by power profiles).
        """
        src = self._sources(model)
        if src and src[0].dtype != torch.float32:
            src = [s.float() for s in src]
        for shadow, b in zip(self.shadows, self.betas(nimg)):
            torch._foreach_lerp_(shadow, src, 1.0 - b)
        self.num_updates += 1
        if nimg is not None:
            self.nimg = int(nimg)

    def state_dict_for(self, index: int = 0) -> dict[str, torch.Tensor]:
        """The shadow weights of one profile as a model state dict (names without prefixes)."""
        return dict(zip(self.names, self.shadows[index]))

    @torch.no_grad()
    def copy_to(self, model: nn.Module, index: int = 0) -> None:
        """Load one profile's shadow weights into ``model``."""
        model.load_state_dict(self.state_dict_for(index), strict=False)

    def state_dict(self) -> dict[str, Any]:
        """The EMA's state: decays, sigma_rels, update and image counters, one weight dict per profile."""
        return {
            "decays": list(self.decays),
            "sigma_rels": list(self.sigma_rels),
            "warmup": self.warmup,
            "num_updates": self.num_updates,
            "nimg": self.nimg,
            "shadows": [self.state_dict_for(i) for i in range(self.num_profiles)],
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from ``state_dict()`` output; decays and sigma_rels must match.

        A state from before power profiles existed (no ``sigma_rels``, no ``nimg``) is one with none.
        """
        if [float(d) for d in state["decays"]] != self.decays:
            raise ValueError(f"EMA decays differ: checkpoint {state['decays']} vs config {self.decays}")
        saved_rels = [float(s) for s in state.get("sigma_rels", [])]
        if saved_rels != self.sigma_rels:
            raise ValueError(f"EMA sigma_rels differ: checkpoint {saved_rels} vs config {self.sigma_rels} "
                             "(a run keeps the profiles it started with)")
        self.num_updates = int(state["num_updates"])
        self.nimg = int(state.get("nimg", 0))
        for shadow, saved in zip(self.shadows, state["shadows"], strict=True):
            missing = [n for n in self.names if n not in saved]
            if missing:
                raise ValueError(f"EMA state lacks tensors: {missing[:5]}")
            torch._foreach_copy_(shadow, [saved[n].to(shadow[0].device) for n in self.names])

    def to(self, device: torch.device) -> EMA:
        """Move the shadows to ``device``."""
        self.shadows = [[t.to(device) for t in s] for s in self.shadows]
        return self
