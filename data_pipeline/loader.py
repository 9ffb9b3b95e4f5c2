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
from data_pipeline.shards import ShardSet, image_part, iter_tar, resolve_shards, shuffled

log = logging.getLogger(__name__)

STATE_VERSION = 1


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


# torchvision marks its image codecs deprecated in favour of torchcodec, yet decode_jpeg is still
# the fastest libjpeg-turbo path measured here; frombuffer warns on read-only bytes we never write.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities")
warnings.filterwarnings("ignore", message="The given buffer is not writable")


def decode_image(data: bytes, ext: str) -> Tensor:
    """(3, H, W) uint8 from encoded bytes: libjpeg-turbo for JPEG, libpng etc. otherwise."""
    import torchvision.io as tio

    raw = torch.frombuffer(data, dtype=torch.uint8)  # zero-copy view; the decoders only read it
    if ext in ("jpg", "jpeg"):
        return tio.decode_jpeg(raw, mode=tio.ImageReadMode.RGB)
    return tio.decode_image(raw, mode=tio.ImageReadMode.RGB)


class ShardStream(IterableDataset):
    """Per-worker endless stream of collated uint8 batches with cursors attached."""

    def __init__(
        self,
        shards: ShardSet,
        cfg: DataConfig,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        image_size: int,
        ship_bytes: bool,
    ) -> None:
        super().__init__()
        self.urls, self.counts = shards.urls, shards.counts
        self.cfg = cfg
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.image_size = image_size
        self.ship_bytes = ship_bytes
        self.num_workers = max(1, cfg.num_workers)
        self.cursors: list[list[int]] = [[0, 0, 0] for _ in range(self.num_workers)]
        self.counters: list[list[int]] = [[0, 0] for _ in range(self.num_workers)]  # bad, seen
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
            self._ring.append(torch.empty(shape, dtype=torch.uint8, memory_format=fmt).share_memory_())
        return self._ring[i]

    def _batches(self, w: int) -> Iterator[dict[str, Any]]:
        g = self.rank * self.num_workers + w
        total = self.world_size * self.num_workers
        epoch, pos, offset = self.cursors[w]
        bad, seen = self.counters[w]
        images, encoded, flips, labels = self._new_batch(), [], [], []
        last_bad = ""

        def on_error(url: str, key: str, reason: str) -> None:
            nonlocal bad, last_bad
            bad += 1
            last_bad = f"key {key} in shard {url}: {reason}"
            log.warning("bad sample: %s", last_bad)

        while True:
            order = worker_shards(len(self.urls), self.seed, epoch, g, total, self.override)
            while pos < len(order):
                sid = order[pos]
                url = self.urls[sid]
                rng = random.Random(f"ddpm-scale-samples-{self.seed}-{epoch}-{sid}")
                raw = iter_tar(url, on_error)
                for i, (key, parts, flip) in enumerate(
                    shuffled(raw, rng, self.cfg.shuffle_buffer, self.cfg.hflip)
                ):
                    if i < offset:
                        continue  # resume: skip raw samples, never decode them
                    offset = i + 1
                    seen += 1
                    try:
                        img, label = self._sample(parts)
                    except Exception as e:  # any decode failure is one bad sample, never a crash
                        on_error(url, key, f"{type(e).__name__}: {e}")
                        img = None
                    if bad > self.cfg.max_bad_fraction * max(seen, self.cfg.bad_min_samples):
                        raise RuntimeError(
                            f"{bad} bad samples out of {seen} on rank {self.rank} worker {w} exceed "
                            f"data.max_bad_fraction={self.cfg.max_bad_fraction}; last: {last_bad}"
                        )
                    if img is None:
                        continue
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
                        cursor = (epoch, pos, offset)
                        yield self._emit(images, encoded, flips, labels, w, cursor, bad, seen)
                        images, encoded, flips, labels = self._new_batch(), [], [], []
                pos, offset = pos + 1, 0
            epoch, pos, offset = epoch + 1, 0, 0

    def _sample(self, parts: dict[str, bytes]) -> tuple[Tensor, int]:
        """Decoded (3, H, W) uint8 image (or its JPEG bytes with gpu_decode) and label."""
        found = image_part(parts)
        if found is None:
            raise ValueError(f"no image member (has {sorted(parts)})")
        ext, data = found
        label = 0
        if self.cfg.use_labels:
            if "cls" not in parts:
                raise ValueError("no .cls member but data.use_labels is on")
            label = int(parts["cls"])
        if self.ship_bytes:
            if ext not in ("jpg", "jpeg"):
                raise ValueError(f"gpu_decode needs JPEG samples, got .{ext}")
            return torch.frombuffer(bytearray(data), dtype=torch.uint8), label
        img = decode_image(data, ext)
        if img.shape != (3, self.image_size, self.image_size):
            raise ValueError(
                f"image is {tuple(img.shape)}, expected (3, {self.image_size}, {self.image_size})"
            )
        return img, label

    @staticmethod
    def _emit(images, encoded, flips, labels, w, cursor, bad, seen) -> dict[str, Any]:
        batch: dict[str, Any] = {"label": torch.tensor(labels, dtype=torch.int64)}
        if images is not None:
            batch["image"] = images  # (B, 3, H, W) uint8 channels_last, flips already applied
        else:
            batch["jpeg"], batch["flip"] = encoded, torch.tensor(flips, dtype=torch.bool)
        batch["_meta"] = {"worker": w, "cursor": list(cursor), "bad": bad, "seen": seen}
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
        shards: ShardSet,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        image_size: int,
        device: torch.device | None,
    ) -> None:
        self.cfg = cfg
        self.shards = shards
        self.image_size = image_size
        self.num_classes = len(shards.classes)
        self.num_samples = shards.num_samples
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.device = device
        cuda = device is not None and device.type == "cuda" and torch.cuda.is_available()
        self.gpu_decode = cfg.gpu_decode and cuda
        if cfg.gpu_decode and not self.gpu_decode:
            warnings.warn("data.gpu_decode needs a CUDA device; decoding on the CPU", stacklevel=2)
        self.pin = cuda
        self.dataset = ShardStream(
            shards,
            cfg,
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
            seed=seed,
            image_size=image_size,
            ship_bytes=self.gpu_decode,
        )
        self.num_workers = max(1, cfg.num_workers)
        self.next_worker = 0
        self._dataloader: DataLoader | None = None
        self._active: Iterator | None = None
        self._fingerprint = hashlib.sha256(
            "\n".join(u.rsplit("/", 1)[-1] for u in shards.urls).encode()
        ).hexdigest()[:16]

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
            self.dataset.counters[w] = [meta["bad"], meta["seen"]]
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
            self._reshard(list(state["resharded_from"]))
            return
        if state.get("backend") != "webdataset":
            raise ValueError(
                f"loader state is for backend {state.get('backend')!r}, not webdataset"
            )
        self._check_same_data(state)
        if (state["world_size"], state["num_workers"]) != (self.world_size, self.num_workers):
            raise ValueError(
                f"loader state was saved with world_size={state['world_size']} and "
                f"num_workers={state['num_workers']}, now {self.world_size} and {self.num_workers}: "
                "pass {'resharded_from': [every old rank's state]}"
            )
        if state["rank"] != self.rank:
            raise ValueError(f"loader state of rank {state['rank']} given to rank {self.rank}")
        self.dataset.cursors = [list(c) for c in state["cursors"]]
        self.dataset.counters = [list(c) for c in state["counters"]]
        self.dataset.override = state["override"]
        self.next_worker = int(state["next_worker"])

    def _check_same_data(self, state: dict) -> None:
        if (
            state["num_shards"] != len(self.shards.urls)
            or state["shards_fingerprint"] != self._fingerprint
        ):
            raise ValueError(
                "loader state belongs to a different shard list; cannot resume its cursor"
            )
        if state["seed"] != self.seed:
            raise ValueError(f"loader state was saved with seed {state['seed']}, now {self.seed}")

    def _reshard(self, states: list[dict]) -> None:
        """Weaker resume after a change of world size or workers (module docstring, 2nd guarantee)."""
        if not states:
            raise ValueError("resharded_from holds no states")
        for st in states:
            self._check_same_data(st)
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
        """Cumulative counts on this rank: bad samples and samples read."""
        bad = sum(c[0] for c in self.dataset.counters)
        seen = sum(c[1] for c in self.dataset.counters)
        return {
            "bad_samples": float(bad),
            "samples": float(seen),
            "bad_fraction": bad / max(seen, 1),
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
    """Validate the data (shards exist, enough shards, image size) and build the rank's loader."""
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
    shards = resolve_shards(cfg.shards)
    needed = world_size * max(1, cfg.num_workers)
    if len(shards.urls) < needed:
        raise ValueError(
            f"{len(shards.urls)} shards for {world_size} ranks x {max(1, cfg.num_workers)} workers: "
            f"need at least {needed} (prepare with a smaller --shard-size, or use fewer workers)"
        )
    image_size = check_image_size(cfg, shards)
    if cfg.use_labels and not shards.classes:
        raise ValueError(
            "data.use_labels is on but the manifest lists no classes (prepare --labels)"
        )
    return Loader(
        cfg,
        shards,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        image_size=image_size,
        device=device,
    )


def check_image_size(cfg: DataConfig, shards: ShardSet) -> int:
    """The image size: from the manifest (checked against cfg), else from the first sample."""
    size = shards.image_size
    if size == 0:  # no manifest: look at one sample
        for _key, parts in iter_tar(shards.urls[0], lambda *a: None):
            found = image_part(parts)
            if found is not None:
                size = decode_image(found[1], found[0]).shape[-1]
                break
    if size == 0:
        raise ValueError(f"cannot tell the image size: no readable image in {shards.urls[0]}")
    if cfg.image_size and cfg.image_size != size:
        raise ValueError(f"data.image_size={cfg.image_size} but the shards hold {size}px images")
    return size
