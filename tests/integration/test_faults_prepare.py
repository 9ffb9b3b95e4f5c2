"""ddpm-prepare on real faulty filesystems: a tmpfs that fills up, a read-only bind mount.

A full disk mid-work stops every process within seconds with one line and exit code 74, keeps the
finished shards and no temporary file; after space is freed the same command resumes and ends with
the shards an uninterrupted run writes. A read-only OUT_DIR is refused before any work (exit 2).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_pipeline.prepare import prepare
from data_pipeline.storage import StorageError
from tests.data_helpers import make_image_folder, write_wds_shards
from tests.fault_helpers import fill, free_space, read_only, tmpfs

REPO = Path(__file__).resolve().parents[2]
COMMON = ["--size", "48", "--format", "png", "--shard-size", "4", "--no-progress"]


def cli(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    """ddpm-prepare as a user runs it, in its own session (so its workers can be found afterwards)."""
    return subprocess.run(
        [sys.executable, "-m", "data_pipeline.prepare", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
    )


def one_line(proc: subprocess.CompletedProcess) -> str:
    """stderr is exactly one line, without a traceback."""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def session_processes(sid: int) -> list[int]:
    """Live processes of session ``sid`` (the command and whatever it started)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # fields: state, ppid, pgrp, session
            found.append(int(d.name))
    return found


def assert_no_process_left(sid: int) -> None:
    """Every worker is gone within a few seconds of the command's exit."""
    deadline = time.time() + 10
    while session_processes(sid) and time.time() < deadline:
        time.sleep(0.1)
    assert not session_processes(sid)


def temporary_files(folder: Path) -> list[Path]:
    """Temporary files of interrupted writes anywhere under folder."""
    return [p for p in folder.rglob("*") if ".tmp" in p.name]


def shard_sums(out: Path) -> dict[str, str]:
    """name -> sha256 of the manifest's shards."""
    return {
        s["name"]: s["sha256"] for s in json.loads((out / "manifest.json").read_text())["shards"]
    }


@pytest.mark.slow
@pytest.mark.parametrize("kind,workers", [("folder", 2), ("shards", 0)])
def test_full_disk_stops_keeps_finished_shards_and_resumes(
    tmp_path: Path, kind: str, workers: int
) -> None:
    if kind == "folder":
        src = tmp_path / "src"
        make_image_folder(src, 48, size=64)
    else:  # streamed: the staging area is on the full disk too
        write_wds_shards(tmp_path / "src", 6, 8, min_size=40, max_size=64)
        src = tmp_path / "src"
    args = [str(src), "--workers", str(workers), *COMMON]
    ref = cli(args[0], str(tmp_path / "ref"), *args[1:])
    assert ref.returncode == 0, ref.stderr
    total = len(shard_sums(tmp_path / "ref"))

    with tmpfs(tmp_path / "mnt", "4m") as mnt:
        out = mnt / "out"
        filler = fill(mnt, leave=72 * 1024)  # room for a few shards, not for all of them
        start = time.time()
        proc = subprocess.Popen(
            [sys.executable, "-m", "data_pipeline.prepare", args[0], str(out), *args[1:]],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        _, err = proc.communicate(timeout=180)
        elapsed = time.time() - start
        assert proc.returncode == 74, err
        line = one_line(subprocess.CompletedProcess([], 74, "", err))
        assert "no space left" in line and str(out) in line and "free" in line
        assert "run the same command again" in line
        assert elapsed < 120
        assert_no_process_left(proc.pid)
        assert not temporary_files(out)  # partial shards and staged blocks are gone
        finished = sorted(p.name for p in out.glob("shard-*.tar"))
        assert len(finished) < total
        mtimes = {n: (out / n).stat().st_mtime_ns for n in finished}

        free_space(filler)
        again = cli(args[0], str(out), *args[1:])
        assert again.returncode == 0, again.stderr
        if finished:
            assert "resuming: kept" in again.stderr
        assert all(
            (out / n).stat().st_mtime_ns == t for n, t in mtimes.items()
        )  # kept as they were
        assert shard_sums(out) == shard_sums(tmp_path / "ref")  # equal to an uninterrupted run
        assert not temporary_files(out)


def test_disk_full_before_any_shard_is_one_storage_error(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "src", 8, size=32)
    with tmpfs(tmp_path / "mnt", "1m") as mnt:
        filler = fill(mnt, leave=0)
        with pytest.raises(StorageError) as info:
            prepare(tmp_path / "src", mnt / "out", image_size=16, shard_size=2, progress=False)
        assert info.value.kind == "full" and "\n" not in str(info.value)
        assert not temporary_files(mnt / "out") if (mnt / "out").exists() else True
        free_space(filler)
        man = prepare(tmp_path / "src", mnt / "out", image_size=16, shard_size=2, progress=False)
        assert json.loads(man.read_text())["num_samples"] == 8


def test_read_only_out_dir_is_refused_before_work(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "src", 4, size=20)
    out = tmp_path / "out"
    out.mkdir()
    with read_only(out):
        proc = cli(str(tmp_path / "src"), str(out), "--size", "8", "--workers", "0")
        line = one_line(proc)
        assert proc.returncode == 2 and "read-only" in line and str(out) in line
    # An earlier run's output on a read-only filesystem: the same refusal, nothing touched.
    assert cli(str(tmp_path / "src"), str(out), "--size", "8", "--workers", "0").returncode == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with read_only(out):
        proc = cli(str(tmp_path / "src"), str(out), "--size", "8", "--workers", "0")
        assert proc.returncode == 2 and "read-only" in one_line(proc)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
