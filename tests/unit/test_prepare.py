"""prepare: folder / LSUN sources, odd and bad files, manifest, resume, errors."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipeline.prepare import main, prepare
from tests.data_helpers import (
    make_image_folder,
    make_lsun_lmdb,
    make_odd_files,
    write_parquet,
    write_wds_shards,
)

REPO = Path(__file__).resolve().parents[2]


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
    # Different options: refused (naming the option), rebuilt only when asked to.
    with pytest.raises(ValueError, match="--size 16 \\(now 8\\).*--overwrite"):
        prepare(src, out, image_size=8, shard_size=3, progress=False)
    prepare(src, out, image_size=8, shard_size=3, progress=False, overwrite=True)
    assert decode(next(iter(read_shards(out).values()))["jpg"]).shape == (8, 8, 3)
    # The source lost images: the shards beyond the new count go, nothing stale is left behind.
    for p in sorted(src.glob("*.png"))[:4]:
        p.unlink()
    man = json.loads(prepare(src, out, image_size=8, shard_size=3, progress=False).read_text())
    assert man["num_samples"] == 5 and sorted(p.name for p in out.glob("shard-*.tar")) == [
        "shard-000000.tar",
        "shard-000001.tar",
    ]


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
    with pytest.raises(ValueError, match="holds no images"):
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


# ----------------------------------------------------------------------------- other sources


def labels_by_image(out: Path) -> Counter:
    """(decoded pixels, label) pairs of prepared shards, to compare label by label."""
    return Counter((decode(p["jpg"]).tobytes(), int(p["cls"])) for p in read_shards(out).values())


def reference_pairs(samples: list[dict], size: int) -> Counter:
    """The same pairs made from the source samples with the same functions."""
    from data_pipeline.images import decode_image, encode_image, resize_crop

    return Counter(
        (
            decode(encode_image(resize_crop(decode_image(s["jpg"]), size), "jpeg", 95)).tobytes(),
            s["label"],
        )
        for s in samples
    )


def test_from_webdataset_shards_keeps_every_label(tmp_path: Path) -> None:
    samples = write_wds_shards(tmp_path / "src", 3, 7, min_size=10, max_size=40)
    man = json.loads(
        prepare(tmp_path / "src", tmp_path / "out", image_size=16, progress=False).read_text()
    )
    assert man["source_type"] == "shards" and man["num_samples"] == 21
    assert man["classes"] == ["0", "1", "2"]
    assert man["upscaled"] == sum(min(s["w"], s["h"]) < 16 for s in samples) > 0
    assert labels_by_image(tmp_path / "out") == reference_pairs(samples, 16)
    assert not (tmp_path / "out" / ".prepare" / "stage").exists()  # staging removed when done
    # A brace pattern and a pipe: command give the same shards (webdataset URL forms).
    for spec in (
        str(tmp_path / "src" / "part-{0000..0002}.tar"),
        f"pipe:cat {tmp_path}/src/part-{{0000..0002}}.tar",
    ):
        out = tmp_path / f"out{len(spec)}"
        prepare(spec, out, image_size=16, progress=False, workers=0)
        assert labels_by_image(out) == labels_by_image(tmp_path / "out")


def test_json_class_names_become_classes(tmp_path: Path) -> None:
    names = ["cat", "dog", "owl"]
    samples = write_wds_shards(tmp_path / "src", 2, 5, label_names=names)
    man = json.loads(
        prepare(
            tmp_path / "src",
            tmp_path / "out",
            image_size=12,
            progress=False,
            labels_from="json:label",
        ).read_text()
    )
    assert man["classes"] == names
    assert labels_by_image(tmp_path / "out") == reference_pairs(samples, 12)


def test_from_parquet_keeps_every_label(tmp_path: Path) -> None:
    samples = write_wds_shards(tmp_path / "imgs", 1, 10, min_size=10, max_size=30)
    write_parquet(tmp_path / "pq" / "train-00000.parquet", samples[:6], class_names=["a", "b", "c"])
    write_parquet(tmp_path / "pq" / "train-00001.parquet", samples[6:], class_names=["a", "b", "c"])
    man = json.loads(
        prepare(tmp_path / "pq", tmp_path / "out", image_size=16, progress=False).read_text()
    )
    assert man["source_type"] == "parquet" and man["num_samples"] == 10
    assert man["classes"] == ["a", "b", "c"]  # Hugging Face ClassLabel names
    assert labels_by_image(tmp_path / "out") == reference_pairs(samples, 16)
    # A plain binary column without labels works too.
    write_parquet(tmp_path / "plain.parquet", samples, hf_image=False, with_label=False)
    man = json.loads(
        prepare(
            tmp_path / "plain.parquet", tmp_path / "o2", image_size=8, progress=False
        ).read_text()
    )
    assert man["num_samples"] == 10 and man["classes"] == []


def test_shard_without_images_is_one_skip_line(tmp_path: Path) -> None:
    write_wds_shards(tmp_path / "src", 2, 4)
    with tarfile.open(tmp_path / "src" / "part-0009.tar", "w") as tar:
        for i in range(5):
            info = tarfile.TarInfo(f"{i:03d}.txt")
            info.size = 3
            tar.addfile(info, io.BytesIO(b"hi!"))
    man = json.loads(
        prepare(tmp_path / "src", tmp_path / "out", image_size=8, progress=False).read_text()
    )
    assert man["num_samples"] == 8
    assert [s["reason"] for s in man["skipped"]] == [
        "no image of a known type (jpg, jpeg, png, webp) in its 5 samples (parts: txt)"
    ]


# ----------------------------------------------------------------------------- the command


def cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run the prepare command as a user would (python -m, the same entry point as ddpm-prepare)."""
    return subprocess.run(
        [sys.executable, "-m", "data_pipeline.prepare", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def error_line(proc: subprocess.CompletedProcess) -> str:
    """stderr must be exactly one line, without a traceback."""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_cli_help_shows_defaults() -> None:
    proc = cli("--help")
    assert proc.returncode == 0
    assert "(default: 95)" in proc.stdout and "(default: 0)" in proc.stdout


def test_cli_summary_resume_and_changed_options(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    make_image_folder(src, 6, size=20)
    (src / "text.jpg").write_text("not an image")
    common = ["--shard-size", "2", "--workers", "0", "--no-progress"]
    proc = cli(str(src), str(out), "--size", "8", *common)
    assert proc.returncode == 0, proc.stderr
    # --no-progress hides only the bar: the summary and a readable skip reason stay.
    # 7 files in shards of 2: the 4th would hold only text.jpg, so it is not written at all.
    assert "prepared 6 images into 3 shards" in proc.stderr and "it/s" not in proc.stderr
    assert sorted(p.name for p in out.glob("shard-*.tar"))[-1] == "shard-000002.tar"
    skip = next(line for line in proc.stderr.splitlines() if "text.jpg" in line)
    assert "not an image of a known type" in skip and "0x" not in skip and "object at" not in skip
    # A re-run that resumes says what it kept.
    (out / "shard-000001.tar").unlink()
    proc = cli(str(src), str(out), "--size", "8", *common)
    assert proc.returncode == 0 and "resuming: kept 3 of 4 shards" in proc.stderr
    # Other options into the same folder: refused in one line naming the option and the fix.
    proc = cli(str(src), str(out), "--size", "16", *common)
    line = error_line(proc)
    assert proc.returncode == 2 and "--size 8 (now 16)" in line and "--overwrite" in line
    proc = cli(str(src), str(out), "--size", "16", "--overwrite", *common)
    assert (
        proc.returncode == 0 and decode(next(iter(read_shards(out).values()))["jpg"]).shape[0] == 16
    )


def test_cli_bad_sources_are_one_line(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"caption": ["a", "b"], "score": [1, 2]}), tmp_path / "text.parquet")
    proc = cli(str(tmp_path / "text.parquet"), str(tmp_path / "out"), "--size", "8")
    line = error_line(proc)
    assert proc.returncode == 2 and "has no image column" in line and "--image-column" in line
    proc = cli(str(tmp_path / "missing"), str(tmp_path / "out"), "--size", "8")
    assert proc.returncode == 2 and "does not exist" in error_line(proc)


@pytest.mark.slow
def test_ctrl_c_prints_one_line_and_resumes(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    # enough shards that the Ctrl-C lands while the workers still run, even on a loaded machine
    make_image_folder(src, 720, size=64)
    args = [
        sys.executable,
        "-m",
        "data_pipeline.prepare",
        str(src),
        str(out),
        "--size",
        "32",
        "--shard-size",
        "1",
        "--workers",
        "2",
        "--no-progress",
    ]
    # Its own process group, like a terminal's foreground job: Ctrl-C reaches every process.
    proc = subprocess.Popen(
        args,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        # A background job of a non-interactive shell ignores SIGINT, and Python then installs no
        # KeyboardInterrupt handler: give the child the terminal's default, whoever runs pytest.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if len(list((out / ".prepare").glob("shard-*.json"))) >= 3:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "finished shards are kept" in lines[0] and "run the same command again" in lines[0]
    rerun = cli(*args[3:], timeout=300)
    assert rerun.returncode == 0 and "resuming: kept" in rerun.stderr
    assert json.loads((out / "manifest.json").read_text())["num_samples"] == 720


# ----------------------------------------------------------------------------- empty shards, own output


def test_broken_files_never_make_an_empty_shard(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    make_image_folder(src, 30, size=20)
    for i in range(3):
        (src / f"broken{i}.jpg").write_bytes(b"not a jpeg")
    man = json.loads(
        prepare(src, out, image_size=8, progress=False).read_text()
    )  # auto: 1 per shard
    assert man["num_samples"] == 30 and len(man["skipped"]) == 3
    assert len(man["shards"]) == 30 and all(s["samples"] == 1 for s in man["shards"])
    on_disk = sorted(p.name for p in out.glob("shard-*.tar"))
    assert on_disk == sorted(s["name"] for s in man["shards"])  # no file beyond the manifest's
    # Resume stays exact: a lost shard is rewritten byte for byte, the empty ones stay unwritten.
    (out / man["shards"][5]["name"]).unlink()
    again = json.loads(prepare(src, out, image_size=8, progress=False).read_text())
    assert again["shards"] == man["shards"] and again["skipped"] == man["skipped"]
    assert sorted(p.name for p in out.glob("shard-*.tar")) == on_disk
    from data_pipeline.shards import resolve_shards

    assert sum(resolve_shards(str(out)).counts) == 30


def test_manifest_says_who_made_it_and_readers_still_read_it(tmp_path: Path) -> None:
    from data_pipeline.shards import resolve_shards

    make_image_folder(tmp_path / "src", 5, size=20, classes=2)
    man = json.loads(
        prepare(
            tmp_path / "src", tmp_path / "out", image_size=8, labels=True, progress=False
        ).read_text()
    )
    assert man["made_by"] == "ddpm-prepare" and man["version"] == 1
    shards = resolve_shards(str(tmp_path / "out"))
    assert shards.counts == [s["samples"] for s in man["shards"]] and shards.image_size == 8
    assert shards.classes == ["class0", "class1"]


def test_someone_elses_folder_is_refused_before_any_work(tmp_path: Path, capsys) -> None:
    make_image_folder(tmp_path / "src", 4, size=20)
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "shard-000000.tar").write_bytes(b"their shard")
    rc = main([str(tmp_path / "src"), str(out), "--size", "8", "--workers", "0", "--no-progress"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and str(out) in lines[0]
    assert "new or empty output folder" in lines[0] and "--overwrite" in lines[0]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "shard-000000.tar"]
    assert (out / "shard-000000.tar").read_bytes() == b"their shard"
    # A file where the folder should be: one line too.
    (tmp_path / "afile").write_text("x")
    assert main([str(tmp_path / "src"), str(tmp_path / "afile"), "--size", "8"]) == 2
    # With --overwrite the shards go in; files of other names stay.
    prepare(tmp_path / "src", out, image_size=8, shard_size=2, progress=False, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and len(read_shards(out)) == 4
    # Our own earlier output (even unfinished: only .prepare/) is ours to resume.
    out2 = tmp_path / "ours"
    prepare(tmp_path / "src", out2, image_size=8, shard_size=2, progress=False)
    (out2 / "manifest.json").unlink()
    assert (
        json.loads(
            prepare(tmp_path / "src", out2, image_size=8, shard_size=2, progress=False).read_text()
        )["num_samples"]
        == 4
    )


# ----------------------------------------------------------------------------- synthetic data


def test_synthetic_shards_are_made_kept_and_rebuilt_only_when_their_own(tmp_path: Path) -> None:
    from data_pipeline.synthetic import ensure_synthetic_shards

    syn = tmp_path / "syn"
    assert ensure_synthetic_shards(syn, 20, 8, seed=1, progress=False) == "made"
    man = json.loads((syn / "manifest.json").read_text())
    assert man["synthetic"] == {"images": 20, "size": 8, "seed": 1} and man["num_samples"] == 20
    mtime = (syn / "manifest.json").stat().st_mtime_ns
    assert ensure_synthetic_shards(syn, 20, 8, seed=1, progress=False) == "kept"
    assert (syn / "manifest.json").stat().st_mtime_ns == mtime  # nothing redone
    # Its own shards with other options are rebuilt.
    assert ensure_synthetic_shards(syn, 24, 8, seed=1, progress=False) == "made"
    assert json.loads((syn / "manifest.json").read_text())["num_samples"] == 24
    assert not list(tmp_path.glob(".synthetic-src-*"))


def test_synthetic_never_touches_someone_elses_data(tmp_path: Path) -> None:
    from data_pipeline.config import SetupError
    from data_pipeline.synthetic import ensure_synthetic_shards

    def snapshot(folder: Path) -> dict[str, bytes]:
        return {
            str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()
        }

    # A user's prepared data set (a manifest without the synthetic mark).
    make_image_folder(tmp_path / "src", 6, size=20)
    real = tmp_path / "real"
    prepare(tmp_path / "src", real, image_size=8, shard_size=2, progress=False)
    before = snapshot(real)
    assert ensure_synthetic_shards(real, 1024, 32, progress=False) == "foreign"
    assert ensure_synthetic_shards(real / "manifest.json", 1024, 32, progress=False) == "foreign"
    assert snapshot(real) == before
    # Shards of another tool (.tar files, no manifest).
    wds = tmp_path / "wds"
    write_wds_shards(wds, 2, 3)
    before = snapshot(wds)
    assert ensure_synthetic_shards(wds, 16, 8, progress=False) == "foreign"
    assert snapshot(wds) == before
    # A folder of something else entirely: one line, nothing written.
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "thesis.pdf").write_bytes(b"%PDF")
    with pytest.raises(SetupError, match="holds files but no shards") as info:
        ensure_synthetic_shards(docs, 16, 8, progress=False)
    assert "\n" not in str(info.value) and snapshot(docs) == {"thesis.pdf": b"%PDF"}


def test_synthetic_shards_of_earlier_versions_and_unfinished_runs_are_its_own(
    tmp_path: Path,
) -> None:
    from data_pipeline.synthetic import ensure_synthetic_shards

    syn = tmp_path / "syn"
    ensure_synthetic_shards(syn, 16, 8, progress=False)
    # As versions before the mark left it: prepared from a temporary .synthetic-src-* folder.
    man = json.loads((syn / "manifest.json").read_text())
    del man["synthetic"]
    man["source"] = str(tmp_path / ".synthetic-src-x1y2")
    (syn / "manifest.json").write_text(json.dumps(man))
    opts = json.loads((syn / ".prepare" / "options.json").read_text())
    del opts["synthetic"]
    (syn / ".prepare" / "options.json").write_text(json.dumps(opts))
    assert ensure_synthetic_shards(syn, 16, 8, progress=False) == "kept"
    assert ensure_synthetic_shards(syn, 16, 12, progress=False) == "made"  # rebuilt: its own
    # A run stopped before its manifest: still its own, made again.
    (syn / "manifest.json").unlink()
    assert ensure_synthetic_shards(syn, 16, 12, progress=False) == "made"
    assert json.loads((syn / "manifest.json").read_text())["synthetic"]["size"] == 12
