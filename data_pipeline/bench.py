"""Loader throughput benchmark: our loader vs the raw decode ceiling vs webdataset's own pipeline.

python -m data_pipeline.bench [--shards DIR|manifest|pattern] --workers N --batch B --seconds S
python -m data_pipeline.bench --varied [--size 64] [--images 640]

Without --shards it generates 256x256 JPEG q95 shards (textured synthetic images, about the
size of natural photos) through the real prepare path. Prints medians over --repeats:
  ceiling   the same JPEG bytes decoded in a tight loop by one process (libjpeg-turbo via
            torchvision.io.decode_jpeg, and PIL for reference)
  loader    data_pipeline's loader, N workers, uint8 batches, flips on: total and per worker
  recipe    wds.WebDataset(...).decode("pil") + torchvision flip/ToTensor/Normalize to [-1, 1], N workers
  memory    the memory backend on 32x32 uint8 data (50,000 images, CPU)

--varied: 20 manifest-less shards written by webdataset's ShardWriter, JPEGs of 200 to 640 px in
any aspect ratio (as img2dataset writes them), brought to --size px by
  ceiling   one process: decode only, and decode + resize_crop (the loader's per-image work)
  loader    our loader's online resize + center crop, flips, uint8 batches, N workers
  webdataset  wds.WebDataset(...).decode("pil") + Resize(bicubic, antialias) + CenterCrop + flip
            + PILToTensor, batched by the DataLoader into uint8: the same work, N workers
and the start-up cost on those shards: build_loader's wall time and bytes read (no manifest), and
what counting their samples costs (tar headers only).
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
from data_pipeline.images import decode_image, resize_crop
from data_pipeline.loader import build_loader
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


def wds_pil_loader(urls: list[str], tf: Callable, workers: int, batch: int):
    """webdataset's own pipeline: endless shards -> decode("pil") -> ``tf`` per image -> DataLoader."""
    import webdataset as wds

    ds = (
        wds.WebDataset(urls, shardshuffle=False, empty_check=False, nodesplitter=None)
        .repeat()
        .decode("pil")
        .to_tuple("jpg")
        .map_tuple(tf)
    )
    return torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers)


def recipe_loader(urls: list[str], workers: int, batch: int):
    """The usual recipe: decode("pil") + torchvision transforms to float tensors."""
    import torchvision.transforms as T

    # flip, to float, to [-1, 1] as DDPM needs (our loader leaves that scaling to the device)
    tf = T.Compose([T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    return wds_pil_loader(urls, tf, workers, batch)


def memory_rate(seconds: float, batch: int) -> tuple[float, float]:
    """Memory backend images/s on a 50,000 x 3 x 32 x 32 uint8 dataset (CPU)."""
    from data_pipeline.memory_backend import MemoryLoader

    images = torch.randint(0, 256, (50_000, 3, 32, 32), dtype=torch.uint8)
    labels = torch.zeros(50_000, dtype=torch.int64)
    cfg = DataConfig(backend="memory", shards="-", hflip=True)
    lo = MemoryLoader(images, labels, cfg, batch_size=batch, rank=0, world_size=1, seed=0)
    return stream_rate(lo, seconds)


def make_varied_shards(out_dir: Path, num_images: int, num_shards: int = 20) -> list[str]:
    """ShardWriter shards (no manifest) of noisy JPEG q90 photos-alike, 200-640 px, any aspect."""
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
    return sorted(str(p) for p in out_dir.glob("*.tar"))


def rchar() -> int:
    """Bytes this process has read through read() calls (Linux /proc/self/io)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def startup_cost(spec: str, size: int, world: int, workers: int) -> dict[str, float]:
    """build_loader on manifest-less shards: seconds and bytes read; then counting their samples."""
    cfg = DataConfig(shards=spec, image_size=size, num_workers=workers)
    resolve_shards(spec)  # imports and the directory listing warm, as on a real start-up
    b0, t0 = rchar(), time.perf_counter()
    lo = build_loader(cfg, batch_size=8, rank=0, world_size=world, seed=0)
    t1, b1 = time.perf_counter(), rchar()
    n = lo.num_samples  # what evaluation asks for: tar headers only
    t2, b2 = time.perf_counter(), rchar()
    return {"s": t1 - t0, "bytes": b1 - b0, "count_s": t2 - t1, "count_bytes": b2 - b1, "n": n}


def wds_resize_pipeline(urls: list[str], size: int, workers: int, batch: int):
    """webdataset's own pipeline doing the loader's work: decode, resize, center-crop, flip, uint8."""
    import torchvision.transforms as T

    tf = T.Compose(
        [
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
            T.CenterCrop(size),
            T.RandomHorizontalFlip(),
            T.PILToTensor(),  # (3, S, S) uint8: the DataLoader stacks them into a uint8 batch
        ]
    )
    return wds_pil_loader(urls, tf, workers, batch)


def varied_main(args: argparse.Namespace) -> int:
    """--varied: online resize + crop of varied JPEGs, ours vs webdataset's, and start-up cost."""
    import logging

    # 200-640 px sources for a 256px target upscale some images; the loader's warnings about it
    # would interleave with the figures.
    logging.getLogger("ddpm.data").setLevel(logging.ERROR)
    tmp = tempfile.TemporaryDirectory(prefix="ddpm-bench-varied-")
    urls = make_varied_shards(Path(tmp.name) / "shards", args.images)
    spec = str(Path(tmp.name) / "shards")
    med = statistics.median
    size = args.size
    datas = []
    for url in urls[:4]:
        datas += [image_part(p)[1] for _, p in iter_tar(url, lambda *a: None)]
    datas = datas[:128]

    def dec() -> int:
        for d in datas:
            decode_image(d)
        return len(datas)

    def dec_resize() -> int:
        for d in datas:
            resize_crop(decode_image(d), size)
        return len(datas)

    torch.set_num_threads(1)
    cd = [rate(dec, args.seconds) for _ in range(args.repeats)]
    cr = [rate(dec_resize, args.seconds) for _ in range(args.repeats)]
    ceil_dec, ceil_dec_cpu = med(x[0] for x in cd), med(x[1] for x in cd)
    ceil_rc, ceil_rc_cpu = med(x[0] for x in cr), med(x[1] for x in cr)
    cfg = DataConfig(shards=spec, image_size=size, num_workers=args.workers, prefetch_factor=4)
    ours, theirs = [], []
    for _ in range(args.repeats):  # interleaved, so both see the same machine load
        lo = build_loader(cfg, batch_size=args.batch, rank=0, world_size=1, seed=0)
        ours.append(stream_rate(lo, args.seconds))
        lo.close()
        theirs.append(
            stream_rate(wds_resize_pipeline(urls, size, args.workers, args.batch), args.seconds)
        )
    start = [startup_cost(spec, size, 8, 2) for _ in range(args.repeats)]
    w = max(1, args.workers)
    o, t = med(r[0] for r in ours), med(r[0] for r in theirs)
    oc, tc = med(r[1] for r in ours), med(r[1] for r in theirs)
    total = sum(os.path.getsize(u) for u in urls)
    print(
        f"shards: {len(urls)} ShardWriter shards, no manifest, {total / 2**20:.1f} MiB, "
        f"JPEG q90 200-640 px -> {size}px"
    )
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(
        f"ceiling (1 process): decode {ceil_dec:6.0f} img/s wall, {ceil_dec_cpu:6.0f} per CPU-s; "
        f"decode + resize_crop {ceil_rc:6.0f} img/s wall, {ceil_rc_cpu:6.0f} per CPU-s"
    )
    for name, wall, cpu in (("loader    ", o, oc), ("webdataset", t, tc)):
        print(
            f"{name} {w} workers: {wall:6.0f} img/s total, {wall / w:6.0f} per worker (wall) = "
            f"{wall / w / ceil_dec:4.0%} of the decode ceiling; {cpu:6.0f} img per worker CPU-s = "
            f"{cpu / ceil_dec_cpu:4.0%} of decode, {cpu / ceil_rc_cpu:4.0%} of decode + resize_crop"
        )
    print(f"loader / webdataset: {o / t:4.2f}x (wall), {oc / tc:4.2f}x (CPU)")
    print(
        "runs (img/s wall): loader "
        + ", ".join(f"{x[0]:.0f}" for x in ours)
        + " | webdataset "
        + ", ".join(f"{x[0]:.0f}" for x in theirs)
    )
    print(
        f"start-up, 8 ranks x 2 workers on {len(urls)} manifest-less shards: "
        f"{med(x['s'] for x in start) * 1e3:.1f} ms, {med(x['bytes'] for x in start):.0f} bytes read; "
        f"counting {start[0]['n']} samples (tar headers only): "
        f"{med(x['count_s'] for x in start) * 1e3:.1f} ms, {med(x['count_bytes'] for x in start):.0f} "
        f"bytes of {total}"
    )
    tmp.cleanup()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the figures."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", default="", help="manifest / folder / pattern (default: generate)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--batch", type=int, default=64, help="batch size")
    p.add_argument("--seconds", type=float, default=5.0, help="seconds per measurement")
    p.add_argument("--repeats", type=int, default=3, help="repeats (median reported)")
    p.add_argument("--images", type=int, default=1024, help="generated images (without --shards)")
    p.add_argument("--size", type=int, default=256, help="generated image size (--varied: target)")
    p.add_argument(
        "--varied", action="store_true", help="varied-size JPEG shards, online resize + crop"
    )
    args = p.parse_args(argv)
    if args.varied:
        return varied_main(args)

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
