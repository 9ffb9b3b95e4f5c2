"""Snapshots of the power-function EMA profiles: what ``ddpm-ema`` reconstructs any profile from.

Layout of ``<run>/ema/``: ``snapshot-<images, 12 digits>.pt``, each one torch.save'd dict

    {"format": 1, "nimg": images seen, "batch": global batch (updates came every ``batch`` images),
     "sigma_rels": [...], "gammas": [...], "shadows": [{name: fp16 tensor} per power profile],
     "config": the run's resolved config}

written by rank 0 every ``ema.snapshot_every_images`` and at the end of training, atomically
(data_pipeline.storage) and in the background like checkpoints (a storage fault goes to the
stop request). A run resumed from the checkpoint at N images first removes the snapshots after N
(the redone steps write them again), and ``save_checkpoint`` waits for the snapshot writes before
a checkpoint: a complete checkpoint at N implies every snapshot up to N is complete, so a requeue
neither loses nor duplicates one. Checkpoint retention never touches this folder.
"""

from __future__ import annotations

import logging
import re
import threading
from pathlib import Path
from typing import Any

import torch

from data_pipeline.storage import atomic_open, remove_partial
from trainer.checkpoint import host_copy, state_bytes
from trainer.ema import EMA

log = logging.getLogger("ddpm")

snapshots_per_run = 32  # what ema.snapshot_every_images=0 means (EDM2 keeps a snapshot every ~8M images)
_NAME_RE = re.compile(r"^snapshot-(\d{12})\.pt$")


def snapshot_dir(run_dir: str | Path) -> Path:
    """Where a run keeps its EMA snapshots."""
    return Path(run_dir) / "ema"


def snapshot_name(nimg: int) -> str:
    """File name of the snapshot taken after ``nimg`` training images."""
    return f"snapshot-{nimg:012d}.pt"


def snapshot_interval(every_images: int, total_images: int, batch: int) -> int:
    """``ema.snapshot_every_images``, or for 0 about ``snapshots_per_run`` per run, a multiple of the batch."""
    if every_images > 0:
        return every_images
    return batch * max(1, round(total_images / snapshots_per_run / batch))


def snapshot_bytes(num_values: int, num_profiles: int, num_tensors: int) -> int:
    """The size of one snapshot file: fp16 copies of ``num_values`` floats in ``num_tensors`` tensors per
    profile, ~300 bytes of zip record and name per tensor (measured), and the config."""
    return (2 * num_values + 320 * num_tensors) * num_profiles + (16 << 10)


def list_snapshots(directory: str | Path) -> list[tuple[int, Path]]:
    """(images, path) of the complete snapshots in ``directory``, oldest first (temporary files never)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME_RE.match(p.name))]
    return sorted(found)


def prune_after(directory: str | Path, nimg: int) -> list[Path]:
    """Remove partial writes and the snapshots taken after ``nimg`` images (a resume redoes them)."""
    for tmp in remove_partial(directory):
        log.warning("removed incomplete EMA snapshot file %s", tmp)
    removed = []
    for n, path in list_snapshots(directory):
        if n > nimg:
            path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        log.info("removed %d EMA snapshot(s) taken after the checkpoint at %d images; the redone steps write "
                 "them again", len(removed), nimg)
    return removed


@torch.no_grad()
def snapshot_state(ema: EMA, nimg: int, batch: int, config: dict[str, Any]) -> dict[str, Any]:
    """What one snapshot holds: the power profiles in fp16 (new tensors: later updates do not touch them)."""
    if ema.nimg != nimg:
        raise ValueError(f"the EMA was last updated at {ema.nimg} images, not at {nimg}")
    return {
        "format": 1,
        "nimg": int(nimg),
        "batch": int(batch),
        "sigma_rels": list(ema.sigma_rels),
        "gammas": list(ema.gammas),
        "shadows": [{n: t.to(torch.float16) for n, t in zip(ema.names, shadow)} for shadow in ema.power_shadows],
        "config": config,
    }


class SnapshotWriter:
    """Writes snapshots one at a time, in a background thread like CheckpointManager (rank 0 only)."""

    def __init__(self, directory: str | Path, every_images: int, background: bool = True) -> None:
        self.dir = Path(directory)
        self.every = every_images
        self.background = background
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, ema: EMA, nimg: int, batch: int, config: dict[str, Any]) -> Path:
        """Copy the power profiles to host memory (fp16), then write them (in the background if configured)."""
        self.flush()  # one write at a time
        if self._error is not None:
            return self.dir / snapshot_name(nimg)  # the run is stopping for that fault; no more writes
        host_state, copied = host_copy(snapshot_state(ema, nimg, batch, config))
        path = self.dir / snapshot_name(nimg)
        if self.background:
            self._thread = threading.Thread(target=self._write_guarded, args=(host_state, path, copied),
                                            name="ema-snapshot-writer", daemon=False)
            self._thread.start()
        else:
            self._write_guarded(host_state, path, copied)
        return path

    def _write_guarded(self, state: dict[str, Any], path: Path, copied: Any) -> None:
        try:
            if copied is not None:
                copied.synchronize()  # the device-to-host copies have landed in the pinned buffers
            with atomic_open(path, needed=state_bytes(state), what="EMA snapshot") as f:
                torch.save(state, f)
            log.info("EMA snapshot written: %s", path)
        except BaseException as e:  # noqa: BLE001 - reported through failure() to the stop request
            self._error = e

    def failure(self) -> BaseException | None:
        """The error of a write that has ended, without waiting for one still running."""
        if self._thread is not None and not self._thread.is_alive():
            self._thread.join()
            self._thread = None
        return self._error

    def flush(self) -> BaseException | None:
        """Wait for the write in progress; return the error of any write so far (None: all complete)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        return self._error
