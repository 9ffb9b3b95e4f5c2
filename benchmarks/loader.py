"""Loader benchmark: will the loader keep your GPUs fed on your data?

    python -m benchmarks.loader --shards /data/mine --size 256 --workers 8            # your shards, 8 workers
    python -m benchmarks.loader --shards 'part-{000000..000099}.tar' --size 256 --workers 8 --gpu-rate 900
    python -m benchmarks.loader --varied --size 64 --workers 2      # generated mixed-size shards (no manifest)
    python -m benchmarks.loader --workers 1 --arms ceiling,loader,recipe              # generated 256px shards

--shards takes what data.shards takes (a folder, manifest.json, brace pattern, pipe:, http(s)://);
--size is the model's image size (default: the manifest's, else the first image's, as the
trainer's data.image_size=0). Images not at --size are resized on the shorter side and
center-cropped, as in training. Without --shards the benchmark generates 20 shards: prepared
JPEG q95 images at --size (default 256), or with --varied manifest-less ShardWriter shards of JPEG
q90 images of 200 to 640 px in any aspect ratio, as img2dataset writes them.

Arms (--arms, comma-separated; default ceiling,loader,webdataset,startup), medians of --repeats
interleaved runs of --seconds each:
  ceiling     one process, one thread, no I/O: decode only, and decode + bring to --size
  loader      data_pipeline's loader for one rank in its default global order (samples read by byte
              range, the same global batches on any cluster): --workers workers, uint8 batches of
              --batch, flips
  streaming   the same loader in the streaming order (data.order=streaming: per-worker shard streams,
              the order of pipe: sources and of the loader before the global order)
  webdataset  webdataset's own pipeline doing the same work: decode("pil"), Resize + CenterCrop,
              flip, PILToTensor, batched into uint8 by the DataLoader, --workers workers
  recipe      the usual recipe: as webdataset, but ToTensor + Normalize to [-1, 1] float in the workers
  memory      the in-memory backend (data.backend=memory) over the same shards, decoded once at start
  startup     build_loader for rank 0 of --gpus ranks x --workers workers: time and bytes read, then
              what counting the samples costs (tar headers only, without a manifest)

The verdict: one loader worker's images per CPU-second, so how many cores each GPU needs; with
--gpu-rate (the images/s one GPU trains at: benchmarks.trainer or the GPU check's `step`) whether
--workers workers per rank keep --gpus GPUs fed, and how many cores that takes.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import loader_arms as arms
from benchmarks import timing
from benchmarks.timing import UsageError

MODULE = "benchmarks.loader"
ARMS = ("ceiling", "loader", "streaming", "webdataset", "recipe", "memory", "startup")
STREAMS = ("loader", "streaming", "webdataset", "recipe", "memory")


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, set[str]]:
    """The command line, and which options were given explicitly."""
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", default="", help="your shards: folder, manifest.json, brace pattern, pipe:, URL "
                   "(default: generate)")
    p.add_argument("--size", type=int, default=0, help="the model's image size (default: the manifest's, else the "
                   "first image's; generated shards: 256)")
    p.add_argument("--workers", type=int, default=2, help="loader workers per rank (data.num_workers; default 2)")
    p.add_argument("--batch", type=int, default=64, help="images per batch (default 64)")
    p.add_argument("--seconds", type=float, default=5.0, help="seconds per measurement (default 5)")
    p.add_argument("--arms", default="ceiling,loader,webdataset,startup", help=f"comma-separated: {', '.join(ARMS)}")
    p.add_argument("--gpus", type=int, default=8, help="GPUs (ranks) to feed: start-up and verdict (default 8)")
    p.add_argument("--gpu-rate", type=float, default=0.0, metavar="IMG_PER_S",
                   help="images/s one GPU's training step consumes: says whether --workers keep it fed")
    p.add_argument("--varied", action="store_true", help="generate mixed-size manifest-less shards (no --shards)")
    p.add_argument("--images", type=int, default=1024, help="generated images (no --shards; default 1024)")
    timing.add_common_args(p, repeats=3)
    args = p.parse_args(argv)
    return args, timing.explicit(p, argv)


def check(args: argparse.Namespace, given: set[str]) -> list[str]:
    """Refuse what cannot be honoured; the arms to run."""
    timing.check_common_args(args)
    chosen = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(chosen) - set(ARMS))
    if unknown or not chosen:
        raise UsageError(f"--arms: expected a comma-separated subset of {', '.join(ARMS)}, got {args.arms!r}")
    if args.shards:
        timing.refuse_unused(given, ["varied", "images"], "with --shards: your shards are measured as they are "
                             "(--varied and --images shape generated shards)")
    if not {"loader", "streaming", "webdataset", "recipe", "startup"} & set(chosen):
        timing.refuse_unused(given, ["workers"], f"with --arms {args.arms} (no arm starts workers)")
    if not set(STREAMS) & set(chosen):
        timing.refuse_unused(given, ["batch"], f"with --arms {args.arms} (no arm makes batches)")
    if chosen == ["startup"]:
        timing.refuse_unused(given, ["seconds"], "with --arms startup (it times one build per repeat)")
    for name in ("workers", "batch", "gpus", "size", "images"):
        if getattr(args, name) < (0 if name == "size" else 1):
            raise UsageError(f"--{name} must be >= {0 if name == 'size' else 1}, got {getattr(args, name)}")
    if "gpu_rate" in given and "loader" not in chosen:
        raise UsageError("--gpu-rate is judged against the loader arm: add loader to --arms")
    if "gpus" in given and not {"loader", "startup"} & set(chosen):
        raise UsageError("--gpus sizes the startup arm and the loader's verdict: add one of them to --arms")
    if args.seconds <= 0 or args.gpu_rate < 0:
        raise UsageError("--seconds must be > 0 and --gpu-rate >= 0")
    return chosen


def resolve(args: argparse.Namespace, scratch: Path) -> tuple[str, Any, int, str]:
    """(shard spec, resolved shards, image size, 'given' | 'generated'); set-up mistakes are UsageErrors."""
    from data_pipeline.loader import build_loader
    from data_pipeline.shards import resolve_shards

    source = "given" if args.shards else "generated"
    if args.shards:
        spec = args.shards
    elif args.varied:
        spec = arms.make_varied_shards(scratch / "shards", args.images)
    else:
        spec = arms.make_fixed_shards(scratch / "shards", args.images, args.size or 256)
    size = args.size or (0 if args.shards else 256)  # given shards: the trainer's own choice (data.image_size=0)
    try:
        shards = resolve_shards(spec)
        # Built and closed at once: validates the shards against --workers and decides the size as
        # the trainer would (no worker starts, no sample is read beyond one image's header).
        probe = build_loader(arms.loader_cfg(spec, size, args.workers), batch_size=args.batch, rank=0,
                             world_size=1, seed=0)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"shards: {e}") from None
    probe.close()
    return spec, shards, probe.image_size, source


def verdict(args: argparse.Namespace, results: dict[str, Any]) -> dict[str, Any]:
    """Cores per GPU at the loader's per-worker CPU rate; with --gpu-rate, fed or not."""
    lo = results.get("loader")
    if not lo:
        return {}
    w = max(1, args.workers)
    per_worker_cpu = lo["images_per_cpu_s"]
    out: dict[str, Any] = {"images_per_s_per_rank": lo["images_per_s"], "images_per_s_per_worker": lo["images_per_s"] / w,
                           "images_per_worker_cpu_s": per_worker_cpu, "gpus": args.gpus, "cpu_count": os.cpu_count()}
    print(f"verdict: one rank with {w} workers delivered {lo['images_per_s']:.0f} img/s here; one worker makes "
          f"{per_worker_cpu:.0f} images per CPU-second")
    if args.gpu_rate:
        cores = args.gpu_rate / per_worker_cpu
        fed = lo["images_per_s"] >= args.gpu_rate
        out.update(gpu_rate=args.gpu_rate, cores_per_gpu=cores, cores_for_all_gpus=cores * args.gpus,
                   workers_per_gpu_needed=math.ceil(cores), fed_with_these_workers=fed)
        print(f"  at {args.gpu_rate:.0f} img/s per GPU each GPU needs {cores:.1f} busy cores of loader workers "
              f"({math.ceil(cores)} worker(s)), {args.gpus} GPUs {cores * args.gpus:.1f} cores; this machine has "
              f"{os.cpu_count()}")
        print(f"  with --workers {w}: {'fed' if fed else 'NOT fed'} ({lo['images_per_s']:.0f} vs {args.gpu_rate:.0f} "
              f"img/s{'' if fed else '; the step would wait for data'})")
    else:
        print(f"  each 1,000 img/s a GPU trains at needs {1000 / per_worker_cpu:.1f} cores of loader workers "
              f"(give --gpu-rate IMG_PER_S for a verdict)")
    return out


def run(args: argparse.Namespace, chosen: list[str], argv: Sequence[str] | None) -> int:
    """Measure the chosen arms and print the figures."""
    # Sources smaller than --size are upscaled; the loader's warnings would interleave with the figures.
    logging.getLogger("ddpm.data").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="ddpm-bench-loader-") as tmp:
        spec, shards, size, source = resolve(args, Path(tmp))
        urls, total = shards.urls, arms.local_bytes(shards.urls)
        print(f"shards ({source}): {spec}: {len(urls)} shards"
              + (f", {total / 2**20:.1f} MiB" if total is not None else "")
              + (", manifest" if shards.manifest is not None else ", no manifest")
              + f" -> {size}px, {args.workers} workers, batch {args.batch}, {args.repeats} x {args.seconds:g} s"
              + (" (the memory arm reads in-process)" if "memory" in chosen else ""))
        results: dict[str, Any] = {"shards": {"source": source, "spec": spec, "count": len(urls), "urls": urls[:3],
                                              "bytes": total, "manifest": shards.manifest is not None},
                                   "size": size}
        if "ceiling" in chosen:
            c = results["ceiling"] = arms.ceiling(urls, size, args.seconds, args.repeats)
            print(f"ceiling (1 process, {c['images']} images, {c['already_at_size']} at {size}px): decode "
                  f"{c['decode']['images_per_s']:6.0f} img/s wall, {c['decode']['images_per_cpu_s']:6.0f} per CPU-s; "
                  f"decode + to {size}px {c['decode_to_size']['images_per_s']:6.0f} img/s wall, "
                  f"{c['decode_to_size']['images_per_cpu_s']:6.0f} per CPU-s")
        streams = {}
        for name in (a for a in STREAMS if a in chosen):
            if name in ("loader", "streaming"):
                streams[name] = arms.ours(spec, size, args.workers, args.batch, args.seconds,
                                          "global" if name == "loader" else "streaming")
            elif name == "memory":
                streams[name] = arms.memory(spec, size, args.batch, args.seconds)
            else:
                streams[name] = arms.theirs(urls, size, args.workers, args.batch, args.seconds,
                                            "uint8" if name == "webdataset" else "float")
        runs = timing.interleave(streams, args.repeats)  # interleaved: every arm sees the same machine load
        ceil = results.get("ceiling", {}).get("decode_to_size")
        for name, rs in runs.items():
            r = results[name] = {"images_per_s": timing.median(x["images_per_s"] for x in rs),
                                 "images_per_cpu_s": timing.median(x["images_per_cpu_s"] for x in rs),
                                 "runs_images_per_s": [x["images_per_s"] for x in rs],
                                 "batch_shape": rs[0]["batch_shape"], "dtype": rs[0]["dtype"],
                                 "processes": rs[0]["processes"]}
            per = f"{r['images_per_s'] / r['processes']:6.0f} per worker, " if name != "memory" else ""
            share = (f" = {r['images_per_cpu_s'] / ceil['images_per_cpu_s']:4.0%} of the ceiling's"
                     if ceil and name != "memory" else "")
            print(f"{name:<10} {r['images_per_s']:8.0f} img/s wall ({per}{r['images_per_cpu_s']:6.0f} img per "
                  f"{'worker ' if name != 'memory' else ''}CPU-s{share}); batches {r['dtype']} {r['batch_shape']}; "
                  f"runs {', '.join(f'{x:.0f}' for x in r['runs_images_per_s'])}")
        for other in ("streaming", "webdataset", "recipe"):
            if "loader" in results and other in results:
                lo, ot = results["loader"], results[other]
                results[f"loader_over_{other}"] = {"wall": lo["images_per_s"] / ot["images_per_s"],
                                                   "cpu": lo["images_per_cpu_s"] / ot["images_per_cpu_s"]}
                print(f"loader / {other}: {results[f'loader_over_{other}']['wall']:4.2f}x (wall), "
                      f"{results[f'loader_over_{other}']['cpu']:4.2f}x (CPU)")
        if "startup" in chosen:
            s = results["startup"] = arms.startup(spec, size, args.gpus, args.workers, args.repeats)
            if "error" in s:
                print(f"startup, {args.gpus} ranks x {args.workers} workers: {s['error']}")
            else:
                print(f"startup, {args.gpus} ranks x {args.workers} workers: {s['s'] * 1e3:.1f} ms, {s['bytes']:.0f} "
                      f"bytes read; counting {s['samples']} samples: {s['count_s'] * 1e3:.1f} ms, "
                      f"{s['count_bytes']:.0f} bytes" + (f" of {total}" if total else ""))
        print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        results["verdict"] = verdict(args, results)
    timing.finish(MODULE, argv, args, results)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 2 with one line on stderr for a set-up mistake."""
    args, given = parse_args(argv)
    return timing.run_cli(MODULE, lambda: run(args, check(args, given), argv))


if __name__ == "__main__":
    sys.exit(main())
