"""Sampling from a trained model: per-image seeds, rank split, labels, uint8 images, grids, strips.

Image k's noise comes from its own seed (``image_seed(seed, k)``), so the set of images
is the same at any world size and batch size. The command-line tool is ``trainer.sample``;
the grid and denoising strip written during training come from here too.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from data_pipeline.storage import atomic_write
from models.diffusion import DDIM_EPS, DDIM_EPS_DEFAULT
from trainer import distributed as du
from trainer.config import Config

log = logging.getLogger("ddpm")


def image_seed(seed: int, index: int) -> int:
    """The seed of image ``index`` in a sampling run with base ``seed``."""
    digest = hashlib.sha256(f"sample:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def rank_block(n: int, rank: int, world_size: int) -> range:
    """This rank's contiguous share of indices 0..n-1 (sizes differ by at most one)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def class_labels(indices: Sequence[int], num_classes: int) -> torch.Tensor | None:
    """Balanced, world-size independent labels for class-conditional sampling: image k is class k % C."""
    if num_classes <= 0:
        return None
    return torch.tensor([k % num_classes for k in indices], dtype=torch.long)


def add_ddim_eps_option(p: argparse.ArgumentParser, default: str | None = DDIM_EPS_DEFAULT) -> None:
    """``--ddim-eps model|clipped``, DDIM's direction term, on a command's parser (None: the default convention)."""
    p.add_argument("--ddim-eps", choices=DDIM_EPS, default=default,
                   help="DDIM direction term: model = the model's eps (diffusers' default), clipped = eps from the "
                        "clipped x0 (guided-diffusion)" + ("" if default else f"; default: {DDIM_EPS_DEFAULT}"))


def ddim_eps_suffix(sampler: str, ddim_eps: str) -> str:
    """An output folder's suffix for a DDIM direction term other than the default ('' otherwise)."""
    return f"-eps-{ddim_eps}" if sampler == "ddim" and ddim_eps != DDIM_EPS_DEFAULT else ""


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Map [-1, 1] float images to uint8 [0, 255] (the usual DDPM quantisation)."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def sample_uint8(model: nn.Module, diffusion, indices: Sequence[int], *, image_shape: tuple[int, int, int],
                 seed: int, batch_size: int, sampler: str = "ddpm", steps: int | None = None,
                 eta: float = 0.0, guidance_scale: float = 1.0, labels: torch.Tensor | None = None,
                 device: torch.device | str = "cpu", progress: bool = False,
                 ddim_eps: str = DDIM_EPS_DEFAULT) -> torch.Tensor:
    """Sample the images with the given global indices; returns uint8 (N, C, H, W) on the CPU.

    ``labels`` (N,) are aligned with ``indices``; image k depends only on (seed, k, its label).
    ``ddim_eps``: DDIM's direction term (``GaussianDiffusion.sample``).
    """
    out = []
    indices = list(indices)
    batches = [(i, indices[i: i + batch_size]) for i in range(0, len(indices), batch_size)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(indices), desc="sampling", unit="img", dynamic_ncols=True)
    for start, b in batches:
        y = labels[start: start + len(b)].to(device) if labels is not None else None
        x = diffusion.sample(
            model, image_shape, [image_seed(seed, k) for k in b], sampler=sampler, steps=steps,
            eta=eta, guidance_scale=guidance_scale, y=y, device=device, ddim_eps=ddim_eps,
        )
        out.append(to_uint8(x).cpu())
        if bar is not None:
            bar.update(len(b))
    if bar is not None:
        bar.close()
    if not out:
        return torch.zeros((0, *image_shape), dtype=torch.uint8)
    return torch.cat(out)


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2, pad_value: int = 0) -> torch.Tensor:
    """(N, C, H, W) uint8 -> one (C, H', W') uint8 grid, ``nrow`` images per row (default: square)."""
    from torchvision.utils import make_grid as tv_grid

    nrow = nrow or max(1, int(math.ceil(math.sqrt(images.shape[0]))))
    return tv_grid(images, nrow=nrow, padding=padding, pad_value=pad_value)


def save_png(image: torch.Tensor, path: str | Path) -> None:
    """Write one (C, H, W) uint8 image as PNG (atomically: a StorageError names a full disk)."""
    from PIL import Image

    arr = image.permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr.squeeze(-1) if arr.shape[-1] == 1 else arr).save(buf, format="PNG")
    atomic_write(path, buf.getvalue(), what="image")


@torch.no_grad()
def sample_images(
    model: torch.nn.Module,
    diffusion: Any,
    indices: list[int],
    *,
    seed: int,
    image_size: int,
    num_classes: int = 0,
    sampler: str = "ddim",
    steps: int = 0,
    eta: float = 0.0,
    channels: int = 3,
    device: torch.device | str = "cpu",
    ddim_eps: str = DDIM_EPS_DEFAULT,
) -> torch.Tensor:
    """uint8 (len(indices), C, H, W); image k depends only on (image_seed(seed, k), label k % classes)."""
    return sample_uint8(
        model, diffusion, indices, image_shape=(channels, image_size, image_size), seed=seed,
        batch_size=max(1, len(indices)), sampler=sampler, steps=steps or None, eta=eta,
        labels=class_labels(indices, num_classes), device=device, ddim_eps=ddim_eps,
    )


@torch.no_grad()
def denoising_strip(
    diffusion: Any,
    model: torch.nn.Module,
    seeds: list[int],
    image_size: int,
    num_columns: int = 8,
    sampler: str = "ddpm",
    steps: int | None = None,
    y: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    padding: int = 2,
    ddim_eps: str = DDIM_EPS_DEFAULT,
) -> torch.Tensor:
    """One row per seed: x_t from pure noise x_T (left) to x_0 (right), as in the DDPM figures.

    Returns uint8 (3, H', W') for TensorBoard's add_image.
    """
    _, frames = diffusion.sample(
        model, shape=(3, image_size, image_size), seeds=list(seeds), sampler=sampler,
        steps=steps, y=y, device=torch.device(device), progress=False,
        return_intermediates=True, intermediate_steps=num_columns, ddim_eps=ddim_eps,
    )  # frames: list over time of (B, C, H, W) on the CPU, x_T first, x_0 last
    # Evenly spaced columns over the trajectory, always the noise and the result.
    pick = sorted({round(i * (len(frames) - 1) / max(num_columns - 1, 1)) for i in range(num_columns)})
    cols = torch.stack([frames[i].float() for i in pick], dim=1)  # (B, T', C, H, W)
    b, t = cols.shape[:2]
    # x_t of early steps leaves [-1, 1] (it is mostly noise): clamp for display.
    tiles = to_uint8(cols.reshape(b * t, *cols.shape[2:]).clamp(-1, 1))  # (B*T', C, H, W)
    return make_grid(tiles, nrow=t, padding=padding, pad_value=255)  # (3, H', W') uint8


@torch.no_grad()
def sample_grid(cfg: Config, diffusion, ema_model: nn.Module, monitor: Any, run_dir: Path, step: int,
                nimg: int, device: torch.device) -> None:
    """A fixed-noise grid from the EMA weights, split over ranks, saved as PNG and to TensorBoard."""
    n = cfg.log.sample_count
    mine = list(rank_block(n, du.get_rank(), du.get_world_size()))
    m = cfg.model
    labels = class_labels(mine, m.num_classes)
    imgs = sample_uint8(ema_model, diffusion, mine, image_shape=(m.in_channels, m.image_size, m.image_size),
                        seed=cfg.run.seed, batch_size=max(1, cfg.train.batch_size // du.get_world_size()),
                        sampler=cfg.log.sample_sampler, steps=cfg.log.sample_steps, labels=labels, device=device,
                        ddim_eps=cfg.log.sample_ddim_eps)
    allimgs = du.all_gather_tensor(imgs.to(device)).cpu()
    idx = du.all_gather_tensor(torch.tensor(mine, dtype=torch.long, device=device)).cpu()
    if du.is_main():
        grid = make_grid(allimgs[torch.argsort(idx)])
        out = run_dir / "samples"
        out.mkdir(parents=True, exist_ok=True)
        save_png(grid, out / f"grid-{nimg:012d}.png")
        monitor.image("samples/ema_grid", grid, step)
        # The paper's figure: x_t from noise to image for a few fixed seeds (rank 0; small).
        k = min(4, n)
        strip_labels = class_labels(range(k), m.num_classes)
        strip = denoising_strip(diffusion, ema_model, [image_seed(cfg.run.seed, i) for i in range(k)], m.image_size,
                                sampler=cfg.log.sample_sampler, steps=cfg.log.sample_steps,
                                y=strip_labels.to(device) if strip_labels is not None else None, device=device,
                                ddim_eps=cfg.log.sample_ddim_eps)
        save_png(strip, out / f"denoise-{nimg:012d}.png")
        monitor.image("samples/denoising", strip, step)
        log.info("sample grid written: %s", out / f"grid-{nimg:012d}.png")
