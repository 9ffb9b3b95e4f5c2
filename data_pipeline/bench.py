"""Loader throughput benchmark: our loader vs the raw decode ceiling vs the usual webdataset recipe.

python -m data_pipeline.bench [--shards DIR|manifest|pattern] --workers N --batch B --seconds S

Without --shards it generates 256x256 JPEG q95 shards (textured synthetic images, about the
size of natural photos) through the real prepare path. Prints medians over --repeats:
  ceiling   the same JPEG bytes decoded in a tight loop by one process (libjpeg-turbo via
            torchvision.io.decode_jpeg, and PIL for reference)
  loader    data_pipeline's loader, N workers, uint8 batches, flips on: total and per worker
  recipe    wds.WebDataset(...).decode("pil") + torchvision flip/ToTensor/Normalize to [-1, 1], N workers
  memory    the memory backend on 32x32 uint8 data (50,000 images, CPU)
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from data_pipeline.config import DataConfig
from data_pipeline.loader import build_loader, decode_image
from data_pipeline.shards import image_part, iter_tar, resolve_shards


def make_bench_shards(out_dir: Path, num_images: int, size: int, shard_size: int) -> Path:
    """Textured synthetic images (flat shapes + noise, ~natural JPEG sizes) prepared into shards."""
    from PIL import Image

    from data_pipeline.prepare import prepare
    from data_pipeline.synthetic import synthetic_image

    src = out_dir.parent / "bench-src"
    src.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(num_images):
        base = np.asarray(synthetic_image(rng, size)).astype(np.int16)
        noisy = base + rng.integers(-20, 21, base.shape)
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(src / f"{i:06d}.png")
    return prepare(src, out_dir, image_size=size, shard_size=shard_size, progress=False, workers=2)


def rate(fn: Callable[[], int], seconds: float) -> tuple[float, float]:
    """(items per wall second, items per CPU second) of repeated fn() calls in this process."""
    fn()  # warm-up
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        n += fn()
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of processes (Linux /proc): a shared machine's fair clock."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def worker_pids(it) -> list[int]:
    """Worker process ids of a DataLoader iterator (empty in-process)."""
    return [w.pid for w in getattr(it, "_workers", [])]


def stream_rate(batches: Iterable, seconds: float, warmup: int = 3) -> tuple[float, float]:
    """(images per wall second, images per worker CPU second) after `warmup` batches."""
    it = iter(batches)
    for _ in range(warmup):  # worker start-up and first shard opens are not throughput
        next(it)
    inner = getattr(batches, "_active", None)  # our Loader keeps its DataLoader iterator
    if inner is None:
        inner = it
    pids = worker_pids(inner)
    n, t0, c0 = 0, time.perf_counter(), cpu_seconds(pids)
    while time.perf_counter() - t0 < seconds:
        b = next(it)
        n += len(b["image"] if isinstance(b, dict) else b[0])
    wall, cpu = time.perf_counter() - t0, cpu_seconds(pids) - c0
    return n / wall, (n / cpu if cpu > 0 else float("nan"))


def ceiling(urls: list[str], seconds: float) -> dict[str, tuple[float, float]]:
    """Tight-loop decode rates of the same JPEG bytes in this process (one thread)."""
    from PIL import Image

    datas = []
    for url in urls[:4]:
        datas += [image_part(p)[1] for _, p in iter_tar(url, lambda *a: None)]
    datas = datas[:256]

    def tv() -> int:
        for d in datas:
            decode_image(d, "jpg")
        return len(datas)

    def pil() -> int:
        for d in datas:
            np.asarray(Image.open(io.BytesIO(d)).convert("RGB"))
        return len(datas)

    torch.set_num_threads(1)
    return {"decode_jpeg": rate(tv, seconds), "pil": rate(pil, seconds)}


def recipe_loader(urls: list[str], workers: int, batch: int):
    """The usual recipe: decode("pil") + torchvision transforms to float tensors."""
    import torchvision.transforms as T
    import webdataset as wds

    # flip, to float, to [-1, 1] as DDPM needs (our loader leaves that scaling to the device)
    tf = T.Compose([T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    ds = (
        wds.WebDataset(urls, shardshuffle=False, empty_check=False, nodesplitter=None)
        .repeat()
        .decode("pil")
        .to_tuple("jpg")
        .map_tuple(tf)
    )
    return torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers)


def memory_rate(seconds: float, batch: int) -> tuple[float, float]:
    """Memory backend images/s on a 50,000 x 3 x 32 x 32 uint8 dataset (CPU)."""
    from data_pipeline.memory_backend import MemoryLoader

    images = torch.randint(0, 256, (50_000, 3, 32, 32), dtype=torch.uint8)
    labels = torch.zeros(50_000, dtype=torch.int64)
    cfg = DataConfig(backend="memory", shards="-", hflip=True)
    lo = MemoryLoader(images, labels, cfg, batch_size=batch, rank=0, world_size=1, seed=0)
    return stream_rate(lo, seconds)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the figures."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", default="", help="manifest / folder / pattern (default: generate)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--batch", type=int, default=64, help="batch size")
    p.add_argument("--seconds", type=float, default=5.0, help="seconds per measurement")
    p.add_argument("--repeats", type=int, default=3, help="repeats (median reported)")
    p.add_argument("--images", type=int, default=1024, help="generated images (without --shards)")
    p.add_argument("--size", type=int, default=256, help="generated image size")
    args = p.parse_args(argv)

    tmp = None
    spec = args.shards
    if not spec:
        tmp = tempfile.TemporaryDirectory(prefix="ddpm-bench-")
        spec = str(make_bench_shards(Path(tmp.name) / "shards", args.images, args.size, 64))
    shards = resolve_shards(spec)
    med = statistics.median
    ceil = [ceiling(shards.urls, args.seconds) for _ in range(args.repeats)]
    ceil_tv = med(c["decode_jpeg"][0] for c in ceil)
    ceil_tv_cpu = med(c["decode_jpeg"][1] for c in ceil)
    ceil_pil = med(c["pil"][0] for c in ceil)

    cfg = DataConfig(shards=spec, num_workers=args.workers, hflip=True, prefetch_factor=4)
    ours = []
    for _ in range(args.repeats):
        lo = build_loader(cfg, batch_size=args.batch, rank=0, world_size=1, seed=0)
        ours.append(stream_rate(lo, args.seconds))
        lo.close()
    recipe = []
    for _ in range(args.repeats):
        recipe.append(
            stream_rate(recipe_loader(shards.urls, args.workers, args.batch), args.seconds)
        )
    mem = med(memory_rate(args.seconds, 128)[0] for _ in range(args.repeats))

    w = max(1, args.workers)
    ours_m, recipe_m = med(r[0] for r in ours), med(r[0] for r in recipe)
    ours_cpu, recipe_cpu = med(r[1] for r in ours), med(r[1] for r in recipe)
    size = shards.image_size or "?"
    print(
        f"shards: {len(shards.urls)} x ~{shards.num_samples // len(shards.urls)} images, {size}px"
    )
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(
        f"decode ceiling (1 process): decode_jpeg {ceil_tv:7.0f} img/s wall, {ceil_tv_cpu:7.0f} "
        f"img per CPU-s;  PIL {ceil_pil:7.0f} img/s wall"
    )
    print(
        f"loader   {w} workers: {ours_m:7.0f} img/s total, {ours_m / w:7.0f} per worker (wall) "
        f"= {ours_m / w / ceil_tv:4.0%} of the ceiling; {ours_cpu:7.0f} img per worker CPU-s "
        f"= {ours_cpu / ceil_tv_cpu:4.0%} of the ceiling's"
    )
    print(
        f"recipe   {w} workers: {recipe_m:7.0f} img/s total, {recipe_m / w:7.0f} per worker (wall); "
        f"{recipe_cpu:7.0f} img per worker CPU-s -> loader is {ours_m / recipe_m:4.1f}x (wall), "
        f"{ours_cpu / recipe_cpu:4.1f}x (CPU) the usual recipe"
    )
    print(f"memory backend 32x32 (CPU, batch 128): {mem:8.0f} img/s")
    print(
        "runs (img/s wall): loader "
        + ", ".join(f"{x[0]:.0f}" for x in ours)
        + " | recipe "
        + ", ".join(f"{x[0]:.0f}" for x in recipe)
    )
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
