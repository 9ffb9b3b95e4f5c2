"""Training benchmark: images/s, the split of step time, peak memory, MFU; EMA, input layout, DDP hand-off.

    python -m benchmarks.trainer --config quickstart --repeats 30                 # step + EMA on the preset's data
    python -m benchmarks.trainer --config celebahq_256 --shards /data/mine --batch-per-gpu 16 --repeats 50
    python -m benchmarks.trainer --config celebahq_256 --measure ema              # EMA fused vs per-tensor loop
    python -m benchmarks.trainer --config quickstart --measure layout --threads 1 # CPU step input layout
    python -m benchmarks.trainer --config celebahq_256 --measure grad_handoff     # DDP's gradient hand-off
    python -m benchmarks.trainer --config celebahq_256 --measure draws --batch-per-gpu 16  # per-sample draws

Measurements (--measure, comma-separated; default step,ema):
  step          the trainer's own step on its own loader (the config's shards, --shards, or --synthetic
                N generated images): data wait, fwd+bwd, optimizer, EMA, each between device syncs
                (which the real loop does not do: the split is exact, images/s slightly pessimistic)
  ema           one EMA update: the trainer's fused foreach lerp vs a per-tensor loop, interleaved
  layout        fwd+bwd with the input contiguous vs channels_last, same model, interleaved
  grad_handoff  DDP's gradient hand-off for as many gradients as the model has: copied into the
                bucket with the 1/world division (the trainer: grads set to None) vs kept in the
                bucket (zero, accumulate, divide), interleaved
  draws         what drawing t and eps per sample from (seed, global sample index) costs (the
                trainer's DiffusionLoss.draws: the same draws on any cluster) against one batched draw
                from a per-rank generator (the trainer before), next to one fwd+bwd, interleaved
Figures are medians over --repeats after --warmup; comparisons give the ratio to the first arm.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch

from benchmarks import timing
from benchmarks.timing import UsageError
from benchmarks.trainer_internals import (
    StepRig,
    build_data,
    build_model,
    ema_tensors,
    load_cfg,
    make_ema,
    memory_gb,
    with_section,
)

MODULE = "benchmarks.trainer"
MEASURES = ("step", "ema", "layout", "grad_handoff", "draws")
# Dense bf16 peak of the GPUs we run on (tensor cores, no sparsity), for MFU.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def peak_tflops(device: torch.device) -> float | None:
    """The dense bf16 peak of this GPU, if known."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, v in PEAK_BF16_TFLOPS.items():
        if key in name:
            return v
    return None


def random_batch(cfg: Any, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A uint8 batch as the loader hands it over: channels_last, pinned where a GPU takes it."""
    s, c = cfg.model.image_size, cfg.model.in_channels
    x = torch.randint(0, 256, (batch, c, s, s), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    out = {"image": x.pin_memory() if device.type == "cuda" else x}
    if cfg.model.num_classes > 0:
        out["label"] = torch.randint(0, cfg.model.num_classes, (batch,))
    return out


def bench_step(cfg: Any, repeats: int, warmup: int, device: torch.device) -> dict[str, Any]:
    """The trainer's step phases on its own loader, accumulation included; print and return the figures."""
    from models.flops import training_flops_per_image

    loader, b = build_data(cfg, device)
    accum = cfg.train.batch_size // b
    torch.manual_seed(0)
    rig = StepRig(cfg, device)
    phases: dict[str, list[float]] = {"data": [], "fwd_bwd": [], "optimizer": [], "ema": [], "step": []}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    it = iter(loader)
    try:
        for i in range(warmup + repeats):
            data = fwd = 0.0
            for _ in range(accum):  # the micro-batches of one optimizer step
                t0 = time.perf_counter()
                batch = next(it)
                t1 = time.perf_counter()
                fwd += timing.timed(lambda batch=batch: rig.forward_backward(batch), device)
                data += t1 - t0
            opt = timing.timed(rig.optimizer_step, device)
            ema = timing.timed(rig.ema_update, device)
            if i >= warmup:
                for k, v in zip(phases, (data, fwd, opt, ema, data + fwd + opt + ema)):
                    phases[k].append(v)
    finally:
        loader.close()
    med = {k: timing.median(v) for k, v in phases.items()}
    ips = cfg.train.batch_size / med["step"]
    flops = training_flops_per_image(cfg.model)
    peak = peak_tflops(device)
    achieved = flops * ips / 1e12
    out = {"batch_per_gpu": b, "accum_steps": accum, "precision": str(rig.amp or "fp32").replace("torch.", ""),
           "compiled": rig.compiled, "shards": cfg.data.shards, "images_per_s": ips,
           "step_ms": med["step"] * 1e3, "split_ms": {k: med[k] * 1e3 for k in list(phases)[:4]},
           "split_pct": {k: 100 * med[k] / med["step"] for k in list(phases)[:4]},
           "peak_memory_gb": memory_gb(device), "training_gflop_per_image": flops / 1e9,
           "achieved_tflops": achieved, "mfu_pct": 100 * achieved / peak if peak else None}
    print(f"step: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"data {cfg.data.shards}, batch per GPU {b} x {accum} micro-batches, precision {out['precision']}, "
          f"compile {rig.compiled}, {repeats} timed steps after {warmup}")
    print(f"  images/s             {ips:10.1f}")
    print(f"  step time (median)   {med['step'] * 1e3:10.1f} ms")
    for k in list(phases)[:4]:
        print(f"    {k:<18} {med[k] * 1e3:10.1f} ms  ({out['split_pct'][k]:4.1f}%)")
    print(f"  peak memory          {out['peak_memory_gb']:10.2f} GB")
    print(f"  training FLOPs/img   {flops / 1e9:10.2f} GFLOP")
    print(f"  achieved             {achieved:10.2f} TFLOP/s"
          + (f"  (MFU {out['mfu_pct']:.1f}% of {peak:.0f} bf16)" if peak else ""))
    return out


def bench_ema(cfg: Any, repeats: int, warmup: int, device: torch.device) -> dict[str, Any]:
    """One EMA update, the trainer's fused foreach lerp vs a per-tensor loop, interleaved."""
    model = build_model(cfg, device)
    rig_ema = make_ema(model, cfg.ema.decays)
    shadows, params = ema_tensors(rig_ema, model)
    shadows = [t.clone() for t in shadows]
    decay = cfg.ema.decays[0]

    @torch.no_grad()
    def loop_update() -> None:
        for s, p in zip(shadows, params):
            s.mul_(decay).add_(p, alpha=1 - decay)

    runs = timing.time_arms({"fused": lambda: rig_ema.update(model), "loop": loop_update},
                            repeats, max(warmup, 1), device)
    s = timing.summarize(runs)
    n = sum(t.numel() for t in params)
    print(f"ema: {len(params)} tensors, {n / 1e6:.1f}M values, {len(cfg.ema.decays)} decay(s), {device}, "
          f"median of {repeats}")
    print(f"  fused foreach lerp   {s['fused']['median'] * 1e3:8.2f} ms")
    print(f"  per-tensor loop      {s['loop']['median'] * 1e3:8.2f} ms  ({s['loop']['ratio']:.2f}x the fused time)")
    return {"values": n, "tensors": len(params), "ms": {k: v["median"] * 1e3 for k, v in s.items()},
            "loop_over_fused": s["loop"]["ratio"], "runs_s": runs}


def bench_layout(cfg: Any, batch: int, repeats: int, warmup: int, device: torch.device) -> dict[str, Any]:
    """fwd+bwd of the trainer's step with the input contiguous vs channels_last; the model as the trainer builds it."""
    torch.manual_seed(0)
    rig = StepRig(cfg, device)
    losses = {"contiguous": rig.make_loss(torch.contiguous_format),
              "channels_last": rig.make_loss(torch.channels_last)}
    data = random_batch(cfg, batch, device)

    def arm(loss: Any) -> Any:
        def run() -> None:
            rig.forward_backward(data, loss=loss)
            rig.optimizer.zero_grad(set_to_none=True)
        return run

    runs = timing.time_arms({k: arm(v) for k, v in losses.items()}, repeats, max(warmup, 1), device)
    s = timing.summarize(runs)
    weight = next(p for p in rig.model.parameters() if p.ndim == 4)
    model_layout = "channels_last" if weight.is_contiguous(memory_format=torch.channels_last) else "contiguous"
    print(f"layout: fwd+bwd, batch {batch}, model in {model_layout} (the trainer's on {device}), "
          f"{torch.get_num_threads()} thread(s), median of {repeats}")
    for k, v in s.items():
        print(f"  input {k:<14} {v['median'] * 1e3:9.1f} ms  ({v['ratio']:.3f}x)")
    return {"batch": batch, "model_layout": model_layout, "threads": torch.get_num_threads(),
            "ms": {k: v["median"] * 1e3 for k, v in s.items()},
            "channels_last_over_contiguous": s["channels_last"]["ratio"], "runs_s": runs}


def bench_draws(cfg: Any, batch: int, repeats: int, warmup: int, device: torch.device) -> dict[str, Any]:
    """Per-sample draws (trainer.loss) vs one batched draw, and one fwd+bwd for scale; interleaved."""
    torch.manual_seed(0)
    rig = StepRig(cfg, device)
    loss = rig.loss  # the trainer's loss object, in the trainer's input layout
    data = random_batch(cfg, batch, device)
    shape = tuple(data["image"].shape[1:])
    T = cfg.diffusion.timesteps
    gen = torch.Generator(device=device)
    positions = range(1_000_000, 1_000_000 + batch)

    def per_sample() -> None:
        loss.draws(positions, shape)

    def batched() -> None:  # one generator per rank and step: the same draws only on the same cluster
        gen.manual_seed(12345)
        torch.randint(0, T, (batch,), generator=gen, device=device)
        torch.randn((batch, *shape), generator=gen, device=device)

    def step() -> None:
        rig.forward_backward(data)
        rig.optimizer.zero_grad(set_to_none=True)

    runs = timing.time_arms({"batched": batched, "per_sample": per_sample, "fwd_bwd": step}, repeats,
                            max(warmup, 1), device)
    s = timing.summarize(runs)
    extra = s["per_sample"]["median"] - s["batched"]["median"]
    print(f"draws: batch {batch} of {shape}, {device}, median of {repeats}")
    print(f"  one batched draw (per rank)      {s['batched']['median'] * 1e3:9.3f} ms")
    print(f"  per-sample draws (any cluster)   {s['per_sample']['median'] * 1e3:9.3f} ms  "
          f"({s['per_sample']['ratio']:.1f}x)")
    print(f"  one fwd+bwd of the same batch    {s['fwd_bwd']['median'] * 1e3:9.1f} ms: the per-sample draws add "
          f"{100 * extra / s['fwd_bwd']['median']:.2f}% to it")
    return {"batch": batch, "shape": list(shape), "ms": {k: v["median"] * 1e3 for k, v in s.items()},
            "extra_over_fwd_bwd": extra / s["fwd_bwd"]["median"], "runs_s": runs}


def bench_grad_handoff(cfg: Any, repeats: int, warmup: int, device: torch.device, world: int = 2) -> dict[str, Any]:
    """DDP's hand-off of as many gradients as the model has: copy with 1/world vs zero, accumulate, divide."""
    from models.unet import UNet

    with torch.device("meta"):
        n = sum(p.numel() for p in UNet(cfg.model).parameters())
    grad, bucket = torch.randn(n, device=device), torch.empty(n, device=device)

    def copy() -> None:  # gradient_as_bucket_view, grads set to None: one copy that divides
        torch.mul(grad, 1.0 / world, out=bucket)

    def kept() -> None:  # .grad kept in the bucket (zero_grad(set_to_none=False))
        bucket.zero_()
        bucket.add_(grad)
        bucket.div_(float(world))

    runs = timing.time_arms({"copy_into_bucket": copy, "kept_in_bucket": kept}, repeats, max(warmup, 1), device)
    s = timing.summarize(runs)
    print(f"grad_handoff: {n / 1e6:.1f}M gradients, world {world}, {device}, median of {repeats}")
    print(f"  copied into the bucket with the 1/world division   {s['copy_into_bucket']['median'] * 1e3:8.2f} ms")
    print(f"  kept in the bucket (zero, accumulate, divide)      {s['kept_in_bucket']['median'] * 1e3:8.2f} ms "
          f"({s['kept_in_bucket']['ratio']:.2f}x)")
    return {"gradients": n, "world": world, "ms": {k: v["median"] * 1e3 for k, v in s.items()},
            "kept_over_copy": s["kept_in_bucket"]["ratio"], "runs_s": runs}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="quickstart", help="preset name or YAML path (default quickstart)")
    p.add_argument("--measure", default="step,ema", help=f"comma-separated: {', '.join(MEASURES)} (default step,ema)")
    p.add_argument("--shards", default=None, help="your shards for the step (data.shards: folder, manifest, pattern)")
    p.add_argument("--synthetic", type=int, default=0, metavar="N",
                   help="time the step on N generated images instead of the config's shards")
    p.add_argument("--batch-per-gpu", type=int, default=0, help="per-GPU micro-batch of step and layout "
                   "(default: the config's train.batch_per_gpu, else train.batch_size)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda if available")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    timing.add_common_args(p, repeats=20, warmup=5)
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.batch_size=64")
    return p.parse_args(argv)


def setup(args: argparse.Namespace) -> tuple[Any, list[str], torch.device, tempfile.TemporaryDirectory | None]:
    """Check the options against each other and the machine; the config, measures, device, scratch folder."""
    timing.check_common_args(args)
    measures = [m for m in args.measure.split(",") if m]
    unknown = sorted(set(measures) - set(MEASURES))
    if unknown or not measures:
        raise UsageError(f"--measure: expected a comma-separated subset of {', '.join(MEASURES)}, got {args.measure!r}")
    if (args.shards or args.synthetic) and "step" not in measures:
        raise UsageError("--shards and --synthetic feed the step only: add step to --measure")
    if args.shards and args.synthetic:
        raise UsageError("--shards and --synthetic exclude each other: time your shards or generated images")
    if args.batch_per_gpu and not {"step", "layout", "draws"} & set(measures):
        raise UsageError("--batch-per-gpu sets the batch of step, layout and draws: add one of them to --measure")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device here (torch.cuda.is_available() is False)")
    if args.threads < 0 or args.synthetic < 0 or args.batch_per_gpu < 0:
        raise UsageError("--threads, --synthetic and --batch-per-gpu must be >= 0")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    cfg = load_cfg(args.config, args.overrides)
    if args.batch_per_gpu:
        with_section(cfg, "train", batch_per_gpu=args.batch_per_gpu)
    tmp = None
    if "step" in measures:
        if args.synthetic:
            tmp = tempfile.TemporaryDirectory(prefix="ddpm-bench-")
            with_section(cfg, "data", shards=tmp.name, synthetic_images=args.synthetic)
        elif args.shards:
            with_section(cfg, "data", shards=args.shards, synthetic_images=0)
        if not cfg.data.synthetic_images:
            from data_pipeline.shards import resolve_shards

            try:
                resolve_shards(cfg.data.shards)
            except (FileNotFoundError, ValueError) as e:
                raise UsageError(f"data.shards: {e}; give --shards PATH (your data) or --synthetic N "
                                 "(generated images)") from None
    return cfg, measures, device, tmp


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen measurements, print them, and write --json if asked."""
    args = parse_args(argv)

    def run() -> int:
        cfg, measures, device, tmp = setup(args)
        if args.threads:
            torch.set_num_threads(args.threads)
        results: dict[str, Any] = {"config": args.config, "device": str(device)}
        try:
            if "step" in measures:
                results["step"] = bench_step(cfg, args.repeats, args.warmup, device)
            if "ema" in measures:
                results["ema"] = bench_ema(cfg, args.repeats, args.warmup, device)
            if "layout" in measures:
                batch = args.batch_per_gpu or cfg.train.batch_per_gpu or cfg.train.batch_size
                results["layout"] = bench_layout(cfg, batch, args.repeats, args.warmup, device)
            if "grad_handoff" in measures:
                results["grad_handoff"] = bench_grad_handoff(cfg, args.repeats, args.warmup, device)
            if "draws" in measures:
                batch = args.batch_per_gpu or cfg.train.batch_per_gpu or cfg.train.batch_size
                results["draws"] = bench_draws(cfg, batch, args.repeats, args.warmup, device)
        finally:
            if tmp is not None:
                tmp.cleanup()
        timing.finish(MODULE, argv, args, results)
        return 0

    return timing.run_cli(MODULE, run)


if __name__ == "__main__":
    sys.exit(main())
