"""In-memory backend: the whole decoded dataset as one uint8 tensor (CIFAR-size data).

Ordering: epoch e is a seeded permutation perm(seed, e) of all N samples; the epoch starts at
global position `start` (0 unless resharded), and rank r reads perm[start + r :: W], cut to the
same length (N - start) // W on every rank, in batches that run on into the next epoch. So every
rank yields the same number of batches forever, and within an epoch no sample is repeated.

Resume: the cursor is (epoch, start, offset). Same world size: exact. Different world size
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
from data_pipeline.shards import ShardSet, image_part, iter_tar, resolve_shards

log = logging.getLogger(__name__)


def load_decoded(shards: ShardSet, image_size: int, use_labels: bool) -> tuple[Tensor, Tensor, int]:
    """All samples of all shards decoded: ((N, 3, H, W) uint8, (N,) int64, bad count)."""
    from data_pipeline.loader import decode_image

    images, labels, bad = [], [], 0

    def on_error(url: str, key: str, reason: str) -> None:
        nonlocal bad
        bad += 1
        log.warning("bad sample: key %s in shard %s: %s", key, url, reason)

    for url in shards.urls:
        for key, parts in iter_tar(url, on_error):
            found = image_part(parts)
            try:
                if found is None:
                    raise ValueError("no image member")
                img = decode_image(found[1], found[0])
                if img.shape != (3, image_size, image_size):
                    raise ValueError(f"image is {tuple(img.shape)}")
                label = int(parts["cls"]) if use_labels else 0
            except Exception as e:  # one bad sample is skipped and counted, never a crash
                on_error(url, key, f"{type(e).__name__}: {e}")
                continue
            images.append(img)
            labels.append(label)
    if not images:
        raise ValueError(f"no readable samples in {len(shards.urls)} shards")
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64), bad


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
        self.bad = bad

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

    def load_state_dict(self, state: dict) -> None:
        """Restore the cursor (exact for the same world size; see the module docstring otherwise)."""
        if "resharded_from" in state:
            states = list(state["resharded_from"])
            st = states[0]
            self._check(st)
            # Every old rank sat at the same offset: perm[start : start + offset * W_old] was read.
            self.epoch = st["epoch"]
            self.start = st["start"] + st["offset"] * st["world_size"]
            self.offset, self.step = 0, st["step"]
            return
        self._check(state)
        if state["world_size"] != self.world_size or state["rank"] != self.rank:
            raise ValueError(
                "memory loader state of another layout: pass {'resharded_from': states}"
            )
        self.epoch, self.start = state["epoch"], state["start"]
        self.offset, self.step = state["offset"], state["step"]

    def _check(self, state: dict) -> None:
        if state.get("backend") != "memory":
            raise ValueError(f"loader state is for backend {state.get('backend')!r}, not memory")
        if state["num_samples"] != self.num_samples or state["seed"] != self.seed:
            raise ValueError("loader state belongs to another dataset or seed")

    def stats(self) -> dict[str, float]:
        """Bad samples found while loading, samples delivered, epoch."""
        return {
            "bad_samples": float(self.bad),
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
    from data_pipeline.loader import check_image_size

    shards = resolve_shards(cfg.shards)
    size = check_image_size(cfg, shards)
    if cfg.use_labels and not shards.classes:
        raise ValueError(
            "data.use_labels is on but the manifest lists no classes (prepare --labels)"
        )
    images, labels, bad = load_decoded(shards, size, cfg.use_labels)
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
        num_classes=len(shards.classes),
        bad=bad,
    )
