"""prepare: folder / LSUN sources, odd and bad files, manifest, resume, errors."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipeline.prepare import main, prepare
from tests.data_helpers import make_image_folder, make_lsun_lmdb, make_odd_files


def read_shards(out: Path) -> dict[str, dict[str, bytes]]:
    """All samples of all shards in out: {key: {ext: bytes}}."""
    samples: dict[str, dict[str, bytes]] = {}
    for tar_path in sorted(out.glob("shard-*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def decode(data: bytes) -> np.ndarray:
    """(H, W, C) uint8 of encoded bytes."""
    return np.asarray(Image.open(io.BytesIO(data)))


def test_folder_with_odd_and_bad_files(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_image_folder(src / "sub" / "deeper", 5, size=20)
    planted = make_odd_files(src, size=24)
    manifest_path = prepare(src, tmp_path / "out", image_size=16, shard_size=4, progress=False)
    man = json.loads(manifest_path.read_text())

    good = 5 + len(planted["good"])
    assert man["num_samples"] == good
    skipped = {Path(s["path"]).name: s["reason"] for s in man["skipped"]}
    assert set(skipped) == set(planted["bad"])
    assert all(skipped.values())  # every skip carries a reason
    samples = read_shards(tmp_path / "out")
    assert len(samples) == good
    for parts in samples.values():
        img = decode(parts["jpg"])
        assert img.shape == (16, 16, 3) and img.dtype == np.uint8

    # Odd modes end up as sensible RGB: find each by its source position in the manifest order.
    imgs = [decode(p["jpg"]) for p in samples.values()]
    # 16-bit mid-gray must become mid-gray, not white (clipping) or black.
    assert any(np.all(np.abs(im.astype(int) - 128) <= 3) for im in imgs)

    # EXIF orientation 6 honored: upright image is red on top, blue at the bottom.
    def is_exif(im: np.ndarray) -> bool:
        top, bottom = im[1].mean(0), im[-2].mean(0)
        return top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60

    assert sum(is_exif(im) for im in imgs) == 1


def test_manifest_is_correct_and_shards_deterministic(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_image_folder(src, 11, size=20, classes=3)
    m1 = prepare(src, tmp_path / "a", image_size=16, shard_size=4, labels=True, progress=False)
    man = json.loads(m1.read_text())
    assert [s["name"] for s in man["shards"]] == [f"shard-{i:06d}.tar" for i in range(3)]
    assert [s["samples"] for s in man["shards"]] == [4, 4, 3]
    assert man["image_size"] == 16 and man["format"] == "jpeg" and man["options"]["quality"] == 95
    assert man["classes"] == ["class0", "class1", "class2"]
    for s in man["shards"]:
        data = (tmp_path / "a" / s["name"]).read_bytes()
        assert s["bytes"] == len(data)
        assert s["sha256"] == hashlib.sha256(data).hexdigest()
    samples = read_shards(tmp_path / "a")
    assert sorted(samples) == [f"{i:09d}" for i in range(11)]
    labels = sorted(int(p["cls"]) for p in samples.values())
    assert labels == sorted([i % 3 for i in range(11)])
    # Same input, same options: byte-identical shards (deterministic names, keys, metadata).
    m2 = prepare(
        src, tmp_path / "b", image_size=16, shard_size=4, labels=True, progress=False, workers=2
    )
    assert [s["sha256"] for s in json.loads(m2.read_text())["shards"]] == [
        s["sha256"] for s in man["shards"]
    ]
    assert not list((tmp_path / "a").glob(".*.tmp*"))


def test_png_format(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "src", 3, size=20)
    prepare(tmp_path / "src", tmp_path / "out", image_size=8, fmt="png", progress=False)
    samples = read_shards(tmp_path / "out")
    assert all(decode(p["png"]).shape == (8, 8, 3) for p in samples.values())


def test_rerun_keeps_finished_shards(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_image_folder(src, 9, size=20)
    out = tmp_path / "out"
    prepare(src, out, image_size=16, shard_size=3, progress=False)
    # Simulate a crash: one shard lost, and a leftover temp file.
    (out / "shard-000001.tar").unlink()
    (out / ".shard-000002.tar.tmp999").write_bytes(b"junk")
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}
    man = json.loads(prepare(src, out, image_size=16, shard_size=3, progress=False).read_text())
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}
    assert after["shard-000000.tar"] == before["shard-000000.tar"]  # kept, not rewritten
    assert after["shard-000002.tar"] == before["shard-000002.tar"]
    assert "shard-000001.tar" in after and man["num_samples"] == 9
    assert not list(out.glob(".shard-*"))
    # Different options: shards are rewritten, not silently reused.
    man = json.loads(prepare(src, out, image_size=8, shard_size=3, progress=False).read_text())
    assert decode(next(iter(read_shards(out).values()))["jpg"]).shape == (8, 8, 3)


def test_lsun_lmdb(tmp_path: Path) -> None:
    make_lsun_lmdb(tmp_path / "lsun" / "church_outdoor_train_lmdb", 7, size=24)
    make_lsun_lmdb(tmp_path / "lsun" / "bedroom_train_lmdb", 5, size=24, seed=1)
    man = json.loads(
        prepare(
            tmp_path / "lsun", tmp_path / "out", image_size=16, labels=True, progress=False
        ).read_text()
    )
    assert man["source_type"] == "lsun" and man["num_samples"] == 12
    assert man["classes"] == ["bedroom_train", "church_outdoor_train"]
    labels = [int(p["cls"]) for p in read_shards(tmp_path / "out").values()]
    assert sorted(labels) == [0] * 5 + [1] * 7
    # A single *_lmdb directory works too.
    man = json.loads(
        prepare(
            tmp_path / "lsun" / "bedroom_train_lmdb",
            tmp_path / "one",
            image_size=16,
            progress=False,
        ).read_text()
    )
    assert man["num_samples"] == 5


def test_clear_errors_before_work(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare(tmp_path / "missing", tmp_path / "out", image_size=16, progress=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no images"):
        prepare(tmp_path / "empty", tmp_path / "out", image_size=16, progress=False)
    assert not (tmp_path / "out").exists()  # nothing was started
    assert main([str(tmp_path / "missing"), str(tmp_path / "o"), "--size", "8"]) == 2


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make_image_folder(tmp_path / "src", 4, size=20)
    rc = main(
        [
            str(tmp_path / "src"),
            str(tmp_path / "out"),
            "--size",
            "8",
            "--quality",
            "80",
            "--shard-size",
            "2",
            "--workers",
            "0",
            "--no-progress",
        ]
    )
    assert rc == 0
    man = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert man["options"]["quality"] == 80 and len(man["shards"]) == 2
    assert os.fspath(tmp_path / "out" / "manifest.json") in capsys.readouterr().out
