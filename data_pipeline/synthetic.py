"""Synthetic data for the default config: procedural images pushed through the real prepare path."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image


def synthetic_image(rng: np.random.Generator, size: int) -> Image.Image:
    """A colourful gradient with one or two flat shapes: structure a tiny UNet learns in minutes."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    c0, c1 = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    t = (np.cos(angle) * xs + np.sin(angle) * ys + 1.5) / 3  # (H, W) in [0, 1]
    arr = c0 * (1 - t[..., None]) + c1 * t[..., None]  # (H, W, 3)
    for _ in range(rng.integers(1, 3)):
        colour = rng.uniform(0, 255, size=3)
        cx, cy = rng.uniform(0.2, 0.8, size=2) * size
        r = rng.uniform(0.12, 0.3) * size
        if rng.random() < 0.5:  # disc
            mask = (xs * (size - 1) - cx) ** 2 + (ys * (size - 1) - cy) ** 2 <= r * r
        else:  # square
            mask = (np.abs(xs * (size - 1) - cx) <= r) & (np.abs(ys * (size - 1) - cy) <= r)
        arr[mask] = colour
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB")


def ensure_synthetic_shards(
    out_dir: str | os.PathLike,
    num_images: int,
    image_size: int,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Make num_images synthetic images and prepare them into out_dir (idempotent); returns the manifest."""
    out_dir = Path(out_dir)
    manifest = out_dir / "manifest.json"
    if manifest.exists():
        man = json.loads(manifest.read_text())
        if man.get("image_size") == image_size and man.get("num_samples") == num_images:
            return manifest
    if num_images < 1 or image_size < 1:
        raise ValueError("num_images and image_size must be positive")
    rng = np.random.default_rng(seed)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    src = Path(tempfile.mkdtemp(prefix=".synthetic-src-", dir=out_dir.parent))
    try:
        for i in range(num_images):
            synthetic_image(rng, image_size).save(src / f"{i:07d}.png")
        # Enough shards for a few ranks x workers even on tiny runs, at most 1000 images each.
        shard_size = max(1, min(1000, num_images // 16))
        return prepare_synthetic(src, out_dir, image_size, shard_size, progress)
    finally:
        shutil.rmtree(src, ignore_errors=True)


def prepare_synthetic(
    src: Path, out_dir: Path, image_size: int, shard_size: int, progress: bool
) -> Path:
    """The same prepare path as real data (JPEG q95 shards + manifest)."""
    from data_pipeline.prepare import prepare

    return prepare(
        src,
        out_dir,
        image_size=image_size,
        shard_size=shard_size,
        progress=progress,
        source_type="folder",
        overwrite=True,  # other size or count than an earlier synthetic set: rebuild it
    )
