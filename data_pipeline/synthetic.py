"""Synthetic data for the default config: procedural images pushed through the real prepare path.

The trainer makes them on first use into the folder ``data.shards`` names, and writes only where it
may: an absent or empty folder, or its own synthetic shards (marked in their manifest:
``"synthetic": {"images": n, "size": s, "seed": seed}``). Shards it did not make are never touched.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from data_pipeline.config import SetupError
from data_pipeline.storage import is_fault, storage_error

MARK = "synthetic"  # the manifest key that says "the trainer's own synthetic shards"
Outcome = Literal["made", "kept", "foreign"]


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


def _own_mark(out_dir: Path) -> dict | None:
    """The synthetic mark of what the trainer made in out_dir earlier (finished or not), else None."""
    from data_pipeline.prepare.resume import earlier_output

    man, opts = earlier_output(out_dir)
    if opts is not None and MARK in opts:  # the latest run, finished or interrupted
        return opts[MARK]
    if man is None:
        return None
    if MARK in man:
        return man[MARK]
    # Versions before the mark prepared from a temporary ".synthetic-src-*" folder beside out_dir.
    if Path(str(man.get("source", ""))).name.startswith(".synthetic-src-"):
        return {"images": man.get("num_samples"), "size": man.get("image_size"), "seed": None}
    return None


def _complete(out_dir: Path) -> bool:
    """Every shard the manifest lists is in place with its size."""
    from data_pipeline.prepare.resume import own_manifest

    man = own_manifest(out_dir)
    return man is not None and all(
        (out_dir / s["name"]).is_file() and (out_dir / s["name"]).stat().st_size == s["bytes"]
        for s in man.get("shards", [])
    )


def _matches(have: dict, want: dict) -> bool:
    """Same images: count and size equal, and the seed too where it was recorded."""
    return (have.get("images"), have.get("size")) == (want["images"], want["size"]) and (
        have.get("seed") is None or have.get("seed") == want["seed"]
    )


def ensure_synthetic_shards(
    out_dir: str | os.PathLike,
    num_images: int,
    image_size: int,
    seed: int = 0,
    progress: bool = True,
) -> Outcome:
    """Make num_images synthetic images into out_dir unless there already: 'made', 'kept' or 'foreign'.

    'foreign': out_dir holds shards the trainer did not make (a manifest without the synthetic mark,
    or .tar files): nothing is written, the caller trains on them as they are. A non-empty folder
    without shards raises SetupError; other synthetic options rebuild the trainer's own shards.
    """
    if num_images < 1 or image_size < 1:
        raise ValueError("num_images and image_size must be positive")
    out_dir = Path(out_dir)
    want = {"images": num_images, "size": image_size, "seed": seed}
    if out_dir.exists() and not out_dir.is_dir():
        return "foreign"  # a manifest.json or a .tar named directly: someone's shards
    have = _own_mark(out_dir) if out_dir.is_dir() else None
    if have is not None and _matches(have, want) and _complete(out_dir):
        return "kept"
    if have is None and out_dir.is_dir() and any(out_dir.iterdir()):
        if (out_dir / "manifest.json").exists() or any(out_dir.glob("*.tar")):
            return "foreign"
        raise SetupError(
            f"data.shards={out_dir} is a folder that holds files but no shards: synthetic images "
            "go only into a new or empty folder; point data.shards at one (or at your shards)"
        )
    _make(out_dir, want, rebuild=have is not None, progress=progress)
    return "made"


def _make(out_dir: Path, mark: dict, rebuild: bool, progress: bool) -> Path:
    """Generate the images into a temporary folder beside out_dir and prepare them; the real path."""
    from data_pipeline.prepare import prepare

    n, size = mark["images"], mark["size"]
    rng = np.random.default_rng(mark["seed"])
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    src = Path(tempfile.mkdtemp(prefix=".synthetic-src-", dir=out_dir.parent))
    try:
        for i in range(n):
            path = src / f"{i:07d}.png"
            try:
                synthetic_image(rng, size).save(path)
            except OSError as e:  # a full disk here is the same one-line fault as in prepare
                if not is_fault(e):
                    raise
                raise storage_error(e, path, what="synthetic image") from e
        return prepare(
            src,
            out_dir,
            image_size=size,
            # Enough shards for a few ranks x workers even on tiny runs, at most 1000 images each.
            shard_size=max(1, min(1000, n // 16)),
            progress=progress,
            source_type="folder",
            overwrite=rebuild,  # only ever the trainer's own synthetic shards
            extra={MARK: mark},
        )
    finally:
        shutil.rmtree(src, ignore_errors=True)
