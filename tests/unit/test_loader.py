"""Webdataset loader, streaming order (pipe: sources and older runs): rank/worker split, equal
batches, exact resume, resharding, bad data, errors. The global order: tests/unit/test_global_order.py."""

from __future__ import annotations

import io
import json
import logging
import multiprocessing as mp
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from data_pipeline import DataConfig, build_loader
from data_pipeline.config import SetupError
from data_pipeline.loader import decode_image
from data_pipeline.shards import image_part, iter_tar
from data_pipeline.streaming import worker_shards
from tests.data_helpers import make_shards, take


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """53 images of 16px in 11 shards of 5 (the last holds 3): uneven on purpose."""
    return make_shards(tmp_path_factory.mktemp("wds") / "out", 53, size=16, shard_size=5).parent


def reference(out: Path) -> dict[bytes, str]:
    """Decoded image bytes -> key, for every sample of every shard (images are unique)."""
    ref = {}
    for tar_path in sorted(out.glob("shard-*.tar")):
        for key, parts in iter_tar(str(tar_path), lambda *a: None):
            ext, data = image_part(parts)
            ref[decode_image(data, ext).numpy().tobytes()] = key
    assert len(ref) == 53
    return ref


def cfg_for(out: Path, **kw) -> DataConfig:
    """A small DataConfig for these tests (the streaming order unless asked otherwise)."""
    kw.setdefault("num_workers", 0)
    kw.setdefault("shuffle_buffer", 4)
    kw.setdefault("order", "streaming")
    return DataConfig(shards=str(out), **kw)


@pytest.mark.parametrize("world,workers", [(1, 1), (2, 2), (3, 1), (1, 4), (5, 2)])
def test_split_covers_every_sample_once_per_epoch(shards: Path, world: int, workers: int) -> None:
    ref = reference(shards)
    for epoch in (0, 1):
        seen: Counter = Counter()
        for rank in range(world):
            loader = build_loader(
                cfg_for(shards, num_workers=workers, hflip=False),
                batch_size=1,
                rank=rank,
                world_size=world,
                seed=3,
            )
            for w in range(workers):
                # Each logical worker's stream, one sample per batch, until its epoch ends.
                loader.mode.stream.cursors[w] = [epoch, 0, 0]
                for batch in loader.mode.stream._batches(w):
                    if batch["_meta"]["cursor"][0] != epoch:
                        break
                    seen[ref[batch["image"][0].numpy().tobytes()]] += 1
        assert sorted(seen) == sorted(ref.values()) and set(seen.values()) == {1}


def test_shard_order_changes_per_epoch_and_with_seed() -> None:
    assert worker_shards(11, 0, 0, 0, 1, None) != worker_shards(11, 0, 1, 0, 1, None)
    assert worker_shards(11, 0, 0, 0, 1, None) != worker_shards(11, 1, 0, 0, 1, None)
    assert sorted(worker_shards(11, 0, 5, 0, 1, None)) == list(range(11))


def test_every_rank_yields_batches_forever(shards: Path) -> None:
    # 53 samples over 3 ranks with batch 4: ~4 batches per rank and epoch; run 4 epochs' worth.
    for rank in range(3):
        loader = build_loader(cfg_for(shards), batch_size=4, rank=rank, world_size=3, seed=0)
        batches = take(loader, 20)
        assert len(batches) == 20
        assert all(
            b["image"].shape == (4, 3, 16, 16) and b["image"].dtype == torch.uint8 for b in batches
        )
        assert all(b["label"].shape == (4,) and b["label"].dtype == torch.int64 for b in batches)
        assert loader.stats()["epoch"] >= 3


def test_exact_resume_with_workers(shards: Path, tmp_path: Path) -> None:
    cfg = cfg_for(shards, num_workers=2, hflip=True, shuffle_buffer=3)
    kw = dict(batch_size=3, rank=1, world_size=2, seed=7)
    ref_loader = build_loader(cfg, **kw)
    ref = torch.cat([b["image"] for b in take(ref_loader, 14)])
    ref_loader.close()
    for cuts in ([1], [4, 9], [5, 6, 13]):
        got, state, done = [], None, 0
        for cut in [*cuts, 14]:
            loader = build_loader(cfg, **kw)
            if state is not None:
                path = tmp_path / "state.pt"
                torch.save([state, state], path)  # the checkpoint's list of every rank's state
                loader.load_rank_states(torch.load(path, weights_only=True), 1, 2)
            got += [b["image"] for b in take(loader, cut - done)]
            state, done = loader.state_dict(), cut
            loader.close()
        assert torch.equal(torch.cat(got), ref), f"resume at {cuts} diverged"


def test_state_reports_delivered_not_prefetched(shards: Path) -> None:
    cfg = cfg_for(shards, num_workers=2, prefetch_factor=4)
    loader = build_loader(cfg, batch_size=2, rank=0, world_size=1, seed=0)
    take(loader, 3)
    st = loader.state_dict()
    # 3 batches delivered round-robin: worker 0 gave 2 batches (4 samples), worker 1 one (2).
    assert [c[1] for c in st["counters"]] == [4, 2] and st["next_worker"] == 1
    alive = len(mp.active_children())
    loader.close()
    assert len(mp.active_children()) == alive - 2  # close() stops this loader's two workers


def test_resume_with_different_world_size(shards: Path) -> None:
    ref = reference(shards)
    cfg = cfg_for(shards, hflip=False)
    old = [build_loader(cfg, batch_size=1, rank=r, world_size=2, seed=1) for r in range(2)]
    consumed = [ref[b["image"][0].numpy().tobytes()] for lo in old for b in take(lo, 7)]
    states = [lo.state_dict() for lo in old]
    assert {s["epoch"] for s in states} == {0}
    seen = Counter(consumed)
    for rank in range(3):
        lo = build_loader(cfg, batch_size=1, rank=rank, world_size=3, seed=1)
        lo.load_rank_states(states, rank, 3)
        for batch in lo.mode.stream._batches(0):
            if batch["_meta"]["cursor"][0] != 0:
                break
            seen[ref[batch["image"][0].numpy().tobytes()]] += 1
    # The epoch completes: every sample at least once; repeats only from the partly read shards
    # (at most one per old worker, restarted from its beginning).
    assert set(seen) == set(ref.values())
    assert 0 < sum(seen.values()) - len(ref) <= 2 * 5


def test_resume_errors(shards: Path) -> None:
    cfg = cfg_for(shards)
    a = build_loader(cfg, batch_size=2, rank=0, world_size=1, seed=0)
    take(a, 2)
    c = build_loader(cfg, batch_size=2, rank=0, world_size=1, seed=1)
    with pytest.raises(ValueError, match="seed"):
        c.load_rank_states([a.state_dict()], 0, 1)


def test_labels(tmp_path: Path) -> None:
    out = make_shards(tmp_path / "lab", 12, size=16, shard_size=3, classes=3).parent
    loader = build_loader(
        cfg_for(out, use_labels=True), batch_size=12, rank=0, world_size=1, seed=0
    )
    assert loader.num_classes == 3 and loader.num_samples == 12
    labels = next(iter(loader))["label"]
    assert sorted(labels.tolist()) == [0] * 4 + [1] * 4 + [2] * 4
    with pytest.raises(SetupError, match="no classes"):
        build_loader(
            cfg_for(make_shards(tmp_path / "nolab", 4, shard_size=2).parent, use_labels=True),
            batch_size=1,
            rank=0,
            world_size=1,
            seed=0,
        )


def _corrupt(out: Path) -> tuple[str, str]:
    """Garble one sample's JPEG in shard 0 and truncate shard 1; returns (bad key, shard 0 name)."""
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
    raw = (out / "shard-000001.tar").read_bytes()
    (out / "shard-000001.tar").write_bytes(raw[: len(raw) // 2 + 100])
    return bad_key, src.name


def test_corrupt_samples_and_truncated_shard(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = make_shards(tmp_path / "c", 20, size=16, shard_size=5).parent
    bad_key, shard0 = _corrupt(out)
    cfg = cfg_for(out, max_bad_fraction=0.5)
    loader = build_loader(cfg, batch_size=1, rank=0, world_size=1, seed=0)
    with caplog.at_level(logging.WARNING, logger="ddpm.data"):
        got = 0
        for _ in take(loader, 40):
            got += 1
    st = loader.stats()
    assert got == 40
    assert (
        st["bad_samples"] >= 2 * 2
    )  # 2 epochs: the garbled sample and the truncated shard each time
    assert any(bad_key in r.message and shard0 in r.message for r in caplog.records)
    assert any("shard-000001.tar" in r.message for r in caplog.records)

    strict = build_loader(
        cfg_for(out, max_bad_fraction=0.01, bad_min_samples=1),
        batch_size=1,
        rank=0,
        world_size=1,
        seed=0,
    )
    with pytest.raises(RuntimeError, match="max_bad_fraction"):
        take(strict, 40)


def test_corrupt_in_worker_process_stops_with_clear_error(tmp_path: Path) -> None:
    out = make_shards(tmp_path / "c", 10, size=16, shard_size=5).parent
    bad_key, shard0 = _corrupt(out)
    loader = build_loader(
        cfg_for(out, num_workers=2, max_bad_fraction=0.0, bad_min_samples=1),
        batch_size=1,
        rank=0,
        world_size=1,
        seed=0,
    )
    with pytest.raises(RuntimeError, match="shard-00000[01].tar"):
        take(loader, 20)
    loader.close()


def test_startup_errors(shards: Path, tmp_path: Path) -> None:
    def build(spec: str, **kw):
        return build_loader(cfg_for(spec, **kw), batch_size=2, rank=0, world_size=1, seed=0)

    # Every set-up mistake is a SetupError (the trainer's exit code 2) with one line naming the fix.
    with pytest.raises(SetupError, match="matches no file"):
        build(str(tmp_path / "nothing-{000..003}.tar"))
    with pytest.raises(SetupError, match="do not exist"):
        build(str(shards / "shard-{000000..000020}.tar"))
    with pytest.raises(SetupError, match="neither manifest.json nor .tar shards.*ddpm-prepare"):
        build(str(tmp_path))
    # 11 shards, 4 ranks x 4 workers in the streaming order: fewer workers, or the global order.
    with pytest.raises(SetupError, match=r"at least 16: set data.num_workers=2.*data.order=global"):
        build_loader(cfg_for(shards, num_workers=4), batch_size=2, rank=0, world_size=4, seed=0)
    # The global order has no such limit: 16 readers on 11 shards.
    lo = build_loader(cfg_for(shards, num_workers=4, order="global"), batch_size=2, rank=0, world_size=4, seed=0)
    assert len(take(lo, 3)) == 3
    lo.close()
    # Another size than the manifest's: resized in the loader, or refused with data.crop=none.
    assert next(iter(build(str(shards), image_size=32)))["image"].shape == (2, 3, 32, 32)
    with pytest.raises(SetupError, match="data.crop=none: set data.crop=center"):
        build(str(shards), image_size=32, crop="none")
    # A brace pattern without a usable manifest still works (counts and size read from the tars).
    man = json.loads((shards / "manifest.json").read_text())
    lo = build(str(shards / "shard-{000000..000010}.tar"))
    assert lo.num_samples == man["num_samples"] and lo.image_size == 16
    cfg = cfg_for(shards)
    cfg.backend = "nope"
    with pytest.raises(ValueError, match="backend"):
        cfg.validate()


def test_pipe_urls_are_read_in_the_streaming_order(shards: Path, caplog: pytest.LogCaptureFixture) -> None:
    spec = f"pipe:cat {shards}/shard-{{000000..000010}}.tar"
    with caplog.at_level(logging.INFO, logger="ddpm.data"):
        pipe = build_loader(cfg_for(spec, order="global"), batch_size=4, rank=0, world_size=1, seed=2)
    assert pipe.order == "streaming" and any("pipe: sources cannot seek" in r.message for r in caplog.records)
    a = take(pipe, 5)
    b = take(build_loader(cfg_for(shards), batch_size=4, rank=0, world_size=1, seed=2), 5)
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))


def test_gpu_decode_falls_back_to_cpu(shards: Path) -> None:
    with pytest.warns(UserWarning, match="gpu_decode"):
        lo = build_loader(
            cfg_for(shards, gpu_decode=True),
            batch_size=4,
            rank=0,
            world_size=1,
            seed=0,
            device=torch.device("cpu"),
        )
    assert next(iter(lo))["image"].shape == (4, 3, 16, 16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_decode_matches_cpu(shards: Path) -> None:
    dev = torch.device("cuda")
    gpu = build_loader(
        cfg_for(shards, gpu_decode=True, num_workers=2),
        batch_size=4,
        rank=0,
        world_size=1,
        seed=0,
        device=dev,
    )
    cpu = build_loader(
        cfg_for(shards, num_workers=2), batch_size=4, rank=0, world_size=1, seed=0, device=dev
    )
    for g, c in zip(take(gpu, 6), take(cpu, 6)):
        assert g["image"].device.type == "cuda" and c["image"].is_pinned()
        # nvJPEG and libjpeg-turbo may round differently (IDCT/upsampling); same image and flip.
        assert (g["image"].float().cpu() - c["image"].float()).abs().mean() < 3.0
    gpu.close()
    cpu.close()


def test_state_of_the_previous_version_still_resumes_exactly(shards: Path) -> None:
    import hashlib

    cfg = cfg_for(shards, hflip=True)
    a = build_loader(cfg, batch_size=3, rank=0, world_size=1, seed=4)
    take(a, 3)
    st = a.state_dict()
    names = "\n".join(u.rsplit("/", 1)[-1] for u in a.shards.urls)
    # Version 1: names-only fingerprint, counters [bad, seen].
    st.update(version=1, shards_fingerprint=hashlib.sha256(names.encode()).hexdigest()[:16])
    st["counters"] = [c[:2] for c in st["counters"]]
    del st["order"]
    # A run from before the global order: its checkpoint resumes in the streaming order, exactly.
    b = build_loader(cfg_for(shards, hflip=True, order="global"), batch_size=3, rank=0, world_size=1, seed=4)
    b.load_rank_states([st], 0, 1)
    assert b.order == "streaming"
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(take(a, 4), take(b, 4)))
