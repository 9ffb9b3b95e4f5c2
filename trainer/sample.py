"""Sampling from a run: EMA weights, DDPM or DDIM, split over ranks, PNGs + grid + .npz.

Image k's noise comes from its own seed (``image_seed(seed, k)``), so the set of
images is the same at any world size and batch size.

    torchrun --nproc_per_node=8 -m trainer.sample --run-dir runs/celebahq_256 --num-samples 1000 --sampler ddim --steps 100
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from trainer import distributed as du

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


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Map [-1, 1] float images to uint8 [0, 255] (the usual DDPM quantisation)."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def sample_uint8(model: nn.Module, diffusion, indices: Sequence[int], *, image_shape: tuple[int, int, int],
                 seed: int, batch_size: int, sampler: str = "ddpm", steps: int | None = None,
                 eta: float = 0.0, guidance_scale: float = 1.0, labels: torch.Tensor | None = None,
                 device: torch.device | str = "cpu", progress: bool = False) -> torch.Tensor:
    """Sample the images with the given global indices; returns uint8 (N, C, H, W) on the CPU.

    ``labels`` (N,) are aligned with ``indices``; image k depends only on (seed, k, its label).
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
            eta=eta, guidance_scale=guidance_scale, y=y, device=device,
        )
        out.append(to_uint8(x).cpu())
        if bar is not None:
            bar.update(len(b))
    if bar is not None:
        bar.close()
    if not out:
        return torch.zeros((0, *image_shape), dtype=torch.uint8)
    return torch.cat(out)


def make_grid(images: torch.Tensor, nrow: int | None = None) -> torch.Tensor:
    """(N, C, H, W) uint8 -> one (C, H', W') uint8 grid with a 2-pixel border."""
    from torchvision.utils import make_grid as tv_grid

    nrow = nrow or max(1, int(math.ceil(math.sqrt(images.shape[0]))))
    return tv_grid(images, nrow=nrow, padding=2, pad_value=0)


def save_png(image: torch.Tensor, path: str | Path) -> None:
    """Write one (C, H, W) uint8 image as PNG."""
    from PIL import Image

    arr = image.permute(1, 2, 0).numpy()
    Image.fromarray(arr.squeeze(-1) if arr.shape[-1] == 1 else arr).save(path)


def main(argv: list[str] | None = None) -> int:
    """The ``ddpm-sample`` command."""
    p = argparse.ArgumentParser(description="Sample images from a ddpm-scale run (EMA weights by default).")
    p.add_argument("--run-dir", required=True, help="run directory or checkpoint file")
    p.add_argument("--out", default=None, help="output folder (default: <run>/samples/<sampler>-<steps>-seed<seed>)")
    p.add_argument("--num-samples", type=int, default=64, help="number of images")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: T for ddpm, 50 for ddim)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-per-gpu", type=int, default=64)
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale")
    p.add_argument("--label", type=int, default=None,
                   help="class label for conditional models (default: image k gets class k %% num_classes)")
    p.add_argument("--weights", choices=("ema", "model"), default="ema")
    args = p.parse_args(argv)

    from trainer.checkpoint import load_for_inference
    from trainer.monitor import setup_logging

    info = du.init_distributed()
    setup_logging(info.rank)
    steps = args.steps if args.steps is not None else (50 if args.sampler == "ddim" else None)
    model, diffusion, cfg = load_for_inference(args.run_dir, which=args.weights)
    model.to(info.device)
    diffusion.to(info.device)
    m = cfg["model"]
    shape = (m["in_channels"], m["image_size"], m["image_size"])
    run_dir = Path(args.run_dir) if Path(args.run_dir).is_dir() else Path(args.run_dir).parent.parent
    out = Path(args.out) if args.out else run_dir / "samples" / f"{args.sampler}-{steps or 'T'}-seed{args.seed}"
    out.mkdir(parents=True, exist_ok=True)
    mine = list(rank_block(args.num_samples, info.rank, info.world_size))
    labels = class_labels(mine, m.get("num_classes", 0))
    if labels is not None and args.label is not None:
        labels.fill_(args.label)
    imgs = sample_uint8(model, diffusion, mine, image_shape=shape, seed=args.seed, batch_size=args.batch_per_gpu,
                        sampler=args.sampler, steps=steps, eta=args.eta, guidance_scale=args.guidance,
                        labels=labels, device=info.device, progress=du.is_main())
    for k, img in zip(mine, imgs):
        save_png(img, out / f"{k:06d}.png")
    gathered = du.all_gather_tensor(imgs.to(info.device)).cpu()
    idx = du.all_gather_tensor(torch.tensor(mine, dtype=torch.long, device=info.device)).cpu()
    if du.is_main():
        order = torch.argsort(idx)
        allimgs = gathered[order]
        save_png(make_grid(allimgs[:64]), out / "grid.png")
        np.savez(out / "samples.npz", arr_0=allimgs.permute(0, 2, 3, 1).numpy())
        log.info("wrote %d images, grid.png and samples.npz to %s", len(allimgs), out)
    du.barrier()
    du.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
