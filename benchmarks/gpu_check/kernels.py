"""The decode and ema_checkpoint sections: nvJPEG against a CPU core; EMA, checkpoint stall, DDP's hand-off."""

from __future__ import annotations

import functools
import gc
import io
import time
from contextlib import redirect_stdout
from typing import Any

import torch

from benchmarks import timing
from benchmarks.gpu_check.common import Check
from benchmarks.trainer import bench_ema, bench_grad_handoff
from benchmarks.trainer_internals import StepRig, checkpoint_manager, checkpoint_state


def _host_copy(tensors: list[torch.Tensor]) -> None:
    """The old synchronous, pageable device-to-host copy of the weights (what the async checkpoint replaced)."""
    for t in tensors:
        t.detach().to("cpu", copy=True)


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

        def cpu_decode() -> int:
            for j in jpegs:
                tio.decode_jpeg(j, mode=tio.ImageReadMode.RGB)
            return n

        cpu_rate, _ = timing.rate(cpu_decode, 1.0)
    finally:
        torch.set_num_threads(threads)
    out: dict[str, Any] = {"image_size": size, "quality": 95, "images": n,
                           "cpu_images_per_s_one_core": round(cpu_rate, 1)}
    if check.device.type != "cuda":
        out["nvjpeg"] = "skipped: no CUDA device"
        return out
    dev = check.device
    gpu_imgs = tio.decode_jpeg(jpegs, mode=tio.ImageReadMode.RGB, device=dev)  # warm-up (nvJPEG handles)

    def gpu_decode() -> int:
        tio.decode_jpeg(jpegs, mode=tio.ImageReadMode.RGB, device=dev)
        timing.sync(dev)
        return n

    gpu_rate, _ = timing.rate(gpu_decode, 1.0)
    diff = max((g.cpu().float() - c.float()).abs().mean().item() for g, c in zip(gpu_imgs, cpu_imgs))
    out.update({"nvjpeg_images_per_s": round(gpu_rate, 1), "nvjpeg_over_one_cpu_core": round(gpu_rate / cpu_rate, 2),
                "max_mean_abs_diff_vs_cpu": round(diff, 3)})
    if diff >= 3.0:
        out["status"] = "failed"
        out["note"] = "nvJPEG and libjpeg-turbo images differ by more than IDCT rounding"
    return out


def section_ema_checkpoint(check: Check) -> dict[str, Any]:
    """EMA update (fused vs loop), the checkpoint's stall of the step, DDP's bucket copy vs in-place divide."""
    dev, cfg = check.device, check.cfg
    repeats = 10 if check.mode == "gpu" else 3
    with redirect_stdout(io.StringIO()):  # the figures go into the report
        ema_t = bench_ema(cfg, repeats, 2, dev)
        handoff = bench_grad_handoff(cfg, 5, 1, dev)
    torch.manual_seed(0)
    rig = StepRig(cfg, dev)
    for p in rig.model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    rig.optimizer_step()  # creates the AdamW moments
    state = checkpoint_state(rig)
    nbytes = sum(t.numel() * t.element_size() for t in (
        list(state["model"].values()) + [v for s in state["ema"]["shadows"] for v in s.values()]
        + [v for st in state["optimizer"]["state"].values() for v in st.values() if isinstance(v, torch.Tensor)]))
    ckpt = checkpoint_manager(check.work / "ckpt_timing")
    saves = []
    for k in range(2):  # the first allocates the pinned buffers, the second reuses them
        timing.sync(dev)
        t0 = time.perf_counter()
        ckpt.save(state, nimg=k + 1)
        t1 = time.perf_counter()
        timing.sync(dev)
        t2 = time.perf_counter()
        ckpt.wait()
        t3 = time.perf_counter()
        saves.append({"host_stall_ms": round((t1 - t0) * 1e3, 2), "copies_done_ms": round((t2 - t0) * 1e3, 2),
                      "background_write_s": round(t3 - t2, 2)})
    model_sync_ms = 1e3 * timing.timed(functools.partial(_host_copy, list(state["model"].values())), dev)
    del rig, state
    gc.collect()
    return {
        "ema_update_ms_fused": round(ema_t["ms"]["fused"], 3),
        "ema_update_ms_per_parameter_loop": round(ema_t["ms"]["loop"], 3),
        "checkpoint_bytes_on_device": nbytes, "checkpoint_saves": saves,
        "checkpoint_stall_ms": saves[-1]["host_stall_ms"],
        "checkpoint_copies_on_stream_ms": saves[-1]["copies_done_ms"],
        "old_synchronous_model_copy_ms": round(model_sync_ms, 2),
        "ddp_grad_copy_into_bucket_ms": round(handoff["ms"]["copy_into_bucket"], 3),
        "ddp_grad_kept_in_bucket_ms": round(handoff["ms"]["kept_in_bucket"], 3),
        "note": "host_stall_ms: the step waits this long (copies queued, not waited for); copies_on_stream_ms: "
                "when the device-to-host copies have landed (the next step's kernels queue behind them)",
    }
