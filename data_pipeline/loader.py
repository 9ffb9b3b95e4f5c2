"""The rank's endless, resumable loader over tar shards: one of two orders, and the plumbing both share.

* ``data.order=global`` (default; data_pipeline.global_stream): the run's samples form one stream
  whose p-th sample is a pure function of (seed, epoch, p) (data_pipeline.order); each rank reads
  its slice of every global batch by byte range. Global batch k holds the same samples on any
  number of GPUs, workers or per-GPU batch, and a resume continues sample-exact on another cluster.
  Local files and http(s) URLs.
* ``data.order=streaming`` (data_pipeline.streaming): per-worker shard streams, exact only at the
  same world size and workers. The order of ``pipe:`` sources (they cannot seek), and of runs whose
  checkpoint comes from it.

Both yield {"image": uint8 (B, 3, H, W) channels_last, "label": int64 (B,)} forever (training is
step-based, so every rank yields the same number of batches and DDP never waits on an epoch end),
plus "samples" [(epoch, key, shard, position)] when data.audit is on. DataLoader workers collate
whole batches into shared buffers; the main process pins them (GPU) or decodes JPEG bytes with
nvJPEG (data.gpu_decode). The state is the order's cursor (``state_dict``; restored from every old
rank's state by ``load_rank_states``).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from data_pipeline.config import DataConfig, SetupError
from data_pipeline.dataset import Dataset, open_dataset
from data_pipeline.global_stream import GlobalMode, GlobalStream
from data_pipeline.images import decode_image
from data_pipeline.index import ShardIndex, load_or_build_index
from data_pipeline.reader import serves_ranges
from data_pipeline.restore import ReshardNeeded
from data_pipeline.shards import ShardSet
from data_pipeline.stream_base import ignore_stop_signals
from data_pipeline.streaming import ShardStream, StreamingMode, check_enough_shards

log = logging.getLogger("ddpm.data")  # under the trainer's "ddpm" logger: rank logs get it

__all__ = ["Loader", "ReshardNeeded", "build_loader", "decode_image", "prepare_index"]


def streaming_reason(cfg: DataConfig, shards: ShardSet) -> str:
    """Why this data is read in the streaming order ('' for the global order)."""
    if cfg.order == "streaming":
        return "data.order=streaming"
    if any(u.startswith("pipe:") for u in shards.urls):
        return "pipe: sources cannot seek"
    http = next((u for u in shards.urls if u.startswith(("http://", "https://"))), None)
    if http is not None and not serves_ranges(http):
        return f"the server of {http.split('/')[2]} ignores HTTP Range requests"
    return ""


class Loader:
    """Endless, resumable iterator of uint8 batches for one rank (see the module docstring)."""

    def __init__(self, cfg: DataConfig, data: Dataset, *, batch_size: int, rank: int, world_size: int, seed: int,
                 device: torch.device | None, global_batch: int | None = None,
                 index: ShardIndex | None = None) -> None:
        self.cfg = cfg
        self.data = data
        self.shards: ShardSet = data.shards
        self.image_size = data.image_size
        self.num_classes = data.num_classes
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.global_batch = global_batch or batch_size * world_size
        if self.global_batch % (batch_size * world_size):
            raise ValueError(f"global batch {self.global_batch} is not a multiple of {batch_size} x {world_size}")
        self.device = device
        cuda = device is not None and device.type == "cuda" and torch.cuda.is_available()
        self.gpu_decode = cfg.gpu_decode and cuda
        if cfg.gpu_decode and not self.gpu_decode:
            warnings.warn("data.gpu_decode needs a CUDA device; decoding on the CPU", stacklevel=2)
        if self.gpu_decode and not data.presized:
            raise SetupError(
                f"data.gpu_decode batches whole JPEGs, so the shards must hold {self.image_size}px "
                "images (a manifest saying so): set data.gpu_decode=false to resize them on the CPU, "
                f"or prepare them with ddpm-prepare SOURCE OUT_DIR --size {self.image_size}"
            )
        self.pin = cuda
        self._fingerprint = data.shards.fingerprint
        self._dataloader: DataLoader | None = None
        self._active: Iterator | None = None
        if index is None:  # build_loader decided: the streaming order (streaming_reason)
            self.mode: GlobalMode | StreamingMode = self._streaming()
        else:
            stream = GlobalStream(data, cfg, index, accum=self.global_batch // (batch_size * world_size),
                                  global_batch=self.global_batch, **self._stream_args())
            self.mode = GlobalMode(stream, index.fingerprint, cfg.on_data_change)

    def _stream_args(self) -> dict[str, Any]:
        return dict(batch_size=self.batch_size, rank=self.rank, world_size=self.world_size, seed=self.seed,
                    ship_bytes=self.gpu_decode)

    def _streaming(self) -> StreamingMode:
        check_enough_shards(len(self.shards.urls), self.world_size, self.cfg.num_workers)
        return StreamingMode(ShardStream(self.data, self.cfg, **self._stream_args()), self._fingerprint,
                             self.cfg.on_data_change)

    @property
    def order(self) -> str:
        """The order this loader reads in: "global" or "streaming"."""
        return self.mode.name

    @property
    def num_samples(self) -> int:
        """Samples over all shards (the index's count in the global order)."""
        if isinstance(self.mode, GlobalMode):
            return self.mode.order.num_samples
        return self.shards.num_samples

    @property
    def position(self) -> int | None:
        """The global sample index of the next global batch (None in the streaming order)."""
        return self.mode.position if isinstance(self.mode, GlobalMode) else None

    # ---- iteration
    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.close()  # a new pass always continues after the last delivered batch
        dataset = self.mode.dataset()
        if self.cfg.num_workers == 0:
            source = iter(dataset)
        else:
            self._dataloader = DataLoader(
                dataset,
                batch_size=None,  # workers collate whole batches themselves
                num_workers=self.cfg.num_workers,
                prefetch_factor=self.cfg.prefetch_factor,
                pin_memory=self.pin,
                worker_init_fn=ignore_stop_signals,
            )
            source = iter(self._dataloader)
        self._active = source
        for batch in source:
            meta = batch.pop("_meta")
            self.mode.delivered(meta)
            if self.cfg.audit:
                batch["samples"] = meta["samples"]
            if "jpeg" in batch:
                batch = self._decode_on_device(batch)
            elif self.cfg.num_workers > 0 and not self.pin:
                # The worker reuses this shared buffer a few batches later (BaseStream.new_batch);
                # pin_memory already copied it when pinning.
                batch["image"] = batch["image"].clone()
            elif self.pin and self.cfg.num_workers == 0:
                batch = {k: v.pin_memory() if isinstance(v, Tensor) else v for k, v in batch.items()}
            yield batch

    def _decode_on_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        """nvJPEG decode of the whole batch on the device, then the seeded flips."""
        import torchvision.io as tio

        imgs = tio.decode_jpeg(batch["jpeg"], mode=tio.ImageReadMode.RGB, device=self.device)
        x = torch.stack(imgs)  # (B, 3, H, W) uint8 on the device
        if tuple(x.shape[1:]) != (3, self.image_size, self.image_size):
            raise RuntimeError(f"decoded images are {tuple(x.shape[1:])}, expected {self.image_size}px")
        flip = batch["flip"].to(self.device, non_blocking=True)[:, None, None, None]
        x = torch.where(flip, x.flip(-1), x)
        out = {"image": x, "label": batch["label"].to(self.device, non_blocking=True)}
        if "samples" in batch:
            out["samples"] = batch["samples"]
        return out

    # ---- state
    def state_dict(self) -> dict:
        """This rank's cursor after the last delivered batch (plain python: weights_only-safe)."""
        return self.mode.state_dict()

    def load_rank_states(self, states: list[dict], rank: int, world_size: int) -> None:
        """Resume from every old rank's state (the checkpoint's ``loader`` entry); call before iterating."""
        states = list(states)
        if not states:
            raise ValueError("no loader state to resume from")
        first = states[0]
        if first.get("backend") != "webdataset":
            raise ValueError(f"loader state is for backend {first.get('backend')!r}, not webdataset")
        saved_global = first.get("order") == "global"
        if saved_global and isinstance(self.mode, StreamingMode):
            raise SetupError("this run's checkpoint comes from the global order, but data.shards now names sources "
                             "only the streaming order reads (pipe:) or data.order=streaming: point data.shards at "
                             "local files or http(s) URLs, or set data.order=global")
        if not saved_global and isinstance(self.mode, GlobalMode):
            if rank == 0:
                log.warning("data: this run's checkpoint comes from the streaming order (per-worker cursors): the run "
                            "continues in that order (exact at the same world size and workers; otherwise the epoch "
                            "resumes without repeating finished shards). A new run.dir gets the world-size-independent "
                            "order")
            self.mode = self._streaming()
        self.mode.load_rank_states(states, rank, world_size)

    def stats(self) -> dict[str, float]:
        """Cumulative counts on this rank: bad samples, samples read, upscaled images, epoch."""
        out = self.mode.stats()
        out["bad_fraction"] = out["bad_samples"] / max(out["samples"], 1.0)
        return out

    def close(self) -> None:
        """Stop the worker processes of the current iteration (a later iter() restarts them)."""
        it, self._active, self._dataloader = self._active, None, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()


def prepare_index(cfg: DataConfig, cache: str | Path | None, *, rank: int = 0) -> None:
    """Build (or check) the shard index cache of the global order (the trainer calls it on rank 0 first)."""
    data = open_dataset(cfg, rank=rank, log_path=False)
    if cfg.backend != "webdataset" or streaming_reason(cfg, data.shards):
        return
    index, how = load_or_build_index(data.shards, cache)
    log.info("data: shard index %s (%d shards, %d samples)%s", how, len(index.names), index.num_samples,
             f": {cache}" if cache else "")


def build_loader(cfg: DataConfig, *, batch_size: int, rank: int, world_size: int, seed: int,
                 device: torch.device | str | None = None, global_batch: int | None = None,
                 index_cache: str | Path | None = None) -> Any:
    """Validate the data (shards exist, size, labels) and build the rank's loader.

    ``global_batch``: images per optimizer step over all ranks (default batch_size x world_size);
    ``index_cache``: where the global order's shard index is kept (built in memory when None).
    """
    cfg.validate()
    if device is not None:
        device = torch.device(device)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    if cfg.backend == "memory":
        from data_pipeline.memory_backend import build_memory_loader

        return build_memory_loader(cfg, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
                                   device=device)
    if cfg.backend == "ffcv":
        from data_pipeline.ffcv_backend import build_ffcv_loader

        return build_ffcv_loader(cfg, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
                                 device=device)
    data = open_dataset(cfg, rank=rank)
    index = None
    reason = streaming_reason(cfg, data.shards)
    if not reason:
        index, _ = load_or_build_index(data.shards, index_cache)
    elif cfg.order == "global" and rank == 0:
        log.info("data: %s, so the shards are read in the streaming order (per-worker shard streams; a resume "
                 "is sample-exact only at the same world size and workers)", reason)
    return Loader(cfg, data, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed, device=device,
                  global_batch=global_batch, index=index)
