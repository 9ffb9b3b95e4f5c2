"""FFCV backend: .beton written from prepared shards, endless batches, exact resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from data_pipeline import DataConfig, build_loader
from tests.data_helpers import make_shards, take

pytest.importorskip("ffcv", reason="the ffcv extra is not installed")


@pytest.fixture(scope="module")
def beton(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from data_pipeline.ffcv_backend import write_beton

    out = tmp_path_factory.mktemp("ffcv") / "out"
    manifest = make_shards(out, 24, size=16, shard_size=6, classes=2)
    return write_beton(manifest, out.parent / "data.beton")


def test_beton_batches_cover_the_data(beton: Path) -> None:
    cfg = DataConfig(backend="ffcv", shards=str(beton), num_workers=1, hflip=False, use_labels=True)
    loader = build_loader(cfg, batch_size=4, rank=0, world_size=1, seed=0)
    assert loader.num_samples == 24 and loader.image_size == 16 and loader.num_classes == 2
    batches = take(loader, 12)  # two epochs of 6 batches
    assert all(
        b["image"].shape == (4, 3, 16, 16) and b["image"].dtype == torch.uint8 for b in batches
    )
    epoch0 = torch.cat([b["image"] for b in batches[:6]])
    # Every sample exactly once in an epoch: 24 distinct images.
    assert len({x.numpy().tobytes() for x in epoch0}) == 24
    labels = torch.cat([b["label"] for b in batches[:6]])
    assert sorted(labels.tolist()) == [0] * 12 + [1] * 12
    assert not torch.equal(epoch0, torch.cat([b["image"] for b in batches[6:]]))  # reshuffled


def test_beton_exact_resume(beton: Path) -> None:
    cfg = DataConfig(backend="ffcv", shards=str(beton), num_workers=1, hflip=True)
    kw = dict(batch_size=4, rank=0, world_size=1, seed=5)
    ref = torch.cat([b["image"] for b in take(build_loader(cfg, **kw), 9)])
    first = build_loader(cfg, **kw)
    got = [b["image"] for b in take(first, 4)]
    second = build_loader(cfg, **kw)
    second.load_state_dict(first.state_dict())
    got += [b["image"] for b in take(second, 5)]
    assert torch.equal(torch.cat(got), ref)


def test_ffcv_needs_a_beton(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=".beton"):
        build_loader(
            DataConfig(backend="ffcv", shards=str(tmp_path)),
            batch_size=2,
            rank=0,
            world_size=1,
            seed=0,
        )


def test_prepare_cli_writes_a_beton(tmp_path: Path) -> None:
    from data_pipeline.prepare import main
    from tests.data_helpers import make_image_folder

    make_image_folder(tmp_path / "src", 8, size=20)
    beton = tmp_path / "d.beton"
    argv = [
        str(tmp_path / "src"),
        str(tmp_path / "out"),
        "--size",
        "16",
        "--shard-size",
        "4",
        "--workers",
        "1",
        "--no-progress",
        "--beton",
        str(beton),
    ]
    assert main(argv) == 0 and beton.exists()
    loader = build_loader(
        DataConfig(backend="ffcv", shards=str(beton), num_workers=1),
        batch_size=4,
        rank=0,
        world_size=1,
        seed=0,
    )
    assert loader.num_samples == 8 and next(iter(loader))["image"].shape == (4, 3, 16, 16)
