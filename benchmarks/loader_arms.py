"""What the loader benchmark measures, one function per arm, and the shards it generates when given none.

Every arm brings the same images to the same ``size`` (decode; resize on the shorter side and
center-crop where an image is not at ``size``; flips; uint8 batches), so their rates compare.
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import timing
from data_pipeline.config import DataConfig
from data_pipeline.images import decode_image, resize_crop
from data_pipeline.loader import build_loader
from data_pipeline.shards import image_part, iter_tar, resolve_shards

IMAGE_PARTS = "jpg;jpeg;png;webp"  # webdataset's names of the parts our loader reads images from


# ----------------------------------------------------------------------------- generated shards


def make_fixed_shards(out_dir: Path, num_images: int, size: int, num_shards: int = 20) -> str:
    """Noisy synthetic images (natural-photo JPEG sizes) at ``size`` px through the real prepare path."""
    from PIL import Image

    from data_pipeline.prepare import prepare
    from data_pipeline.synthetic import synthetic_image

    with tempfile.TemporaryDirectory(prefix="src-", dir=out_dir.parent) as src:
        rng = np.random.default_rng(0)
        for i in range(num_images):
            base = np.asarray(synthetic_image(rng, size)).astype(np.int16)
            noisy = base + rng.integers(-20, 21, base.shape)
            Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(Path(src) / f"{i:06d}.png")
        shard_size = max(1, -(-num_images // num_shards))
        return str(prepare(Path(src), out_dir, image_size=size, shard_size=shard_size, progress=False, workers=2))


def make_varied_shards(out_dir: Path, num_images: int, num_shards: int = 20) -> str:
    """ShardWriter shards (no manifest) of noisy JPEG q90 photos-alike, 200-640 px, any aspect ratio."""
    import webdataset as wds
    from PIL import Image

    from data_pipeline.synthetic import synthetic_image

    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    per = max(1, num_images // num_shards)
    with wds.ShardWriter(str(out_dir / "img-%04d.tar"), maxcount=per, verbose=0) as sink:
        for i in range(per * num_shards):
            w, h = (int(x) for x in rng.integers(200, 641, size=2))
            base = np.asarray(synthetic_image(rng, max(w, h)).resize((w, h))).astype(np.int16)
            noisy = (base + rng.integers(-20, 21, base.shape)).clip(0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(noisy).save(buf, format="JPEG", quality=90)
            sink.write({"__key__": f"{'ab'[i % 2]}/{i:06d}", "jpg": buf.getvalue(), "cls": i % 10})
    return str(out_dir)


# ----------------------------------------------------------------------------- arms


def sample_bytes(urls: list[str], limit: int = 256) -> list[tuple[str, bytes]]:
    """(part, bytes) of the first ``limit`` images of the shards, in shard order."""
    out: list[tuple[str, bytes]] = []
    for url in urls:
        for _, parts in iter_tar(url, lambda *a: None):
            found = image_part(parts)
            if found is not None:
                out.append(found)
            if len(out) >= limit:
                return out
    return out


def ceiling(urls: list[str], size: int, seconds: float, repeats: int) -> dict[str, Any]:
    """One process, one thread, no I/O: decode only, and decode + bring to ``size`` (the loader's per-image work)."""
    datas = sample_bytes(urls)
    if not datas:
        raise timing.UsageError(f"no image (parts {IMAGE_PARTS}) at the start of {urls[0]}")

    def dec() -> int:
        for ext, d in datas:
            decode_image(d, ext)
        return len(datas)

    def dec_to_size() -> int:
        for ext, d in datas:
            img = decode_image(d, ext)
            if img.shape[-2:] != (size, size):
                resize_crop(img, size)
        return len(datas)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = timing.interleave({"decode": lambda: timing.rate(dec, seconds),
                                  "decode_to_size": lambda: timing.rate(dec_to_size, seconds)}, repeats)
    finally:
        torch.set_num_threads(threads)
    at_size = 0
    for ext, d in datas:
        at_size += decode_image(d, ext).shape[-2:] == (size, size)
    return {"images": len(datas), "already_at_size": at_size,
            **{k: {"images_per_s": timing.median(r[0] for r in v), "images_per_cpu_s": timing.median(r[1] for r in v),
                   "runs_images_per_s": [r[0] for r in v]} for k, v in runs.items()}}


def loader_cfg(spec: str, size: int, workers: int, **kw: Any) -> DataConfig:
    """The DataConfig the trainer would use for these shards at this size."""
    return DataConfig(shards=spec, image_size=size, num_workers=workers, hflip=True, prefetch_factor=4, **kw)


def ours(spec: str, size: int, workers: int, batch: int, seconds: float,
         order: str = "global") -> Callable[[], dict[str, Any]]:
    """One measurement of data_pipeline's loader in ``order`` (a fresh one, so each repeat starts its workers)."""

    def run() -> dict[str, Any]:
        lo = build_loader(loader_cfg(spec, size, workers, order=order), batch_size=batch, rank=0, world_size=1,
                          seed=0)
        try:
            return timing.stream_rate(lo, seconds)
        finally:
            lo.close()

    return run


def _rgb(img: Any) -> Any:
    return img.convert("RGB")  # as our loader does: any mode to RGB


def webdataset_pipeline(urls: list[str], size: int, workers: int, batch: int, recipe: str) -> Any:
    """webdataset's own pipeline: decode("pil"), RGB, Resize (bicubic, antialiased) + CenterCrop, flip, batched.

    recipe "uint8": PILToTensor, uint8 batches (the same work as our loader); "float": the usual
    recipe, ToTensor + Normalize to [-1, 1] float32 in the workers.
    """
    import torchvision.transforms as T
    import webdataset as wds

    tail = [T.PILToTensor()] if recipe == "uint8" else [T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)]
    tf = T.Compose([T.Lambda(_rgb), T.Resize(size, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                    T.CenterCrop(size), T.RandomHorizontalFlip(), *tail])
    ds = (
        wds.WebDataset(urls, shardshuffle=False, empty_check=False, nodesplitter=None,
                       handler=wds.ignore_and_continue)
        .repeat()
        .decode("pil", handler=wds.ignore_and_continue)
        .to_tuple(IMAGE_PARTS)
        .map_tuple(tf)
    )
    return torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers)


def theirs(urls: list[str], size: int, workers: int, batch: int, seconds: float,
           recipe: str) -> Callable[[], dict[str, Any]]:
    """One measurement of webdataset's pipeline (fresh workers each time)."""

    def run() -> dict[str, Any]:
        dl = _Tracked(webdataset_pipeline(urls, size, workers, batch, recipe))
        try:
            return timing.stream_rate(dl, seconds)
        finally:
            if hasattr(dl.it, "_shutdown_workers"):
                dl.it._shutdown_workers()  # now, not at garbage collection: the next arm needs the cores

    return run


class _Tracked:
    """A DataLoader that keeps the iterator it hands out, so its workers can be stopped after use."""

    def __init__(self, dl: Any) -> None:
        self.dl, self.it = dl, None

    def __iter__(self) -> Any:
        self.it = iter(self.dl)
        return self.it


def memory(spec: str, size: int, batch: int, seconds: float) -> Callable[[], dict[str, Any]]:
    """The in-memory backend over the same shards (decoded once at build, then random batches)."""
    lo = build_loader(loader_cfg(spec, size, 0, backend="memory"), batch_size=batch, rank=0, world_size=1, seed=0)

    def run() -> dict[str, Any]:
        return timing.stream_rate(lo, seconds)

    return run


def rchar() -> int:
    """Bytes this process has read through read() calls (Linux /proc/self/io)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def startup(spec: str, size: int, ranks: int, workers: int, repeats: int) -> dict[str, Any]:
    """build_loader of rank 0 of ``ranks``: seconds and bytes read; then what counting the samples costs."""
    resolve_shards(spec)  # imports and the directory listing warm, as on a real start-up
    runs = []
    for _ in range(repeats):
        b0, t0 = rchar(), time.perf_counter()
        try:
            lo = build_loader(loader_cfg(spec, size, workers), batch_size=8, rank=0, world_size=ranks, seed=0)
        except ValueError as e:  # too few shards for this many ranks x workers: the finding, not a crash
            return {"ranks": ranks, "workers": workers, "error": str(e)}
        t1, b1 = time.perf_counter(), rchar()
        n = lo.num_samples  # what evaluation asks for: a manifest, or tar headers only
        t2, b2 = time.perf_counter(), rchar()
        lo.close()
        runs.append({"s": t1 - t0, "bytes": b1 - b0, "count_s": t2 - t1, "count_bytes": b2 - b1, "samples": n})
    return {"ranks": ranks, "workers": workers, "samples": runs[0]["samples"],
            **{k: timing.median(r[k] for r in runs) for k in ("s", "bytes", "count_s", "count_bytes")}}


def local_bytes(urls: list[str]) -> int | None:
    """Total size of the shard files (None when some are remote)."""
    if not all(os.path.exists(u) for u in urls):
        return None
    return sum(os.path.getsize(u) for u in urls)
