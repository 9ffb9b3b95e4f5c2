"""Validate the GPU paths in one command and write one JSON report.

    python -m trainer.gpu_check                          # a GPU: about 8 minutes, writes gpu_check.json
    python -m trainer.gpu_check --batches 8,16,32,64 --budget-s 900 --out /shared/gpu_check.json
    python -m trainer.gpu_check --cpu                    # the reduced CPU mode CI runs (tiny model, < 1 min)

Sections, in this order, each timed, each allowed to fail or be skipped without stopping
the others (the report says which and why; the exit code is 1 if any failed):

  environment     torch, CUDA, cuDNN, NCCL, the device and its dense bf16 peak (from its name)
  step            the trainer's own step (bf16 autocast, torch.compile, channels_last on a GPU)
                  at several per-GPU batches: images/s, the split fwd+bwd / optimizer / EMA,
                  peak memory, compile time, graph breaks, MFU (FLOPs counted by models.flops)
  diffusers       the same step for diffusers' UNet2DModel of the same (paper) configuration,
                  side by side with ours, as a ratio (skipped with a note if diffusers is missing)
  ddp_nccl        torchrun, one process: DDP + torch.compile + NCCL (gloo on CPU) with no_sync
                  accumulation, the trainer's step, its collectives; no "Grad strides" warning
  resume          the trainer under torchrun: a checkpoint mid-run, resumed, compared with a
                  straight run (bit-exact, or else measured against the GPU's run-to-run noise)
  decode          nvJPEG (batched, on the device) vs one CPU core of libjpeg-turbo, images/s
  ema_checkpoint  the EMA update and the checkpoint's stall of the step, in ms
  gpu_tests       the ``gpu``-marked tests (CPU mode: collected only, so they cannot rot)

Whatever does not fit the time budget (--budget-s) is skipped and reported as such. Nothing
is downloaded: diffusers, if wanted, is carried as a wheel (see the README).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]

# The CPU mode's model and the tiny run of the resume and DDP sections: 2 levels at 16x16.
tiny_overrides = (
    "model.image_size=16", "model.base_channels=32", "model.channel_mult=[1,2]", "model.num_res_blocks=1",
    "model.attn_resolutions=[8]", "model.dropout=0.1", "diffusion.timesteps=100", "train.batch_size=8",
    "train.lr=1e-3", "train.warmup_images=80",
)
grad_stride_warning = "Grad strides do not match"
# What the sections import besides torch (a GPU machine may have torch alone), by import name.
packages_needed = {
    "einops": "every section", "yaml": "every section", "numpy": "every section", "PIL": "every section",
    "webdataset": "every section", "braceexpand": "every section", "tqdm": "every section",
    "torchvision": "resume, decode, gpu_tests", "pytest": "gpu_tests", "diffusers": "diffusers",
}


@dataclass
class Check:
    """What every section gets: the mode, the device, the model config, the budget."""

    mode: str  # "gpu" or "cpu"
    device: torch.device
    cfg: Any  # trainer.config.Config of the model the step, diffusers and EMA sections time
    batches: list[int]
    steps: int
    warmup: int
    work: Path
    deadline: float  # time.monotonic() by which the whole check ends
    section_deadline: float = 0.0  # this section's end, leaving the later sections their minimum
    results: dict[str, Any] = field(default_factory=dict)

    def left(self) -> float:
        """Seconds left to the running section."""
        return self.section_deadline - time.monotonic()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _env_for_children(check: Check) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("WORLD_SIZE", None)
    # One inductor cache for every child run: the second compile of the same graph is a cache hit.
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(check.work / "inductor_cache"))
    if check.mode == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _tail(text: str, n: int = 3000) -> str:
    return text[-n:]


# ----------------------------------------------------------------------------- environment


def section_environment(check: Check) -> dict[str, Any]:
    """Versions, the device and its peak."""
    from trainer.bench import PEAK_BF16_TFLOPS, peak_tflops

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
        out["missing"] = missing
        out["note"] = ("carry the missing packages as wheels (README, Validate on a GPU); "
                       + ("every section needs " + ", ".join(m for m in missing if packages_needed[m] == "every section")
                          if any(packages_needed[m] == "every section" for m in missing) else "the others run"))
        if any(packages_needed[m] == "every section" for m in missing):
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
        out["peak_source"] = (f"dense bf16 tensor-core peak for '{props.name}' from trainer.bench.PEAK_BF16_TFLOPS"
                              if peak else f"'{props.name}' is not in trainer.bench.PEAK_BF16_TFLOPS "
                              f"({', '.join(PEAK_BF16_TFLOPS)}): MFU not computed")
    else:
        out["device"] = "cpu"
        out["mode_note"] = "no CUDA device (or --cpu): reduced CPU mode, tiny model, no GPU figures"
    return out


# ----------------------------------------------------------------------------- the step


class _EpsOutput(nn.Module):
    """diffusers' UNet2DModel behind our model's call: (x_t, t) -> eps tensor."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W), (B,) -> (B, C, H, W)."""
        return self.net(x, t).sample


def ours(cfg: Any, device: torch.device) -> nn.Module:
    """The trainer's model (channels_last on a GPU)."""
    from trainer.build import build_model

    return build_model(cfg, device)


def diffusers_unet(cfg: Any, device: torch.device) -> nn.Module:
    """UNet2DModel of the same configuration, with our initial weights, in the same memory format."""
    from diffusers import UNet2DModel

    from models.interop import convert_state_dict_to_diffusers, diffusers_config_from_unet
    from trainer.build import memory_format

    src = ours(cfg, torch.device("cpu"))
    net = UNet2DModel(**diffusers_config_from_unet(cfg.model))
    net.load_state_dict(convert_state_dict_to_diffusers(src.state_dict(), cfg.model))
    return _EpsOutput(net).to(device).to(memory_format=memory_format(cfg, device))


def time_step(cfg: Any, batch: int, device: torch.device, steps: int, warmup: int,
              make_model: Callable[[Any, torch.device], nn.Module] = ours) -> dict[str, Any]:
    """The trainer's step on one device at one per-GPU batch: medians of ``steps`` after ``warmup``."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from models.diffusion import GaussianDiffusion
    from models.flops import training_flops_per_image
    from trainer.bench import peak_tflops
    from trainer.build import build_optimizer, parallelize, resolve_compile, resolve_precision
    from trainer.distributed import DistInfo
    from trainer.ema import EMA
    from trainer.step import forward_backward, memory_gb, optimizer_step

    torch._dynamo.reset()  # a static compile for this batch, not a dynamic-shape one
    counters.clear()
    gc.collect()  # the previous call's model, optimizer and EMA
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    model = make_model(cfg, device)
    train_model = parallelize(model, cfg, DistInfo(0, 1, 0, device))
    opt, fused = build_optimizer(model, cfg, device)
    ema = EMA(model, cfg.ema.decays)
    diffusion = GaussianDiffusion(cfg.diffusion).to(device)
    amp = resolve_precision(cfg, device)
    gen = torch.Generator(device=device)
    s = cfg.model.image_size
    x = torch.randint(0, 256, (batch, 3, s, s), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    data = {"image": x.pin_memory() if device.type == "cuda" else x}  # as the loader hands it over
    phases: dict[str, list[float]] = {"fwd_bwd": [], "optimizer": [], "ema": [], "step": []}
    first_step_s = 0.0
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        forward_backward(train_model, diffusion, data, cfg, device, gen, amp, seed=i)
        _sync(device)
        t1 = time.perf_counter()
        optimizer_step(model, opt, fused, cfg.train.grad_clip)
        _sync(device)
        t2 = time.perf_counter()
        ema.update(model)
        _sync(device)
        t3 = time.perf_counter()
        if i == 0:
            first_step_s = t3 - t0
        if i >= warmup:
            for k, v in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
                phases[k].append(v)
    med = {k: statistics.median(v) for k, v in phases.items()}
    ips = batch / med["step"]
    flops = training_flops_per_image(cfg.model)
    achieved = flops * ips / 1e12
    peak = peak_tflops(device)
    return {
        "batch_per_gpu": batch, "precision": str(amp or "fp32").replace("torch.", ""),
        "compiled": resolve_compile(cfg, device),
        "channels_last": next(p for p in model.parameters() if p.ndim == 4).is_contiguous(
            memory_format=torch.channels_last) and device.type == "cuda",
        "parameters": sum(p.numel() for p in model.parameters()),
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


# ----------------------------------------------------------------------------- DDP over NCCL


def ddp_worker(out: Path, overrides: list[str]) -> int:
    """Under torchrun: DDP (forced, one rank) + compile + the trainer's step with no_sync accumulation."""
    import torch.distributed as dist
    from torch._dynamo.utils import counters

    from models.diffusion import GaussianDiffusion
    from trainer import distributed as du
    from trainer.build import (
        build_model,
        build_optimizer,
        parallelize,
        resolve_compile,
        resolve_precision,
    )
    from trainer.config import load_config
    from trainer.distributed import DistInfo
    from trainer.step import StepStats, forward_backward, optimizer_step

    cfg = load_config(None, [*tiny_overrides, *overrides])
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(backend, **({"device_id": device} if cuda else {}))
    info = DistInfo(dist.get_rank(), dist.get_world_size(), local, device)
    torch.manual_seed(0)
    model = build_model(cfg, device)
    train_model = parallelize(model, cfg, info, ddp=True)
    opt, fused = build_optimizer(model, cfg, device)
    diffusion = GaussianDiffusion(cfg.diffusion).to(device)
    stats = StepStats(device, diffusion.num_timesteps)
    amp = resolve_precision(cfg, device)
    gen = torch.Generator(device=device)
    s = cfg.model.image_size
    for step in range(4):
        for micro in range(2):  # the first under no_sync()
            x = torch.randint(0, 256, (2, 3, s, s), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
            losses, t = forward_backward(train_model, diffusion, {"image": x}, cfg, device, gen, amp,
                                         seed=10 * step + micro, scale=0.5, sync_grads=micro == 1)
            stats.add_losses(losses, t)
        grad_norm, found_inf = optimizer_step(model, opt, fused, cfg.train.grad_clip)
        stats.add_step(grad_norm, found_inf, step, max_run=5)
    values = stats.reduce()  # all-reduce of a device vector over the default group
    gathered = du.all_gather_tensor(torch.arange(3, device=device))  # all_gather on the device
    echoed = du.broadcast_object({"rank": info.rank})
    du.barrier()
    result = {"backend": backend, "world_size": info.world_size, "ddp": type(getattr(
        train_model, "_orig_mod", train_model)).__name__, "compiled": resolve_compile(cfg, device),
        "precision": str(amp or "fp32"), "loss": values["train/loss"], "grad_norm": values["train/grad_norm"],
        "skipped_steps": values["train/skipped_steps_interval"], "all_gather_ok": gathered.tolist() == [0, 1, 2],
        "broadcast_ok": echoed == {"rank": 0},
        # Dynamo graphs of the model (DDPOptimizer splits the one graph at bucket boundaries in the
        # backend) and the breaks, which torch puts in DDP's own Python on purpose (its forward
        # wrapper runs eagerly: logger, _inside_ddp_forward), none in the model.
        "graphs": counters["stats"].get("unique_graphs", 0),
        "graph_breaks": {k.strip().splitlines()[0][:160] + " | " + (k.strip().splitlines() + [""])[1].strip()[:200]: v
                         for k, v in counters["graph_break"].items()}}
    out.write_text(json.dumps(result))
    dist.destroy_process_group()
    return 0


def section_ddp_nccl(check: Check) -> dict[str, Any]:
    """torchrun one process: DDP + compile + NCCL with accumulation, and the trainer's collectives."""
    out = check.work / "ddp_worker.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           "-m", "trainer.gpu_check", "--ddp-worker", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=_env_for_children(check), capture_output=True, text=True,
                          timeout=max(30.0, check.left()))
    text = proc.stdout + proc.stderr
    if proc.returncode != 0 or not out.is_file():
        return {"status": "failed", "returncode": proc.returncode, "output_tail": _tail(text)}
    res = json.loads(out.read_text())
    res["grad_stride_warning"] = grad_stride_warning in text
    ok = (res["ddp"] == "DistributedDataParallel" and res["all_gather_ok"] and res["broadcast_ok"]
          and not res["grad_stride_warning"] and 0 < res["loss"] < 10 and res["skipped_steps"] == 0
          and (not res["compiled"] or res["graphs"] == 1))
    if not ok:
        res.update(status="failed", output_tail=_tail(text))
    return res


# ----------------------------------------------------------------------------- resume


def _ckpt_tensors(path: Path) -> dict[str, torch.Tensor]:
    s = torch.load(path, map_location="cpu", weights_only=True)
    out = {f"model.{k}": v for k, v in s["model"].items()}
    for i, sh in enumerate(s["ema"]["shadows"]):
        out.update({f"ema{i}.{k}": v for k, v in sh.items()})
    for pid, st in s["optimizer"]["state"].items():
        out.update({f"opt.{pid}.{k}": v for k, v in st.items()})
    return out


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if a.keys() != b.keys():
        return float("inf")
    return max((x.double() - y.double()).abs().max().item() for x, y in ((a[k], b[k]) for k in a))


def section_resume(check: Check) -> dict[str, Any]:
    """The trainer under torchrun: straight vs checkpoint + resume, compared tensor by tensor."""
    from data_pipeline.synthetic import ensure_synthetic_shards
    from trainer.config import load_config, to_yaml

    total, half = (320, 160) if check.mode == "gpu" else (32, 16)
    data = check.work / "resume_data"
    ensure_synthetic_shards(data, 128, 16, seed=0, progress=False)  # once, before the runs share it
    cfg_path = check.work / "resume.yaml"
    cfg_path.write_text(to_yaml(load_config(None, [
        *tiny_overrides, f"data.shards={data}", "data.synthetic_images=0", "data.num_workers=1",
        f"checkpoint.every_images={half}", "log.every_images=8", "log.sample_every_images=0",
        "log.tensorboard=false"])))
    procs: list[subprocess.Popen] = []

    def start(name: str, images: int) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
               str(REPO / "trainer" / "main.py"), "--config", str(cfg_path), f"run.dir={check.work / name}",
               f"train.total_images={images}"]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=_env_for_children(check), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
        return procs[-1]

    def finish(p: subprocess.Popen) -> str:
        text, _ = p.communicate(timeout=max(30.0, check.left()))
        if p.returncode != 0:
            raise RuntimeError(f"trainer exited {p.returncode}:\n{_tail(text)}")
        return text

    try:
        return _compare_resume(check, start, finish, total, half)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _compare_resume(check: Check, start: Callable, finish: Callable, total: int, half: int) -> dict[str, Any]:
    """Straight and first half together, then the resume; a second straight run only if they differ."""
    straight, first = start("straight", total), start("split", half)  # independent: run together
    finish(straight)
    finish(first)
    resumed = finish(start("split", total))
    if "resumed from" not in resumed:
        return {"status": "failed", "note": "the second run did not resume", "output_tail": _tail(resumed)}
    name = f"checkpoints/ckpt-{total:012d}.pt"
    a, b = _ckpt_tensors(check.work / "straight" / name), _ckpt_tensors(check.work / "split" / name)
    diff = _max_diff(a, b)
    out: dict[str, Any] = {"images": total, "checkpoint_at": half, "tensors": len(a),
                           "bit_exact": diff == 0.0, "max_abs_diff_resumed_vs_straight": diff,
                           "note": "world size 1: torchrun starts no process group for one rank; "
                                   "NCCL is exercised by the ddp_nccl section"}
    if diff != 0.0:  # is the device deterministic at all? a second straight run says
        finish(start("straight2", total))
        noise = _max_diff(a, _ckpt_tensors(check.work / "straight2" / name))
        out["max_abs_diff_straight_vs_straight"] = noise
        if noise == 0.0:
            out["status"] = "failed"
            out["note"] = "two straight runs agree bit for bit but the resumed one differs: resume is not exact"
        else:
            out["note"] = ("not bit-exact, but two straight runs differ too (non-deterministic kernels, e.g. "
                           "cuDNN weight gradients or attention backward): resume is as exact as this device")
    return out


# ----------------------------------------------------------------------------- decode


def section_decode(check: Check) -> dict[str, Any]:
    """JPEG decode rate: nvJPEG batched on the device vs libjpeg-turbo on one CPU core."""
    import numpy as np

    try:
        import torchvision.io as tio
    except Exception as e:  # noqa: BLE001
        return {"status": "skipped", "note": f"torchvision is not importable ({type(e).__name__}: {e})"}
    from data_pipeline.synthetic import synthetic_image

    size, n = 256, (64 if check.mode == "gpu" else 16)
    rng = np.random.default_rng(0)
    jpegs = [tio.encode_jpeg(torch.from_numpy(np.array(synthetic_image(rng, size))).permute(2, 0, 1).contiguous(),
                             quality=95) for _ in range(n)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cpu_imgs = [tio.decode_jpeg(j, mode=tio.ImageReadMode.RGB) for j in jpegs]  # warm-up
        reps, t0 = 0, time.perf_counter()
        while reps < 3 or time.perf_counter() - t0 < 1.0:
            for j in jpegs:
                tio.decode_jpeg(j, mode=tio.ImageReadMode.RGB)
            reps += 1
        cpu_rate = reps * n / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    out: dict[str, Any] = {"image_size": size, "quality": 95, "images": n,
                           "cpu_images_per_s_one_core": round(cpu_rate, 1)}
    if check.device.type != "cuda":
        out["nvjpeg"] = "skipped: no CUDA device"
        return out
    dev = check.device
    gpu_imgs = tio.decode_jpeg(jpegs, mode=tio.ImageReadMode.RGB, device=dev)  # warm-up (nvJPEG handles)
    _sync(dev)
    reps, t0 = 0, time.perf_counter()
    while reps < 3 or time.perf_counter() - t0 < 1.0:
        tio.decode_jpeg(jpegs, mode=tio.ImageReadMode.RGB, device=dev)
        _sync(dev)
        reps += 1
    gpu_rate = reps * n / (time.perf_counter() - t0)
    diff = max((g.cpu().float() - c.float()).abs().mean().item() for g, c in zip(gpu_imgs, cpu_imgs))
    out.update({"nvjpeg_images_per_s": round(gpu_rate, 1), "nvjpeg_over_one_cpu_core": round(gpu_rate / cpu_rate, 2),
                "max_mean_abs_diff_vs_cpu": round(diff, 3)})
    if diff >= 3.0:
        out["status"] = "failed"
        out["note"] = "nvJPEG and libjpeg-turbo images differ by more than IDCT rounding"
    return out


# ----------------------------------------------------------------------------- EMA and checkpoint


def section_ema_checkpoint(check: Check) -> dict[str, Any]:
    """EMA update (fused vs loop), the checkpoint's stall of the step, DDP's bucket copy vs in-place divide."""
    import io
    from contextlib import redirect_stdout

    from trainer.bench import bench_ema
    from trainer.build import build_optimizer
    from trainer.checkpoint import CheckpointManager
    from trainer.ema import EMA
    from trainer.step import optimizer_step

    dev, cfg = check.device, check.cfg
    with redirect_stdout(io.StringIO()):
        ema_t = bench_ema(cfg, 10 if check.mode == "gpu" else 3, dev)
    torch.manual_seed(0)
    model = ours(cfg, dev)
    opt, fused = build_optimizer(model, cfg, dev)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizer_step(model, opt, fused, cfg.train.grad_clip)  # creates the AdamW moments
    ema = EMA(model, cfg.ema.decays)
    state = {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
             "train_state": {"nimg": 0}, "loader": [{}], "config": {}, "fingerprint": "gpu_check"}
    nbytes = sum(t.numel() * t.element_size() for t in (
        list(state["model"].values()) + [v for s in state["ema"]["shadows"] for v in s.values()]
        + [v for st in state["optimizer"]["state"].values() for v in st.values()]))
    ckpt = CheckpointManager(check.work / "ckpt_timing", keep_last=1, async_write=True)
    saves = []
    for k in range(2):  # the first allocates the pinned buffers, the second reuses them
        _sync(dev)
        t0 = time.perf_counter()
        ckpt.save(state, nimg=k + 1)
        t1 = time.perf_counter()
        _sync(dev)
        t2 = time.perf_counter()
        ckpt.wait()
        t3 = time.perf_counter()
        saves.append({"host_stall_ms": round((t1 - t0) * 1e3, 2), "copies_done_ms": round((t2 - t0) * 1e3, 2),
                      "background_write_s": round(t3 - t2, 2)})
    _sync(dev)
    t0 = time.perf_counter()
    [t.detach().to("cpu", copy=True) for t in state["model"].values()]  # the old synchronous, pageable copy
    _sync(dev)
    model_sync_ms = (time.perf_counter() - t0) * 1e3
    # DDP (gradient_as_bucket_view, grads set to None after each step) copies each fresh gradient
    # into its bucket while dividing by the world size. Keeping .grad in the bucket instead
    # (zero_grad(set_to_none=False)) costs a zeroing, an accumulation and an in-place division.
    n = sum(p.numel() for p in model.parameters())
    grad, bucket = torch.randn(n, device=dev), torch.empty(n, device=dev)
    copy_t, alias_t = [], []
    for _ in range(5):
        _sync(dev)
        t0 = time.perf_counter()
        torch.mul(grad, 0.5, out=bucket)
        _sync(dev)
        t1 = time.perf_counter()
        bucket.zero_()
        bucket.add_(grad)
        bucket.div_(2.0)
        _sync(dev)
        copy_t.append(t1 - t0)
        alias_t.append(time.perf_counter() - t1)
    del model, opt, ema, state, grad, bucket
    gc.collect()
    return {
        "ema_update_ms_fused": round(ema_t["ema_fused_s"] * 1e3, 3),
        "ema_update_ms_per_parameter_loop": round(ema_t["ema_loop_s"] * 1e3, 3),
        "checkpoint_bytes_on_device": nbytes, "checkpoint_saves": saves,
        "checkpoint_stall_ms": saves[-1]["host_stall_ms"],
        "checkpoint_copies_on_stream_ms": saves[-1]["copies_done_ms"],
        "old_synchronous_model_copy_ms": round(model_sync_ms, 2),
        "ddp_grad_copy_into_bucket_ms": round(statistics.median(copy_t) * 1e3, 3),
        "ddp_grad_kept_in_bucket_ms": round(statistics.median(alias_t) * 1e3, 3),
        "note": "host_stall_ms: the step waits this long (copies queued, not waited for); copies_on_stream_ms: "
                "when the device-to-host copies have landed (the next step's kernels queue behind them)",
    }


# ----------------------------------------------------------------------------- gpu tests


def _gpu_test_files() -> list[str]:
    tests = REPO / "tests"
    if not tests.is_dir():
        return []
    return sorted(str(p.relative_to(REPO)) for p in tests.rglob("test_*.py") if "mark.gpu" in p.read_text())


def section_gpu_tests(check: Check) -> dict[str, Any]:
    """pytest -m gpu on the files that have such tests (CPU mode: collect them only)."""
    import importlib.util

    if importlib.util.find_spec("pytest") is None:
        return {"status": "skipped", "note": "pytest is not installed: carry it as a wheel (README, Validate on a GPU)"}
    files = _gpu_test_files()
    if not files:
        return {"status": "skipped", "note": f"no tests/ next to {REPO / 'trainer'} (an installed copy?)"}
    gc.collect()
    if check.device.type == "cuda":
        torch.cuda.empty_cache()  # the tests run in a child process on the same GPU
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *files]
    if check.mode == "cpu":
        cmd.insert(-len(files), "--collect-only")
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=_env_for_children(check), capture_output=True, text=True,
                              timeout=max(20.0, check.left()))
    except subprocess.TimeoutExpired as e:
        return {"status": "failed", "note": f"timed out after {e.timeout:.0f} s", "files": files}
    text = proc.stdout + proc.stderr
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", text)}
    collected = re.search(r"(\d+)(?:/\d+)? tests? collected", text)
    if collected:
        counts["selected"] = int(collected.group(1))
    out: dict[str, Any] = {"files": files, "returncode": proc.returncode, "counts": counts}
    if check.mode == "cpu":
        out["note"] = "CPU mode: the gpu tests were collected, not run"
    if proc.returncode != 0 or not counts.get("selected", counts.get("passed", 0)):
        out.update(status="failed", output_tail=_tail(text))
    return out


# ----------------------------------------------------------------------------- driver

# (name, function, minimum seconds it needs in GPU mode, in CPU mode)
sections: list[tuple[str, Callable[[Check], dict[str, Any]], float, float]] = [
    ("environment", section_environment, 0, 0),
    ("step", section_step, 60, 2),
    ("diffusers", section_diffusers, 60, 2),
    ("ddp_nccl", section_ddp_nccl, 30, 5),
    ("resume", section_resume, 45, 10),
    ("decode", section_decode, 5, 1),
    ("ema_checkpoint", section_ema_checkpoint, 15, 1),
    ("gpu_tests", section_gpu_tests, 60, 5),
]


def run_all(check: Check, out: Path, only: set[str] | None = None) -> dict[str, Any]:
    """Run the sections in order within the budget; write the report after each one."""
    report: dict[str, Any] = {"version": 1, "command": " ".join(["python -m trainer.gpu_check", *sys.argv[1:]]),
                              "mode": check.mode, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                              "budget_s": round(check.deadline - time.monotonic()), "sections": {}}
    t_start = time.monotonic()
    chosen = [s for s in sections if only is None or s[0] in only]
    for i, (name, fn, gpu_min, cpu_min) in enumerate(chosen):
        need = gpu_min if check.mode == "gpu" else cpu_min
        later = sum((g if check.mode == "gpu" else c) for _, _, g, c in chosen[i + 1:])
        check.section_deadline = check.deadline - later
        left = check.deadline - time.monotonic()
        if left < need:
            res: dict[str, Any] = {"status": "skipped", "note": f"time budget: {left:.0f} s left, needs ~{need:.0f} s"}
        else:
            t0 = time.perf_counter()
            print(f"[gpu_check] {name} ...", flush=True)
            gc.collect()
            if check.device.type == "cuda":
                torch.cuda.empty_cache()  # child processes share the GPU with this one
            try:
                res = fn(check) or {}
            except Exception as e:  # noqa: BLE001 - one broken section must not hide the others
                res = {"status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": _tail(traceback.format_exc())}
            res = {"status": res.pop("status", "ok"), "seconds": round(time.perf_counter() - t0, 1), **res}
        report["sections"][name] = res
        print(f"[gpu_check] {name}: {res['status']} ({res.get('seconds', 0)} s)"
              + (f" - {res.get('note') or res.get('error')}" if res["status"] != "ok" else ""), flush=True)
        report["wall_s"] = round(time.monotonic() - t_start, 1)
        report["ok"] = not any(s["status"] == "failed" for s in report["sections"].values())
        out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    """The command line; returns 0 when no section failed."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check.json", help="the JSON report (default: ./gpu_check.json)")
    p.add_argument("--cpu", action="store_true", help="the reduced CPU mode even where CUDA is available")
    p.add_argument("--config", default=None,
                   help="model of the step/diffusers/EMA sections (default: celebahq_256 on a GPU, a tiny UNet on CPU)")
    p.add_argument("--batches", default=None, help="per-GPU batches for the step, e.g. 8,16,32 (default: 8,16,32; CPU 2,4)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per batch (default 10; CPU 2)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps incl. the compile (default 3; CPU 1)")
    p.add_argument("--budget-s", type=float, default=None, help="time budget in seconds (default 450; CPU 120)")
    p.add_argument("--sections", default=None, help=f"comma-separated subset of: {', '.join(s[0] for s in sections)}")
    p.add_argument("--ddp-worker", default=None, help=argparse.SUPPRESS)  # internal: the ddp_nccl child
    p.add_argument("overrides", nargs="*", help="config overrides for the timed model, e.g. model.dropout=0.1")
    args = p.parse_args(argv)
    if args.ddp_worker:
        return ddp_worker(Path(args.ddp_worker), args.overrides)
    from trainer.config import ConfigError, load_config
    from trainer.main import find_config

    gpu = torch.cuda.is_available() and not args.cpu
    mode, device = ("gpu", torch.device("cuda", torch.cuda.current_device())) if gpu else ("cpu", torch.device("cpu"))
    try:
        if args.config:
            cfg = load_config(find_config(args.config), args.overrides)
        elif gpu:
            cfg = load_config(find_config("celebahq_256"), args.overrides)
        else:
            cfg = load_config(None, [*tiny_overrides, *args.overrides])
        batches = [int(b) for b in (args.batches or ("8,16,32" if gpu else "2,4")).split(",") if b.strip()]
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return 2
    if not gpu:  # the CPU mode times the same step functions eagerly (compile has its own CI test)
        cfg.train = replace(cfg.train, compile="false")
    only = set(args.sections.split(",")) if args.sections else None
    unknown = (only or set()) - {s[0] for s in sections}
    if unknown:
        print(f"gpu_check: unknown sections {sorted(unknown)}; choose from {[s[0] for s in sections]}",
              file=sys.stderr)
        return 2
    budget = args.budget_s or (450.0 if gpu else 120.0)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ddpm-gpu-check-") as tmp:
        check = Check(mode=mode, device=device, cfg=cfg, batches=batches,
                      steps=args.steps or (10 if gpu else 2), warmup=args.warmup or (3 if gpu else 1),
                      work=Path(tmp), deadline=time.monotonic() + budget)
        with contextlib.suppress(KeyboardInterrupt):
            report = run_all(check, out, only)
    print(f"[gpu_check] report: {out.resolve()} ({'ok' if report.get('ok') else 'FAILED'}, {report.get('wall_s')} s)")
    return 0 if report.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
