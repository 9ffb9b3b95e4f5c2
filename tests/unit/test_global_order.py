"""The global sample order: a pure function of (seed, epoch, position), whatever the cluster.

Global batch k holds the same samples on any number of ranks, workers and per-GPU batch; every
epoch reads each sample exactly once; a resume on another cluster continues the stream exactly;
more readers than shards work; bad samples are replaced the same way everywhere.
"""

from __future__ import annotations

import io
import logging
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline import DataConfig, build_loader
from data_pipeline.config import SetupError
from data_pipeline.index import ShardIndex, build_index, load_or_build_index
from data_pipeline.order import EpochPlan, GlobalOrder, micro_batch_positions
from data_pipeline.shards import resolve_shards
from tests.data_helpers import make_shards, take, write_wds_shards
from trainer.loss import batch_positions

N = 53


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """53 images of 16px in 11 shards of 5 (the last holds 3): uneven on purpose."""
    return make_shards(tmp_path_factory.mktemp("glob") / "out", N, size=16, shard_size=5).parent


def cfg_for(out: Path | str, **kw) -> DataConfig:
    """A global-order config with per-sample records (data.audit) for the tests to read."""
    kw.setdefault("num_workers", 0)
    kw.setdefault("shuffle_shards", 3)
    return DataConfig(shards=str(out), order="global", audit=True, **kw)


def stream(out: Path, *, world: int, per_gpu: int, global_batch: int, steps: int, workers: int = 0,
           start: int = 0, seed: int = 5, **kw) -> dict[int, tuple]:
    """Position -> (epoch, key, shard) for ``steps`` global batches read by every rank of a cluster."""
    got: dict[int, tuple] = {}
    accum = global_batch // (per_gpu * world)
    for rank in range(world):
        lo = build_loader(cfg_for(out, num_workers=workers, **kw), batch_size=per_gpu, rank=rank, world_size=world,
                          seed=seed, global_batch=global_batch)
        if start:
            state = dict(lo.state_dict(), position=start)
            lo.load_rank_states([state], rank, world)
        for j, batch in enumerate(take(lo, steps * accum)):
            k, m = divmod(j, accum)
            expect = batch_positions(start + k * global_batch, m, rank, world, per_gpu)
            assert [s[3] for s in batch["samples"]] == list(expect)  # the trainer's positions
            for p, sample in zip(expect, batch["samples"]):
                got[p] = (sample[0], sample[1], sample[2])
        lo.close()
    return got


def test_order_is_a_permutation_per_epoch_and_changes_with_epoch_and_seed() -> None:
    counts = [5] * 10 + [3]
    order = GlobalOrder(counts, seed=1, group=4)
    for e in (0, 1):
        ids = [order.sample_in_epoch(e, i) for i in range(N)]
        assert sorted(ids) == sorted((s, j) for s, c in enumerate(counts) for j in range(c))
    assert [order.sample_in_epoch(0, i) for i in range(N)] != [order.sample_in_epoch(1, i) for i in range(N)]
    other = GlobalOrder(counts, seed=2, group=4)
    assert [order.sample_in_epoch(0, i) for i in range(N)] != [other.sample_in_epoch(0, i) for i in range(N)]
    # A group of 4 shards: the first 4 shards' worth of positions come from 4 shards only.
    first = {order.sample_in_epoch(0, i)[0] for i in range(20)}
    assert len(first) == 4
    # The plan moves epochs in the stream (a data change under a run starts the next epoch there).
    assert EpochPlan().locate(N + 7, N) == (1, 7) and EpochPlan(100, 3).locate(100 + N, N) == (4, 0)
    # Micro-batch positions match the trainer's (trainer.loss.batch_positions).
    for j in range(12):
        k, m = divmod(j, 3)
        assert micro_batch_positions(j, rank=1, world_size=2, batch_per_gpu=2, accum=3, global_batch=12) == (
            batch_positions(k * 12, m, 1, 2, 2))


@pytest.mark.parametrize("world,per_gpu,workers", [(1, 12, 0), (2, 6, 2), (3, 4, 1), (3, 2, 2), (4, 1, 0)])
def test_global_batches_are_the_same_on_any_cluster(shards: Path, world: int, per_gpu: int, workers: int) -> None:
    ref = stream(shards, world=1, per_gpu=12, global_batch=12, steps=10)
    got = stream(shards, world=world, per_gpu=per_gpu, global_batch=12, steps=10, workers=workers)
    assert got == ref  # the same sample at every position: identical global batches (10 of 12 images)
    # Every epoch reads each sample exactly once: 120 positions = 2 epochs of 53 and 14 of the third.
    per_epoch = Counter((e, key) for e, key, _ in ref.values())
    keys = {key for _, key, _ in ref.values()}
    assert len(keys) == N and set(per_epoch.values()) == {1}
    assert sum(1 for e, _ in per_epoch if e == 0) == N and sum(1 for e, _ in per_epoch if e == 1) == N


def test_resume_on_another_cluster_continues_the_stream(shards: Path) -> None:
    ref = stream(shards, world=1, per_gpu=12, global_batch=12, steps=12)
    # 2 ranks for 4 steps, then 3 ranks x 2 workers from image 48, then 1 rank from 96 (an epoch boundary in between).
    a = stream(shards, world=2, per_gpu=6, global_batch=12, steps=4)
    b = stream(shards, world=3, per_gpu=2, global_batch=12, steps=4, workers=2, start=48)
    c = stream(shards, world=1, per_gpu=4, global_batch=12, steps=4, start=96)
    assert {**a, **b, **c} == ref


def test_more_readers_than_shards(tmp_path: Path) -> None:
    out = make_shards(tmp_path / "four", 20, size=16, shard_size=5).parent  # 4 shards
    got = stream(out, world=4, per_gpu=1, global_batch=4, steps=5, workers=2)  # 8 readers
    assert sorted(key for _, key, _ in got.values()) == sorted({key for _, key, _ in got.values()})
    assert len(got) == 20


def test_state_is_one_global_cursor_and_data_change_rules(shards: Path, tmp_path: Path) -> None:
    lo = build_loader(cfg_for(shards), batch_size=4, rank=0, world_size=2, seed=0, global_batch=8)
    take(lo, 3)
    st = lo.state_dict()
    assert (st["order"], st["position"], st["num_samples"], st["plan"]) == ("global", 24, N, [0, 0])
    lo2 = build_loader(cfg_for(shards), batch_size=2, rank=0, world_size=2, seed=0, global_batch=8)  # 2 micro
    take(lo2, 1)
    with pytest.raises(RuntimeError, match="between the micro-batches"):
        lo2.state_dict()
    other = make_shards(tmp_path / "other", 20, size=16, shard_size=5).parent
    strict = build_loader(cfg_for(other, on_data_change="error"), batch_size=4, rank=0, world_size=2, seed=0,
                          global_batch=8)
    with pytest.raises(SetupError, match="shard list changed.*data.on_data_change=error"):
        strict.load_rank_states([st], 0, 2)
    moved = build_loader(cfg_for(other), batch_size=4, rank=0, world_size=2, seed=0, global_batch=8)
    moved.load_rank_states([st], 0, 2)
    assert moved.mode.order.plan == EpochPlan(24, 1) and moved.position == 24


def test_bad_samples_are_replaced_the_same_way_on_every_cluster(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    out = make_shards(tmp_path / "bad", 20, size=16, shard_size=5).parent
    src = out / "shard-000000.tar"
    members = []
    with tarfile.open(src) as tar:
        for m in tar.getmembers():
            members.append((m, tar.extractfile(m).read()))
    bad_key = members[1][0].name.split(".")[0]
    with tarfile.open(src, "w") as tar:
        for i, (m, data) in enumerate(members):
            if i == 1:
                data = b"\xff\xd8garbage" + data[100:200]
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    with caplog.at_level(logging.WARNING, logger="ddpm.data"):
        one = stream(out, world=1, per_gpu=4, global_batch=4, steps=5, max_bad_fraction=0.5)
    two = stream(out, world=2, per_gpu=2, global_batch=4, steps=5, workers=2, max_bad_fraction=0.5)
    assert one == two and bad_key not in {key for _, key, _ in one.values()}
    assert any("bad sample" in r.message and "shard-000000.tar" in r.message for r in caplog.records)


def test_index_of_foreign_shards_and_its_cache(tmp_path: Path) -> None:
    write_wds_shards(tmp_path / "wds", 3, 4, seed=1)
    shards = resolve_shards(str(tmp_path / "wds"))
    index = build_index(shards)
    assert index.counts == [4, 4, 4] and index.num_samples == 12
    cache = tmp_path / "run" / "data_index.npz"
    built, how = load_or_build_index(shards, cache)
    assert how == "built" and ShardIndex.load(cache).counts == [4, 4, 4]
    assert load_or_build_index(shards, cache)[1] == "cached"
    with open(shards.urls[0], "ab") as f:  # a shard changed under the run: the index is rebuilt
        f.write(b"\0" * 1024)
    assert load_or_build_index(resolve_shards(str(tmp_path / "wds")), cache)[1] == "rebuilt"
    assert np.array_equal(built.starts, index.starts)
    lo = build_loader(cfg_for(tmp_path / "wds", image_size=16), batch_size=3, rank=0, world_size=1, seed=0)
    assert next(iter(lo))["image"].shape == (3, 3, 16, 16)


def test_equal_batches_forever_and_stats(shards: Path) -> None:
    for rank in range(3):
        lo = build_loader(cfg_for(shards), batch_size=4, rank=rank, world_size=3, seed=0)
        batches = take(lo, 20)
        assert len(batches) == 20 and all(b["image"].shape == (4, 3, 16, 16) for b in batches)
        assert all(b["image"].dtype == torch.uint8 for b in batches)
        assert lo.stats()["epoch"] >= 4  # 20 steps x 12 images = 240 positions = epoch 4 of 53
