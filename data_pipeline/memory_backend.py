"""In-memory backend: the whole decoded dataset as one uint8 tensor (CIFAR-size data).

Ordering: epoch e is a seeded permutation perm(seed, e) of all N samples; the epoch starts at
global position `start` (0 unless resharded), and rank r reads perm[start + r :: W], cut to the
same length (N - start) // W on every rank, in batches that run on into the next epoch. So every
rank yields the same number of batches forever, and within an epoch no sample is repeated.

Resume: the cursor is (epoch, start, offset). Another sample count than in the state (re-prepared
data): data.on_data_change decides (restart_epoch: epoch + 1 from its start; error). Same world size: exact. Different world size
(load_state_dict({"resharded_from": states})): all ranks are at the same offset, so exactly the
positions perm[start : start + offset * W_old] were read; the new ranks continue the same epoch from
there, so within that epoch nothing is repeated or skipped (beyond the usual cut to a multiple of W).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch import Tensor

from data_pipeline.config import DataConfig
from data_pipeline.dataset import SampleDecoder, open_dataset
from data_pipeline.restore import restore_from_ranks
from data_pipeline.shards import ShardSet, iter_tar

log = logging.getLogger("ddpm.data")  # under the trainer's "ddpm" logger: rank logs get it


def load_decoded(shards: ShardSet, decoder: SampleDecoder) -> tuple[Tensor, Tensor, int, int]:
    """All samples of all shards at the decoder's size: ((N, 3, H, W) uint8, (N,) int64, bad, upscaled)."""
    images, labels, bad, upscaled = [], [], 0, 0

    def on_error(url: str, key: str, reason: str) -> None:
        nonlocal bad
        bad += 1
        log.warning("bad sample: key %s in shard %s: %s", key, url, reason)

    for url in shards.urls:
        for key, parts in iter_tar(url, on_error):
            try:
                img, label, up = decoder(parts)  # center crop: decoded once, so no random crop
            except Exception as e:  # one bad sample is skipped and counted, never a crash
                on_error(url, key, str(e) if isinstance(e, ValueError) else repr(e))
                continue
            images.append(img)
            labels.append(label)
            upscaled += up
    if not images:
        raise ValueError(f"no readable samples in {len(shards.urls)} shards")
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64), bad, upscaled


class MemoryLoader:
    """Random batches from a decoded in-memory uint8 tensor; same interface as Loader."""

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        cfg: DataConfig,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        num_classes: int = 0,
        bad: int = 0,
        upscaled: int = 0,
    ) -> None:
        if images.shape[0] < world_size:
            raise ValueError(f"{images.shape[0]} samples for {world_size} ranks")
        self.images, self.labels = images, labels  # (N, 3, H, W) uint8, (N,) int64
        self.cfg = cfg
        self.image_size = int(images.shape[-1])
        self.num_classes = num_classes
        self.num_samples = int(images.shape[0])
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.epoch, self.start, self.offset, self.step = 0, 0, 0, 0
        self.bad, self.upscaled = bad, upscaled

    def _rank_indices(self, epoch: int, start: int) -> Tensor:
        """This rank's sample order for an epoch: perm[start + rank :: W], equal length on all ranks."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.num_samples, generator=g)
        count = (self.num_samples - start) // self.world_size
        return perm[start + self.rank :: self.world_size][:count]

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        dev = self.images.device
        order = self._rank_indices(self.epoch, self.start).to(dev)
        b = self.batch_size
        while True:
            parts, got = [], 0
            while got < b:
                if self.offset >= len(order):  # next epoch, from its beginning
                    self.epoch, self.start, self.offset = self.epoch + 1, 0, 0
                    order = self._rank_indices(self.epoch, 0).to(dev)
                take = order[self.offset : self.offset + b - got]
                parts.append(take)
                got += len(take)
                self.offset += len(take)
            idx = torch.cat(parts)
            x = self.images.index_select(0, idx)  # (B, 3, H, W) uint8
            if self.cfg.hflip:
                # Flips from (seed, rank, step): reproducible after resume without saving an rng.
                g = torch.Generator().manual_seed(
                    (self.seed * 65_537 + self.rank) * 1_000_003 + self.step
                )
                flip = (torch.rand(b, generator=g) < 0.5).to(dev)[:, None, None, None]
                x = torch.where(flip, x.flip(-1), x)
            y = self.labels.index_select(0, idx)
            self.step += 1
            yield {"image": x, "label": y}

    def state_dict(self) -> dict:
        """Cursor after the last delivered batch (plain python)."""
        return {
            "version": 1,
            "backend": "memory",
            "rank": self.rank,
            "world_size": self.world_size,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "epoch": self.epoch,
            "start": self.start,
            "offset": self.offset,
            "step": self.step,
        }

    def load_rank_states(self, states: list[dict], rank: int, world_size: int) -> None:
        """Resume from every old rank's state (see data_pipeline.loader.restore_from_ranks)."""
        restore_from_ranks(self, states, rank, world_size)

    def load_state_dict(self, state: dict) -> None:
        """Restore the cursor (exact for the same world size; see the module docstring otherwise)."""
        if "resharded_from" in state:
            states = list(state["resharded_from"])
            st = states[0]
            if self._check(st):
                return
            # Every old rank sat at the same offset: perm[start : start + offset * W_old] was read.
            self.epoch = st["epoch"]
            self.start = st["start"] + st["offset"] * st["world_size"]
            self.offset, self.step = 0, st["step"]
            return
        if self._check(state):
            return
        if state["world_size"] != self.world_size or state["rank"] != self.rank:
            raise ValueError(
                "memory loader state of another layout: pass {'resharded_from': states}"
            )
        self.epoch, self.start = state["epoch"], state["start"]
        self.offset, self.step = state["offset"], state["step"]

    def _check(self, state: dict) -> bool:
        """Check backend and seed; a changed dataset follows data.on_data_change (True: handled)."""
        if state.get("backend") != "memory":
            raise ValueError(f"loader state is for backend {state.get('backend')!r}, not memory")
        if state["seed"] != self.seed:
            raise ValueError(f"loader state was saved with seed {state['seed']}, now {self.seed}")
        if state["num_samples"] == self.num_samples:
            return False
        change = f"{state['num_samples']} -> {self.num_samples} samples"
        if self.cfg.on_data_change == "error":
            raise ValueError(
                f"the data changed since the checkpoint ({change}) and data.on_data_change=error: "
                "set data.on_data_change=restart_epoch, or point data.shards at the original data"
            )
        self.epoch, self.start, self.offset, self.step = state["epoch"] + 1, 0, 0, state["step"]
        if self.rank == 0:
            log.warning(
                "data: the data changed since the checkpoint (%s): the loader starts epoch %d "
                "under a fresh order (data.on_data_change=restart_epoch)",
                change,
                self.epoch,
            )
        return True

    def stats(self) -> dict[str, float]:
        """Bad and upscaled samples found while loading, samples delivered, epoch."""
        return {
            "bad_samples": float(self.bad),
            "upscaled_samples": float(self.upscaled),
            "samples": float(self.step * self.batch_size),
            "epoch": float(self.epoch),
        }

    def close(self) -> None:
        """Nothing to stop."""


def build_memory_loader(
    cfg: DataConfig,
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    device: torch.device | None,
) -> MemoryLoader:
    """Decode every shard into one tensor, on `device` when it fits in data.memory_device_max_gb."""
    if cfg.crop == "random":
        raise ValueError(
            "data.crop=random needs data.backend=webdataset: the memory backend decodes each image "
            "once (use data.crop=center)"
        )
    data = open_dataset(cfg, rank=rank, backend="memory")
    decoder = SampleDecoder(cfg, data.image_size, data.num_classes)
    images, labels, bad, upscaled = load_decoded(data.shards, decoder)
    if upscaled and rank == 0:
        log.warning(
            "data: upscaled %d of %d images smaller than %dpx",
            upscaled,
            len(images),
            data.image_size,
        )
    if bad > cfg.max_bad_fraction * max(len(images) + bad, cfg.bad_min_samples):
        raise RuntimeError(
            f"{bad} bad samples out of {len(images) + bad} exceed data.max_bad_fraction"
        )
    if device is not None and device.type == "cuda":
        if images.numel() <= cfg.memory_device_max_gb * 2**30:
            images, labels = images.to(device), labels.to(device)
        else:
            images, labels = images.pin_memory(), labels.pin_memory()
    return MemoryLoader(
        images,
        labels,
        cfg,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        num_classes=data.num_classes,
        bad=bad,
        upscaled=upscaled,
    )
