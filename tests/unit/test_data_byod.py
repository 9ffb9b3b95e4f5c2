"""Bring your own shards: webdataset ShardWriter output (varied sizes, folders in keys, .cls/.json
labels, no manifest) through the loaders, header-only start-up, and resume after re-preparing."""

from __future__ import annotations

import io
import logging
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from data_pipeline import DataConfig, build_loader
from data_pipeline.images import decode_image, resize_crop
from data_pipeline.prepare import prepare
from data_pipeline.shards import iter_tar, resolve_shards
from tests.data_helpers import make_image_folder, take, write_wds_shards

SIZE = 16


@pytest.fixture(scope="module")
def byod(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """4 ShardWriter shards of 9 JPEGs from 10 to 40 px (some smaller than 16: upscaled)."""
    out = tmp_path_factory.mktemp("byod") / "shards"
    return out, write_wds_shards(out, 4, 9, min_size=10, max_size=40)


def pixels(img: torch.Tensor) -> bytes:
    """An image's identity: its pixel bytes in (C, H, W) order."""
    return img.contiguous().numpy().tobytes()


def expected(samples: list[dict], pos: float | None = None) -> dict[bytes, dict]:
    """What the loader must yield for each sample: the shared decode + center crop."""
    return {pixels(resize_crop(decode_image(s["jpg"]), SIZE, pos)): s for s in samples}


def one_epoch(loader, workers: int = 1) -> tuple[list[tuple[torch.Tensor, int]], list[int]]:
    """(image, label) of every sample of epoch 0 of a rank (batch size 1), and the epoch's
    [bad, seen, upscaled] counts summed over workers."""
    out, totals = [], [0, 0, 0]
    for w in range(workers):
        loader.mode.stream.cursors[w] = [0, 0, 0]  # the streaming order's per-worker cursors
        last = [0, 0, 0]
        for batch in loader.mode.stream._batches(w):
            bad, seen, up = batch["_meta"]["counters"]
            if batch["_meta"]["cursor"][0] != 0:
                # The first batch of epoch 1: its sample and the bad ones before it are epoch 1's.
                lead = seen - last[1] - 1 if last[1] else 0
                last = [bad - lead, last[1], last[2]]
                break
            out.append((batch["image"][0].clone(), int(batch["label"][0])))
            last = [bad, seen, up]
        totals = [a + b for a, b in zip(totals, last)]
    return out, totals


def test_keys_and_parts_follow_webdataset(tmp_path: Path) -> None:
    import webdataset as wds

    path = tmp_path / "k.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [
            ("a/0001.jpg", b"x"),
            ("a/0001.cls", b"1"),
            ("b/0001.jpg", b"y"),  # same file name in another folder: another sample
            ("b/0001.seg.PNG", b"z"),  # multi-dot part, upper case: lower-cased like webdataset
            ("__index__", b"meta"),  # webdataset metadata: skipped
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    ours = [(k, sorted(p)) for k, p in iter_tar(str(path), lambda *a: None)]
    theirs = [
        (s["__key__"], sorted(k for k in s if not k.startswith("__")))
        for s in wds.WebDataset(str(path), shardshuffle=False, empty_check=False)
    ]
    assert ours == theirs == [("a/0001", ["cls", "jpg"]), ("b/0001", ["jpg", "seg.png"])]


def test_varied_sizes_are_resized_and_every_sample_comes_once(byod) -> None:
    out, samples = byod
    cfg = DataConfig(shards=str(out), image_size=SIZE, num_workers=2, hflip=False, shuffle_buffer=4,
                     order="streaming")
    loader = build_loader(cfg, batch_size=1, rank=0, world_size=1, seed=0)
    assert loader.image_size == SIZE and loader.num_samples == len(samples)  # counted from headers
    ref = expected(samples)
    got, (bad, _, upscaled) = one_epoch(loader, workers=2)
    assert Counter(ref[pixels(img)]["key"] for img, _ in got) == Counter(s["key"] for s in samples)
    small = sum(min(s["w"], s["h"]) < SIZE for s in samples)
    assert bad == 0 and 0 < small < len(samples) and upscaled == small  # upscaled are counted


def test_batches_from_workers_are_at_the_model_size(byod) -> None:
    out, _ = byod
    cfg = DataConfig(shards=str(out), image_size=SIZE, num_workers=2)
    loader = build_loader(cfg, batch_size=5, rank=1, world_size=2, seed=0)
    batches = take(loader, 6)
    loader.close()
    assert all(b["image"].shape == (5, 3, SIZE, SIZE) for b in batches)
    assert loader.stats()["upscaled_samples"] >= 0 and loader.stats()["bad_samples"] == 0


@pytest.mark.parametrize("labels_from", ["cls", "json:label"])
def test_labels_from_cls_or_json(byod, labels_from: str) -> None:
    out, samples = byod
    cfg = DataConfig(
        shards=str(out),
        image_size=SIZE,
        num_workers=0,
        hflip=False,
        use_labels=True,
        labels_from=labels_from,
        num_classes=3,
        order="streaming",
    )
    loader = build_loader(cfg, batch_size=1, rank=0, world_size=1, seed=0)
    assert loader.num_classes == 3
    ref = expected(samples)
    got, _ = one_epoch(loader)
    assert len(got) == len(samples)
    assert all(label == ref[pixels(img)]["label"] for img, label in got)


def test_label_outside_num_classes_is_a_counted_bad_sample(
    byod, caplog: pytest.LogCaptureFixture
) -> None:
    out, samples = byod
    cfg = DataConfig(
        shards=str(out),
        image_size=SIZE,
        num_workers=0,
        use_labels=True,
        num_classes=2,
        max_bad_fraction=1.0,
        order="streaming",
    )
    loader = build_loader(cfg, batch_size=1, rank=0, world_size=1, seed=0)
    with caplog.at_level(logging.WARNING, logger="ddpm.data"):
        got, (bad, _, _) = one_epoch(loader)
    assert sorted(label for _, label in got) == sorted(
        s["label"] for s in samples if s["label"] < 2
    )
    assert bad == sum(s["label"] == 2 for s in samples)
    assert any("label 2 outside [0, 2)" in r.message for r in caplog.records)


def test_label_errors_are_one_line(byod) -> None:
    out, _ = byod
    with pytest.raises(ValueError, match="set data.num_classes"):
        build_loader(
            DataConfig(shards=str(out), image_size=SIZE, use_labels=True),
            batch_size=1,
            rank=0,
            world_size=1,
            seed=0,
        )
    with pytest.raises(ValueError, match="labels_from must be cls or json:FIELD"):
        DataConfig(shards=str(out), labels_from="txt").validate()


def test_random_crop_resumes_exactly(byod, tmp_path: Path) -> None:
    out, samples = byod
    cfg = DataConfig(shards=str(out), image_size=SIZE, num_workers=2, crop="random")
    kw = dict(batch_size=3, rank=0, world_size=1, seed=5)
    ref = torch.cat([b["image"] for b in take(build_loader(cfg, **kw), 10)])
    first = build_loader(cfg, **kw)
    got = [b["image"] for b in take(first, 4)]
    torch.save(first.state_dict(), tmp_path / "s.pt")
    first.close()
    second = build_loader(cfg, **kw)
    second.load_rank_states([torch.load(tmp_path / "s.pt", weights_only=True)], 0, 1)
    got += [b["image"] for b in take(second, 6)]
    second.close()
    assert torch.equal(torch.cat(got), ref)
    # Random crops of the non-square images differ from the center crop somewhere.
    center = expected(samples)
    assert any(pixels(x) not in center and pixels(x.flip(-1)) not in center for x in ref)


def test_memory_backend_takes_the_same_shards(byod) -> None:
    out, samples = byod
    cfg = DataConfig(backend="memory", shards=str(out), image_size=SIZE, hflip=False)
    lo = build_loader(cfg, batch_size=4, rank=0, world_size=1, seed=0)
    assert lo.images.shape == (len(samples), 3, SIZE, SIZE)
    assert {pixels(x) for x in lo.images} == set(expected(samples))
    with pytest.raises(ValueError, match="data.crop=random needs data.backend=webdataset"):
        build_loader(
            DataConfig(backend="memory", shards=str(out), crop="random"),
            batch_size=4,
            rank=0,
            world_size=1,
            seed=0,
        )


def test_shard_without_images_and_corrupt_member(tmp_path: Path, caplog) -> None:
    out = tmp_path / "bad"
    write_wds_shards(out, 2, 6)
    with tarfile.open(out / "part-0002.tar", "w") as tar:  # a shard of text only
        for i in range(30):
            data = f"caption {i}".encode()
            info = tarfile.TarInfo(f"{i:04d}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    cfg = DataConfig(shards=str(out), image_size=SIZE, num_workers=0, max_bad_fraction=1.0, order="streaming")
    loader = build_loader(cfg, batch_size=1, rank=0, world_size=1, seed=0)
    with caplog.at_level(logging.WARNING, logger="ddpm.data"):
        got, (bad, _, _) = one_epoch(loader)
    assert len(got) == 12 and bad == 30
    lines = [r.message for r in caplog.records if "part-0002" in r.message]
    # Per pass over the shard: 3 sample lines and one count, not 30 lines.
    counts = [m for m in lines if "27 more bad samples in shard" in m]
    assert counts and len(lines) == 4 * len(counts)
    assert "no image part (jpg, jpeg, png, webp); the sample has: txt" in lines[0]


def rchar() -> int:
    """Bytes this process has read through read() calls so far (Linux /proc)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def test_startup_reads_headers_not_members(tmp_path: Path) -> None:
    out = tmp_path / "twenty"
    samples = write_wds_shards(out, 20, 6, min_size=120, max_size=200, seed=3)
    data_bytes = sum(p.stat().st_size for p in out.glob("*.tar"))
    cfg = DataConfig(shards=str(out), image_size=SIZE, num_workers=0, order="streaming")
    resolve_shards(str(out))  # warm up imports and caches outside the measurement
    before = rchar()
    loader = build_loader(cfg, batch_size=2, rank=0, world_size=2, seed=0)
    startup = rchar() - before
    assert startup < 4096, f"start-up read {startup} bytes of shards"  # streaming order: no shard is opened
    # The global order reads each shard's tar headers once (the byte ranges of its samples), never an image.
    before = rchar()
    indexed = build_loader(DataConfig(shards=str(out), image_size=SIZE, num_workers=0), batch_size=2, rank=0,
                           world_size=2, seed=0)
    headers = rchar() - before
    assert indexed.num_samples == len(samples)
    assert 512 * 3 * len(samples) <= headers <= data_bytes - sum(len(s["jpg"]) for s in samples)
    # Without data.image_size the size comes from the first image: one header and one member.
    before = rchar()
    guess = build_loader(
        DataConfig(shards=str(out), num_workers=0, order="streaming"), batch_size=2, rank=0, world_size=2, seed=0
    )
    assert guess.image_size >= 120 and rchar() - before < 512 + len(samples[0]["jpg"]) + 4096
    # Counting (for evaluation) reads tar headers (and pax records) only, never an image byte.
    before = rchar()
    assert loader.num_samples == len(samples)
    counted = rchar() - before
    assert 512 * 3 * len(samples) <= counted <= data_bytes - sum(len(s["jpg"]) for s in samples)


def test_resume_after_reprepare_restarts_the_epoch(tmp_path: Path, caplog) -> None:
    src = tmp_path / "src"
    make_image_folder(src, 24, size=20)
    out = tmp_path / "data"
    prepare(src, out, image_size=SIZE, shard_size=4, progress=False)
    cfg = DataConfig(shards=str(out), num_workers=0, shuffle_buffer=2, order="streaming")
    kw = dict(batch_size=2, rank=0, world_size=2, seed=0)
    old = build_loader(cfg, **kw)
    take(old, 3)
    state = old.state_dict()
    # Re-prepared with another shard size (and 6 more images).
    make_image_folder(src / "more", 6, size=20, seed=9)
    prepare(src, out, image_size=SIZE, shard_size=3, progress=False, overwrite=True)
    new = build_loader(cfg, **kw)
    with caplog.at_level(logging.WARNING, logger="ddpm.data"):
        new.load_rank_states([state, {**state, "rank": 1}], 0, 2)
    lines = [r.message for r in caplog.records]
    assert len(lines) == 1 and "6 -> 10 shards" in lines[0] and "starts epoch 1" in lines[0]
    assert len(take(new, 5)) == 5 and new.stats()["epoch"] >= 1
    strict = build_loader(DataConfig(shards=str(out), num_workers=0, on_data_change="error", order="streaming"),
                          **kw)
    with pytest.raises(ValueError, match="set data.on_data_change=restart_epoch"):
        strict.load_rank_states([state, {**state, "rank": 1}], 0, 2)
    # The world size changed too: the same rule, not a contradiction.
    three = build_loader(cfg, batch_size=2, rank=2, world_size=3, seed=0)
    three.load_rank_states([state, {**state, "rank": 1}], 2, 3)
    assert three.mode.stream.cursors == [[1, 0, 0]]
