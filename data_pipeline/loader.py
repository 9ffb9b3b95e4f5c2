"""Streaming webdataset loader with deterministic sharding and exact mid-epoch resume.

Ordering (all derived from `seed`, so every rank computes the same plan without talking):

* Global worker g = rank * num_workers + w, W = world_size * num_workers (w is a *logical* worker).
* Epoch e: the shard order is a seeded permutation perm(seed, e); worker g reads perm[g::W].
  Over all workers, epoch e reads every shard exactly once.
* Within a shard, samples pass a seeded shuffle buffer (rng seeded by (seed, e, shard)), which
  also draws the flip decision of each sample.
* Each worker's stream is endless: when it finishes its shards of epoch e it starts its shards of
  e + 1, so batches never end and every rank yields the same number of batches forever (a
  batch may hold the end of one epoch and the start of the next). Workers are balanced to within
  one shard per epoch; "epoch" in the state is per worker.

Cursor (per logical worker): (epoch, pos, offset) = the index `pos` into that worker's shard list
of epoch `epoch`, and `offset` raw samples already consumed from that shard (good or bad).
Workers attach their cursor-after-this-batch to each batch; DataLoader returns batches round-robin
over workers, so the main process keeps the cursor of the last *delivered* batch of each worker
plus which worker comes next. Resuming re-reads the shard at `pos` and drops `offset` raw samples
from the same seeded shuffle without decoding them.

Guarantees:
* Same world size and num_workers: the batches after load_state_dict() are exactly those that
  would have come without the interruption; within an epoch no sample is repeated or skipped,
  across any number of resumes.
* Different world size or num_workers (load_state_dict({"resharded_from": [state of every old
  rank]})): resume in epoch e = the lowest epoch any old worker was in. Shards of epoch e that
  old workers had finished are not read again in e; the shards not yet finished (at most one
  partly read shard per old worker, which restarts from its beginning) are dealt over the new
  workers; then epoch e + 1 starts normally with the new layout. Samples that workers already
  ahead in e + 1 had read are read again in e + 1.
* The shard list changed since the state was saved (re-prepared data, shards added or removed:
  another fingerprint of names and manifest checksums): with data.on_data_change=restart_epoch
  (the default) every worker starts epoch E + 1 (E: the furthest epoch of the state) under that
  epoch's fresh shard order over the new list, and rank 0 logs one line saying so; the rest of
  epoch E is not read. With data.on_data_change=error, load_state_dict raises ValueError.

Preprocessing (data_pipeline.dataset.SampleDecoder): an image already at data.image_size is only
decoded; any other is resized (shorter side, antialiased) and cropped in the worker, with the
crop position drawn from the same seeded rng as the flips when data.crop=random.
"""

from __future__ import annotations

import hashlib
import logging
import random
import signal
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.config import DataConfig
from data_pipeline.dataset import Dataset, SampleDecoder, open_dataset
from data_pipeline.images import decode_image
from data_pipeline.restore import ReshardNeeded, restore_from_ranks
from data_pipeline.shards import ShardSet, iter_tar, shuffled

log = logging.getLogger("ddpm.data")  # under the trainer's "ddpm" logger: rank logs get it

STATE_VERSION = 2
__all__ = ["Loader", "ReshardNeeded", "build_loader", "decode_image", "worker_shards"]


def shard_order(num_shards: int, seed: int, epoch: int, override: dict | None) -> list[int]:
    """The shard order of an epoch: seeded permutation, or the resharding override list."""
    if override is not None and epoch == override["epoch"]:
        return list(override["shards"])
    order = list(range(num_shards))
    random.Random(f"ddpm-scale-shards-{seed}-{epoch}").shuffle(order)
    return order


def worker_shards(
    num_shards: int, seed: int, epoch: int, g: int, total_workers: int, override: dict | None
) -> list[int]:
    """The shard indices global worker g reads in an epoch, in order."""
    return shard_order(num_shards, seed, epoch, override)[g::total_workers]


class ShardStream(IterableDataset):
    """Per-worker endless stream of collated uint8 batches with cursors attached."""

    def __init__(
        self,
        data: Dataset,
        cfg: DataConfig,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        ship_bytes: bool,
    ) -> None:
        super().__init__()
        self.urls = data.shards.urls
        self.cfg = cfg
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.image_size = data.image_size
        self.decoder = SampleDecoder(cfg, data.image_size, data.num_classes)
        self.ship_bytes = ship_bytes
        self.num_workers = max(1, cfg.num_workers)
        self.cursors: list[list[int]] = [[0, 0, 0] for _ in range(self.num_workers)]
        # bad, seen, upscaled
        self.counters: list[list[int]] = [[0, 0, 0] for _ in range(self.num_workers)]
        self.override: dict | None = None
        self.worker_offset = 0  # logical worker of DataLoader worker 0 (resume: the next one due)
        self._ring: list[Tensor] = []  # a worker's shared-memory batch buffers (_new_batch)
        self._ring_next = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        if info is not None:
            torch.set_num_threads(1)  # decode is per-sample; threads only fight over the cores
        wid = 0 if info is None else info.id
        logical = (wid + self.worker_offset) % self.num_workers
        return self._batches(logical)

    def _new_batch(self) -> Tensor | None:
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
            self._ring.append(
                torch.empty(shape, dtype=torch.uint8, memory_format=fmt).share_memory_()
            )
        return self._ring[i]

    def _batches(self, w: int) -> Iterator[dict[str, Any]]:
        g = self.rank * self.num_workers + w
        total = self.world_size * self.num_workers
        epoch, pos, offset = self.cursors[w]
        bad, seen, upscaled = (list(self.counters[w]) + [0])[:3]
        images, encoded, flips, labels = self._new_batch(), [], [], []
        last_bad, shard_bad = "", 0
        random_crop = self.cfg.crop == "random"

        def on_error(url: str, key: str, reason: str) -> None:
            nonlocal bad, last_bad, shard_bad
            bad += 1
            shard_bad += 1
            last_bad = f"key {key} in shard {url}: {reason}"
            if shard_bad <= 3:  # a shard of bad samples logs 3 lines and a count, not thousands
                log.warning("bad sample: %s", last_bad)

        while True:
            order = worker_shards(len(self.urls), self.seed, epoch, g, total, self.override)
            while pos < len(order):
                sid = order[pos]
                url = self.urls[sid]
                rng = random.Random(f"ddpm-scale-samples-{self.seed}-{epoch}-{sid}")
                raw = iter_tar(url, on_error)
                shard_bad = 0
                for i, (key, parts, flip, crop_pos) in enumerate(
                    shuffled(raw, rng, self.cfg.shuffle_buffer, self.cfg.hflip, random_crop)
                ):
                    if i < offset:
                        continue  # resume: skip raw samples, never decode them
                    offset = i + 1
                    seen += 1
                    try:
                        img, label, up = self._sample(parts, crop_pos)
                    except Exception as e:  # any decode failure is one bad sample, never a crash
                        on_error(url, key, str(e) if isinstance(e, ValueError) else repr(e))
                        img = None
                    if bad > self.cfg.max_bad_fraction * max(seen, self.cfg.bad_min_samples):
                        raise RuntimeError(
                            f"{bad} bad samples out of {seen} on rank {self.rank} worker {w} exceed "
                            f"data.max_bad_fraction={self.cfg.max_bad_fraction}; last: {last_bad}"
                        )
                    if img is None:
                        continue
                    if up:
                        upscaled += 1
                        if upscaled in (1, 10, 100, 1000) or upscaled % 10000 == 0:
                            log.warning(
                                "upscaled %d images smaller than %dpx so far on rank %d worker %d "
                                "(latest: key %s in shard %s); counted in the loader stats (upscaled_samples)",
                                upscaled,
                                self.image_size,
                                self.rank,
                                w,
                                key,
                                url,
                            )
                    n = len(labels)
                    if images is None:
                        encoded.append(img)
                    elif flip:
                        images[n].copy_(img.flip(-1))
                    else:
                        images[n].copy_(img)
                    flips.append(flip)
                    labels.append(label)
                    if n + 1 == self.batch_size:
                        meta = {
                            "worker": w,
                            "cursor": [epoch, pos, offset],
                            "counters": [bad, seen, upscaled],
                        }
                        yield self._emit(images, encoded, flips, labels, meta)
                        images, encoded, flips, labels = self._new_batch(), [], [], []
                if shard_bad > 3:
                    log.warning(
                        "%d more bad samples in shard %s; last: %s", shard_bad - 3, url, last_bad
                    )
                pos, offset = pos + 1, 0
            epoch, pos, offset = epoch + 1, 0, 0

    def _sample(self, parts: dict[str, bytes], pos: float | None) -> tuple[Tensor, int, bool]:
        """Image at image_size (or its JPEG bytes with gpu_decode), label, and whether upscaled."""
        if self.ship_bytes:
            label = self.decoder.label(parts)
            ext, data = self.decoder.image_bytes(parts)
            if ext not in ("jpg", "jpeg"):
                raise ValueError(f"gpu_decode needs JPEG samples, got .{ext}")
            return torch.frombuffer(bytearray(data), dtype=torch.uint8), label, False
        return self.decoder(parts, pos)

    @staticmethod
    def _emit(images, encoded, flips, labels, meta) -> dict[str, Any]:
        batch: dict[str, Any] = {"label": torch.tensor(labels, dtype=torch.int64)}
        if images is not None:
            batch["image"] = images  # (B, 3, H, W) uint8 channels_last, flips already applied
        else:
            batch["jpeg"], batch["flip"] = encoded, torch.tensor(flips, dtype=torch.bool)
        batch["_meta"] = meta
        return batch


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave stop signals to the trainer's main process.

    SLURM preemption and scancel send SIGTERM (and torchrun forwards SIGINT) to every
    process of the step; a worker killed by it would turn a clean stop into a crash.
    Workers still exit when the main process goes away (DataLoader's watchdog).
    """
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(s, signal.SIG_IGN)


class Loader:
    """Endless, resumable iterator of {"image": uint8 (B,3,H,W), "label": int64 (B,)} for one rank.

    Images come in channels_last memory (the decoder's layout); shape and values are the usual.
    """

    def __init__(
        self,
        cfg: DataConfig,
        data: Dataset,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        device: torch.device | None,
    ) -> None:
        self.cfg = cfg
        self.shards: ShardSet = data.shards
        self.image_size = data.image_size
        self.num_classes = data.num_classes
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.device = device
        cuda = device is not None and device.type == "cuda" and torch.cuda.is_available()
        self.gpu_decode = cfg.gpu_decode and cuda
        if cfg.gpu_decode and not self.gpu_decode:
            warnings.warn("data.gpu_decode needs a CUDA device; decoding on the CPU", stacklevel=2)
        if self.gpu_decode and not data.presized:
            raise ValueError(
                f"data.gpu_decode batches whole JPEGs, so the shards must hold {self.image_size}px "
                "images (a manifest saying so): set data.gpu_decode=false to resize them on the CPU, "
                f"or prepare them with ddpm-prepare SOURCE OUT_DIR --size {self.image_size}"
            )
        self.pin = cuda
        self.dataset = ShardStream(
            data,
            cfg,
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
            seed=seed,
            ship_bytes=self.gpu_decode,
        )
        self.num_workers = max(1, cfg.num_workers)
        self.next_worker = 0
        self._dataloader: DataLoader | None = None
        self._active: Iterator | None = None
        self._fingerprint = data.shards.fingerprint

    @property
    def num_samples(self) -> int:
        """Samples over all shards (without a manifest counted on first use, from tar headers)."""
        return self.shards.num_samples

    # ---- iteration
    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        self.close()  # a new pass always continues from the cursor of the last delivered batch
        self.dataset.cursors = [list(c) for c in self.dataset.cursors]
        self.dataset.worker_offset = self.next_worker
        if self.cfg.num_workers == 0:
            source = iter(self.dataset)
        else:
            self._dataloader = DataLoader(
                self.dataset,
                batch_size=None,  # workers collate whole batches themselves
                num_workers=self.cfg.num_workers,
                prefetch_factor=self.cfg.prefetch_factor,
                pin_memory=self.pin,
                worker_init_fn=_ignore_stop_signals,
            )
            source = iter(self._dataloader)
        self._active = source
        for batch in source:
            meta = batch.pop("_meta")
            w = meta["worker"]
            # The cursor after the last batch *delivered* (not the ones workers prefetched).
            self.dataset.cursors[w] = list(meta["cursor"])
            self.dataset.counters[w] = list(meta["counters"])
            self.next_worker = (w + 1) % self.num_workers
            if "jpeg" in batch:
                batch = self._decode_on_device(batch)
            elif self.cfg.num_workers > 0 and not self.pin:
                # The worker reuses this shared buffer a few batches later (ShardStream._new_batch);
                # pin_memory already copied it when pinning.
                batch["image"] = batch["image"].clone()
            elif self.pin and self.cfg.num_workers == 0:
                batch = {k: v.pin_memory() for k, v in batch.items()}
            yield batch

    def _decode_on_device(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """nvJPEG decode of the whole batch on the device, then the seeded flips."""
        import torchvision.io as tio

        imgs = tio.decode_jpeg(batch["jpeg"], mode=tio.ImageReadMode.RGB, device=self.device)
        x = torch.stack(imgs)  # (B, 3, H, W) uint8 on the device
        if tuple(x.shape[1:]) != (3, self.image_size, self.image_size):
            raise RuntimeError(
                f"decoded images are {tuple(x.shape[1:])}, expected {self.image_size}px"
            )
        flip = batch["flip"].to(self.device, non_blocking=True)[:, None, None, None]
        x = torch.where(flip, x.flip(-1), x)
        return {"image": x, "label": batch["label"].to(self.device, non_blocking=True)}

    # ---- state
    def state_dict(self) -> dict:
        """This rank's cursor after the last delivered batch (plain python: weights_only-safe)."""
        return {
            "version": STATE_VERSION,
            "backend": "webdataset",
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_shards": len(self.shards.urls),
            "shards_fingerprint": self._fingerprint,
            "cursors": [list(c) for c in self.dataset.cursors],
            "counters": [list(c) for c in self.dataset.counters],
            "next_worker": self.next_worker,
            "override": self.dataset.override,
            "epoch": min(c[0] for c in self.dataset.cursors),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a cursor (call before iterating); see the module docstring for the guarantees."""
        if "resharded_from" in state:
            states = list(state["resharded_from"])
            if not states:
                raise ValueError("resharded_from holds no states")
            if self._data_changed(states):
                return
            self._reshard(states)
            return
        if state.get("backend") != "webdataset":
            raise ValueError(
                f"loader state is for backend {state.get('backend')!r}, not webdataset"
            )
        if self._data_changed([state]):
            return
        if (state["world_size"], state["num_workers"]) != (self.world_size, self.num_workers):
            raise ReshardNeeded(
                f"loader state was saved with world_size={state['world_size']} and "
                f"num_workers={state['num_workers']}, now {self.world_size} and {self.num_workers}: "
                "pass {'resharded_from': [every old rank's state]}"
            )
        if state["rank"] != self.rank:
            raise ValueError(f"loader state of rank {state['rank']} given to rank {self.rank}")
        self.dataset.cursors = [list(c) for c in state["cursors"]]
        self.dataset.counters = [(list(c) + [0])[:3] for c in state["counters"]]
        self.dataset.override = state["override"]
        self.next_worker = int(state["next_worker"])

    def load_rank_states(self, states: list[dict], rank: int, world_size: int) -> None:
        """Resume from every old rank's state (see restore_from_ranks)."""
        restore_from_ranks(self, states, rank, world_size)

    def _data_changed(self, states: list[dict]) -> bool:
        """Check seed and data; on a changed shard list apply data.on_data_change (True: handled)."""
        for st in states:
            if st.get("backend") != "webdataset":
                raise ValueError(
                    f"loader state is for backend {st.get('backend')!r}, not webdataset"
                )
            if st["seed"] != self.seed:
                raise ValueError(f"loader state was saved with seed {st['seed']}, now {self.seed}")
        old = states[0]
        fingerprint = self._fingerprint
        if old.get("version", 1) < 2:  # version 1 fingerprinted the shard names only
            names = "\n".join(u.rsplit("/", 1)[-1] for u in self.shards.urls)
            fingerprint = hashlib.sha256(names.encode()).hexdigest()[:16]
        if (old["num_shards"], old["shards_fingerprint"]) == (len(self.shards.urls), fingerprint):
            return False
        change = f"{old['num_shards']} -> {len(self.shards.urls)} shards"
        if old["num_shards"] == len(self.shards.urls):
            change = f"{len(self.shards.urls)} shards, other names or contents"
        if self.cfg.on_data_change == "error":
            raise ValueError(
                f"the shard list changed since the checkpoint ({change}) and "
                "data.on_data_change=error: set data.on_data_change=restart_epoch to continue with "
                "a fresh epoch, or point data.shards at the data this run started with"
            )
        epoch = max(c[0] for st in states for c in st["cursors"]) + 1
        self.dataset.cursors = [[epoch, 0, 0] for _ in range(self.num_workers)]
        self.dataset.override = None
        self.next_worker = 0
        if self.rank == 0:
            log.warning(
                "data: the shard list changed since the checkpoint (%s): the loader starts epoch %d "
                "under a fresh shard order (data.on_data_change=restart_epoch)",
                change,
                epoch,
            )
        return True

    def _reshard(self, states: list[dict]) -> None:
        """Weaker resume after a change of world size or workers (module docstring, 2nd guarantee)."""
        old_world, old_nw = states[0]["world_size"], states[0]["num_workers"]
        if len(states) != old_world:
            raise ValueError(
                f"resharded_from needs all {old_world} old ranks' states, got {len(states)}"
            )
        states = sorted(states, key=lambda st: st["rank"])
        old_total = old_world * old_nw
        override = states[0]["override"]
        cursors = [c for st in states for c in st["cursors"]]  # index = old global worker
        epoch = min(c[0] for c in cursors)
        base = shard_order(len(self.shards.urls), self.seed, epoch, override)
        remaining: set[int] = set()
        for g, (e, pos, _) in enumerate(cursors):
            if e == epoch:  # workers already past `epoch` finished all their shards of it
                remaining.update(base[g::old_total][pos:])
        self.dataset.override = {"epoch": epoch, "shards": [s for s in base if s in remaining]}
        self.dataset.cursors = [[epoch, 0, 0] for _ in range(self.num_workers)]
        self.next_worker = 0
        log.warning(
            "loader resharded from %d ranks x %d workers: resuming epoch %d with %d of %d shards left",
            old_world,
            old_nw,
            epoch,
            len(remaining),
            len(self.shards.urls),
        )

    def stats(self) -> dict[str, float]:
        """Cumulative counts on this rank: bad samples, samples read, upscaled images."""
        bad = sum(c[0] for c in self.dataset.counters)
        seen = sum(c[1] for c in self.dataset.counters)
        return {
            "bad_samples": float(bad),
            "samples": float(seen),
            "bad_fraction": bad / max(seen, 1),
            "upscaled_samples": float(sum(c[2] for c in self.dataset.counters)),
            "epoch": float(min(c[0] for c in self.dataset.cursors)),
        }

    def close(self) -> None:
        """Stop the worker processes of the current iteration (a later iter() restarts them)."""
        it, self._active, self._dataloader = self._active, None, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()


def build_loader(
    cfg: DataConfig,
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    device: torch.device | str | None = None,
) -> Loader:
    """Validate the data (shards exist, enough shards, size, labels) and build the rank's loader."""
    cfg.validate()
    if device is not None:
        device = torch.device(device)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    if cfg.backend == "memory":
        from data_pipeline.memory_backend import build_memory_loader

        return build_memory_loader(
            cfg, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed, device=device
        )
    if cfg.backend == "ffcv":
        from data_pipeline.ffcv_backend import build_ffcv_loader

        return build_ffcv_loader(
            cfg, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed, device=device
        )
    data = open_dataset(cfg, rank=rank)
    workers = max(1, cfg.num_workers)
    needed = world_size * workers
    have = len(data.shards.urls)
    if have < needed:
        fix = "re-prepare with a smaller --shard-size"
        if data.shards.has_counts:
            fix = f"re-prepare with --shard-size {max(1, data.shards.num_samples // needed)}"
        raise ValueError(
            f"{have} shards for {world_size} ranks x {workers} workers: every worker needs a shard, "
            f"so at least {needed}: {fix}, or lower data.num_workers"
        )
    return Loader(
        cfg,
        data,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        device=device,
    )
