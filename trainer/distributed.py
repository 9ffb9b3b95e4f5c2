"""Collectives and rank helpers in one place; every helper also works with no process group.

Imports nothing of the trainer (as EDM2's torch_utils/distributed.py): start-up checks live in
trainer.startup, signal handling in trainer.stop. Host-side flags (stop requests, faults) go over
a gloo group so they never wait on the GPU stream.
"""

from __future__ import annotations

import datetime
import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

log = logging.getLogger("ddpm")


@dataclass
class DistInfo:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


T = TypeVar("T")

_control_group: Any = None  # a gloo group for host-side flags (stop requests), so they never sync the GPU


def is_initialized() -> bool:
    """True when a process group exists."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """True on rank 0."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for all ranks (no-op alone)."""
    if is_initialized():
        dist.barrier()


def join_process_group(backend: str, device: torch.device, init_timeout_s: int) -> None:
    """init_process_group for the torchrun environment, plus the gloo control group."""
    global _control_group
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    # torch.distributed.nn.functional binds group.WORLD into the default arguments of ten
    # functions when it is first imported. Imported after init (torch._dynamo imports it, and
    # torchvision / torch-fidelity import dynamo lazily), it pins the default group past
    # destroy_process_group(): gloo's worker threads then outlive it and can drop the last
    # reference to a collective's tensors during interpreter shutdown, which aborts the
    # process ("terminate called without an active exception"). Imported first, it binds None.
    importlib.import_module("torch.distributed.nn.functional")
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        kwargs["device_id"] = device  # eager NCCL init, binds the communicator to this GPU
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=init_timeout_s), **kwargs)
    # Host-side control messages (stop flags) go over gloo: an all-reduce of a few CPU
    # integers per step costs microseconds and never waits on the GPU stream.
    _control_group = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD


def set_collective_timeout(seconds: int) -> None:
    """Shorten the timeout of the default group after start-up, so a dead rank ends the job."""
    if not is_initialized():
        return
    public = getattr(dist, "set_timeout", None)  # torch >= 2.14
    private = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    if public is None and private is None:
        log.warning("this torch cannot change the collective timeout; keeping the start-up value")
        return
    timeout = datetime.timedelta(seconds=seconds)
    groups = [None] + ([_control_group] if _control_group not in (None, dist.group.WORLD) else [])
    for g in groups:
        if public is not None:
            public(timeout, group=g)
        else:
            private(timeout, g)


def destroy() -> None:
    """Leave the process group."""
    global _control_group
    if is_initialized():
        dist.destroy_process_group()
    _control_group = None


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (returned for chaining)."""
    if is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max_ints(values: list[int]) -> list[int]:
    """Element-wise max of host integers over ranks, on the gloo control group (no GPU sync)."""
    if not is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control_group)
    return [int(v) for v in t.tolist()]


def all_reduce_max_int(value: int) -> int:
    """Max of one host integer over ranks (see all_reduce_max_ints)."""
    return all_reduce_max_ints([value])[0]


def all_gather_tensor(t: torch.Tensor) -> torch.Tensor:
    """Concatenate along dim 0 over ranks; ranks may hold different counts."""
    if not is_initialized():
        return t
    world = get_world_size()
    n = torch.tensor([t.shape[0]], device=t.device, dtype=torch.int64)
    counts = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(counts, n)
    sizes = [int(c.item()) for c in counts]
    biggest = max(sizes)
    padded = torch.zeros((biggest, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return torch.cat([o[:s] for o, s in zip(out, sizes)], dim=0)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send a picklable object from ``src`` to every rank."""
    if not is_initialized():
        return obj
    box = [obj if get_rank() == src else None]
    dist.broadcast_object_list(box, src=src, group=_control_group)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's object, on every rank (small objects only: cursors, stats)."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj, group=_control_group)
    return out


def run_on_main(fn: Callable[[], T], errors: type[BaseException] | tuple[type[BaseException], ...]) -> T | None:
    """``fn()`` on rank 0 only (None elsewhere); one of ``errors`` raised there is raised on every rank.

    So a start-up check that fails on rank 0 (e.g. the run-directory lock) ends every rank with
    the same one-line message instead of leaving them waiting in the next collective.
    """
    result, failure, own = None, None, None
    if is_main():
        try:
            result = fn()
        except errors as e:
            failure = (type(e), str(e))
        except Exception as e:  # anything else still releases the other ranks, then raises here
            own, failure = e, (RuntimeError, f"rank 0 failed: {type(e).__name__}: {e}")
    failure = broadcast_object(failure)
    if own is not None:
        raise own
    if failure is not None:
        kind, msg = failure
        raise kind(msg)
    return result


def rank_ranges(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out: list[str] = []
    for r in sorted(ranks):
        if out and out[-1].split("-")[-1] == str(r - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{r}"
        else:
            out.append(str(r))
    return ", ".join(out)
