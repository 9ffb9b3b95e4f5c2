"""Rank logic in one place. Every helper also works with no process group (one process).

The trainer reads the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT); the SLURM launcher sets the same variables.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib
import json
import logging
import os
import secrets
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from trainer.config import ConfigError
from trainer.run_lock import RunDirLocked, RunLock, StepRecord

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


def wait_for_endpoint(addr: str, port: int, timeout_s: float, *, poll_s: float = 1.0) -> None:
    """Wait until ``addr:port`` accepts a TCP connection; a ConfigError naming it after ``timeout_s``.

    Under SLURM every rank starts at once and rank 0 opens the rendezvous store in
    init_process_group; the other ranks would otherwise wait the whole (long) start-up timeout
    for a rank 0 that is not coming, and then fail with a traceback.
    """
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while True:
        try:
            socket.create_connection((addr, port), timeout=min(5.0, timeout_s)).close()
            return
        except socket.gaierror as e:
            last = e  # DNS may lag behind a freshly booted node: retried like a refused connection
        except OSError as e:
            last = e
        if time.monotonic() >= deadline:
            why = (f"MASTER_ADDR={addr} does not resolve on this host (add the node names to DNS or "
                   f"/etc/hosts)" if isinstance(last, socket.gaierror) else f"last error: {last}")
            raise ConfigError(
                f"rendezvous endpoint {addr}:{port} did not answer within {timeout_s:.0f} s "
                f"(rank {os.environ.get('RANK', '?')} on host {socket.gethostname()}): is rank 0 running "
                f"on {addr}, and is the port open between nodes? {why}"
            )
        time.sleep(poll_s)


def init_distributed(backend: str = "auto", init_timeout_s: int = 1800,
                     rendezvous_timeout_s: float = 300.0) -> DistInfo:
    """Join the process group described by the torchrun environment and pick the device.

    Outside torchrun (the SLURM launcher), ranks other than 0 first wait at most
    ``rendezvous_timeout_s`` (capped by ``init_timeout_s``) for MASTER_ADDR:MASTER_PORT to answer.
    """
    global _control_group
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and rank != 0 and "TORCHELASTIC_RUN_ID" not in os.environ and "MASTER_ADDR" in os.environ:
        # (Under torchrun the agent's store is already up: its rendezvous has its own timeouts.)
        wait_for_endpoint(os.environ["MASTER_ADDR"], int(os.environ.get("MASTER_PORT", "29500")),
                          min(rendezvous_timeout_s, init_timeout_s))
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


def run_on_main(fn: Callable[[], T], errors: type[BaseException] | tuple[type[BaseException], ...]) -> T | None:
    """``fn()`` on rank 0 only (None elsewhere); one of ``errors`` raised there is raised on every rank.

    So a start-up check that fails on rank 0 (e.g. the run-directory lock) ends every rank with
    the same one-line message instead of leaving them waiting in the next collective.
    """
    result, failure = None, None
    if is_main():
        try:
            result = fn()
        except errors as e:
            failure = (type(e), str(e))
    failure = broadcast_object(failure)
    if failure is not None:
        kind, msg = failure
        raise kind(msg)
    return result


def _ranges(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out: list[str] = []
    for r in sorted(ranks):
        if out and out[-1].split("-")[-1] == str(r - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{r}"
        else:
            out.append(str(r))
    return ", ".join(out)


def check_same_config(flat: dict[str, Any]) -> None:
    """Every rank runs the same resolved config, or a ConfigError names who differs and where.

    Nodes that read different copies of a YAML file (an old checkout on one node), or get
    different overrides, would otherwise train together on different settings, or hang.
    """
    if not is_initialized():
        return
    blob = json.dumps(flat, sort_keys=True, default=str)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:12]
    seen = gather_objects((digest, socket.gethostname()))
    if len({d for d, _ in seen}) == 1:
        return
    flats = gather_objects(flat)  # every rank saw the mismatch: one more (rare) collective
    ref, ref_host = flats[0], seen[0][1]
    odd = [r for r, (d, _) in enumerate(seen) if d != seen[0][0]]
    keys = sorted(k for k in set(ref) | set(flats[odd[0]]) if ref.get(k) != flats[odd[0]].get(k))
    diff = "; ".join(f"{k}: {ref.get(k)!r} on rank 0 vs {flats[odd[0]].get(k)!r}" for k in keys[:3])
    hosts = sorted({seen[r][1] for r in odd})
    raise ConfigError(
        f"ranks disagree on the config (fingerprint {seen[0][0]} on rank 0, host {ref_host}): "
        f"rank(s) {_ranges(odd)} on host(s) {', '.join(hosts)} differ: {diff}"
        f"{' ...' if len(keys) > 3 else ''}. Every node must run the same command, code and config files"
    )


def check_shared_dir(directory: str | Path, *, timeout_s: float = 30.0) -> None:
    """Rank 0 writes a file in ``directory``; every rank must see it (a ConfigError otherwise).

    The run directory must be one file system every node mounts: a node-local path of the
    same name lets each node resume from its own checkpoints. Called with the same path on every
    rank; waits up to ``timeout_s`` for file systems with attribute caching (NFS).
    """
    if not is_initialized():
        return
    directory = Path(directory)
    token = secrets.token_hex(8) if is_main() else None
    probe_name = broadcast_object(f".shared-check-{token}" if is_main() else None)
    probe = directory / probe_name
    if is_main():
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_text(probe_name)
    barrier()  # rank 0's write happens before anyone looks
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            seen = probe.read_text() == probe_name
        except OSError:
            seen = False
        if seen or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    results = gather_objects((seen, socket.gethostname()))
    if is_main():
        probe.unlink(missing_ok=True)
    blind = [r for r, (ok, _) in enumerate(results) if not ok]
    if blind:
        hosts = sorted({results[r][1] for r in blind})
        raise ConfigError(
            f"run directory {directory} is not shared: a file rank 0 (host {results[0][1]}) wrote there "
            f"is not visible after {timeout_s:.0f} s to rank(s) {_ranges(blind)} on host(s) "
            f"{', '.join(hosts)}. Put run.dir on a file system every node mounts (NFS, Lustre, GPFS)"
        )


def claim_run_dir(run_dir: str | Path, flat_config: dict[str, Any], rank: int,
                  collective_timeout_s: float) -> tuple[RunLock | None, StepRecord]:
    """Multi-node start-up, before anything in ``run_dir`` is touched; one-line errors on every rank.

    Every rank runs the same config; rank 0 takes the run-directory lock (a second live job is
    refused); every node sees the run directory; then this rank's step record starts, its
    heartbeat a sixth of the collective timeout (at most 10 s) so a silent rank stands out
    long before the others time out. Returns (the lock on rank 0, else None; the record).
    """
    check_same_config(flat_config)
    try:
        lock = run_on_main(lambda: RunLock.acquire(run_dir), RunDirLocked)
    except RunDirLocked as e:
        raise ConfigError(str(e)) from None  # a second job is a user error: exit 2, never requeued
    check_shared_dir(run_dir)
    attempt = broadcast_object(secrets.token_hex(6) if is_main() else None)  # names this attempt's records
    return lock, StepRecord(run_dir, rank, run=attempt, interval_s=max(1.0, min(10.0, collective_timeout_s / 6)))


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
