"""The global order (data.order=global, the default): each rank's micro-batches read by position.

Rank r's j-th micro-batch holds stream positions k B + (m R + r) b + [0, b) (data_pipeline.order),
so a DataLoader worker w produces micro-batches j0 + w, j0 + w + W, ... (W workers; DataLoader
returns them round-robin, i.e. in order) without any per-worker cursor: the whole loader state is
one global position, the same on every rank, valid for any world size, worker count or per-GPU
batch. Each sample is read by its byte range (data_pipeline.index, data_pipeline.reader), the
reads of a batch sorted by shard and offset, adjacent ones merged. Flips and random crops are
drawn per sample from (seed, position). A sample that cannot be read or decoded is counted and
replaced by the next position's sample of the same epoch that decodes (a pure function of the data,
so every cluster makes the same replacement).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from typing import Any

from data_pipeline.config import DataConfig, SetupError
from data_pipeline.dataset import Dataset
from data_pipeline.index import ShardIndex
from data_pipeline.order import EpochPlan, GlobalOrder, micro_batch_positions
from data_pipeline.reader import RangeReader, parse_sample
from data_pipeline.stream_base import BaseStream

log = logging.getLogger("ddpm.data")

STATE_VERSION = 3
MAX_REPLACEMENTS = 1000  # consecutive unreadable samples before the loader gives up


class GlobalStream(BaseStream):
    """Micro-batches of one rank by stream position; a worker owns every W-th micro-batch."""

    def __init__(self, data: Dataset, cfg: DataConfig, index: ShardIndex, *, accum: int, global_batch: int,
                 **kw: Any) -> None:
        super().__init__(data, cfg, **kw)
        self.index = index
        self.order = GlobalOrder(index.counts, self.seed, cfg.shuffle_shards)
        self.accum, self.global_batch = accum, global_batch
        self.start_micro = 0
        self._reader: RangeReader | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        wid, nw = self.worker()
        self._reader = RangeReader()
        counters = [0, 0, 0]  # bad, seen, upscaled (this worker, since this iteration began)
        j = self.start_micro + wid
        while True:
            yield self._micro_batch(j, wid, counters)
            j += nw

    def positions(self, j: int) -> range:
        """Stream positions of micro-batch ``j`` of this rank."""
        return micro_batch_positions(j, rank=self.rank, world_size=self.world_size,
                                     batch_per_gpu=self.batch_size, accum=self.accum,
                                     global_batch=self.global_batch)

    def _read(self, slots: list[tuple[int, int, int, int]]) -> list[bytes | Exception]:
        """The tar bytes of each (epoch, index, shard, sample) slot; reads grouped by shard."""
        by_shard: dict[int, list[int]] = {}
        for row, (_, _, s, _) in enumerate(slots):
            by_shard.setdefault(s, []).append(row)
        out: list[bytes | Exception] = [b""] * len(slots)
        for s in sorted(by_shard):
            rows = by_shard[s]
            try:
                data = self._reader.read_many(self.urls[s], [self.index.byte_range(s, slots[r][3]) for r in rows])
            except OSError as e:
                for r in rows:
                    out[r] = e
                continue
            for r, d in zip(rows, data):
                out[r] = d
        return out

    def _decode_slot(self, raw: bytes | Exception, slot: tuple[int, int, int, int], p: int):
        """(key, image, label, upscaled) of one slot; raises on any read or decode failure."""
        if isinstance(raw, Exception):
            raise raw
        key, parts = parse_sample(raw)
        rng = random.Random(f"ddpm-scale-aug-{self.seed}-{p}")  # per sample: any cluster draws the same
        flip = self.cfg.hflip and rng.random() < 0.5
        crop = rng.random() if self.cfg.crop == "random" else None
        img, label, up = self.decode(parts, crop)
        return key, img, label, up, flip

    def _micro_batch(self, j: int, w: int, counters: list[int]) -> dict[str, Any]:
        positions = self.positions(j)
        slots = [self.order.locate(p) for p in positions]
        raws = self._read(slots)
        images, encoded, flips, labels, samples = self.new_batch(), [], [], [], []
        for row, (p, slot, raw) in enumerate(zip(positions, slots, raws)):
            e, i, s, jj = slot
            counters[1] += 1
            tries = 0
            while True:
                try:
                    key, img, label, up, flip = self._decode_slot(raw, slot, p)
                    break
                except Exception as err:  # any read or decode failure is one bad sample, never a crash
                    counters[0] += 1
                    reason = str(err) if isinstance(err, ValueError | OSError) else repr(err)
                    last = f"sample {slot[3]} of shard {self.urls[slot[2]]}: {reason}"
                    if counters[0] <= 3 or counters[0] % 1000 == 0:
                        log.warning("bad sample (%d so far on rank %d worker %d): %s; replaced by the next one of "
                                    "the epoch", counters[0], self.rank, w, last)
                    self.check_bad(counters[0], counters[1], w, last)
                    tries += 1
                    if tries > MAX_REPLACEMENTS:
                        raise RuntimeError(f"{MAX_REPLACEMENTS} unreadable samples in a row after position {p}; "
                                           f"last: {last}") from err
                    slot = (e, i, *self.order.sample_in_epoch(e, (i + tries) % self.order.num_samples))
                    raw = self._read([slot])[0]
            if up:
                counters[2] += 1
                self.note_upscaled(counters[2], w, key, self.urls[slot[2]])
            if images is None:
                encoded.append(img)
            else:
                images[row].copy_(img.flip(-1) if flip else img)
            flips.append(flip)
            labels.append(label)
            samples.append((slot[0], key, self.urls[slot[2]].rsplit("/", 1)[-1], p))
        meta = {"worker": w, "j": j, "position": positions.start, "counters": list(counters), "samples": samples}
        return self.emit(images, encoded, flips, labels, meta)


class GlobalMode:
    """The loader's state and resume rules in the global order (see the module docstring)."""

    name = "global"

    def __init__(self, stream: GlobalStream, fingerprint: str, on_data_change: str) -> None:
        self.stream = stream
        self.fingerprint = fingerprint
        self.on_data_change = on_data_change
        self.next_micro = 0  # the micro-batch j this rank delivers next
        self.base_counters = [0, 0, 0]  # counts before this iteration (resumed, or earlier iterations)
        self.live: dict[int, list[int]] = {}  # worker -> its counts in the current iteration

    @property
    def order(self) -> GlobalOrder:
        """The stream's order (its plan is part of the state)."""
        return self.stream.order

    @property
    def position(self) -> int:
        """The stream position of the next global batch (a step boundary)."""
        s = self.stream
        return (self.next_micro // s.accum) * s.global_batch

    def dataset(self) -> GlobalStream:
        """The stream, set to continue after the last delivered micro-batch."""
        for i, c in enumerate(self._counts()):
            self.base_counters[i] = c
        self.live = {}
        self.stream.start_micro = self.next_micro
        return self.stream

    def delivered(self, meta: dict[str, Any]) -> None:
        """Bookkeeping after a batch reached the trainer."""
        self.next_micro = meta["j"] + 1
        self.live[meta["worker"]] = list(meta["counters"])

    def _counts(self) -> list[int]:
        return [b + sum(c[i] for c in self.live.values()) for i, b in enumerate(self.base_counters)]

    def state_dict(self) -> dict[str, Any]:
        """One global cursor (the same on every rank at a step boundary) and this rank's counts."""
        s = self.stream
        if self.next_micro % s.accum:
            raise RuntimeError("the loader's state is taken between the micro-batches of a step")
        plan = self.order.plan
        return {
            "version": STATE_VERSION, "backend": "webdataset", "order": "global", "seed": s.seed,
            "rank": s.rank, "world_size": s.world_size, "position": self.position,
            "epoch": self.order.plan.locate(self.position, self.order.num_samples)[0],
            "plan": [plan.base_position, plan.base_epoch], "num_samples": self.order.num_samples,
            "num_shards": len(s.urls), "shards_fingerprint": self.fingerprint, "shuffle_shards": self.order.group,
            "counters": self._counts(),
        }

    def load_rank_states(self, states: list[dict], rank: int, world_size: int) -> None:
        """Continue at the saved position under any world size, worker count or per-GPU batch."""
        st, s = states[0], self.stream
        if st["seed"] != s.seed:
            raise ValueError(f"loader state was saved with seed {st['seed']}, now {s.seed}")
        position = int(st["position"])
        if position % s.global_batch:
            raise ValueError(f"loader position {position} is not a multiple of the global batch {s.global_batch}")
        old_plan = EpochPlan(*st["plan"])
        if (st["num_samples"], st["shards_fingerprint"]) != (self.order.num_samples, self.fingerprint):
            change = (f"{st['num_shards']} -> {len(s.urls)} shards" if st["num_shards"] != len(s.urls)
                      else f"{len(s.urls)} shards, other names or contents")
            if self.on_data_change == "error":
                raise SetupError(f"the shard list changed since the checkpoint ({change}) and "
                                 "data.on_data_change=error: set data.on_data_change=restart_epoch to continue with "
                                 "a fresh epoch, or point data.shards at the data this run started with")
            epoch = old_plan.locate(position, int(st["num_samples"]))[0] + 1
            self.order.plan = EpochPlan(position, epoch)
            if rank == 0:
                log.warning("data: the shard list changed since the checkpoint (%s): the loader starts epoch %d at "
                            "image %d under a fresh order (data.on_data_change=restart_epoch)", change, epoch, position)
        else:
            self.order.plan = old_plan
        self.next_micro = position // s.global_batch * s.accum
        totals = [sum(int(x["counters"][i]) for x in states) for i in range(3)]
        self.base_counters = totals if rank == 0 else [0, 0, 0]  # the run's counts, carried by rank 0
        self.live = {}

    def stats(self) -> dict[str, float]:
        """Counts on this rank (rank 0 carries the run's counts from before a resume), and the epoch."""
        bad, seen, up = self._counts()
        epoch = self.order.plan.locate(self.position, self.order.num_samples)[0]
        return {"bad_samples": float(bad), "samples": float(seen), "upscaled_samples": float(up),
                "epoch": float(epoch)}
