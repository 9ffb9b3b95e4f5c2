"""Start-up of a job, before anything in the run directory is touched: join the process group,
check that every rank runs the same config, take the run directory (one live job), check that
every node sees it and that it can hold the run, and start this rank's step record.

Each check fails on every rank with the same one-line SetupError (exit code 2).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Any

import torch

from data_pipeline.storage import StorageError, atomic_write, check_writable, fmt_bytes, free_bytes
from trainer import distributed as du
from trainer.config import ConfigError
from trainer.distributed import DistInfo
from trainer.run_lock import RunDirLocked, RunLock, StepRecord

log = logging.getLogger("ddpm")


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
    if world > 1 and not du.is_initialized():
        du.join_process_group(backend, device, init_timeout_s)
    log.info(
        "rank %d/%d (local %d) on host %s, device %s", rank, world, local_rank, socket.gethostname(), device
    )
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def check_same_config(flat: dict[str, Any]) -> None:
    """Every rank runs the same resolved config, or a ConfigError names who differs and where.

    Nodes that read different copies of a YAML file (an old checkout on one node), or get
    different overrides, would otherwise train together on different settings, or hang.
    """
    if not du.is_initialized():
        return
    blob = json.dumps(flat, sort_keys=True, default=str)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:12]
    seen = du.gather_objects((digest, socket.gethostname()))
    if len({d for d, _ in seen}) == 1:
        return
    flats = du.gather_objects(flat)  # every rank saw the mismatch: one more (rare) collective
    ref, ref_host = flats[0], seen[0][1]
    odd = [r for r, (d, _) in enumerate(seen) if d != seen[0][0]]
    keys = sorted(k for k in set(ref) | set(flats[odd[0]]) if ref.get(k) != flats[odd[0]].get(k))
    diff = "; ".join(f"{k}: {ref.get(k)!r} on rank 0 vs {flats[odd[0]].get(k)!r}" for k in keys[:3])
    hosts = sorted({seen[r][1] for r in odd})
    raise ConfigError(
        f"ranks disagree on the config (fingerprint {seen[0][0]} on rank 0, host {ref_host}): "
        f"rank(s) {du.rank_ranges(odd)} on host(s) {', '.join(hosts)} differ: {diff}"
        f"{' ...' if len(keys) > 3 else ''}. Every node must run the same command, code and config files"
    )


def check_shared_dir(directory: str | Path, *, timeout_s: float = 30.0) -> None:
    """Rank 0 writes a file in ``directory``; every rank must see it (a ConfigError otherwise).

    The run directory must be one file system every node mounts: a node-local path of the
    same name lets each node resume from its own checkpoints. Called with the same path on every
    rank; waits up to ``timeout_s`` for file systems with attribute caching (NFS).
    """
    if not du.is_initialized():
        return
    directory = Path(directory)
    token = secrets.token_hex(8) if du.is_main() else None
    probe_name = du.broadcast_object(f".shared-check-{token}" if du.is_main() else None)
    probe = directory / probe_name
    if du.is_main():
        atomic_write(probe, probe_name, what="shared-directory probe")
    du.barrier()  # rank 0's write happens before anyone looks
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            seen = probe.read_text() == probe_name
        except OSError:
            seen = False
        if seen or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    results = du.gather_objects((seen, socket.gethostname()))
    if du.is_main():
        probe.unlink(missing_ok=True)
    blind = [r for r, (ok, _) in enumerate(results) if not ok]
    if blind:
        hosts = sorted({results[r][1] for r in blind})
        raise ConfigError(
            f"run directory {directory} is not shared: a file rank 0 (host {results[0][1]}) wrote there "
            f"is not visible after {timeout_s:.0f} s to rank(s) {du.rank_ranges(blind)} on host(s) "
            f"{', '.join(hosts)}. Put run.dir on a file system every node mounts (NFS, Lustre, GPFS)"
        )


def claim_run_dir(run_dir: str | Path, flat_config: dict[str, Any], rank: int,
                  collective_timeout_s: float) -> tuple[RunLock | None, StepRecord]:
    """Multi-node start-up, before anything in ``run_dir`` is touched; one-line errors on every rank.

    Every rank runs the same config; rank 0 takes the run-directory lock (a second live job is
    refused); every node sees the run directory; then this rank's step record starts, its
    heartbeat (and the lock's) a sixth of the collective timeout (at most 10 s) so a silent rank
    stands out long before the others time out, and a full disk under either is seen within it.
    Returns (the lock on rank 0, else None; the record).
    """
    check_same_config(flat_config)
    beat_s = max(1.0, min(10.0, collective_timeout_s / 6))
    lock = du.run_on_main(lambda: _take_run_dir(run_dir, beat_s), ConfigError)
    check_shared_dir(run_dir)
    attempt = du.broadcast_object(secrets.token_hex(6) if du.is_main() else None)  # names this attempt's records
    try:
        record = StepRecord(run_dir, rank, run=attempt, interval_s=beat_s)
    except StorageError as e:
        raise ConfigError(str(e)) from None
    return lock, record


RUN_DIR_FIX = "make it writable, or set run.dir to a writable directory, then run the same command again"


def _take_run_dir(run_dir: str | Path, heartbeat_s: float = 10.0) -> RunLock:
    """Rank 0: the run directory is writable, then its lock; both failures are one-line ConfigErrors."""
    try:
        check_writable(run_dir, what="run directory", fix=RUN_DIR_FIX)
        return RunLock.acquire(run_dir, heartbeat_s=heartbeat_s)
    except (StorageError, RunDirLocked) as e:
        raise ConfigError(str(e)) from None  # a second job or a read-only disk: exit 2, never requeued


def preflight_space(directory: str | Path, checkpoint_bytes: int, keep_last: int, existing: int = 0) -> None:
    """Before training: refuse when the next checkpoint cannot fit, warn when fewer than ``keep_last`` do.

    ``existing``: complete checkpoints already there (retention removes the oldest only after a
    new one is complete, so each write needs its whole size free).
    """
    free = free_bytes(directory)
    if free is None or checkpoint_bytes <= 0:
        return
    fit = free // checkpoint_bytes
    if fit < 1:
        raise ConfigError(
            f"the filesystem of {directory} has {fmt_bytes(free)} free but one checkpoint of this run needs "
            f"{fmt_bytes(checkpoint_bytes)}: free space or set run.dir elsewhere, then run the same command again")
    want = max(1, keep_last - existing)
    if fit < want:
        log.warning("only %d more checkpoint(s) of %s fit in the %s free under %s (checkpoint.keep_last=%d): "
                    "free space before the run needs them", fit, fmt_bytes(checkpoint_bytes), fmt_bytes(free),
                    directory, keep_last)


COMPILE_CACHE = "inductor_cache"  # <run dir>/inductor_cache: torch.compile's cache, unless TORCHINDUCTOR_CACHE_DIR is set


def remove_compile_partials(cache: str | Path, pid: int | None = None) -> list[Path]:
    """Remove the temporary files torch.compile left in its cache (``.<pid>.<thread>.tmp``, written
    then renamed: a full disk leaves them); only process ``pid``'s when given. Returns them."""
    root = Path(cache)
    if not root.is_dir():
        return []
    removed = []
    for p in root.rglob(f".{pid if pid is not None else '*'}.*.tmp"):
        if p.name.split(".")[1].isdigit() and p.is_file():
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed
