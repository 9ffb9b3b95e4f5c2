"""Crash-safe checkpoints: a registry of state dicts, written atomically in the background.

Layout of ``<run>/checkpoints/``:
  ckpt-<images, 12 digits>.pt   complete checkpoints (written as .tmp, fsynced, renamed)
  latest                        name of the newest complete checkpoint (updated after the rename)
  milestone-<images>.pt         hard links kept forever (every checkpoint.milestone_every_images)
  best-<metric>.pt              hard link to the checkpoint with the best metric (e.g. FID)
A file that does not load (truncated, corrupt) is reported and the previous one used.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("ddpm")

_CKPT_RE = re.compile(r"^ckpt-(\d{12})\.pt$")
REQUIRED_KEYS = ("model", "ema", "optimizer", "train_state", "config", "fingerprint")


def _to_host(obj: Any, cuda_copies: list[torch.Tensor]) -> Any:
    """A deep copy with every tensor on the CPU: the only part of a save the training step waits for.

    CUDA tensors go into pinned buffers with the same strides by ``non_blocking`` copies on the
    current stream (appended to ``cuda_copies``): the host does not wait, and the next optimizer
    step, queued behind them on the same stream, cannot overwrite a weight before it is copied.
    The writer thread waits for the copies' event before reading the buffers.
    """
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.is_cuda and t.is_non_overlapping_and_dense():
            # pinned blocks come from torch's caching host allocator: the next save reuses them
            buf = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, pin_memory=True)
            buf.copy_(t, non_blocking=True)
            cuda_copies.append(buf)
            return buf
        return t.to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_host(v, cuda_copies) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_host(v, cuda_copies) for v in obj)
    return obj


def host_copy(state: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """(host copy of ``state``, an event to wait on before reading it, or None when already complete)."""
    cuda_copies: list[torch.Tensor] = []
    host_state = _to_host(state, cuda_copies)
    if not cuda_copies:
        return host_state, None
    done = torch.cuda.Event()
    done.record()  # after the last copy on the current stream
    return host_state, done


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file, fsync and rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def ckpt_name(nimg: int) -> str:
    """File name of the checkpoint taken after ``nimg`` training images."""
    return f"ckpt-{nimg:012d}.pt"


def _link(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # file systems without hard links: copy
        tmp.write_bytes(src.read_bytes())
    os.replace(tmp, dst)


class CheckpointManager:
    """Writes, prunes and finds checkpoints in one directory (rank 0 writes; every rank may read)."""

    def __init__(self, directory: str | Path, keep_last: int = 3, milestone_every_images: int = 0,
                 async_write: bool = True) -> None:
        self.dir = Path(directory)
        self.keep_last = keep_last
        self.milestone_every = milestone_every_images
        self.async_write = async_write
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # ------------------------------------------------------------------ writing
    def save(self, state: dict[str, Any], nimg: int, best: str | None = None) -> Path:
        """Copy ``state`` to host memory, then write it (in the background if configured)."""
        self.wait()  # one write at a time; also surfaces an earlier background error
        host_state, copied = host_copy(state)
        path = self.dir / ckpt_name(nimg)
        if self.async_write:
            self._thread = threading.Thread(
                target=self._write_guarded, args=(host_state, path, nimg, best, copied), name="ckpt-writer",
                daemon=False,
            )
            self._thread.start()
        else:
            self._write(host_state, path, nimg, best, copied)
        return path

    def _write_guarded(self, state: dict[str, Any], path: Path, nimg: int, best: str | None,
                       copied: Any = None) -> None:
        try:
            self._write(state, path, nimg, best, copied)
        except BaseException as e:  # re-raised in the training thread by wait()
            self._error = e

    def _write(self, state: dict[str, Any], path: Path, nimg: int, best: str | None, copied: Any = None) -> None:
        if copied is not None:
            copied.synchronize()  # the device-to-host copies have landed in the pinned buffers
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic: a reader sees the old set or the new complete file
        _fsync_dir(self.dir)
        atomic_write_bytes(self.dir / "latest", (path.name + "\n").encode())
        if self.milestone_every and nimg % self.milestone_every == 0:
            _link(path, self.dir / f"milestone-{nimg:012d}.pt")
        if best:
            _link(path, self.dir / f"best-{best}.pt")
        self._prune()
        log.info("checkpoint written: %s", path)

    def mark_best(self, metric: str) -> None:
        """Point ``best-<metric>.pt`` at the newest complete checkpoint (after its write finished)."""
        self.wait()
        newest = self.complete_checkpoints()
        if newest:
            _link(newest[-1], self.dir / f"best-{metric}.pt")

    def _prune(self) -> None:
        for old in self.complete_checkpoints()[: -self.keep_last]:
            old.unlink(missing_ok=True)  # milestones/best are hard links and survive

    def remove_partial(self) -> None:
        """Delete temporary files left by a writer that was killed mid-write (call at start-up)."""
        if self.dir.is_dir():
            for tmp in self.dir.glob("*.tmp"):
                log.warning("removing incomplete checkpoint file %s", tmp)
                tmp.unlink(missing_ok=True)

    def wait(self) -> None:
        """Block until the background write (if any) is finished; re-raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"writing a checkpoint failed: {err}") from err

    # ------------------------------------------------------------------ reading
    def complete_checkpoints(self) -> list[Path]:
        """Complete checkpoint files, oldest first (temporary files are never listed)."""
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir() if _CKPT_RE.match(p.name))

    def load_latest(self, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], Path] | None:
        """The newest checkpoint that loads and has every required entry, or None.

        A truncated or corrupt newest file is reported and the previous one tried.
        """
        for path in reversed(self.complete_checkpoints()):
            try:
                state = load_checkpoint(path, map_location)
            except Exception as e:  # noqa: BLE001 - any failure means "not usable"
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                log.warning("checkpoint %s is unreadable (%s); falling back to the previous one", path, reason)
                continue
            return state, path
        return None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load one checkpoint with weights_only=True and check its entries."""
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict):
        raise ValueError("not a checkpoint dictionary")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(f"missing entries {missing}")
    return state


def resolve_checkpoint(run_dir_or_ckpt: str | Path) -> Path:
    """A checkpoint file from a run directory (its newest complete one), a checkpoints/ dir or a file."""
    p = Path(run_dir_or_ckpt)
    if p.is_file():
        return p
    for d in (p / "checkpoints", p):
        found = CheckpointManager(d).complete_checkpoints()
        if found:
            return found[-1]
    raise FileNotFoundError(f"no complete checkpoint under {p} (looked for checkpoints/ckpt-*.pt)")


def load_for_inference(run_dir_or_ckpt: str | Path, which: str = "ema", ema_index: int = 0,
                       map_location: str | torch.device = "cpu") -> tuple[Any, Any, dict[str, Any]]:
    """(model in eval mode, diffusion, resolved config dict) from a run directory or checkpoint file.

    ``which`` is "ema" (default: sampling and evaluation use EMA weights) or "model".
    Falls back to older checkpoints when the newest is unreadable.
    """
    from models.diffusion import DiffusionConfig, GaussianDiffusion
    from models.unet import UNet, UNetConfig
    from trainer.config import ConfigError, from_dict

    p = Path(run_dir_or_ckpt)
    if p.is_file():
        state, path = load_checkpoint(p, map_location), p
    else:
        found = None
        for d in (p / "checkpoints", p):
            found = CheckpointManager(d).load_latest(map_location)
            if found:
                break
        if not found:
            raise FileNotFoundError(f"no usable checkpoint under {p}")
        state, path = found
    try:
        cfg = from_dict(state["config"])
        mcfg, dcfg = cfg.model, cfg.diffusion
    except ConfigError:  # a config from another version: take the two sections we need
        mcfg = UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in state["config"]["model"].items()})
        dcfg = DiffusionConfig(**state["config"]["diffusion"])
    model = UNet(mcfg)
    if which == "ema":
        weights = state["ema"]["shadows"][ema_index]
    elif which == "model":
        weights = state["model"]
    else:
        raise ValueError(f"which: expected 'ema' or 'model', got {which!r}")
    model.load_state_dict(weights)
    model.eval()
    log.info("loaded %s weights from %s", which, path)
    return model, GaussianDiffusion(dcfg), state["config"]
