"""The streaming order (data.order=streaming): per-worker shard streams, for sources that cannot seek.

``pipe:`` commands can only be read from the start, so they keep the loader's earlier order, and so
do runs whose checkpoint comes from it (their cursors are per worker):

* Global worker g = rank * num_workers + w, W = world_size * num_workers (w is a *logical* worker).
* Epoch e: the shard order is a seeded permutation perm(seed, e); worker g reads perm[g::W].
* Within a shard, samples pass a seeded shuffle buffer (rng seeded by (seed, e, shard)), which
  also draws the flip decision (and the random crop) of each sample.
* Each worker's stream is endless; "epoch" in the state is per worker.

Cursor (per logical worker): (epoch, pos, offset): index ``pos`` into the worker's shard list of
the epoch and ``offset`` raw samples consumed from that shard. Guarantees: with the same world
size and workers the batches after a resume are exactly those of an uninterrupted run; with
another, the run resumes in the lowest epoch any old worker was in, does not re-read the shards
old workers had finished, deals the unfinished ones (a partly read shard restarts from its
beginning) over the new workers, then continues normally. A changed shard list starts the next
epoch (data.on_data_change=restart_epoch) or is refused (=error).
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Iterator
from typing import Any

from data_pipeline.config import DataConfig, SetupError
from data_pipeline.dataset import Dataset
from data_pipeline.restore import ReshardNeeded
from data_pipeline.shards import iter_tar, shuffled
from data_pipeline.stream_base import BaseStream

log = logging.getLogger("ddpm.data")

STATE_VERSION = 2


def shard_order(num_shards: int, seed: int, epoch: int, override: dict | None) -> list[int]:
    """The shard order of an epoch: seeded permutation, or the resharding override list."""
    if override is not None and epoch == override["epoch"]:
        return list(override["shards"])
    order = list(range(num_shards))
    random.Random(f"ddpm-scale-shards-{seed}-{epoch}").shuffle(order)
    return order


def worker_shards(num_shards: int, seed: int, epoch: int, g: int, total_workers: int,
                  override: dict | None) -> list[int]:
    """The shard indices global worker g reads in an epoch, in order."""
    return shard_order(num_shards, seed, epoch, override)[g::total_workers]


def check_enough_shards(num_shards: int, world_size: int, num_workers: int) -> None:
    """Every worker of every rank needs a shard in the streaming order; one line naming fixes if not."""
    needed = world_size * max(1, num_workers)
    if num_shards < needed:
        fewer = max(1, num_shards // world_size)
        raise SetupError(
            f"{num_shards} shards for {world_size} ranks x {max(1, num_workers)} workers: the streaming order "
            f"(data.order=streaming, the only one for pipe: sources) gives every worker its own shards, so it "
            f"needs at least {needed}: set data.num_workers={fewer}" + (" (or fewer ranks)" if num_shards < world_size
                                                                        else "")
            + ", or read local files or http(s) URLs with data.order=global (any number of readers per shard)"
        )


class ShardStream(BaseStream):
    """Per-worker endless stream of collated uint8 batches with cursors attached."""

    def __init__(self, data: Dataset, cfg: DataConfig, **kw: Any) -> None:
        super().__init__(data, cfg, **kw)
        self.cursors: list[list[int]] = [[0, 0, 0] for _ in range(self.num_workers)]
        self.counters: list[list[int]] = [[0, 0, 0] for _ in range(self.num_workers)]  # bad, seen, upscaled
        self.override: dict | None = None
        self.worker_offset = 0  # logical worker of DataLoader worker 0 (resume: the next one due)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        wid, _ = self.worker()
        return self._batches((wid + self.worker_offset) % self.num_workers)

    def _batches(self, w: int) -> Iterator[dict[str, Any]]:
        g = self.rank * self.num_workers + w
        total = self.world_size * self.num_workers
        epoch, pos, offset = self.cursors[w]
        bad, seen, upscaled = (list(self.counters[w]) + [0])[:3]
        images, encoded, flips, labels, samples = self.new_batch(), [], [], [], []
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
                shard_bad = 0
                for i, (key, parts, flip, crop_pos) in enumerate(
                    shuffled(iter_tar(url, on_error), rng, self.cfg.shuffle_buffer, self.cfg.hflip, random_crop)
                ):
                    if i < offset:
                        continue  # resume: skip raw samples, never decode them
                    offset = i + 1
                    seen += 1
                    try:
                        img, label, up = self.decode(parts, crop_pos)
                    except Exception as e:  # any decode failure is one bad sample, never a crash
                        on_error(url, key, str(e) if isinstance(e, ValueError) else repr(e))
                        img = None
                    self.check_bad(bad, seen, w, last_bad)
                    if img is None:
                        continue
                    if up:
                        upscaled += 1
                        self.note_upscaled(upscaled, w, key, url)
                    n = len(labels)
                    if images is None:
                        encoded.append(img)
                    else:
                        images[n].copy_(img.flip(-1) if flip else img)
                    flips.append(flip)
                    labels.append(label)
                    samples.append((epoch, key, url.rsplit("/", 1)[-1]))
                    if n + 1 == self.batch_size:
                        meta = {"worker": w, "cursor": [epoch, pos, offset], "counters": [bad, seen, upscaled],
                                "samples": samples}
                        yield self.emit(images, encoded, flips, labels, meta)
                        images, encoded, flips, labels, samples = self.new_batch(), [], [], [], []
                if shard_bad > 3:
                    log.warning("%d more bad samples in shard %s; last: %s", shard_bad - 3, url, last_bad)
                pos, offset = pos + 1, 0
            epoch, pos, offset = epoch + 1, 0, 0


class StreamingMode:
    """The loader's state and resume rules in the streaming order (see the module docstring)."""

    name = "streaming"

    def __init__(self, stream: ShardStream, fingerprint: str, on_data_change: str) -> None:
        self.stream = stream
        self.fingerprint = fingerprint
        self.on_data_change = on_data_change
        self.next_worker = 0

    def dataset(self) -> ShardStream:
        """The stream, set to continue after the last delivered batch."""
        self.stream.cursors = [list(c) for c in self.stream.cursors]
        self.stream.worker_offset = self.next_worker
        return self.stream

    def delivered(self, meta: dict[str, Any]) -> None:
        """The cursor after the last batch *delivered* (not the ones workers prefetched)."""
        w = meta["worker"]
        self.stream.cursors[w] = list(meta["cursor"])
        self.stream.counters[w] = list(meta["counters"])
        self.next_worker = (w + 1) % self.stream.num_workers

    def state_dict(self) -> dict[str, Any]:
        """This rank's cursor after the last delivered batch (plain python: weights_only-safe)."""
        s = self.stream
        return {
            "version": STATE_VERSION, "backend": "webdataset", "order": "streaming", "rank": s.rank,
            "world_size": s.world_size, "num_workers": s.num_workers, "seed": s.seed, "batch_size": s.batch_size,
            "num_shards": len(s.urls), "shards_fingerprint": self.fingerprint,
            "cursors": [list(c) for c in s.cursors], "counters": [list(c) for c in s.counters],
            "next_worker": self.next_worker, "override": s.override, "epoch": min(c[0] for c in s.cursors),
        }

    def load_rank_states(self, states: list[dict], rank: int, world_size: int) -> None:
        """Exact with the same world size and workers, else resharded (module docstring)."""
        if self._data_changed(states):
            return
        if len(states) == world_size:
            try:
                self._load_exact(states[rank])
                return
            except ReshardNeeded as e:
                reason = str(e)
        else:
            reason = f"world size changed from {len(states)} to {world_size}"
        log.warning("%s: the data loader resumes in the same epoch without repeating finished shards "
                    "(the streaming order's guarantee; data.order=global resumes sample-exact)", reason)
        self._reshard(states)

    def _load_exact(self, state: dict) -> None:
        s = self.stream
        if (state["world_size"], state["num_workers"]) != (s.world_size, s.num_workers):
            raise ReshardNeeded(f"loader state was saved with world_size={state['world_size']} and "
                                f"num_workers={state['num_workers']}, now {s.world_size} and {s.num_workers}")
        if state["rank"] != s.rank:
            raise ValueError(f"loader state of rank {state['rank']} given to rank {s.rank}")
        s.cursors = [list(c) for c in state["cursors"]]
        s.counters = [(list(c) + [0])[:3] for c in state["counters"]]
        s.override = state["override"]
        self.next_worker = int(state["next_worker"])

    def _data_changed(self, states: list[dict]) -> bool:
        """Check seed and data; on a changed shard list apply data.on_data_change (True: handled)."""
        s = self.stream
        for st in states:
            if st.get("backend") != "webdataset":
                raise ValueError(f"loader state is for backend {st.get('backend')!r}, not webdataset")
            if st["seed"] != s.seed:
                raise ValueError(f"loader state was saved with seed {st['seed']}, now {s.seed}")
        old = states[0]
        fingerprint = self.fingerprint
        if old.get("version", 1) < 2:  # version 1 fingerprinted the shard names only
            names = "\n".join(u.rsplit("/", 1)[-1] for u in s.urls)
            fingerprint = hashlib.sha256(names.encode()).hexdigest()[:16]
        if (old["num_shards"], old["shards_fingerprint"]) == (len(s.urls), fingerprint):
            return False
        change = f"{old['num_shards']} -> {len(s.urls)} shards"
        if old["num_shards"] == len(s.urls):
            change = f"{len(s.urls)} shards, other names or contents"
        if self.on_data_change == "error":
            raise SetupError(f"the shard list changed since the checkpoint ({change}) and data.on_data_change=error: "
                             "set data.on_data_change=restart_epoch to continue with a fresh epoch, or point "
                             "data.shards at the data this run started with")
        epoch = max(c[0] for st in states for c in st["cursors"]) + 1
        s.cursors = [[epoch, 0, 0] for _ in range(s.num_workers)]
        s.override = None
        self.next_worker = 0
        if s.rank == 0:
            log.warning("data: the shard list changed since the checkpoint (%s): the loader starts epoch %d "
                        "under a fresh shard order (data.on_data_change=restart_epoch)", change, epoch)
        return True

    def _reshard(self, states: list[dict]) -> None:
        """Resume after a change of world size or workers: finish the epoch's unfinished shards."""
        s = self.stream
        old_world, old_nw = states[0]["world_size"], states[0]["num_workers"]
        if len(states) != old_world:
            raise ValueError(f"resharded_from needs all {old_world} old ranks' states, got {len(states)}")
        states = sorted(states, key=lambda st: st["rank"])
        old_total = old_world * old_nw
        cursors = [c for st in states for c in st["cursors"]]  # index = old global worker
        epoch = min(c[0] for c in cursors)
        base = shard_order(len(s.urls), s.seed, epoch, states[0]["override"])
        remaining: set[int] = set()
        for g, (e, pos, _) in enumerate(cursors):
            if e == epoch:  # workers already past `epoch` finished all their shards of it
                remaining.update(base[g::old_total][pos:])
        s.override = {"epoch": epoch, "shards": [x for x in base if x in remaining]}
        s.cursors = [[epoch, 0, 0] for _ in range(s.num_workers)]
        self.next_worker = 0
        log.warning("loader resharded from %d ranks x %d workers: resuming epoch %d with %d of %d shards left",
                    old_world, old_nw, epoch, len(remaining), len(s.urls))

    def stats(self) -> dict[str, float]:
        """Cumulative counts on this rank: bad samples, samples read, upscaled images, epoch."""
        c = self.stream.counters
        return {"bad_samples": float(sum(x[0] for x in c)), "samples": float(sum(x[1] for x in c)),
                "upscaled_samples": float(sum(x[2] for x in c)),
                "epoch": float(min(x[0] for x in self.stream.cursors))}
