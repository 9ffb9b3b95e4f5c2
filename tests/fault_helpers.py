"""Real filesystems for the fault suite: a small tmpfs that fills up, a read-only bind mount.

CI runs as root (tests/run.sh); without root these helpers fail the test instead of skipping it,
because a fault test skipped in CI is a fault test that does not exist.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path


def _run(*cmd: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}; the fault suite needs "
            "root (CI runs tests/run.sh as root) to mount a tmpfs or a read-only bind mount"
        )


def _umount(path: Path) -> None:
    for _ in range(20):
        if subprocess.run(["umount", str(path)], capture_output=True).returncode == 0:
            return
        subprocess.run(["sync"])
        import time

        time.sleep(0.25)
    subprocess.run(["umount", "-l", str(path)], capture_output=True)  # lazy: never leave it mounted


@contextlib.contextmanager
def tmpfs(path: str | os.PathLike, size: str = "12m") -> Iterator[Path]:
    """Mount a tmpfs of ``size`` (mount(8) syntax: 12m, 512k) at ``path`` for the block."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    _run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(p))
    try:
        yield p
    finally:
        _umount(p)


@contextlib.contextmanager
def read_only(path: str | os.PathLike) -> Iterator[Path]:
    """Bind-mount ``path`` onto itself read-only for the block (writes fail with EROFS)."""
    p = Path(path)
    _run("mount", "--bind", str(p), str(p))
    try:
        _run("mount", "-o", "remount,bind,ro", str(p))
        yield p
    finally:
        _umount(p)


def fill(path: str | os.PathLike, leave: int = 0) -> Path:
    """Fill the filesystem holding ``path`` until at most ``leave`` bytes are free; returns the filler."""
    filler = Path(path) / ".filler"
    chunk = b"\0" * (1 << 16)
    with open(filler, "ab") as f:
        while shutil.disk_usage(path).free > leave:
            room = shutil.disk_usage(path).free - leave
            try:
                f.write(chunk[: max(1, min(len(chunk), room))])
                f.flush()
            except OSError:
                break
    return filler


def free_space(filler: Path) -> None:
    """Remove a filler made by ``fill`` (the 'free space and run the same command again' step)."""
    filler.unlink(missing_ok=True)
