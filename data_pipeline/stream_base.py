"""What both sample streams share: batch buffers, per-sample decode, bad-sample accounting.

A stream is an IterableDataset run in each DataLoader worker; it collates whole uint8 batches
itself (channels_last, flips applied) and attaches a ``_meta`` dict the main process reads.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from data_pipeline.config import DataConfig
from data_pipeline.dataset import Dataset, SampleDecoder

log = logging.getLogger("ddpm.data")


class BadSampleLimit(RuntimeError):
    """More corrupt samples than data.max_bad_fraction allows."""


class BaseStream(IterableDataset):
    """Per-worker batch buffers, decode and bad-sample counting (the streams subclass it)."""

    def __init__(self, data: Dataset, cfg: DataConfig, *, batch_size: int, rank: int, world_size: int,
                 seed: int, ship_bytes: bool) -> None:
        super().__init__()
        self.urls = data.shards.urls
        self.cfg = cfg
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.image_size = data.image_size
        self.decoder = SampleDecoder(cfg, data.image_size, data.num_classes)
        self.ship_bytes = ship_bytes
        self.num_workers = max(1, cfg.num_workers)
        self._ring: list[Tensor] = []  # a worker's shared-memory batch buffers (_new_batch)
        self._ring_next = 0

    @staticmethod
    def worker() -> tuple[int, int]:
        """(this DataLoader worker's id, the number of workers); (0, 1) in the main process."""
        info = get_worker_info()
        if info is None:
            return 0, 1
        torch.set_num_threads(1)  # decode is per-sample; threads only fight over the cores
        return info.id, info.num_workers

    def new_batch(self) -> Tensor | None:
        """(B, 3, H, W) uint8 to decode into; in a worker, one of a ring of shared-memory buffers."""
        if self.ship_bytes:
            return None
        shape = (self.batch_size, 3, self.image_size, self.image_size)
        # channels_last: libjpeg-turbo writes HWC, so decode_jpeg returns a (3, H, W) view with HWC
        # strides; a batch in the same layout makes each copy a memcpy instead of a transpose
        # (measured 170 -> 20 us per 256px image), and it is the layout the UNet runs in.
        fmt = torch.channels_last
        if get_worker_info() is None:
            return torch.empty(shape, dtype=torch.uint8, memory_format=fmt)  # the consumer owns it
        # Fresh shared memory costs page faults on every batch (~12 MB at 256px, B=64), more than
        # the copy. A worker runs at most prefetch_factor batches ahead of what the main process
        # has received (DataLoader sends the next index only on receipt), and the main process
        # copies each batch out on receipt (pin_memory, or Loader's clone), so a ring of
        # prefetch_factor + 2 buffers is never overwritten while still being read.
        i = self._ring_next
        self._ring_next = (i + 1) % (self.cfg.prefetch_factor + 2)
        if i == len(self._ring):
            self._ring.append(torch.empty(shape, dtype=torch.uint8, memory_format=fmt).share_memory_())
        return self._ring[i]

    def decode(self, parts: dict[str, bytes], crop_pos: float | None) -> tuple[Tensor, int, bool]:
        """Image at image_size (or its JPEG bytes with gpu_decode), label, and whether upscaled."""
        if self.ship_bytes:
            label = self.decoder.label(parts)
            ext, data = self.decoder.image_bytes(parts)
            if ext not in ("jpg", "jpeg"):
                raise ValueError(f"gpu_decode needs JPEG samples, got .{ext}")
            return torch.frombuffer(bytearray(data), dtype=torch.uint8), label, False
        return self.decoder(parts, crop_pos)

    def check_bad(self, bad: int, seen: int, w: int, last: str) -> None:
        """Stop above data.max_bad_fraction (counted over at least data.bad_min_samples)."""
        if bad > self.cfg.max_bad_fraction * max(seen, self.cfg.bad_min_samples):
            raise BadSampleLimit(
                f"{bad} bad samples out of {seen} on rank {self.rank} worker {w} exceed "
                f"data.max_bad_fraction={self.cfg.max_bad_fraction}; last: {last}"
            )

    def note_upscaled(self, upscaled: int, w: int, key: str, url: str) -> None:
        """Warn at 1, 10, 100, 1000 and every 10,000 upscaled images (not for every one)."""
        if upscaled in (1, 10, 100, 1000) or upscaled % 10000 == 0:
            log.warning("upscaled %d images smaller than %dpx so far on rank %d worker %d (latest: key %s in "
                        "shard %s); counted in the loader stats (upscaled_samples)", upscaled, self.image_size,
                        self.rank, w, key, url)

    @staticmethod
    def emit(images: Tensor | None, encoded: list, flips: list[bool], labels: list[int],
             meta: dict[str, Any]) -> dict[str, Any]:
        """One collated batch: images (or JPEG bytes and flips), labels, and the worker's meta."""
        batch: dict[str, Any] = {"label": torch.tensor(labels, dtype=torch.int64)}
        if images is not None:
            batch["image"] = images  # (B, 3, H, W) uint8 channels_last, flips already applied
        else:
            batch["jpeg"], batch["flip"] = encoded, torch.tensor(flips, dtype=torch.bool)
        batch["_meta"] = meta
        return batch


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave stop signals to the trainer's main process.

    SLURM preemption and scancel send SIGTERM (and torchrun forwards SIGINT) to every
    process of the step; a worker killed by it would turn a clean stop into a crash.
    Workers still exit when the main process goes away (DataLoader's watchdog).
    """
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(s, signal.SIG_IGN)
