"""Rank logic in one place. Every helper also works with no process group (one process).

The trainer reads the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT); the SLURM launcher sets the same variables.
"""

from __future__ import annotations

import datetime
import importlib
import logging
import os
import signal
import socket
from dataclasses import dataclass
from typing import Any

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


def init_distributed(backend: str = "auto", init_timeout_s: int = 1800) -> DistInfo:
    """Join the process group described by the torchrun environment and pick the device."""
    global _control_group
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not is_initialized():
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
        dist.init_process_group(
            backend=backend, timeout=datetime.timedelta(seconds=init_timeout_s), **kwargs
        )
        # Host-side control messages (stop flags) go over gloo: an all-reduce of one
        # CPU integer per step costs microseconds and never waits on the GPU stream.
        _control_group = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
    log.info(
        "rank %d/%d (local %d) on host %s, device %s", rank, world, local_rank, socket.gethostname(), device
    )
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


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


def all_reduce_max_int(value: int) -> int:
    """Max of one host integer over ranks, on the gloo control group (no GPU sync)."""
    if not is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control_group)
    return int(t.item())


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


class StopRequest:
    """Turns SIGTERM/SIGINT/SIGUSR1/SIGUSR2 on any rank into one agreed stop step.

    The handler only sets a flag; ``agreed()`` all-reduces it (MAX) so every rank
    sees the same answer at the same step and they stop together.
    """

    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> StopRequest:
        """Install the handlers (main thread only)."""
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self) -> None:
        """Restore the previous handlers."""
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is None:
            log.warning(
                "rank %d received %s: stopping at the next step with a checkpoint",
                get_rank(), signal.Signals(signum).name,
            )
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C aborts at once
        self.received = signum

    def agreed(self) -> int:
        """0, or on every rank the same received signal number once any rank got one (one collective).

        MAX picks SIGTERM (15) over SIGUSR2 (12), SIGUSR1 (10) and SIGINT (2): a cancel or
        preemption wins over a time-limit warning that arrived at the same time.
        """
        return all_reduce_max_int(int(self.received) if self.received is not None else 0)
