"""Memory backend: one decoded uint8 tensor, seeded random batches, equal batches, exact resume."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from data_pipeline import DataConfig, build_loader
from data_pipeline.synthetic import ensure_synthetic_shards
from tests.data_helpers import make_shards, take


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """23 labelled 16px images (an odd count: ranks cut the epoch to a multiple of W)."""
    return make_shards(tmp_path_factory.mktemp("mem") / "out", 23, size=16, shard_size=4, classes=2)


def cfg(shards: Path, **kw) -> DataConfig:
    """A memory-backend config."""
    return DataConfig(backend="memory", shards=str(shards), **kw)


def keys(images: torch.Tensor) -> list[bytes]:
    """Identify images by their bytes (the generated images are unique)."""
    return [x.numpy().tobytes() for x in images]


def test_epoch_covers_samples_once_across_ranks(shards: Path) -> None:
    world = 3
    loaders = [
        build_loader(
            cfg(shards, hflip=False, use_labels=True),
            batch_size=7,
            rank=r,
            world_size=world,
            seed=0,
        )
        for r in range(world)
    ]
    lo = loaders[0]
    assert lo.num_samples == 23 and lo.image_size == 16 and lo.num_classes == 2
    assert lo.images.dtype == torch.uint8 and lo.images.shape == (23, 3, 16, 16)
    # 23 // 3 = 7 samples per rank and epoch, batch 7: one batch = one epoch on every rank.
    epoch0 = [k for lo in loaders for k in keys(take(lo, 1)[0]["image"])]
    assert len(epoch0) == 21 and len(set(epoch0)) == 21
    assert set(epoch0) <= set(keys(lo.images))
    b = take(loaders[1], 1)[0]
    assert b["label"].dtype == torch.int64 and set(b["label"].tolist()) <= {0, 1}


def test_equal_batches_forever_and_flips(shards: Path) -> None:
    for rank in range(2):
        lo = build_loader(cfg(shards), batch_size=5, rank=rank, world_size=2, seed=1)
        batches = take(lo, 30)  # ~13 epochs: straddles epoch boundaries
        assert len(batches) == 30 and all(b["image"].shape == (5, 3, 16, 16) for b in batches)
        assert lo.stats()["epoch"] >= 10
    lo = build_loader(cfg(shards, hflip=True), batch_size=23, rank=0, world_size=1, seed=1)
    base = set(keys(lo.images))
    flipped = set(keys(lo.images.flip(-1)))
    got = keys(take(lo, 1)[0]["image"])
    assert all(k in base or k in flipped for k in got) and any(k in flipped for k in got)


def test_exact_resume(shards: Path, tmp_path: Path) -> None:
    kw = dict(batch_size=4, rank=1, world_size=2, seed=3)
    ref = torch.cat([b["image"] for b in take(build_loader(cfg(shards), **kw), 12)])
    for cut in (1, 5, 8):
        a = build_loader(cfg(shards), **kw)
        got = [b["image"] for b in take(a, cut)]
        torch.save(a.state_dict(), tmp_path / "s.pt")
        b = build_loader(cfg(shards), **kw)
        b.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
        got += [x["image"] for x in take(b, 12 - cut)]
        assert torch.equal(torch.cat(got), ref), f"resume after {cut} batches diverged"


def test_resume_with_other_world_size_continues_the_epoch(shards: Path) -> None:
    c = cfg(shards, hflip=False)
    old = [build_loader(c, batch_size=2, rank=r, world_size=2, seed=4) for r in range(2)]
    seen = Counter(k for lo in old for k in keys(torch.cat([b["image"] for b in take(lo, 3)])))
    states = [lo.state_dict() for lo in old]
    new = [build_loader(c, batch_size=1, rank=r, world_size=3, seed=4) for r in range(3)]
    for lo in new:
        lo.load_state_dict({"resharded_from": states})
        n = (23 - 12) // 3  # what is left of epoch 0 per new rank
        seen.update(keys(torch.cat([b["image"] for b in take(lo, n)])))
    assert len(seen) == 12 + 9 and set(seen.values()) == {1}  # nothing repeated within the epoch


def test_synthetic_shards_go_through_prepare(tmp_path: Path) -> None:
    assert ensure_synthetic_shards(tmp_path / "syn", 40, 16, seed=0, progress=False) == "made"
    man = tmp_path / "syn" / "manifest.json"
    assert len(list((tmp_path / "syn").glob("shard-*.tar"))) == 20
    mtime = man.stat().st_mtime_ns
    assert ensure_synthetic_shards(tmp_path / "syn", 40, 16, progress=False) == "kept"
    assert man.stat().st_mtime_ns == mtime  # idempotent: nothing redone
    lo = build_loader(
        DataConfig(shards=str(tmp_path / "syn"), num_workers=0),
        batch_size=8,
        rank=0,
        world_size=2,
        seed=0,
    )
    x = next(iter(lo))["image"]
    assert x.shape == (8, 3, 16, 16) and x.float().std() > 20  # colourful, not blank
    assert not list(tmp_path.glob(".synthetic-src-*"))
