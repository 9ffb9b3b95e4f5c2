"""Writing one output shard (a worker's task): read its samples, process them, write the tar atomically.

Every tar member has fixed metadata, so identical inputs give byte-identical shards (same sha256)
whatever the run, the worker count or an interruption in between. A shard that would hold no
image (every one of its source files broken) is not written: its record says so.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_pipeline.images import decode_image, encode_image, from_pil, is_upscaled, resize_crop
from data_pipeline.prepare.resume import record_path, write_json
from data_pipeline.storage import StorageError, atomic_open, storage_error

MAX_SHARD_SIZE = 1000
# --shard-size auto aims at this many shards: every worker of 64 ranks x 4 workers gets one.
TARGET_SHARDS = 256
TAR_OVERHEAD = 1536  # a member's header and padding, at most (USTAR: 512-byte blocks)


def shard_name(index: int) -> str:
    """Deterministic shard file name."""
    return f"shard-{index:06d}.tar"


def auto_shard_size(num_items: int) -> int:
    """Images per shard for --shard-size auto: ~TARGET_SHARDS shards, at most MAX_SHARD_SIZE each."""
    return max(1, min(MAX_SHARD_SIZE, math.ceil(num_items / TARGET_SHARDS)))


def ext_of(fmt: str) -> str:
    """The sample part name of an encoding."""
    return "jpg" if fmt == "jpeg" else "png"


def process_image(image: bytes | Any, size: int, fmt: str, quality: int) -> tuple[bytes, bool]:
    """Decode (any mode to RGB, EXIF honoured), resize + center-crop, re-encode; (bytes, upscaled)."""
    # The loaders' decode and resize_crop: one implementation. Sources may hand over PIL images.
    img = (
        decode_image(image)
        if isinstance(image, bytes | bytearray | memoryview)
        else from_pil(image)
    )
    return encode_image(resize_crop(img, size), fmt, quality), is_upscaled(img, size)


def reason(e: BaseException) -> str:
    """A readable one-line reason (ImageError messages already are)."""
    msg = str(e)
    if isinstance(e, ValueError) and msg:
        return msg
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Append one member with fixed metadata (mtime 0, no owner)."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # fixed metadata: identical inputs give byte-identical shards (same sha256)
    info.mode = 0o644
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def label_index(label: int | str | None, classes: dict[str, int]) -> int:
    """A sample's class index (-1: none); class names are looked up in the source's classes."""
    if label is None:
        return -1
    if isinstance(label, str):
        return classes.get(label, -1)
    return int(label)


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class ShardTask:
    """One output shard: which units of which source, and how to write them."""

    out_dir: str
    index: int
    first_key: int  # keys are positions in the shuffled order: unit i of this shard is first_key+i
    source: Any  # a Source, or the staging area's reader (samples already processed)
    units: list
    size: int
    fmt: str
    quality: int
    fingerprint: str
    classes: list[str]
    processed: bool = False  # the samples are staged bytes: copied as they are


class _Empty(Exception):
    """No sample of the shard had an image: abandon the file."""


def _fault_with_estimate(e: StorageError, path: Path, per_image: float, n: int) -> StorageError:
    """A full disk's message with the shard's expected size (what 'free space' should make room for)."""
    if e.kind not in ("full", "quota"):
        return e
    needed = int(n * (per_image + TAR_OVERHEAD))
    return storage_error(OSError(e.errno, os.strerror(e.errno)), path, needed=needed, what="shard")


def write_shard(task: ShardTask) -> dict:
    """Worker: write one shard under a temporary name, then rename; returns (and saves) its record."""
    out_dir = Path(task.out_dir)
    name = shard_name(task.index)
    final = out_dir / name
    ext = ext_of(task.fmt)
    classes = {c: i for i, c in enumerate(task.classes)}
    skipped: list[dict] = []
    count = upscaled = written = 0
    try:
        with atomic_open(final, what="shard") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for offset, sample in enumerate(task.source.read(task.units)):
                    where = sample.key or task.source.describe(task.units[offset])
                    if sample.image is None:
                        skipped.append({"path": where, "reason": sample.note})
                        continue
                    if task.processed:
                        encoded = sample.image
                    else:
                        try:
                            encoded, up = process_image(
                                sample.image, task.size, task.fmt, task.quality
                            )
                        except (OSError, ValueError, KeyError) as e:
                            skipped.append({"path": where, "reason": reason(e)})
                            continue
                        upscaled += up
                    written += len(encoded)
                    key = f"{task.first_key + offset:09d}"
                    add_member(tar, f"{key}.{ext}", encoded)
                    label = label_index(sample.label, classes)
                    if label >= 0:
                        add_member(tar, f"{key}.cls", str(label).encode())
                    count += 1
            if count == 0:
                raise _Empty  # before the rename: an empty shard never appears
    except _Empty:
        final.unlink(missing_ok=True)  # this run's layout has no shard here: an earlier run's goes
    except StorageError as e:
        raise _fault_with_estimate(e, final, written / max(count, 1), len(task.units)) from e
    record = {
        "name": name,
        "samples": count,
        "bytes": final.stat().st_size if count else 0,
        "sha256": sha256_of(final) if count else "",
        "skipped": skipped,
        "upscaled": upscaled,
        "fingerprint": task.fingerprint,
    }
    write_json(record_path(out_dir, name), record, what="shard record")
    return record
