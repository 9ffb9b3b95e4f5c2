"""A watched run directory that goes away: writes under it fail with one line instead of landing
on whatever is now at that path (the fault suite does it with ``umount -l``; a rename shows the
same thing without root)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from data_pipeline.storage import StorageError, atomic_open, atomic_write, vanished, watch_dir


def test_writes_under_a_replaced_directory_fail_and_create_nothing(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    watch = watch_dir(run)
    try:
        atomic_write(run / "ranks" / "rank0.json", "{}")  # still the same directory: fine
        assert vanished(run / "ranks" / "rank0.json") is None
        os.rename(run, tmp_path / "elsewhere")  # what `umount -l` looks like from the path
        run.mkdir()
        with pytest.raises(StorageError) as err:
            atomic_write(run / "checkpoints" / "latest", "ckpt-1.pt\n")
        assert err.value.kind == "vanished" and str(run) in str(err.value) and "\n" not in str(err.value)
        with pytest.raises(StorageError):
            with atomic_open(run / "ema" / "snapshot.pt") as f:
                f.write(b"x")
        assert list(run.iterdir()) == []  # no folder re-created where the run was
        atomic_write(tmp_path / "other.txt", "unwatched paths are not affected")
    finally:
        watch.close()
    atomic_write(run / "after-close.txt", "no longer watched")


def test_a_write_that_fails_because_its_directory_went_away_names_that(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    watch = watch_dir(run)
    try:
        def write(f) -> None:  # the directory goes away while the file is being written
            f.write(b"partial")
            os.rename(run, tmp_path / "gone")

        with pytest.raises(StorageError) as err:
            atomic_write(run / "ckpt.pt", write)
        assert err.value.kind == "vanished" and str(run) in str(err.value)
        assert not (run / "ckpt.pt").exists()
    finally:
        watch.close()
