"""The sections that start processes: DDP + compile + NCCL under torchrun, and the trainer's exact resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.gpu_check.common import (
    MODULE,
    REPO,
    Check,
    env_for_children,
    grad_stride_warning,
    tail,
    tiny_overrides,
)
from benchmarks.trainer_internals import (
    TRAINER_MAIN,
    StepRig,
    checkpoint_file_tensors,
    collectives_ok,
    load_cfg,
    to_yaml,
)
from data_pipeline.storage import atomic_write


def ddp_worker(out: Path, overrides: list[str]) -> int:
    """Under torchrun: DDP (forced, one rank) + compile + the trainer's step with no_sync accumulation."""
    import torch.distributed as dist
    from torch._dynamo.utils import counters

    cfg = load_cfg(None, [*tiny_overrides, *overrides])
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(backend, **({"device_id": device} if cuda else {}))
    torch.manual_seed(0)
    rig = StepRig(cfg, device, rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local, ddp=True)
    stats = rig.step_stats()
    s = cfg.model.image_size
    for step in range(4):
        for micro in range(2):  # the first under no_sync()
            x = torch.randint(0, 256, (2, 3, s, s), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
            losses, t = rig.forward_backward({"image": x}, scale=0.5, sync_grads=micro == 1)
            stats.add_losses(losses, t)
        grad_norm, found_inf = rig.optimizer_step()
        stats.add_step(grad_norm, found_inf, step, max_run=5)
    values = stats.reduce()  # all-reduce of a device vector over the default group
    gathered_ok, broadcast_ok = collectives_ok(rig.info.rank, device)
    result = {"backend": backend, "world_size": rig.info.world_size, "ddp": type(getattr(
        rig.train_model, "_orig_mod", rig.train_model)).__name__, "compiled": rig.compiled,
        "precision": str(rig.amp or "fp32"), "loss": values["train/loss"], "grad_norm": values["train/grad_norm"],
        "skipped_steps": values["train/skipped_steps_interval"], "all_gather_ok": gathered_ok,
        "broadcast_ok": broadcast_ok,
        # Dynamo graphs of the model (DDPOptimizer splits the one graph at bucket boundaries in the
        # backend) and the breaks, which torch puts in DDP's own Python on purpose (its forward
        # wrapper runs eagerly: logger, _inside_ddp_forward), none in the model.
        "graphs": counters["stats"].get("unique_graphs", 0),
        "graph_breaks": {k.strip().splitlines()[0][:160] + " | " + (k.strip().splitlines() + [""])[1].strip()[:200]: v
                         for k, v in counters["graph_break"].items()}}
    atomic_write(out, json.dumps(result))
    dist.destroy_process_group()
    return 0


def section_ddp_nccl(check: Check) -> dict[str, Any]:
    """torchrun one process: DDP + compile + NCCL with accumulation, and the trainer's collectives."""
    out = check.work / "ddp_worker.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           "-m", MODULE, "--ddp-worker", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env_for_children(check), capture_output=True, text=True,
                          timeout=max(30.0, check.left()))
    text = proc.stdout + proc.stderr
    if proc.returncode != 0 or not out.is_file():
        return {"status": "failed", "returncode": proc.returncode, "output_tail": tail(text)}
    res = json.loads(out.read_text())
    res["grad_stride_warning"] = grad_stride_warning in text
    ok = (res["ddp"] == "DistributedDataParallel" and res["all_gather_ok"] and res["broadcast_ok"]
          and not res["grad_stride_warning"] and 0 < res["loss"] < 10 and res["skipped_steps"] == 0
          and (not res["compiled"] or res["graphs"] == 1))
    if not ok:
        res.update(status="failed", output_tail=tail(text))
    return res


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if a.keys() != b.keys():
        return float("inf")
    return max((x.double() - y.double()).abs().max().item() for x, y in ((a[k], b[k]) for k in a))


def section_resume(check: Check) -> dict[str, Any]:
    """The trainer under torchrun: straight vs checkpoint + resume, compared tensor by tensor."""
    from data_pipeline.synthetic import ensure_synthetic_shards

    total, half = (320, 160) if check.mode == "gpu" else (32, 16)
    data = check.work / "resume_data"
    ensure_synthetic_shards(data, 128, 16, seed=0, progress=False)  # once, before the runs share it
    cfg_path = check.work / "resume.yaml"
    atomic_write(cfg_path, to_yaml(load_cfg(None, [
        *tiny_overrides, f"data.shards={data}", "data.synthetic_images=0", "data.num_workers=1",
        f"checkpoint.every_images={half}", "log.every_images=8", "log.sample_every_images=0",
        "log.tensorboard=false"])))
    procs: list[subprocess.Popen] = []

    def start(name: str, images: int) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
               str(TRAINER_MAIN), "--config", str(cfg_path), f"run.dir={check.work / name}",
               f"train.total_images={images}"]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env_for_children(check), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
        return procs[-1]

    def finish(p: subprocess.Popen) -> str:
        text, _ = p.communicate(timeout=max(30.0, check.left()))
        if p.returncode != 0:
            raise RuntimeError(f"trainer exited {p.returncode}:\n{tail(text)}")
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
        return {"status": "failed", "note": "the second run did not resume", "output_tail": tail(resumed)}
    a, b = checkpoint_file_tensors(check.work / "straight", total), checkpoint_file_tensors(check.work / "split", total)
    diff = _max_diff(a, b)
    out: dict[str, Any] = {"images": total, "checkpoint_at": half, "tensors": len(a),
                           "bit_exact": diff == 0.0, "max_abs_diff_resumed_vs_straight": diff,
                           "note": "world size 1: torchrun starts no process group for one rank; "
                                   "NCCL is exercised by the ddp_nccl section"}
    if diff != 0.0:  # is the device deterministic at all? a second straight run says
        finish(start("straight2", total))
        noise = _max_diff(a, checkpoint_file_tensors(check.work / "straight2", total))
        out["max_abs_diff_straight_vs_straight"] = noise
        if noise == 0.0:
            out["status"] = "failed"
            out["note"] = "two straight runs agree bit for bit but the resumed one differs: resume is not exact"
        else:
            out["note"] = ("not bit-exact, but two straight runs differ too (non-deterministic kernels, e.g. "
                           "cuDNN weight gradients or attention backward): resume is as exact as this device")
    return out
