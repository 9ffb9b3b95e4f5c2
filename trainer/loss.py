"""The training loss, built once and called with (model, batch), as EDM2's loss classes are.

Every random draw of a sample (its timestep t, its noise eps, whether its label is dropped) comes
from its own seed, derived from (run.seed, its global sample index): the sample at global index p
(the p-th image of the run's stream, p = images seen before its step + its place in the global
batch) gets the same t and eps on 1 or 64 GPUs, with any per-GPU batch, and after any resume.
Only dropout inside the UNet is drawn per rank (see README: what holds with dropout on).

The timestep is one uniform per sample mapped through ``GaussianDiffusion.timesteps_from_uniform``
(the inverse CDF of ``diffusion.t_sampling``), so a non-uniform timestep distribution keeps every
draw per sample. A per-t loss weight (``diffusion.loss_weight``, e.g. min-SNR-gamma) scales each
sample's gradient; the losses returned keep the unweighted eq. 14 values, so ``train/loss`` and its
per-t quartiles read the same under every weighting (and match the validation loss).
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from models.diffusion import GaussianDiffusion


def seed_for(*parts: Any) -> int:
    """A 63-bit seed from any tuple of values (stable across processes, runs and machines)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def batch_positions(nimg: int, micro: int, rank: int, world_size: int, batch_per_gpu: int) -> range:
    """Global sample indices of one micro-batch: global batch at ``nimg``, micro-step ``micro``, ``rank``.

    The global batch [nimg, nimg + B) is cut into micro-batches of ``batch_per_gpu``: micro-step m
    of rank r holds indices nimg + (m * world_size + r) * b + [0, b). The loader yields exactly these
    samples (data_pipeline.order), so the sum over a global batch is the same on any cluster.
    """
    start = nimg + (micro * world_size + rank) * batch_per_gpu
    return range(start, start + batch_per_gpu)


class DiffusionLoss:
    """Per-sample losses of eq. 14 for a uint8 batch: uint8 -> [-1, 1] on the device, draw, forward."""

    def __init__(self, diffusion: GaussianDiffusion, *, seed: int, num_classes: int, label_dropout: float,
                 device: torch.device, memory_format: torch.memory_format = torch.contiguous_format,
                 amp_dtype: torch.dtype | None = None) -> None:
        self.diffusion = diffusion
        self.seed = seed
        self.num_classes = num_classes
        self.label_dropout = label_dropout
        self.device = device
        self.memory_format = memory_format
        self.amp_dtype = amp_dtype
        self.gen = torch.Generator(device=device)

    def draws(self, positions: Sequence[int], shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(t (b,), eps (b, *shape), keep-label mask (b,)) on the device, each sample from its own seed.

        The two uniforms (timestep, label drop) come from a host RNG of the sample's seed; eps from
        the device generator reseeded per sample (b small kernels: measured in benchmarks.trainer).
        """
        b = len(positions)
        seeds = [seed_for(self.seed, "sample", int(p)) for p in positions]
        uniforms = [random.Random(s) for s in seeds]
        u = torch.tensor([[r.random(), r.random()] for r in uniforms], dtype=torch.float64)  # (b, 2)
        if self.device.type == "cuda":
            u = u.pin_memory()  # an asynchronous copy: the step never waits for the GPU
        u = u.to(self.device, non_blocking=True)
        t = self.diffusion.timesteps_from_uniform(u[:, 0])
        keep = u[:, 1] >= self.label_dropout
        noise = torch.empty((b, *shape), device=self.device, dtype=torch.float32)
        for i, s in enumerate(seeds):
            self.gen.manual_seed(s)
            torch.randn(shape, generator=self.gen, device=self.device, out=noise[i])  # eps ~ N(0, I)
        return t, noise, keep

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor],
                 positions: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample losses (b,) and their timesteps (b,), on the device (no host sync)."""
        fmt = self.memory_format
        x = batch["image"].to(self.device, non_blocking=True)  # (b, C, H, W) uint8, pinned by the loader
        if x.shape[0] != len(positions):
            raise RuntimeError(f"batch of {x.shape[0]} images for {len(positions)} sample positions")
        # One kernel for the dtype and the layout (the loader's batches are channels_last uint8).
        x0 = x.to(torch.float32, memory_format=fmt).div_(127.5).sub_(1.0)  # [-1, 1]
        t, noise, keep = self.draws(positions, tuple(x0.shape[1:]))
        noise = noise.contiguous(memory_format=fmt)  # same values, the model's layout (x_t follows)
        y = None
        if self.num_classes > 0:
            y = batch["label"].to(self.device, non_blocking=True)
            y = torch.where(keep, y, torch.full_like(y, -1))  # -1: the UNet's learned null label (CFG)
        amp = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
               else contextlib.nullcontext())
        with amp:
            losses = self.diffusion.training_losses(model, x0, t, noise, y=y)  # (b,)
        if self.diffusion.cfg.loss_weight != "uniform":  # the paper's loss is left exactly as it was
            weighted = self.diffusion.loss_weights(t) * losses
            # value: the unweighted loss (for logging); gradient: the weighted one's (w_t * dL_t)
            losses = losses.detach() + (weighted - weighted.detach())
        return losses, t
