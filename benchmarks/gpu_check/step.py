"""The environment, step and diffusers sections: what runs here, and how fast the trainer's step is."""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import socket
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from benchmarks import timing
from benchmarks.gpu_check.common import Check, packages_needed
from benchmarks.trainer import PEAK_BF16_TFLOPS, peak_tflops, random_batch
from benchmarks.trainer_internals import StepRig, build_model, memory_format, memory_gb


def section_environment(check: Check) -> dict[str, Any]:
    """Versions, the device and its peak."""
    out: dict[str, Any] = {
        "mode": check.mode, "host": socket.gethostname(), "python": platform.python_version(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "cpu_count": os.cpu_count(),
    }
    missing = []
    for name, needed_by in packages_needed.items():
        try:
            out[name] = getattr(__import__(name), "__version__", "present")
        except Exception as e:  # noqa: BLE001 - a missing or broken package is a fact to report
            out[name] = f"missing ({type(e).__name__}: {e}), needed by: {needed_by}"
            missing.append(name)
    if missing:
        every = [m for m in missing if packages_needed[m] == "every section"]
        out["missing"] = missing
        out["note"] = ("carry the missing packages as wheels (README, Validate on a GPU); "
                       + ("every section needs " + ", ".join(every) if every else "the others run"))
        if every:
            out["status"] = "failed"
    if check.device.type == "cuda":
        props = torch.cuda.get_device_properties(check.device)
        out.update({
            "device": props.name, "capability": f"{props.major}.{props.minor}",
            "memory_gb": round(props.total_memory / 2**30, 1), "cudnn": torch.backends.cudnn.version(),
        })
        with contextlib.suppress(Exception):  # an int in old builds, a tuple in new ones
            v = torch.cuda.nccl.version()
            out["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        peak = peak_tflops(check.device)
        out["peak_bf16_tflops"] = peak
        out["peak_source"] = (f"dense bf16 tensor-core peak for '{props.name}' from benchmarks.trainer.PEAK_BF16_TFLOPS"
                              if peak else f"'{props.name}' is not in benchmarks.trainer.PEAK_BF16_TFLOPS "
                              f"({', '.join(PEAK_BF16_TFLOPS)}): MFU not computed")
    else:
        out["device"] = "cpu"
        out["mode_note"] = "no CUDA device (or --cpu): reduced CPU mode, tiny model, no GPU figures"
    return out


class _EpsOutput(nn.Module):
    """diffusers' UNet2DModel behind our model's call: (x_t, t) -> eps tensor."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W), (B,) -> (B, C, H, W)."""
        return self.net(x, t).sample


def diffusers_unet(cfg: Any, device: torch.device) -> nn.Module:
    """UNet2DModel of the same configuration, with our initial weights, in the same memory format."""
    from diffusers import UNet2DModel

    from models.interop import convert_state_dict_to_diffusers, diffusers_config_from_unet

    src = build_model(cfg, torch.device("cpu"))
    net = UNet2DModel(**diffusers_config_from_unet(cfg.model))
    net.load_state_dict(convert_state_dict_to_diffusers(src.state_dict(), cfg.model))
    return _EpsOutput(net).to(device).to(memory_format=memory_format(cfg, device))


def time_step(cfg: Any, batch: int, device: torch.device, steps: int, warmup: int,
              make_model: Callable[[Any, torch.device], nn.Module] = build_model) -> dict[str, Any]:
    """The trainer's step on one device at one per-GPU batch: medians of ``steps`` after ``warmup``."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from models.flops import training_flops_per_image

    torch._dynamo.reset()  # a static compile for this batch, not a dynamic-shape one
    counters.clear()
    gc.collect()  # the previous call's model, optimizer and EMA
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    rig = StepRig(cfg, device, model=make_model(cfg, device))
    data = random_batch(cfg, batch, device)  # as the loader hands it over
    phases: dict[str, list[float]] = {"fwd_bwd": [], "optimizer": [], "ema": [], "step": []}
    first_step_s = 0.0
    for i in range(warmup + steps):
        fwd = timing.timed(lambda: rig.forward_backward(data), device)
        opt = timing.timed(rig.optimizer_step, device)
        ema = timing.timed(rig.ema_update, device)
        if i == 0:
            first_step_s = fwd + opt + ema
        if i >= warmup:
            for k, v in zip(phases, (fwd, opt, ema, fwd + opt + ema)):
                phases[k].append(v)
    med = {k: timing.median(v) for k, v in phases.items()}
    ips = batch / med["step"]
    flops = training_flops_per_image(cfg.model)
    achieved = flops * ips / 1e12
    peak = peak_tflops(device)
    return {
        "batch_per_gpu": batch, "precision": str(rig.amp or "fp32").replace("torch.", ""),
        "compiled": rig.compiled,
        "channels_last": next(p for p in rig.model.parameters() if p.ndim == 4).is_contiguous(
            memory_format=torch.channels_last) and device.type == "cuda",
        "parameters": sum(p.numel() for p in rig.model.parameters()),
        "images_per_s": round(ips, 2), "step_ms": round(med["step"] * 1e3, 2),
        "split_ms": {k: round(med[k] * 1e3, 2) for k in ("fwd_bwd", "optimizer", "ema")},
        "split_pct": {k: round(100 * med[k] / med["step"], 1) for k in ("fwd_bwd", "optimizer", "ema")},
        "compile_and_first_step_s": round(first_step_s, 1),
        "peak_memory_gb": round(memory_gb(device), 2),
        "training_gflop_per_image": round(flops / 1e9, 2), "achieved_tflops": round(achieved, 2),
        "mfu_pct": round(100 * achieved / peak, 1) if peak else None,
        "graph_breaks": sum(counters["graph_break"].values()),
        "graphs": counters["stats"].get("unique_graphs", 0),
        "timed_steps": steps, "warmup_steps": warmup,
    }


def section_step(check: Check) -> dict[str, Any]:
    """Our step at each per-GPU batch while the budget lasts."""
    runs, last_cost, note = [], 0.0, None
    for b in check.batches:
        if runs and check.left() < 1.2 * last_cost:
            note = f"batches from {b} on skipped: {check.left():.0f} s left, the last one took {last_cost:.0f} s"
            break
        t0 = time.monotonic()
        try:
            runs.append(time_step(check.cfg, b, check.device, check.steps, check.warmup))
        except torch.cuda.OutOfMemoryError:
            runs.append({"batch_per_gpu": b, "status": "out of memory"})
            note = f"batch {b} does not fit; larger ones not tried"
            break
        last_cost = time.monotonic() - t0
        r = runs[-1]
        print(f"  step  batch {b:4d}: {r['images_per_s']:9.1f} img/s, step {r['step_ms']:8.1f} ms "
              f"{r['split_pct']}, {r['peak_memory_gb']:.1f} GB, MFU {r['mfu_pct']}%", flush=True)
    check.results["step"] = runs
    out: dict[str, Any] = {"config_model": vars(check.cfg.model).copy(), "runs": runs}
    if note:
        out["note"] = note
    if not any("images_per_s" in r for r in runs):
        out["status"] = "failed"
    return out


def section_diffusers(check: Check) -> dict[str, Any]:
    """diffusers' UNet2DModel through the same step, at the largest batch our step ran."""
    try:
        import diffusers
    except Exception as e:  # noqa: BLE001
        return {"status": "skipped", "note": (
            f"diffusers is not importable here ({type(e).__name__}: {e}). Carry it as a wheel: "
            "`pip download diffusers --no-deps -d wheels/` where there is network, then "
            "`pip install --no-deps wheels/diffusers-*.whl` here (see README, Validate on a GPU)")}
    done = [r for r in check.results.get("step", []) if "images_per_s" in r]
    mine = done[-1] if done else time_step(check.cfg, check.batches[0], check.device, check.steps, check.warmup)
    batch, note = mine["batch_per_gpu"], None
    try:
        theirs = time_step(check.cfg, batch, check.device, check.steps, check.warmup, make_model=diffusers_unet)
    except torch.cuda.OutOfMemoryError:
        if len(done) < 2:
            raise
        note = f"diffusers does not fit at batch {batch}; compared at {done[0]['batch_per_gpu']}"
        mine = done[0]
        batch = mine["batch_per_gpu"]
        theirs = time_step(check.cfg, batch, check.device, check.steps, check.warmup, make_model=diffusers_unet)
    ratio = mine["images_per_s"] / theirs["images_per_s"]
    print(f"  diffusers batch {batch}: ours {mine['images_per_s']:.1f} img/s, diffusers "
          f"{theirs['images_per_s']:.1f} img/s, ours/diffusers {ratio:.3f}", flush=True)
    return {"diffusers_version": diffusers.__version__, "batch_per_gpu": batch,
            "ratio_ours_over_diffusers_images_per_s": round(ratio, 3), "ours": mine, "diffusers": theirs,
            "note": (note + "; " if note else "") + "same settings (precision, compile, memory format, fused "
                    "AdamW, EMA, loss), same FLOPs count (the architectures are identical); ours timed in the step "
                    "section"}
