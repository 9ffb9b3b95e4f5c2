"""Where every sample of every shard lies: the byte range [start, end) of its tar members.

The global sample order (data_pipeline.order) reads any sample of any shard, so the loader needs
each sample's byte range, not only the counts. It is taken once per run from the tar headers
(local files: headers only, with seeks over the member bytes; http(s): one streamed read of each
shard), cached in the run directory (``<run dir>/data_index.npz``), and checked against the shard
list on every resume: another shard list (names, sizes, or a manifest's checksums) rebuilds it.

A sample is webdataset's: consecutive members with one key (``a/0001.jpg`` + ``a/0001.cls``); its
range starts at the header of its first member (GNU long-name and pax records included) and ends
after the padding of its last one, so reading it is one contiguous read.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipeline.shards import (
    ShardSet,
    _header,
    _long_name,
    _read_exact,
    is_remote,
    open_shard,
    sample_key,
)
from data_pipeline.storage import atomic_write

log = logging.getLogger("ddpm.data")

INDEX_VERSION = 1

ReadAt = Callable[[int, int], bytes]


def scan_samples(read: Callable[[int], bytes], skip: Callable[[int], None], size: int | None = None,
                 ) -> tuple[list[int], list[int]]:
    """(starts, ends) of every sample of a tar read sequentially: ``read(n)`` returns the next n
    bytes, ``skip(n)`` passes over n bytes. A truncated last sample is dropped (it cannot be read)."""
    starts: list[int] = []
    ends: list[int] = []
    pos, pending, long_name, key = 0, None, None, None
    while True:
        header = read(512)
        if len(header) < 512 or header.count(0) == 512:
            break
        name, n, kind = _header(header)
        rec = pending if pending is not None else pos
        nxt = pos + 512 + n + (-n % 512)
        if size is not None and nxt > size:
            log.warning("shard ends inside member %s: its sample is left out", name)
            break
        if kind in (b"L", b"x"):
            long_name = _long_name(kind, read(n))
            skip(-n % 512)
            pending, pos = rec, nxt
            continue
        skip(n + (-n % 512))
        pos, pending = nxt, None
        if kind not in (b"0", b"\0", b"7"):
            long_name = None
            continue
        if long_name is not None:
            name, long_name = long_name, None
        k, _ = sample_key(name)
        if k is None:
            continue  # __key__-style metadata members
        if k != key:
            starts.append(rec)
            ends.append(nxt)
            key = k
        else:
            ends[-1] = nxt
    return starts, ends


def scan_shard(url: str) -> tuple[list[int], list[int], int]:
    """(starts, ends, bytes) of one shard: headers only for a local file, one streamed read otherwise."""
    if not is_remote(url):
        size = os.path.getsize(url)
        with open(url, "rb", buffering=0) as f:
            starts, ends = scan_samples(lambda n: _read_exact(f, n), lambda n: f.seek(n, os.SEEK_CUR), size)
        return starts, ends, size
    stream = open_shard(url)
    try:
        total = [0]

        def read(n: int) -> bytes:
            data = _read_exact(stream, n)
            total[0] += len(data)
            return data

        def skip(n: int) -> None:
            while n > 0:
                got = len(stream.read(min(n, 1 << 20)) or b"")
                if not got:
                    return
                total[0] += got
                n -= got

        starts, ends = scan_samples(read, skip)
        return starts, ends, total[0]
    finally:
        stream.close()


@dataclass
class ShardIndex:
    """Byte ranges of every sample: shard s holds samples offsets[s]..offsets[s+1]-1 (global ids)."""

    names: list[str]  # shard file names, in ShardSet order
    sizes: list[int]  # bytes per shard (0 when unknown)
    starts: np.ndarray  # (N,) int64: start of each sample's first header
    ends: np.ndarray  # (N,) int64: end of its last member's padding
    offsets: np.ndarray  # (S + 1,) int64: cumulative samples per shard
    fingerprint: str  # of the shard list it was built for

    @property
    def counts(self) -> list[int]:
        """Samples per shard."""
        return np.diff(self.offsets).tolist()

    @property
    def num_samples(self) -> int:
        """Samples over all shards."""
        return int(self.offsets[-1])

    def byte_range(self, shard: int, j: int) -> tuple[int, int]:
        """[start, end) of sample j of shard ``shard``."""
        g = int(self.offsets[shard]) + j
        return int(self.starts[g]), int(self.ends[g])

    def save(self, path: str | os.PathLike) -> Path:
        """Write the index atomically (a .npz; sizes and names as JSON)."""
        buf = io.BytesIO()
        meta = {"version": INDEX_VERSION, "names": self.names, "sizes": self.sizes, "fingerprint": self.fingerprint}
        np.savez(buf, starts=self.starts, ends=self.ends, offsets=self.offsets, meta=np.array(json.dumps(meta)))
        return atomic_write(path, buf.getvalue(), what="data index")

    @classmethod
    def load(cls, path: str | os.PathLike) -> ShardIndex | None:
        """The index at ``path``, or None when missing, unreadable or of another version."""
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                if meta.get("version") != INDEX_VERSION:
                    return None
                return cls(meta["names"], meta["sizes"], z["starts"], z["ends"], z["offsets"], meta["fingerprint"])
        except (OSError, ValueError, KeyError):
            return None


def index_fingerprint(shards: ShardSet) -> str:
    """Identity of a shard list for the index: names, manifest checksums, and local file sizes."""
    sizes = [os.path.getsize(u) if not is_remote(u) and os.path.exists(u) else 0 for u in shards.urls]
    text = f"{shards.fingerprint}\n" + "\n".join(map(str, sizes))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build_index(shards: ShardSet, *, threads: int = 16) -> ShardIndex:
    """Scan every shard (in parallel threads: I/O bound) into a ShardIndex."""
    urls = shards.urls
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(urls)))) as pool:
        results = list(pool.map(_scan_or_empty, urls))
    starts = np.array([s for r in results for s in r[0]], dtype=np.int64)
    ends = np.array([e for r in results for e in r[1]], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum([len(r[0]) for r in results])]).astype(np.int64)
    index = ShardIndex([u.rsplit("/", 1)[-1] for u in urls], [r[2] for r in results], starts, ends, offsets,
                       index_fingerprint(shards))
    if shards.has_counts and shards.counts != index.counts:
        bad = [(n, a, b) for n, a, b in zip(index.names, shards.counts, index.counts) if a != b]
        log.warning("data: %d shard(s) hold another number of samples than their manifest says (e.g. %s: "
                    "manifest %d, tar %d); the tar headers are used", len(bad), *bad[0])
    return index


def _scan_or_empty(url: str) -> tuple[list[int], list[int], int]:
    try:
        return scan_shard(url)
    except (OSError, tarfile.TarError, UnicodeDecodeError) as e:
        log.warning("data: cannot index shard %s (%s): its samples are left out", url, e)
        return [], [], 0


def load_or_build_index(shards: ShardSet, cache: str | os.PathLike | None) -> tuple[ShardIndex, str]:
    """The index for ``shards``: from ``cache`` when it matches the shard list, else built (and cached).

    Returns (index, how: "cached" | "built" | "rebuilt").
    """
    fp = index_fingerprint(shards)
    names = [u.rsplit("/", 1)[-1] for u in shards.urls]
    old = ShardIndex.load(cache) if cache is not None else None
    if old is not None and old.fingerprint == fp and old.names == names:
        return old, "cached"
    index = build_index(shards)
    if cache is not None:
        index.save(cache)
    return index, "built" if old is None else "rebuilt"
