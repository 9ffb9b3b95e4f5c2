"""The pinned-noise validation loss on held-out shards (``val/loss`` in TensorBoard)."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from data_pipeline import build_loader
from trainer import distributed as du
from trainer.config import Config
from trainer.sampling import rank_block

log = logging.getLogger("ddpm")

# The timesteps of val/loss_t<t>, as fractions of T: (10, 100, 250, 500, 750, 990) at T = 1000.
val_fractions = (0.01, 0.1, 0.25, 0.5, 0.75, 0.99)


def load_validation_images(cfg: Config, rank: int, world_size: int,
                           ) -> tuple[torch.Tensor, list[int], torch.Tensor | None] | None:
    """This rank's share of the held-out images for the pinned-noise validation loss, or None.

    Returns uint8 (n, C, H, W) images, their global indices, and their labels (or None).
    """
    e = cfg.eval
    if not (e.val_every_images and e.val_shards):
        return None
    # The same first images on every rank (a one-process view, no flips), then a rank block. The
    # loader streams forever (step-based training), so read one pass at most: each held-out image
    # counts once, however few the shards hold.
    vcfg = dataclasses.replace(cfg.data, shards=e.val_shards, hflip=False, num_workers=0, synthetic_images=0,
                               image_size=cfg.data.image_size or cfg.model.image_size,
                               num_classes=cfg.data.num_classes or cfg.model.num_classes)
    loader = build_loader(vcfg, batch_size=1, rank=0, world_size=1, seed=0, device=None)
    try:
        held = getattr(loader, "num_samples", None)
        n = min(e.val_images, int(held)) if held else e.val_images
        stream = iter(loader)
        batches = [next(stream) for _ in range(n)]
    finally:
        loader.close()
    if rank == 0:
        log.info("validation loss: %d held-out image(s) from %s (eval.val_images=%d%s)", n, e.val_shards,
                 e.val_images, f"; the shards hold {held}" if held is not None and held < e.val_images else "")
    images = torch.cat([b["image"] for b in batches])
    mine = list(rank_block(n, rank, world_size))
    labels = None
    if cfg.model.num_classes > 0 and cfg.data.use_labels:
        labels = torch.cat([b["label"] for b in batches])[mine]
    return images[mine].contiguous(), mine, labels


@torch.no_grad()
def pinned_validation_loss(
    model: torch.nn.Module,
    diffusion: Any,
    images: torch.Tensor,
    indices: list[int],
    timesteps: tuple[int, ...] = (10, 100, 250, 500, 750, 990),
    seed: int = 0,
    batch_size: int = 64,
    labels: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Loss of eq. 14 at fixed t with fixed noise per held-out image: comparable across steps.

    ``images`` are this rank's uint8 (N, C, H, W) held-out images, ``indices`` their global
    ids (image i's noise at t is seeded by (seed, i, t), so any rank split gives the same
    numbers). Every rank calls it; returns {"val_loss_t<t>": mean, ..., "val_loss": mean of those}.
    """
    device = torch.device(device)
    ts = [t for t in timesteps if 0 <= t < diffusion.num_timesteps]
    sums = torch.zeros(len(ts) + 1, dtype=torch.float64, device=device)  # per-t sums, then count
    was_training = model.training
    model.eval()
    try:
        for i in range(0, images.shape[0], batch_size):
            x0 = images[i : i + batch_size].to(device).float() / 127.5 - 1  # (B, C, H, W) in [-1, 1]
            idx = indices[i : i + batch_size]
            y = labels[i : i + batch_size].to(device) if labels is not None else None
            for j, t in enumerate(ts):
                noise = torch.stack([
                    torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(
                        (seed * 1_000_003 + k) * 10_007 + t)) for k in idx
                ]).to(device)
                tt = torch.full((x0.shape[0],), t, dtype=torch.long, device=device)
                sums[j] += diffusion.training_losses(model, x0, tt, noise, y).double().sum()
            sums[-1] += x0.shape[0]
    finally:
        model.train(was_training)
    du.all_reduce_sum(sums)
    n = max(sums[-1].item(), 1.0)
    out = {f"val_loss_t{t}": sums[j].item() / n for j, t in enumerate(ts)}
    out["val_loss"] = sum(out.values()) / max(len(ts), 1)
    return out
