"""Training benchmark: images/s, the split of step time, peak memory, MFU; EMA fused vs loop.

    python -m trainer.bench --config quickstart --steps 30
    python -m trainer.bench --config celebahq_256 --batch-per-gpu 16 --steps 50        # on a GPU
    python -m trainer.bench --config celebahq_256 --ema-only --repeats 20               # EMA fused vs loop

Uses the trainer's own builders and step functions (one process, real data
pipeline). Phases are timed with a device synchronisation around each, which
the real loop does not do, so the split is exact and images/s slightly pessimistic.
Figures are medians over the timed steps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

# Dense bf16 peak of the GPUs we run on (tensor cores, no sparsity), for MFU.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_tflops(device: torch.device) -> float | None:
    """The dense bf16 peak of this GPU, if known."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, v in PEAK_BF16_TFLOPS.items():
        if key in name:
            return v
    return None


def bench_ema(cfg, repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds of one EMA update, fused (foreach lerp) vs a per-parameter loop, interleaved."""
    from trainer.build import build_model
    from trainer.ema import EMA

    model = build_model(cfg, device)
    ema = EMA(model, cfg.ema.decays)
    shadows = [t.clone() for t in ema.shadows[0]]
    params = ema._sources(model)
    decay = cfg.ema.decays[0]

    @torch.no_grad()
    def loop_update() -> None:
        for s, p in zip(shadows, params):
            s.mul_(decay).add_(p, alpha=1 - decay)

    fused_t, loop_t = [], []
    for _ in range(2):  # warm-up
        ema.update(model)
        loop_update()
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        ema.update(model)
        _sync(device)
        t1 = time.perf_counter()
        loop_update()
        _sync(device)
        t2 = time.perf_counter()
        fused_t.append(t1 - t0)
        loop_t.append(t2 - t1)
    f, lo = statistics.median(fused_t), statistics.median(loop_t)
    n = sum(t.numel() for t in params)
    print(f"EMA update, {len(params)} tensors, {n / 1e6:.1f}M values, {len(cfg.ema.decays)} decay(s), {device}:")
    print(f"  fused foreach lerp   {f * 1e3:8.2f} ms (median of {repeats})")
    print(f"  per-parameter loop   {lo * 1e3:8.2f} ms (median of {repeats})")
    print(f"  speed-up             {lo / f:8.2f}x")
    return {"ema_fused_s": f, "ema_loop_s": lo}


def bench_train(cfg, steps: int, warmup: int, device: torch.device) -> dict[str, float]:
    """Time the trainer's step phases on the real loader; print the figures."""
    from models.diffusion import GaussianDiffusion
    from models.flops import training_flops_per_image
    from trainer.build import (
        build_data,
        build_model,
        build_optimizer,
        parallelize,
        resolve_compile,
        resolve_precision,
    )
    from trainer.config import plan_batches
    from trainer.distributed import DistInfo
    from trainer.ema import EMA
    from trainer.step import forward_backward, memory_gb, optimizer_step

    info = DistInfo(0, 1, 0, device)
    plan = plan_batches(cfg, world_size=1)
    b = plan.batch_per_gpu
    loader = build_data(cfg, plan, info)  # the trainer's own data path (synthetic shards on first use)
    torch.manual_seed(0)
    model = build_model(cfg, device)
    train_model = parallelize(model, cfg, info)
    opt, fused = build_optimizer(model, cfg, device)
    ema = EMA(model, cfg.ema.decays)
    diffusion = GaussianDiffusion(cfg.diffusion).to(device)
    amp = resolve_precision(cfg, device)
    gen = torch.Generator(device=device)
    it = iter(loader)
    phases: dict[str, list[float]] = {"data": [], "fwd+bwd": [], "optimizer": [], "ema": [], "step": []}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        forward_backward(train_model, diffusion, batch, cfg, device, gen, amp, seed=i)
        _sync(device)
        t2 = time.perf_counter()
        optimizer_step(model, opt, fused, cfg.train.grad_clip)
        _sync(device)
        t3 = time.perf_counter()
        ema.update(model)
        _sync(device)
        t4 = time.perf_counter()
        if i >= warmup:
            for k, v in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
                phases[k].append(v)
    loader.close()
    med = {k: statistics.median(v) for k, v in phases.items()}
    ips = b / med["step"]
    flops = training_flops_per_image(cfg.model)
    mem = memory_gb(device)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}, batch per GPU {b}, precision {amp or 'fp32'}, "
          f"compile {resolve_compile(cfg, device)}, {steps} timed steps after {warmup} warm-up")
    print(f"  images/s             {ips:10.1f}")
    print(f"  step time (median)   {med['step'] * 1e3:10.1f} ms")
    for k in ("data", "fwd+bwd", "optimizer", "ema"):
        print(f"    {k:<18} {med[k] * 1e3:10.1f} ms  ({100 * med[k] / med['step']:4.1f}%)")
    print(f"  peak memory          {mem:10.2f} GB")
    print(f"  training FLOPs/img   {flops / 1e9:10.2f} GFLOP")
    peak = peak_tflops(device)
    achieved = flops * ips / 1e12
    print(f"  achieved             {achieved:10.2f} TFLOP/s" + (f"  (MFU {100 * achieved / peak:.1f}% of "
                                                               f"{peak:.0f} bf16)" if peak else ""))
    return {"images_per_s": ips, **{f"{k}_s": v for k, v in med.items()}, "memory_gb": mem}


def main(argv: list[str] | None = None) -> int:
    """The benchmark command line."""
    from trainer.config import load_config
    from trainer.main import find_config

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="quickstart")
    p.add_argument("--batch-per-gpu", type=int, default=0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20, help="EMA timing repeats")
    p.add_argument("--ema-only", action="store_true", help="only the EMA fused-vs-loop comparison")
    p.add_argument("--no-ema", action="store_true", help="skip the EMA comparison")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    cfg = load_config(find_config(args.config), args.overrides)
    if args.batch_per_gpu:
        cfg.train = replace(cfg.train, batch_per_gpu=args.batch_per_gpu)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if not args.ema_only:
        if cfg.data.synthetic_images == 0 and not Path(cfg.data.shards).exists():
            tmp = tempfile.mkdtemp(prefix="ddpm-bench-")
            print(f"{cfg.data.shards} not found: benchmarking on 512 synthetic images in {tmp}")
            cfg.data = replace(cfg.data, shards=tmp, synthetic_images=512)
        bench_train(cfg, args.steps, args.warmup, device)
    if not args.no_ema:
        bench_ema(cfg, args.repeats, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
