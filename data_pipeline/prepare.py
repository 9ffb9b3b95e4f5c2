"""Prepare image sources into webdataset tar shards + manifest.json (the ddpm-prepare command).

Sources:
    folder     images (jpg, png, webp, bmp), recursive; --labels: class names from sub-folders
    lsun       an LSUN *_lmdb directory, or a folder of them (--labels: one class per LMDB)
    celebahq   a folder (as folder)
    shards     webdataset shards written by any tool: a .tar, a folder of .tar files, a brace
               pattern, http(s)://..., pipe:CMD; labels kept from .cls (or --labels-from json:FIELD)
    parquet    parquet files with an image-bytes column (Hugging Face's Image feature or plain
               binary), a file, a folder of them or a pattern; labels kept from --label-column
               (default: `label`, with Hugging Face ClassLabel names); needs pyarrow

Every image is decoded (any mode to RGB, EXIF honoured), resized (shorter side, antialiased) and
center-cropped by data_pipeline.images, the same functions the loaders use, then encoded as JPEG
(or PNG). Shards and parquet files are first read once, block by block (a shard, a row group),
in parallel, into a staging area of already-processed samples; the fixed-seed shuffle and the
shard writing then copy staged bytes. So a remote shard is downloaded exactly once.

Layout of OUT_DIR:
    shard-000000.tar ...   samples "<key>.jpg" (or .png) and, with labels, "<key>.cls"
    manifest.json          shard list, per-shard counts / bytes / sha256, options, skipped files
    .prepare/              options, one record per finished shard (a re-run keeps finished
                           shards) and, while shards or parquet are converted, the staging area
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import random
import shutil
import signal
import sys
import tarfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from braceexpand import braceexpand

from data_pipeline.images import IMAGE_EXTS, decode_image, encode_image, is_upscaled, resize_crop
from data_pipeline.shards import image_part, is_remote, iter_tar, raw_label

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
SOURCE_TYPES = ("auto", "folder", "lsun", "celebahq", "shards", "parquet")
MANIFEST_VERSION = 1
MAX_SHARD_SIZE = 1000
# --shard-size auto aims at this many shards: every worker of 64 ranks x 4 workers gets one.
TARGET_SHARDS = 256
# Option name -> command-line flag, for the "prepared with other options" message.
FLAGS = {
    "image_size": "--size",
    "format": "--format",
    "quality": "--quality",
    "shard_size": "--shard-size",
    "labels": "--labels",
    "shuffle_seed": "--shuffle-seed",
    "labels_from": "--labels-from",
    "image_column": "--image-column",
    "label_column": "--label-column",
    "source": "SOURCE",
    "source_type": "--source-type",
}


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during prepare: finished shards are kept; the message says how to resume."""


@dataclass(frozen=True)
class Item:
    """One source image: a file, an LMDB record (ref = the LMDB directory), or a staged sample."""

    ref: str  # file path, LMDB directory, or staging tar
    key: bytes | None = None  # LMDB key (None for files and staged samples)
    label: int = -1
    loc: tuple[int, int] = (0, 0)  # staged samples: (offset, size) of the bytes in the staging tar
    staged: bool = False  # already decoded, resized and encoded: copied as is
    name: str = ""  # staged samples: where they came from, for reports

    def describe(self) -> str:
        """Human-readable name for reports."""
        if self.staged:
            return self.name
        return self.ref if self.key is None else f"{self.ref}[{self.key.decode(errors='replace')}]"


# ----------------------------------------------------------------------------- image ops


def process_image(data: bytes, size: int, fmt: str, quality: int) -> tuple[bytes, bool]:
    """Decode (any mode to RGB, EXIF honoured), resize + center-crop, re-encode; (bytes, upscaled)."""
    img = decode_image(data)  # the loaders' decode and resize_crop: one implementation
    return encode_image(resize_crop(img, size), fmt, quality), is_upscaled(img, size)


def _reason(e: BaseException) -> str:
    """A readable one-line reason (ImageError messages already are)."""
    msg = str(e)
    if isinstance(e, ValueError) and msg:
        return msg
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


# ----------------------------------------------------------------------------- sources


def _expand(spec: str) -> list[str]:
    """A brace pattern / glob / plain path into a sorted list of existing local paths (or URLs)."""
    if is_remote(spec):
        return (
            list(braceexpand(spec.removeprefix("pipe:")))
            if spec.startswith("pipe:")
            else list(braceexpand(spec))
        )
    out: list[str] = []
    for u in braceexpand(spec):
        out += sorted(glob.glob(u)) if glob.has_magic(u) else [u]
    return out


def detect_source_type(source: str) -> str:
    """folder / lsun / shards / parquet from the source string and layout (celebahq: ask for it)."""
    if is_remote(source):
        return "shards"
    if "{" in source or glob.has_magic(source):
        names = _expand(source)
        return "parquet" if names and all(n.endswith(".parquet") for n in names) else "shards"
    path = Path(source)
    if path.is_file():
        return "parquet" if path.suffix == ".parquet" else "shards"
    if (path / "data.mdb").exists() or any(path.glob("*_lmdb/data.mdb")):
        return "lsun"
    if path.is_dir() and not _has_images(path):
        if any(path.glob("*.tar")):
            return "shards"
        if any(path.rglob("*.parquet")):
            return "parquet"
    return "folder"


def _has_images(path: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.rglob("*") if p.is_file())


def _lmdb_dirs(source: Path) -> list[Path]:
    if (source / "data.mdb").exists():
        return [source]
    return sorted(p for p in source.glob("*_lmdb") if (p / "data.mdb").exists())


def list_items(source: Path, source_type: str, labels: bool) -> tuple[list[Item], list[str]]:
    """List every source image of a folder or LSUN source (sorted, deterministic) and the classes."""
    if source_type == "lsun":
        dirs = _lmdb_dirs(source)
        classes = [d.name.removesuffix("_lmdb") for d in dirs] if labels else []
        items = []
        for ci, d in enumerate(dirs):
            with _open_lmdb(str(d)).begin(write=False) as txn:
                keys = [bytes(k) for k in txn.cursor().iternext(keys=True, values=False)]
            items += [Item(str(d), k, ci if labels else -1) for k in sorted(keys)]
        return items, classes
    files = sorted(
        p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not labels:
        return [Item(str(p)) for p in files], []
    rel = [p.relative_to(source) for p in files]
    at_root = [str(r) for r in rel if len(r.parts) < 2]
    if at_root:
        raise ValueError(
            f"--labels takes class names from sub-folders, but {len(at_root)} images sit directly "
            f"in {source} (e.g. {at_root[0]})"
        )
    classes = sorted({r.parts[0] for r in rel})
    index = {c: i for i, c in enumerate(classes)}
    return [Item(str(p), None, index[r.parts[0]]) for p, r in zip(files, rel)], classes


_lmdb_envs: dict[str, Any] = {}


def _open_lmdb(path: str) -> Any:
    """One read-only env per (process, path): LMDB refuses a second open and handles must not cross fork()."""
    env = _lmdb_envs.get(path)
    if env is None:
        import lmdb

        env = lmdb.open(path, readonly=True, lock=False, readahead=False, max_readers=4)
        _lmdb_envs[path] = env
    return env


def read_item(item: Item, files: dict[str, Any] | None = None) -> bytes:
    """Raw encoded bytes of one source image (staged samples: their processed bytes)."""
    if item.staged:
        f = files.get(item.ref) if files is not None else None
        if f is None:
            f = open(item.ref, "rb")  # noqa: SIM115 - cached per task, closed by _write_shard
            if files is not None:
                files[item.ref] = f
        f.seek(item.loc[0])
        data = f.read(item.loc[1])
        if files is None:
            f.close()
        return data
    if item.key is None:
        with open(item.ref, "rb") as f:
            return f.read()
    with _open_lmdb(item.ref).begin(write=False) as txn:
        value = txn.get(item.key)
    if value is None:
        raise KeyError("key vanished from LMDB")
    return bytes(value)


# ----------------------------------------------------------------------------- blocks (shards, parquet)


@dataclass(frozen=True)
class Block:
    """A unit of a streamed source, read once by one worker: a shard, or a parquet row group."""

    ref: str  # shard URL / path, or parquet file
    row_group: int = -1  # parquet only
    rows: int = 0  # parquet only: rows in the group

    def describe(self) -> str:
        """Human-readable name for reports."""
        return self.ref if self.row_group < 0 else f"{self.ref}[row group {self.row_group}]"


def shard_blocks(source: str) -> list[Block]:
    """One block per shard: a .tar, a folder of .tar files, a brace pattern, http(s) or pipe:."""
    if is_remote(source):
        if source.startswith("pipe:"):
            return [Block("pipe:" + u) for u in braceexpand(source[5:])]
        return [Block(u) for u in braceexpand(source)]
    path = Path(source)
    if path.is_dir():
        urls = sorted(str(p) for p in path.glob("*.tar"))
        if not urls:
            raise ValueError(f"{source} holds no .tar shards")
        return [Block(u) for u in urls]
    urls = _expand(source)
    missing = [u for u in urls if not os.path.exists(u)]
    if not urls or missing:
        raise FileNotFoundError(
            f"the shard pattern {source!r} matches no file"
            if not urls
            else f"{len(missing)} shards of {source!r} do not exist, e.g. {missing[0]}"
        )
    return [Block(u) for u in urls]


def _pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(
            "parquet sources need pyarrow: pip install 'ddpm-scale[parquet]' (or pip install pyarrow)"
        ) from None
    return pq


def parquet_files(source: str) -> list[str]:
    """The parquet files of a file, a folder (recursive) or a pattern."""
    path = Path(source)
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*.parquet"))
    else:
        files = [u for u in _expand(source) if os.path.exists(u)]
    if not files:
        raise FileNotFoundError(f"{source} holds no .parquet files")
    return files


def image_column(schema: Any, wanted: str, where: str) -> tuple[str, bool]:
    """(column name, is a struct with a `bytes` field) of the image column of a parquet schema."""
    import pyarrow as pa

    def kind(t: Any) -> str:
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            return "binary"
        if pa.types.is_struct(t) and any(
            f.name == "bytes" and (pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type))
            for f in t
        ):
            return "struct"
        return ""

    found = [(f.name, kind(f.type)) for f in schema if kind(f.type)]
    if wanted:
        for name, k in found:
            if name == wanted:
                return name, k == "struct"
        raise ValueError(
            f"{where}: --image-column {wanted!r} is not a column of image bytes (binary, or a "
            f"struct with a 'bytes' field); columns: {_columns(schema)}"
        )
    if not found:
        raise ValueError(
            f"{where} has no image column (binary, or a struct with a 'bytes' field as Hugging "
            f"Face's Image feature writes); columns: {_columns(schema)}; name one with --image-column"
        )
    preferred = [f for f in found if f[0].lower() in ("image", "img", "jpg", "jpeg", "png", "webp")]
    name, k = (preferred or found)[0]
    return name, k == "struct"


def _columns(schema: Any) -> str:
    return ", ".join(f"{f.name} ({f.type})" for f in schema)


def parquet_blocks(files: list[str], image_col: str, label_col: str) -> tuple[list[Block], dict]:
    """One block per row group (metadata only) and the resolved columns / Hugging Face class names."""
    pq = _pyarrow()
    blocks: list[Block] = []
    info: dict = {}
    for path in files:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
        col, struct = image_column(schema, image_col, path)
        names = [f.name for f in schema]
        lab = label_col if label_col in names else ""
        if info and (info["image_column"], info["label_column"]) != (col, lab):
            raise ValueError(
                f"{path}: columns differ from the first file's ({col}/{lab or '-'} vs "
                f"{info['image_column']}/{info['label_column'] or '-'})"
            )
        info.update(image_column=col, struct=struct, label_column=lab)
        if lab and "class_names" not in info:
            info["class_names"] = _hf_class_names(schema, lab)
        for rg in range(pf.metadata.num_row_groups):
            blocks.append(Block(path, rg, pf.metadata.row_group(rg).num_rows))
    return blocks, info


def _hf_class_names(schema: Any, column: str) -> list[str]:
    """ClassLabel names that Hugging Face datasets store in the parquet schema metadata, if any."""
    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta:
        return []
    try:
        feature = json.loads(meta)["info"]["features"][column]
    except (ValueError, KeyError, TypeError):
        return []
    names = feature.get("names") if isinstance(feature, dict) else None
    return [str(n) for n in names] if names else []


def _block_samples(block: Block, cfg: dict) -> Iterator[tuple[str, bytes | None, Any, str]]:
    """(key, image bytes or None, raw label or None, note) of each sample of a block."""
    if block.row_group >= 0:
        pq = _pyarrow()
        cols = [cfg["image_column"]] + ([cfg["label_column"]] if cfg["label_column"] else [])
        table = pq.ParquetFile(block.ref).read_row_group(block.row_group, columns=cols)
        images = table.column(cfg["image_column"]).combine_chunks()
        if cfg["struct"]:
            images = images.field("bytes")
        labels = table.column(cfg["label_column"]).to_pylist() if cfg["label_column"] else None
        stem = Path(block.ref).stem
        for i, data in enumerate(images.to_pylist()):
            label = labels[i] if labels is not None else None
            yield f"{stem}/rg{block.row_group}/{i}", data, label, "" if data else "no image bytes"
        return
    errors: list[str] = []
    for key, parts in iter_tar(block.ref, lambda url, k, reason: errors.append(f"{k}: {reason}")):
        found = image_part(parts)
        label = None
        note = ""
        part = "cls" if cfg["labels_from"] == "cls" else "json"
        if cfg["keep_labels"] and part in parts:  # a sample without the part simply has no label
            try:
                label = raw_label(parts, cfg["labels_from"])
            except ValueError as e:
                note = f"label: {e}"
        if found is None:
            have = ", ".join(sorted(parts)) or "nothing"
            yield key, None, label, f"no image part ({', '.join(IMAGE_EXTS)}); parts: {have}"
            continue
        yield key, found[1], label, note
    for err in errors:
        yield "<tar>", None, None, err


def _stage_block(task: tuple) -> dict:
    """Worker: read one block, process its images into a staging tar; returns its record."""
    stage_dir, index, block, size, fmt, quality, cfg, fingerprint = task
    stage_dir = Path(stage_dir)
    ext = "jpg" if fmt == "jpeg" else "png"
    final = stage_dir / f"{index:06d}.tar"
    tmp = stage_dir / f".{index:06d}.tar.tmp{os.getpid()}"
    samples, skipped, notes = [], [], []
    seen = with_image = 0
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, data, label, note in _block_samples(block, cfg):
            where = f"{block.describe()}: {key}"
            if key == "<tar>":  # the shard itself is damaged: its later samples are lost
                skipped.append({"path": block.describe(), "reason": note})
                continue
            seen += 1
            if data is None:
                skipped.append({"path": where, "reason": note})
                continue
            with_image += 1
            if note:
                notes.append(f"{where}: {note}")
            try:
                encoded, up = process_image(data, size, fmt, quality)
            except (OSError, ValueError) as e:
                skipped.append({"path": where, "reason": _reason(e)})
                continue
            offset = tar.offset + 512  # USTAR, short name: one header block before the data
            _add_member(tar, f"{len(samples):09d}.{ext}", encoded)
            samples.append([offset, len(encoded), label, int(up), where])
    if seen and not with_image:
        # One line for a shard without a single image, not one per sample.
        parts = {r["reason"].rsplit("parts: ", 1)[-1] for r in skipped if "parts: " in r["reason"]}
        skipped = [
            {
                "path": block.describe(),
                "reason": f"no image of a known type ({', '.join(IMAGE_EXTS)}) in its {seen} "
                f"samples (parts: {'; '.join(sorted(parts)) or '-'})",
            }
        ]
    os.replace(tmp, final)
    record = {"samples": samples, "skipped": skipped, "notes": notes, "fingerprint": fingerprint}
    _write_json(stage_dir / f"{index:06d}.json", record)
    return {"index": index, **record}


def _load_staged(stage_dir: Path, index: int, fingerprint: str) -> dict | None:
    rec_path = stage_dir / f"{index:06d}.json"
    if not rec_path.exists() or not (stage_dir / f"{index:06d}.tar").exists():
        return None
    try:
        rec = json.loads(rec_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return {"index": index, **rec} if rec.get("fingerprint") == fingerprint else None


def _class_index(raw: list[Any], known: list[str]) -> tuple[list[int], list[str]]:
    """Map raw labels (int, str or None) to indices and a class list; None stays -1."""
    present = [r for r in raw if r is not None]
    if not present:
        return [-1] * len(raw), []
    if any(isinstance(r, str) for r in present):
        names = known or sorted({str(r) for r in present})
        index = {n: i for i, n in enumerate(names)}
        missing = sorted({str(r) for r in present if not isinstance(r, int)} - set(index))
        if missing:
            raise ValueError(f"labels {missing[:5]} are not among the class names {names[:10]}")
        return [
            -1 if r is None else (r if isinstance(r, int) else index[str(r)]) for r in raw
        ], names
    top = max(present)
    if min(present) < 0:
        raise ValueError(f"negative class index {min(present)} among the labels")
    names = known if len(known) > top else [str(i) for i in range(top + 1)]
    return [-1 if r is None else int(r) for r in raw], names


# ----------------------------------------------------------------------------- shards


def shard_name(index: int) -> str:
    """Deterministic shard file name."""
    return f"shard-{index:06d}.tar"


def auto_shard_size(num_items: int) -> int:
    """Images per shard for --shard-size auto: ~TARGET_SHARDS shards, at most MAX_SHARD_SIZE each."""
    return max(1, min(MAX_SHARD_SIZE, math.ceil(num_items / TARGET_SHARDS)))


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # fixed metadata: identical inputs give byte-identical shards (same sha256)
    info.mode = 0o644
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _write_shard(task: tuple) -> dict:
    """Worker: process one shard's items and write it under a temp name, then rename."""
    out_dir, index, first_key, items, size, fmt, quality, fingerprint = task
    out_dir = Path(out_dir)
    ext = "jpg" if fmt == "jpeg" else "png"
    name = shard_name(index)
    tmp = out_dir / f".{name}.tmp{os.getpid()}"
    skipped, count, upscaled = [], 0, 0
    files: dict[str, Any] = {}
    try:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for offset, item in enumerate(items):
                key = f"{first_key + offset:09d}"
                try:
                    if item.staged:
                        encoded = read_item(item, files)
                    else:
                        encoded, up = process_image(read_item(item), size, fmt, quality)
                        upscaled += up
                except (OSError, ValueError, KeyError) as e:
                    skipped.append({"path": item.describe(), "reason": _reason(e)})
                    continue
                _add_member(tar, f"{key}.{ext}", encoded)
                if item.label >= 0:
                    _add_member(tar, f"{key}.cls", str(item.label).encode())
                count += 1
    finally:
        for f in files.values():
            f.close()
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    final = out_dir / name
    os.replace(tmp, final)  # atomic: a shard under its final name is always complete
    record = {
        "name": name,
        "samples": count,
        "bytes": final.stat().st_size,
        "sha256": _sha256(final),
        "skipped": skipped,
        "upscaled": upscaled,
        "fingerprint": fingerprint,
    }
    _write_json(out_dir / ".prepare" / f"{name}.json", record)
    return record


def _load_done(out_dir: Path, index: int, fingerprint: str) -> dict | None:
    """A finished shard's record, if the shard and its record exist and match these options."""
    name = shard_name(index)
    rec_path = out_dir / ".prepare" / f"{name}.json"
    if not rec_path.exists() or not (out_dir / name).exists():
        return None
    try:
        rec = json.loads(rec_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if rec.get("fingerprint") != fingerprint or (out_dir / name).stat().st_size != rec["bytes"]:
        return None
    return rec


# ----------------------------------------------------------------------------- running tasks


def _worker_init() -> None:
    """Pool workers leave Ctrl-C to the parent, which terminates them (no traceback per worker)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run(fn: Callable[[tuple], dict], tasks: list[tuple], workers: int, on_done: Callable) -> None:
    """Run tasks in a spawn pool (or in-process); on_done(record) as each finishes."""
    if workers > 0 and len(tasks) > 1:
        main = threading.current_thread() is threading.main_thread()
        # Children start with SIGINT ignored (the disposition survives exec, and Python keeps it),
        # so a Ctrl-C during their start-up cannot print a traceback either.
        old = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            # spawn, not fork: safe next to threads (tqdm) and LMDB handles in the parent.
            pool = mp.get_context("spawn").Pool(min(workers, len(tasks)), initializer=_worker_init)
        finally:
            if main:
                signal.signal(signal.SIGINT, old)
        try:
            for rec in pool.imap_unordered(fn, tasks):
                on_done(rec)
            pool.close()
        except BaseException:
            pool.terminate()  # Ctrl-C or an error: stop the workers now, keep what is finished
            raise
        finally:
            pool.join()
    else:
        for task in tasks:
            on_done(fn(task))


class _Bar:
    """A tqdm bar on stderr, or nothing."""

    def __init__(self, show: bool, total: int, initial: int, desc: str, unit: str) -> None:
        self.bar = None
        if show and total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit=unit, desc=desc, file=sys.stderr)

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------- prepare


def _say(verbose: bool, msg: str) -> None:
    if verbose:
        print(msg, file=sys.stderr, flush=True)


def _check_options(out_dir: Path, options: dict, overwrite: bool) -> dict | None:
    """The previous run's options (None if none); refuses other options unless overwrite."""
    prev = None
    path = out_dir / ".prepare" / "options.json"
    man = out_dir / "manifest.json"
    try:
        if path.exists():
            prev = json.loads(path.read_text())
        elif man.exists():
            m = json.loads(man.read_text())
            prev = {
                **m.get("options", {}),
                "source": m.get("source"),
                "source_type": m.get("source_type"),
            }
            prev.pop("shard_size", None)  # the manifest holds the resolved size, not the request
    except (OSError, json.JSONDecodeError):
        prev = None
    if prev is None:
        return None
    changed = [k for k in options if k != "num_items" and k in prev and prev[k] != options[k]]
    if changed and not overwrite:
        k = changed[0]
        flag = FLAGS.get(k, k)
        if isinstance(options[k], bool):
            was = f"{'with' if prev[k] else 'without'} {flag} (now {'with' if options[k] else 'without'})"
        else:
            was = f"{flag} {prev[k]} (now {options[k]})"
        raise ValueError(
            f"{out_dir} was prepared with other options: {was}; add --overwrite to rebuild it, "
            "or choose another output folder"
        )
    if changed:
        _clear(out_dir)
        return None
    return prev


def _clear(out_dir: Path) -> None:
    """Remove what an earlier prepare wrote (shards, manifest, .prepare); other files stay."""
    for p in out_dir.glob("shard-*.tar"):
        p.unlink()
    for p in (out_dir / "manifest.json",):
        p.unlink(missing_ok=True)
    shutil.rmtree(out_dir / ".prepare", ignore_errors=True)


def prepare(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    image_size: int,
    source_type: str = "auto",
    fmt: str = "jpeg",
    quality: int = 95,
    shard_size: int = 0,
    workers: int = 0,
    labels: bool = False,
    progress: bool = True,
    shuffle_seed: int = 0,
    labels_from: str = "cls",
    image_column: str = "",
    label_column: str = "label",
    overwrite: bool = False,
    verbose: bool = False,
) -> Path:
    """Turn a source into tar shards + manifest.json in out_dir; resumable; returns the manifest path.

    shard_size 0 = auto (about TARGET_SHARDS shards, at most MAX_SHARD_SIZE images each);
    progress shows the bars, verbose prints the summary, the skip list and resume notes (stderr).
    """
    source_str = os.fspath(source)
    out_dir = Path(out_dir)
    # ---- validate everything before any work
    if fmt not in ("jpeg", "png"):
        raise ValueError(f"format must be jpeg or png, got {fmt!r}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    if image_size < 1 or shard_size < 0:
        raise ValueError("--size must be positive and --shard-size >= 0 (0: auto)")
    if source_type not in SOURCE_TYPES:
        raise ValueError(f"unknown source type {source_type!r}")
    if labels_from != "cls" and not (labels_from.startswith("json:") and len(labels_from) > 5):
        raise ValueError(f"--labels-from must be cls or json:FIELD, got {labels_from!r}")
    if not is_remote(source_str) and "{" not in source_str and not glob.has_magic(source_str):
        if not Path(source_str).exists():
            raise FileNotFoundError(f"source {source_str} does not exist")
    kind = detect_source_type(source_str) if source_type == "auto" else source_type
    if kind in ("folder", "lsun", "celebahq") and not Path(source_str).is_dir():
        raise NotADirectoryError(f"source {source_str} must be a folder or an LMDB directory")
    streamed = kind in ("shards", "parquet")
    src_id = source_str if is_remote(source_str) else str(Path(source_str).resolve())
    if "{" in source_str or glob.has_magic(source_str):
        src_id = source_str

    items: list[Item] = []
    classes: list[str] = []
    blocks: list[Block] = []
    block_cfg: dict = {}
    if kind == "lsun" and not _lmdb_dirs(Path(source_str)):
        raise ValueError(f"{source_str} holds no LMDB (no data.mdb, no *_lmdb/data.mdb)")
    if kind == "shards":
        blocks = shard_blocks(source_str)
        block_cfg = {
            "keep_labels": True,
            "labels_from": labels_from,
            "class_names": _known_classes(blocks),
        }
    elif kind == "parquet":
        blocks, block_cfg = parquet_blocks(parquet_files(source_str), image_column, label_column)
        block_cfg["keep_labels"] = bool(block_cfg["label_column"])
    else:
        items, classes = list_items(
            Path(source_str), "lsun" if kind == "lsun" else "folder", labels
        )
        if not items:
            raise ValueError(
                f"{source_str} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)}, "
                "recursively; shards and parquet files are taken with --source-type shards|parquet)"
                if kind != "lsun"
                else f"{source_str}: the LMDB holds no records"
            )
    options = {
        "image_size": image_size,
        "format": fmt,
        "quality": quality,
        "shard_size": shard_size,
        "labels": labels,
        "shuffle_seed": shuffle_seed,
        "source": src_id,
        "source_type": kind,
    }
    if kind == "shards":
        options["labels_from"] = labels_from
    if kind == "parquet":
        options.update(image_column=image_column, label_column=label_column)
    out_dir.mkdir(parents=True, exist_ok=True)
    prev = _check_options(out_dir, options, overwrite)
    (out_dir / ".prepare").mkdir(exist_ok=True)
    _write_json(out_dir / ".prepare" / "options.json", options)

    try:
        # ---- streamed sources: read every block once into the staging area (resumable)
        staged_skipped: list[dict] = []
        notes: list[str] = []
        staged_upscaled = 0
        if streamed:
            blocks_id = hashlib.sha256(
                "\n".join(f"{b.describe()} {b.rows}" for b in blocks).encode()
            ).hexdigest()[:16]
            options["blocks"] = blocks_id
            if _complete(out_dir, prev, options):
                _say(verbose, f"{out_dir} is complete and matches these options: nothing to do")
                return out_dir / "manifest.json"
            items, classes, staged_skipped, notes, staged_upscaled = _stage(
                blocks,
                block_cfg,
                out_dir,
                options,
                image_size,
                fmt,
                quality,
                workers,
                progress,
                verbose,
            )
            if not items:
                raise ValueError(
                    f"{source_str}: no readable image in {len(blocks)} "
                    f"{'shards' if kind == 'shards' else 'row groups'}"
                    + (
                        f" (first problem: {staged_skipped[0]['path']}: {staged_skipped[0]['reason']})"
                        if staged_skipped
                        else ""
                    )
                )
        # A fixed-seed shuffle spreads classes / sub-folders / source shards over the output shards;
        # keys are positions in it.
        random.Random(shuffle_seed).shuffle(items)
        size = shard_size or auto_shard_size(len(items))
        fingerprint = hashlib.sha256(
            json.dumps([options, size, len(items)], sort_keys=True).encode()
        ).hexdigest()[:16]

        # ---- one task per shard; finished shards (matching fingerprint) are kept
        num_shards = (len(items) + size - 1) // size
        records: dict[int, dict] = {}
        tasks = []
        for j in range(num_shards):
            done = _load_done(out_dir, j, fingerprint)
            if done is not None:
                records[j] = done
                continue
            chunk = items[j * size : (j + 1) * size]
            tasks.append((str(out_dir), j, j * size, chunk, image_size, fmt, quality, fingerprint))
        for stale in out_dir.glob("shard-*.tar"):  # shards of an earlier, larger run
            if stale.name[6:12].isdigit() and int(stale.name[6:12]) >= num_shards:
                stale.unlink()
                (out_dir / ".prepare" / f"{stale.name}.json").unlink(missing_ok=True)
        if records:
            _say(
                verbose,
                f"resuming: kept {len(records)} of {num_shards} shards finished by an earlier run",
            )
        elif prev is not None and prev.get("num_items") not in (None, len(items)):
            _say(
                verbose,
                f"the source changed since the last run ({prev['num_items']} -> "
                f"{len(items)} images): rebuilding every shard",
            )
        _write_json(out_dir / ".prepare" / "options.json", {**options, "num_items": len(items)})
        bar = _Bar(
            progress,
            num_shards,
            num_shards - len(tasks),
            f"prepare {Path(source_str).name}",
            "shard",
        )

        def finished(rec: dict) -> None:
            records[int(rec["name"][6:12])] = rec
            bar.update()

        try:
            _run(_write_shard, tasks, workers, finished)
        finally:
            bar.close()
    except KeyboardInterrupt:
        kept = len(list((out_dir / ".prepare").glob("shard-*.json")))
        read = len(list((out_dir / ".prepare" / "stage").glob("*.json")))
        what = f"{kept} finished shards" + (f" and {read} read source blocks" if read else "")
        raise Interrupted(
            f"interrupted: {what} are kept in {out_dir}; run the same command again to resume"
        ) from None
    for tmp in out_dir.glob(".shard-*.tmp*"):  # leftovers of a killed earlier run
        tmp.unlink(missing_ok=True)

    # ---- manifest, written atomically
    shards = [records[j] for j in range(num_shards)]
    skipped = staged_skipped + [s for rec in shards for s in rec["skipped"]]
    upscaled = staged_upscaled + sum(rec.get("upscaled", 0) for rec in shards)
    manifest = {
        "version": MANIFEST_VERSION,
        "created_by": "ddpm-prepare",
        "source": src_id,
        "source_type": kind,
        "image_size": image_size,
        "format": fmt,
        "options": {
            k: options[k] for k in ("image_size", "format", "quality", "labels", "shuffle_seed")
        }
        | {"shard_size": size},
        "num_samples": sum(r["samples"] for r in shards),
        "classes": classes,
        "upscaled": upscaled,
        "shards": [{k: r[k] for k in ("name", "samples", "bytes", "sha256")} for r in shards],
        "skipped": skipped,
    }
    path = out_dir / "manifest.json"
    tmp = out_dir / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, path)
    if streamed:
        shutil.rmtree(out_dir / ".prepare" / "stage", ignore_errors=True)
    kept = (
        f" ({len(shards) - len(tasks)} kept from an earlier run)"
        if len(tasks) < len(shards)
        else ""
    )
    _say(
        verbose,
        f"prepared {manifest['num_samples']} images into {num_shards} shards of up to {size} in "
        f"{out_dir}{kept}; skipped {len(skipped)}"
        + (f"; {len(classes)} classes" if classes else ""),
    )
    for s in skipped[:20]:
        _say(verbose, f"  skipped {s['path']}: {s['reason']}")
    if len(skipped) > 20:
        _say(verbose, f"  ... and {len(skipped) - 20} more (all listed in {path})")
    for n in notes[:5]:
        _say(verbose, f"  note: {n}")
    if upscaled:
        _say(
            verbose,
            f"warning: {upscaled} images were smaller than {image_size}px and were upscaled",
        )
    return path


def _complete(out_dir: Path, prev: dict | None, options: dict) -> bool:
    """A finished earlier run of the same options on the same blocks (every shard in place)."""
    if prev is None or prev.get("blocks") != options.get("blocks"):
        return False
    try:
        man = json.loads((out_dir / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return all(
        (out_dir / s["name"]).exists() and (out_dir / s["name"]).stat().st_size == s["bytes"]
        for s in man.get("shards", [])
    )


def _stage(
    blocks: list[Block],
    block_cfg: dict,
    out_dir: Path,
    options: dict,
    image_size: int,
    fmt: str,
    quality: int,
    workers: int,
    progress: bool,
    verbose: bool,
) -> tuple[list[Item], list[str], list[dict], list[str], int]:
    """Read every block once into out_dir/.prepare/stage; (items, classes, skipped, notes, upscaled)."""
    stage = out_dir / ".prepare" / "stage"
    stage.mkdir(parents=True, exist_ok=True)
    fingerprint = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:16]
    records: dict[int, dict] = {}
    tasks = []
    for i, block in enumerate(blocks):
        done = _load_staged(stage, i, fingerprint)
        if done is not None:
            records[i] = done
        else:
            tasks.append((str(stage), i, block, image_size, fmt, quality, block_cfg, fingerprint))
    if records:
        _say(
            verbose,
            f"resuming: kept {len(records)} of {len(blocks)} source blocks read by an earlier run",
        )
    unit = "shard" if blocks[0].row_group < 0 else "row group"
    bar = _Bar(progress, len(blocks), len(records), "read source", unit)

    def finished(rec: dict) -> None:
        records[rec["index"]] = rec
        bar.update()

    try:
        _run(_stage_block, tasks, workers, finished)
    finally:
        bar.close()
    for tmp in stage.glob(".*.tmp*"):
        tmp.unlink(missing_ok=True)
    flat = [(i, smp) for i in range(len(blocks)) for smp in records[i]["samples"]]
    labels, classes = _class_index([smp[2] for _, smp in flat], block_cfg.get("class_names", []))
    if not block_cfg.get("keep_labels"):
        labels, classes = [-1] * len(flat), []
    items = [
        Item(str(stage / f"{i:06d}.tar"), None, lab, (smp[0], smp[1]), True, smp[4])
        for (i, smp), lab in zip(flat, labels)
    ]
    skipped = [s for i in range(len(blocks)) for s in records[i]["skipped"]]
    notes = [n for i in range(len(blocks)) for n in records[i]["notes"]]
    unlabelled = sum(1 for lab in labels if lab < 0)
    if classes and unlabelled:
        notes.insert(0, f"{unlabelled} images carry no label and are written without .cls")
    upscaled = sum(smp[3] for _, smp in flat)
    return items, classes, skipped, notes, upscaled


def _known_classes(blocks: list[Block]) -> list[str]:
    """Class names of a manifest beside local source shards (our own shards re-prepared)."""
    if not blocks or is_remote(blocks[0].ref) or blocks[0].row_group >= 0:
        return []
    man = Path(blocks[0].ref).parent / "manifest.json"
    try:
        return list(json.loads(man.read_text()).get("classes", [])) if man.exists() else []
    except (OSError, json.JSONDecodeError):
        return []


def main(argv: list[str] | None = None) -> int:
    """Console entry point (ddpm-prepare)."""
    p = argparse.ArgumentParser(
        prog="ddpm-prepare",
        description="Prepare images (a folder, an LSUN LMDB, CelebA-HQ, webdataset shards or parquet "
        "files) into webdataset tar shards + manifest.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "source",
        help="image folder, LSUN *_lmdb directory (or its parent), CelebA-HQ folder, webdataset "
        "shards (a .tar, a folder of them, a brace pattern, http(s)://..., pipe:CMD) or parquet "
        "files (a file, a folder, a pattern)",
    )
    p.add_argument("out_dir", help="output folder for shards and manifest.json")
    p.add_argument("--size", type=int, required=True, help="output image side in pixels")
    p.add_argument(
        "--format", choices=["jpeg", "png"], default="jpeg", help="encoding of the samples"
    )
    p.add_argument("--quality", type=int, default=95, help="JPEG quality")
    p.add_argument(
        "--shard-size",
        type=int,
        default=0,
        help=f"images per shard; 0: auto (about {TARGET_SHARDS} shards, at most {MAX_SHARD_SIZE} "
        "images each, so every worker of many ranks gets shards)",
    )
    p.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="processes (0: in-process)"
    )
    p.add_argument(
        "--labels",
        action="store_true",
        help="folder / LSUN: class labels from sub-folder / LMDB names (shards and parquet keep "
        "their labels without it)",
    )
    p.add_argument("--source-type", choices=list(SOURCE_TYPES), default="auto")
    p.add_argument(
        "--labels-from", default="cls", help="shards: label from the .cls part, or json:FIELD"
    )
    p.add_argument(
        "--image-column", default="", help="parquet: the image column ('': found by type)"
    )
    p.add_argument("--label-column", default="label", help="parquet: the label column, if present")
    p.add_argument(
        "--shuffle-seed", type=int, default=0, help="seed of the order shuffle before sharding"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="rebuild an output folder prepared with other options",
    )
    p.add_argument("--beton", default=None, help="also write an FFCV .beton file at this path")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the summary stays)")
    args = p.parse_args(argv)
    try:
        manifest = prepare(
            args.source,
            args.out_dir,
            image_size=args.size,
            source_type=args.source_type,
            fmt=args.format,
            quality=args.quality,
            shard_size=args.shard_size,
            workers=args.workers,
            labels=args.labels,
            progress=not args.no_progress,
            shuffle_seed=args.shuffle_seed,
            labels_from=args.labels_from,
            image_column=args.image_column,
            label_column=args.label_column,
            overwrite=args.overwrite,
            verbose=True,
        )
        if args.beton:
            from data_pipeline.ffcv_backend import write_beton

            write_beton(manifest, args.beton, workers=max(1, args.workers))
    except Interrupted as e:
        print(e, file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(manifest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
