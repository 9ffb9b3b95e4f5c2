"""The global sample order: which sample is the run's p-th, a pure function of the data and the seed.

The run consumes one endless stream of samples. Its p-th sample (p = the global sample index =
images seen before it) is, for a shard list of N samples:

    epoch e, index i        from the plan: e = base_epoch + (p - base_position) // N, i = the rest
    shard order of e        a seeded permutation of the shards (seed, e)
    groups of e             that order cut into groups of ``group`` consecutive shards
                            (data.shuffle_shards): the samples of a group are shuffled together
    sample i of the epoch   the group holding position i, then a seeded permutation of the group's
                            samples (seed, e, group): (shard, sample in shard)

Nothing depends on the world size, the loader workers or the per-GPU batch: global batch k is
samples [k B, (k + 1) B) on any cluster, and every epoch reads each sample exactly once. A batch
mixes the samples of ``group`` shards; readers touch those shards' files only while the group is
being read (the ordering of the stream follows the shard order).

Rank r's micro-batch m of global batch k holds positions k B + (m R + r) b + [0, b) (trainer.loss
.batch_positions), so the loader yields micro-batch j = k A + m of its rank without talking to the
others. The plan (base_position, base_epoch) moves only when the shard list changes under a run
(data.on_data_change=restart_epoch: the next epoch starts at the resumed position).
"""

from __future__ import annotations

import hashlib
import random
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def _seed32(*parts: object) -> int:
    """A 32-bit seed from values (RandomState takes 32 bits; its streams are frozen across numpy versions)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little")


@dataclass(frozen=True)
class EpochPlan:
    """Where epochs begin in the stream: epoch ``base_epoch`` starts at position ``base_position``."""

    base_position: int = 0
    base_epoch: int = 0

    def locate(self, p: int, n: int) -> tuple[int, int]:
        """(epoch, index in the epoch) of stream position ``p`` for ``n`` samples per epoch."""
        q = p - self.base_position
        if q < 0:
            raise ValueError(f"position {p} lies before the plan's start {self.base_position}")
        return self.base_epoch + q // n, q % n


def micro_batch_positions(j: int, *, rank: int, world_size: int, batch_per_gpu: int, accum: int,
                          global_batch: int) -> range:
    """Stream positions of rank ``rank``'s j-th micro-batch (j = step * accum + micro-step)."""
    k, m = divmod(j, accum)
    start = k * global_batch + (m * world_size + rank) * batch_per_gpu
    return range(start, start + batch_per_gpu)


class GlobalOrder:
    """Stream position -> (epoch, shard, sample in shard); small caches of the permutations in use."""

    def __init__(self, counts: Sequence[int], seed: int, group: int, plan: EpochPlan | None = None) -> None:
        self.counts = np.asarray(counts, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self.num_samples = int(self.offsets[-1])
        if self.num_samples <= 0:
            raise ValueError("the shards hold no readable sample")
        self.seed, self.group = seed, max(1, int(group))
        self.plan = plan or EpochPlan()
        self._epochs: OrderedDict[int, tuple[list[list[int]], np.ndarray]] = OrderedDict()
        self._groups: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def shard_order(self, epoch: int) -> list[int]:
        """The epoch's shard permutation (the same seeding as the streaming order)."""
        order = list(range(len(self.counts)))
        random.Random(f"ddpm-scale-shards-{self.seed}-{epoch}").shuffle(order)
        return order

    def _epoch(self, epoch: int) -> tuple[list[list[int]], np.ndarray]:
        """(groups of shard indices, cumulative samples before each group) of an epoch."""
        if epoch in self._epochs:
            self._epochs.move_to_end(epoch)
            return self._epochs[epoch]
        order = self.shard_order(epoch)
        groups = [order[k : k + self.group] for k in range(0, len(order), self.group)]
        sizes = [int(self.counts[g].sum()) for g in groups]
        cum = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._epochs[epoch] = (groups, cum)
        if len(self._epochs) > 2:
            self._epochs.popitem(last=False)
        return groups, cum

    def _group_ids(self, epoch: int, g: int, shards: list[int]) -> np.ndarray:
        """Global sample ids of one group, in the group's seeded order."""
        key = (epoch, g)
        if key in self._groups:
            self._groups.move_to_end(key)
            return self._groups[key]
        ids = np.concatenate([np.arange(self.offsets[s], self.offsets[s + 1]) for s in shards])
        ids = ids[np.random.RandomState(_seed32("group", self.seed, epoch, g)).permutation(len(ids))]
        self._groups[key] = ids
        if len(self._groups) > 4:
            self._groups.popitem(last=False)
        return ids

    def sample_in_epoch(self, epoch: int, i: int) -> tuple[int, int]:
        """(shard, sample in shard) of index ``i`` of an epoch."""
        groups, cum = self._epoch(epoch)
        g = int(np.searchsorted(cum, i, side="right")) - 1
        gid = int(self._group_ids(epoch, g, groups[g])[i - cum[g]])
        s = int(np.searchsorted(self.offsets, gid, side="right")) - 1
        return s, gid - int(self.offsets[s])

    def locate(self, p: int) -> tuple[int, int, int, int]:
        """(epoch, index in epoch, shard, sample in shard) of stream position ``p``."""
        e, i = self.plan.locate(p, self.num_samples)
        s, j = self.sample_in_epoch(e, i)
        return e, i, s, j
