"""Crash-safe checkpoints: a registry of state dicts, written atomically in the background.

Layout of ``<run>/checkpoints/``:
  ckpt-<images, 12 digits>.pt   complete checkpoints (written as .tmp, fsynced, renamed)
  latest                        name of the newest complete checkpoint (updated after the rename)
  milestone-<images>.pt         hard links kept forever (every checkpoint.milestone_every_images)
  best-<metric>.pt              hard link to the checkpoint with the best metric (e.g. FID)
A file that does not load (truncated, corrupt) is reported and the previous one used, the same
way by every reader (resume, sampling, evaluation, export, post-hoc EMA); a file named explicitly
that does not load is one line and exit code 2. Every write goes through data_pipeline.storage.

What a training checkpoint holds comes from one registry of stateful parts (``StateRegistry``:
model, EMA, optimizer, loader cursor, train state, each with state_dict/load_state_dict, as EDM2's
CheckpointIO and torchtitan's checkpointer take ``states={...}``); its required keys derive from it.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from data_pipeline.config import SetupError
from data_pipeline.storage import atomic_link, atomic_open, atomic_write, remove_partial
from trainer import distributed as du

log = logging.getLogger("ddpm")

_CKPT_RE = re.compile(r"^ckpt-(\d{12})\.pt$")
META_KEYS = ("config", "fingerprint")  # beside the registry's parts in every training checkpoint
INFERENCE_KEYS = ("config",)  # plus "ema" or "model": what sampling, evaluation and export need


class CheckpointError(SetupError):
    """A checkpoint named explicitly that does not load, or none under a run directory (exit code 2)."""


class StateRegistry:
    """The stateful parts of a run by name; a checkpoint is ``{name: part.state_dict()} | meta``.

    Parts named in ``gathered`` (the loader: each rank has its own cursor) are stored as the list
    of every rank's state (a collective: every rank calls ``state_dict``) and restored from it.
    """

    def __init__(self, parts: dict[str, Any], meta: dict[str, Any], gathered: Sequence[str] = ()) -> None:
        self.parts = parts
        self.meta = meta
        self.gathered = tuple(gathered)

    @property
    def required(self) -> tuple[str, ...]:
        """The keys a checkpoint of this run must hold to resume it."""
        return (*self.parts, *self.meta)

    def state_dict(self) -> dict[str, Any]:
        """Every part's state (gathered parts from every rank) and the meta entries."""
        out: dict[str, Any] = {}
        for name, part in self.parts.items():
            state = part.state_dict()
            out[name] = du.gather_objects(state) if name in self.gathered else state
        out.update(self.meta)
        return out

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Restore every part (a gathered part receives the list of every old rank's state)."""
        missing = [k for k in self.required if k not in saved]
        if missing:
            raise ValueError(f"checkpoint lacks entries {missing}")
        for name, part in self.parts.items():
            part.load_state_dict(saved[name])


def state_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nested state (what a checkpoint file of it roughly takes)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(state_bytes(v) for v in obj)
    return 0


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


def ckpt_name(nimg: int) -> str:
    """File name of the checkpoint taken after ``nimg`` training images."""
    return f"ckpt-{nimg:012d}.pt"


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
        self.committed_nimg = 0  # images of the newest checkpoint this manager wrote completely

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
        # Temporary file, fsync, rename: a reader sees the old set or the new complete file; a
        # failed write (full disk) removes its partial file and raises a one-line StorageError.
        with atomic_open(path, needed=state_bytes(state), what="checkpoint") as f:
            torch.save(state, f)
        atomic_write(self.dir / "latest", path.name + "\n", what="checkpoint pointer")
        if self.milestone_every and nimg % self.milestone_every == 0:
            atomic_link(path, self.dir / f"milestone-{nimg:012d}.pt", what="milestone checkpoint")
        if best:
            atomic_link(path, self.dir / f"best-{best}.pt", what="best checkpoint")
        self._prune()
        self.committed_nimg = max(self.committed_nimg, nimg)  # read by the training thread (an int: atomic)
        log.info("checkpoint written: %s", path)

    def mark_best(self, metric: str) -> None:
        """Point ``best-<metric>.pt`` at the newest complete checkpoint (after its write finished)."""
        self.wait()
        newest = self.complete_checkpoints()
        if newest:
            atomic_link(newest[-1], self.dir / f"best-{metric}.pt", what="best checkpoint")

    def _prune(self) -> None:
        for old in self.complete_checkpoints()[: -self.keep_last]:
            old.unlink(missing_ok=True)  # milestones/best are hard links and survive

    def remove_partial(self) -> None:
        """Delete temporary files left by a writer that was killed mid-write (call at start-up)."""
        for tmp in remove_partial(self.dir, legacy="ckpt-*.pt.tmp"):
            log.warning("removed incomplete checkpoint file %s", tmp)

    def failure(self) -> BaseException | None:
        """The error of a background write that has ended, without waiting for one still running."""
        if self._thread is not None and not self._thread.is_alive():
            self._thread.join()
            self._thread = None
        return self._error

    def wait(self, raise_error: bool = True) -> None:
        """Block until the background write (if any) is finished; re-raise its error (as it is: a
        full disk is a StorageError naming the file)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None and raise_error:
            err, self._error = self._error, None
            raise err

    # ------------------------------------------------------------------ reading
    def complete_checkpoints(self) -> list[Path]:
        """Complete checkpoint files, oldest first (temporary files are never listed)."""
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir() if _CKPT_RE.match(p.name))

    def load_latest(self, map_location: str | torch.device = "cpu",
                    required: Sequence[str] = INFERENCE_KEYS) -> tuple[dict[str, Any], Path] | None:
        """The newest checkpoint that loads and has every ``required`` entry, or None.

        A truncated or corrupt newest file is reported (one line) and the previous one tried.
        """
        for path in reversed(self.complete_checkpoints()):
            try:
                state = load_checkpoint(path, map_location, required)
            except Exception as e:  # noqa: BLE001 - any failure means "not usable"
                reason = _reason(e)
                log.warning("checkpoint %s is unreadable (%s); falling back to the previous one", path, reason)
                continue
            return state, path
        return None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    required: Sequence[str] = INFERENCE_KEYS) -> dict[str, Any]:
    """Load one checkpoint with weights_only=True and check its entries (``required``, and weights)."""
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict):
        raise ValueError("not a checkpoint dictionary")
    missing = [k for k in required if k not in state]
    if "ema" not in state and "model" not in state:
        missing.append("ema or model")
    if missing:
        raise ValueError(f"missing entries {missing}")
    return state


def _reason(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def find_checkpoint(run_dir_or_ckpt: str | Path, map_location: str | torch.device = "cpu",
                    required: Sequence[str] = INFERENCE_KEYS) -> tuple[dict[str, Any], Path]:
    """(state, path): a checkpoint file, or the newest usable one of a run directory or checkpoints/.

    Every reader falls back the same way: an unreadable newest checkpoint is named in one line and
    the previous complete one used. A file named explicitly that does not load, or a directory
    without a usable checkpoint, is a CheckpointError (one line, exit code 2).
    """
    p = Path(run_dir_or_ckpt)
    if p.is_file():
        try:
            return load_checkpoint(p, map_location, required), p
        except Exception as e:  # noqa: BLE001 - any failure means "not usable"
            raise CheckpointError(f"{p} is not a usable checkpoint ({_reason(e)}): pass another checkpoint "
                                  "file, or the run directory to use its newest complete one") from None
    if not p.exists():
        raise CheckpointError(f"{p} does not exist: pass a run directory or a checkpoint file")
    for d in (p / "checkpoints", p):
        found = CheckpointManager(d).load_latest(map_location, required)
        if found:
            return found
    raise CheckpointError(f"no usable checkpoint under {p} (looked for checkpoints/ckpt-*.pt): "
                          "train first, or pass a checkpoint file")


def resolve_checkpoint(run_dir_or_ckpt: str | Path) -> Path:
    """The checkpoint file readers use for a run directory or file (see find_checkpoint)."""
    return find_checkpoint(run_dir_or_ckpt)[1]


@dataclass
class Inference:
    """What sampling, evaluation and export load: the model in eval mode, its diffusion, config, file."""

    model: Any
    diffusion: Any
    config: dict[str, Any]
    path: Path


def open_for_inference(run_dir_or_ckpt: str | Path, which: str = "ema", ema_index: int = 0,
                       map_location: str | torch.device = "cpu") -> Inference:
    """The model (EMA weights by default) of a run directory or checkpoint file, with the usual fallback."""
    from models.diffusion import DiffusionConfig, GaussianDiffusion
    from models.unet import UNet, UNetConfig
    from trainer.config import ConfigError, from_dict

    state, path = find_checkpoint(run_dir_or_ckpt, map_location)
    try:
        cfg = from_dict(state["config"])
        mcfg, dcfg = cfg.model, cfg.diffusion
    except ConfigError:  # a config from another version: take the two sections we need
        mcfg = UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in state["config"]["model"].items()})
        dcfg = DiffusionConfig(**state["config"]["diffusion"])
    model = UNet(mcfg)
    if which == "ema" and "ema" in state:
        shadows = state["ema"]["shadows"]
        if not 0 <= ema_index < len(shadows):
            raise CheckpointError(f"{path} holds {len(shadows)} EMA profile(s); --ema-index {ema_index} is not one")
        weights = shadows[ema_index]
    elif which == "model" and "model" in state:
        weights = state["model"]
    elif which in ("ema", "model"):
        raise CheckpointError(f"{path} holds no {which} weights")
    else:
        raise ValueError(f"which: expected 'ema' or 'model', got {which!r}")
    model.load_state_dict(weights)
    model.eval()
    log.info("loaded %s weights from %s", which, path)
    return Inference(model, GaussianDiffusion(dcfg), state["config"], path)


def load_for_inference(run_dir_or_ckpt: str | Path, which: str = "ema", ema_index: int = 0,
                       map_location: str | torch.device = "cpu") -> tuple[Any, Any, dict[str, Any]]:
    """(model in eval mode, diffusion, resolved config dict): ``open_for_inference`` as a tuple."""
    got = open_for_inference(run_dir_or_ckpt, which, ema_index, map_location)
    return got.model, got.diffusion, got.config
