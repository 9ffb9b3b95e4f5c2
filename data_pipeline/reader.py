"""Reading byte ranges of shards: ``pread`` on local files, HTTP Range requests on http(s) URLs.

Each loader worker holds one RangeReader: local files stay open (a small LRU of descriptors),
HTTP connections stay alive per host, and a transient error (5xx, 429, reset, timeout) is retried
with backoff for a bounded time (``DDPM_HTTP_RETRY_S``, as the manifest fetch) before it becomes
one bad sample. Adjacent ranges of one shard are read in one request.
"""

from __future__ import annotations

import http.client
import io
import os
import time
from collections import OrderedDict
from collections.abc import Iterable
from urllib.parse import urlsplit

from data_pipeline.shards import TRANSIENT_HTTP, http_retry_s, sample_key, tar_members

MAX_OPEN_FILES = 64


class RangeReader:
    """``read(url, start, end)`` -> bytes, for local paths and http(s) URLs (not pipe: commands)."""

    def __init__(self) -> None:
        self._files: OrderedDict[str, int] = OrderedDict()
        self._conns: dict[tuple[str, str, int], http.client.HTTPConnection] = {}

    def read(self, url: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of ``url``; OSError when it cannot be read (after retries for http)."""
        if url.startswith(("http://", "https://")):
            return self._http(url, start, end)
        fd = self._fd(url)
        data = os.pread(fd, end - start, start)
        if len(data) < end - start:
            raise OSError(f"short read: {len(data)} of {end - start} bytes at offset {start} (truncated shard?)")
        return data

    def read_many(self, url: str, ranges: Iterable[tuple[int, int]]) -> list[bytes]:
        """The bytes of several ranges of one shard, adjacent ranges merged into one read."""
        ranges = list(ranges)
        order = sorted(range(len(ranges)), key=lambda i: ranges[i][0])
        out: list[bytes] = [b""] * len(ranges)
        i = 0
        while i < len(order):
            run = [order[i]]
            while i + len(run) < len(order) and ranges[order[i + len(run)]][0] == ranges[run[-1]][1]:
                run.append(order[i + len(run)])
            lo, hi = ranges[run[0]][0], ranges[run[-1]][1]
            data = self.read(url, lo, hi)
            for k in run:
                a, b = ranges[k]
                out[k] = data[a - lo : b - lo]
            i += len(run)
        return out

    def _fd(self, path: str) -> int:
        fd = self._files.pop(path, None)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            if len(self._files) >= MAX_OPEN_FILES:
                _, old = self._files.popitem(last=False)
                os.close(old)
        self._files[path] = fd
        return fd

    def _http(self, url: str, start: int, end: int) -> bytes:
        parts = urlsplit(url)
        key = (parts.scheme, parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        deadline = time.monotonic() + http_retry_s()
        delay, last = 0.25, ""
        while True:
            conn = self._conns.get(key)
            if conn is None:
                cls = http.client.HTTPSConnection if key[0] == "https" else http.client.HTTPConnection
                conn = self._conns[key] = cls(key[1], key[2], timeout=60)
            try:
                conn.request("GET", path, headers={"Range": f"bytes={start}-{end - 1}"})
                resp = conn.getresponse()
                body = resp.read()
                if resp.status == 206 and len(body) == end - start:
                    return body
                if resp.status == 200:
                    raise OSError(f"{url}: the server ignores Range requests (HTTP 200): data.order=streaming "
                                  "reads such servers")
                last = f"HTTP {resp.status} {resp.reason}"
                if resp.status not in TRANSIENT_HTTP:
                    raise OSError(f"{url}: {last}")
            except (http.client.HTTPException, ConnectionError, TimeoutError, OSError) as e:
                if isinstance(e, OSError) and str(e).startswith(url):
                    raise
                last = f"{type(e).__name__}: {e}"
                conn.close()
                self._conns.pop(key, None)
            if time.monotonic() + delay > deadline:
                raise OSError(f"{url}: {last} (retried for {http_retry_s():.0f} s)")
            time.sleep(delay)
            delay = min(2 * delay, 10.0)

    def close(self) -> None:
        """Close every file and connection."""
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()


def serves_ranges(url: str) -> bool:
    """Whether an http(s) server answers a Range request with 206 (probed on one shard's first block)."""
    reader = RangeReader()
    try:
        reader.read(url, 0, 512)
        return True
    except OSError as e:
        if "ignores Range" in str(e):
            return False
        raise
    finally:
        reader.close()


def parse_sample(data: bytes) -> tuple[str, dict[str, bytes]]:
    """(key, {part: bytes}) of one sample's tar bytes (its members, headers included)."""
    key, parts = None, {}
    for name, member in tar_members(io.BytesIO(data)):
        k, part = sample_key(name)
        if k is None:
            continue
        if key is None:
            key = k
        if k != key:
            break  # never: an index range holds one sample
        parts.setdefault(part, member)  # a duplicate member keeps the first, as the streaming reader does
    if key is None:
        raise ValueError("no tar member in the sample's byte range")
    return key, parts
