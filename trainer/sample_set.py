"""Sample sets on disk: images 0..N-1 of one sampling protocol, written in resumable chunks.

Both ``trainer.sample`` (PNGs, grid, .npz) and ``trainer.evaluate`` (FID/IS/KID) write their
samples through a ``SampleSet``, so both resume the same way and both refuse to mix settings:

    <dir>/protocol.json                       what makes image k what it is (checkpoint, sampler, seed, ...)
    <dir>/samples/chunk_<start>_<end>.npz     images[start:end] uint8 (n, H, W, C), their indices and labels

A chunk file with its final name is complete (written through data_pipeline.storage: hidden
temporary name, fsync, rename); a truncated one is ignored and made again. Image k depends only
on the protocol and k, so a set may grow (a later run with more samples keeps the finished
chunks) but never change protocol, and never shrinks: a smaller request reads the first N images
of what is there (``held``) and the commands never rewrite a file of the set with fewer images.

A storage fault (full disk, read-only or vanished filesystem) on any rank while filling stops
every rank at the same chunk round with one line (exit code 74 through trainer.errors.classify);
finished chunks stay, temporary files are removed, and the same command continues the set.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.config import SetupError
from data_pipeline.storage import (
    StorageError,
    atomic_open,
    atomic_write,
    check_writable,
    find_fault,
    is_fault,
    remove_partial,
    storage_error,
)
from trainer import distributed as du
from trainer.errors import StorageFault

log = logging.getLogger("ddpm")

_chunk_re = re.compile(r"^chunk_(\d{8})_(\d{8})\.npz$")

Chunk = tuple[int, int, Path]  # [start, end) and the file


class ProtocolMismatchError(SetupError):
    """The folder holds samples made with other settings."""


class SampleFolderError(SetupError):
    """The sample folder cannot be written at start-up (full, read-only, no permission): exit code 2."""


class SampleSet:
    """A folder of samples of one protocol (see the module docstring for the layout)."""

    def __init__(self, root: str | os.PathLike, protocol: dict[str, Any]) -> None:
        self.root = Path(root)
        self.chunk_dir = self.root / "samples"
        self.protocol = dict(protocol)

    def claim(self, hint: str = "use another --out") -> None:
        """Create the folder, or check that it holds this protocol; call on one rank only.

        Raises ProtocolMismatchError with one line naming what differs and ``hint``, and
        SampleFolderError when the folder cannot be written. Removes temporary files a killed
        writer left behind.
        """
        try:
            check_writable(self.chunk_dir, what="sample folder")
        except StorageError as e:
            raise SampleFolderError(str(e)) from None
        # Temporary files of a killed writer (and the chunk_*.npz.tmp<pid> names of earlier versions).
        for d, legacy in ((self.root, ""), (self.chunk_dir, "chunk_*.npz.tmp*")):
            for p in remove_partial(d, legacy=legacy):
                log.info("removed the partial file %s of an interrupted run", p)
        pfile = self.root / "protocol.json"
        if pfile.is_file():
            old = json.loads(pfile.read_text())
            diff = {k: (old.get(k), v) for k, v in self.protocol.items() if old.get(k) != v}
            if diff:
                what = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in diff.items())
                raise ProtocolMismatchError(f"{self.root} holds samples made with other settings ({what}); {hint}")
        else:
            try:
                atomic_write(pfile, json.dumps(self.protocol, indent=2) + "\n", what="sample protocol")
            except StorageError as e:
                raise SampleFolderError(str(e)) from None

    def claim_everywhere(self, hint: str = "use another --out") -> None:
        """``claim`` on rank 0; every rank raises the same one-line error (none waits at a barrier)."""
        du.run_on_main(lambda: self.claim(hint), (ProtocolMismatchError, SampleFolderError))

    def fill(self, n: int, chunk_size: int,
             make_chunk: Callable[[int, int], tuple[np.ndarray, np.ndarray | None]], progress: bool = False) -> float:
        """Make the missing images of 0..n-1 on all ranks; returns the seconds this rank spent.

        Rank 0 decides what is missing; chunks go round-robin over ranks. ``make_chunk(start, end)``
        returns uint8 (end - start, H, W, C) images and their labels (or None). After every round
        of chunks the ranks agree (one small gather) whether one of them failed, so a full disk on
        one rank stops all of them at once: that rank raises its StorageError, the others
        StorageFault with the same line. ``progress`` shows a bar of rank 0's own share.
        """
        rank, world = du.get_rank(), du.get_world_size()
        todo = None
        if du.is_main():
            todo = self.missing(n, chunk_size)
            kept = n - sum(e - s for s, e in todo)
            log.info("%s: %d of %d samples already there, %d chunks to make on %d ranks",
                     self.root, kept, n, len(todo), world)
        todo = du.broadcast_object(todo)
        t0 = time.time()
        mine = [(s, e) for j, (s, e) in enumerate(todo) if j % world == rank]
        bar = None
        if progress and du.is_main() and mine:
            from tqdm import tqdm

            bar = tqdm(total=sum(e - s for s, e in mine), desc="sampling", unit="img", dynamic_ncols=True)
        try:
            for i in range(-(-len(todo) // world)):  # rounds: every rank takes part in each agreement
                failure: Exception | None = None
                if i < len(mine):
                    s, e = mine[i]
                    try:
                        images, labels = make_chunk(s, e)
                        self.save_chunk(s, images, labels)
                    except Exception as exc:  # noqa: BLE001 - agreed on below, then re-raised
                        failure = exc
                    else:
                        if bar is not None:
                            bar.update(e - s)
                        elif du.is_main() and i % 10 == 0:
                            log.info("chunk %d/%d done (%.1f s)", i * world + 1, len(todo), time.time() - t0)
                self._agree(failure)
        finally:
            if bar is not None:
                bar.close()
        seconds = time.time() - t0
        du.barrier()
        return seconds

    def _agree(self, failure: Exception | None) -> None:
        """Raise on every rank when any rank failed this round (one all-gather of a short line)."""
        line = None
        if failure is not None:
            fault = failure if is_fault(failure) else find_fault(failure)
            if fault is not None:
                err = storage_error(fault, getattr(fault, "filename", None) or self.chunk_dir)
                failure, line = err, f"storage error: {err}"
            else:
                line = f"rank {du.get_rank()} failed: {type(failure).__name__}: {failure}"
        lines = du.gather_objects(line)
        if failure is not None:
            raise failure
        first = next((x for x in lines if x), None)
        if first is not None:
            if first.startswith("storage error: "):
                raise StorageFault(first)
            raise RuntimeError(first)

    @staticmethod
    def chunk_name(start: int, end: int) -> str:
        """The file name of images [start, end)."""
        return f"chunk_{start:08d}_{end:08d}.npz"

    def complete_chunks(self, limit: int | None = None) -> list[Chunk]:
        """(start, end, path) of complete chunk files (a truncated zip is not complete), by start.

        With ``limit``, only chunks that start below it.
        """
        found = []
        for p in sorted(self.chunk_dir.glob("chunk_*.npz")) if self.chunk_dir.is_dir() else []:
            m = _chunk_re.match(p.name)
            if not m:
                continue
            try:
                with zipfile.ZipFile(p) as z:  # reads the central directory, at the end of the file
                    if "images.npy" not in z.namelist():
                        continue
            except (zipfile.BadZipFile, OSError):
                continue
            found.append((int(m.group(1)), int(m.group(2)), p))
        return [c for c in found if limit is None or c[0] < limit]

    def held(self) -> int:
        """How many images the set holds: k such that complete chunks cover 0..k-1 without a gap."""
        k = 0
        for s, e, _ in sorted(self.complete_chunks()):
            if s > k:
                break
            k = max(k, e)
        return k

    def missing(self, n: int, chunk_size: int) -> list[tuple[int, int]]:
        """[start, end) pieces (at most chunk_size long) of 0..n-1 not yet covered by complete chunks."""
        covered = np.zeros(n, dtype=bool)
        for s, e, _ in self.complete_chunks():
            covered[s : min(e, n)] = True
        runs, k = [], 0
        while k < n:
            if covered[k]:
                k += 1
                continue
            e = k
            while e < n and not covered[e] and e - k < chunk_size:
                e += 1
            runs.append((k, e))
            k = e
        return runs

    def save_chunk(self, start: int, images: np.ndarray, labels: np.ndarray | None = None) -> Path:
        """Write images[start:start+n] (uint8 (n, H, W, C)) atomically; a storage fault is a StorageError."""
        path = self.chunk_dir / self.chunk_name(start, start + len(images))
        arrays = {"images": images, "indices": np.arange(start, start + len(images), dtype=np.int64)}
        if labels is not None:
            arrays["labels"] = labels
        return atomic_write(path, lambda f: np.savez(f, **arrays), needed=images.nbytes, what="sample chunk")

    def iter_images(self, n: int, chunks: list[Chunk] | None = None) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
        """(start, uint8 (m, H, W, C) images, labels or None) of images 0..n-1, chunk by chunk, in order."""
        for s, e, p in chunks if chunks is not None else self.complete_chunks(limit=n):
            with np.load(p) as z:
                stop = min(e, n) - s
                yield s, z["images"][:stop], (z["labels"][:stop] if "labels" in z else None)

    def write_adm_npz(self, path: str | os.PathLike, n: int, conditional: bool) -> Path:
        """Stream images 0..n-1 into an ADM-style .npz (arr_0 uint8 (N, H, W, C), arr_1 labels) without
        holding N images in memory."""
        path = Path(path)
        pieces = self.complete_chunks(limit=n)
        covered = sum(min(e, n) - s for s, e, _ in pieces)
        if covered != n:
            raise RuntimeError(f"{self.chunk_dir} covers {covered} of {n} samples")
        with np.load(pieces[0][2]) as z:
            first = z["images"]
        shape, dtype = (n, *first.shape[1:]), first.dtype
        needed = int(np.prod(shape)) * dtype.itemsize
        with atomic_open(path, needed=needed, what="sample archive") as out, \
                zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            names = [("arr_0.npy", "images", shape, dtype)]
            if conditional:
                names.append(("arr_1.npy", "labels", (n,), np.dtype(np.int64)))
            for member, key, shp, dt in names:
                with zf.open(member, "w", force_zip64=True) as f:
                    np.lib.format.write_array_header_1_0(
                        f, {"descr": np.lib.format.dtype_to_descr(dt), "fortran_order": False, "shape": shp}
                    )
                    for s, e, p in pieces:
                        with np.load(p) as z:
                            f.write(np.ascontiguousarray(z[key][: min(e, n) - s].astype(dt)).tobytes())
        return path


def adm_npz_images(path: str | os.PathLike) -> int | None:
    """The number of images in an ADM-style .npz (its ``arr_0`` header only), or None if unreadable."""
    try:
        with zipfile.ZipFile(path) as z, z.open("arr_0.npy") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, _ = read(f)  # the header only, not the images
            return int(shape[0])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
