"""Prepare image sources (folder, LSUN LMDB, CelebA-HQ) into webdataset tar shards + manifest.json.

Usage: python -m data_pipeline.prepare SOURCE OUT_DIR --size 256 [--format jpeg|png]
       [--quality 95] [--shard-size N] [--workers N] [--labels]
       [--source-type auto|folder|lsun|celebahq] [--beton PATH]

Layout of OUT_DIR:
    shard-000000.tar ...   samples "<key>.jpg" (or .png) and, with labels, "<key>.cls"
    manifest.json          shard list, per-shard counts / bytes / sha256, options, skipped files
    .prepare/              one record per finished shard, so a re-run keeps finished shards
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing as mp
import os
import random
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MANIFEST_VERSION = 1
# Decompression-bomb guard stays on, but at a size that admits 1024x1024 CelebA-HQ and big LSUN scans.
Image.MAX_IMAGE_PIXELS = 20_000 * 20_000


@dataclass(frozen=True)
class Item:
    """One source image: a file path, or (lmdb directory, key) for LSUN."""

    ref: str  # file path, or the LMDB directory
    key: bytes | None = None  # LMDB key (None for files)
    label: int = -1

    def describe(self) -> str:
        """Human-readable name for reports."""
        return self.ref if self.key is None else f"{self.ref}[{self.key.decode(errors='replace')}]"


# ----------------------------------------------------------------------------- image ops


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode (L, P, RGBA, CMYK, I;16, I, F, LA, ...) to 8-bit RGB."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit / 32-bit grayscale: PIL's convert("L") clips at 255, so rescale the real range.
        arr = np.asarray(img).astype(np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        # Composite transparency on white instead of exposing whatever colour sits under alpha=0.
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")


def center_crop_resize(img: Image.Image, size: int) -> Image.Image:
    """ADM's center_crop_arr: box-halve while >= 2x the target, bicubic resize short side, center crop."""
    # Repeated 2x BOX downsampling first is what guided-diffusion does: it antialiases big
    # images (1024 CelebA-HQ, LSUN) before the final bicubic step.
    while min(*img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(*img.size)
    img = img.resize(tuple(max(size, round(x * scale)) for x in img.size), resample=Image.BICUBIC)
    left = (img.size[0] - size) // 2
    top = (img.size[1] - size) // 2
    return img.crop((left, top, left + size, top + size))


def process_image(data: bytes, size: int, fmt: str, quality: int) -> bytes:
    """Decode bytes, honor EXIF orientation, make RGB, crop/resize to size, re-encode."""
    if not data:
        raise ValueError("zero-byte file")
    with Image.open(io.BytesIO(data)) as img:
        img.load()  # forces a full decode, so truncated files fail here, not later
        img = ImageOps.exif_transpose(img)
        img = to_rgb(img)
        img = center_crop_resize(img, size)
    out = io.BytesIO()
    if fmt == "jpeg":
        img.save(out, format="JPEG", quality=quality)
    else:
        img.save(out, format="PNG", compress_level=6)
    return out.getvalue()


# ----------------------------------------------------------------------------- sources


def detect_source_type(source: Path) -> str:
    """Guess folder / lsun from the path layout (celebahq is a folder; ask for it explicitly)."""
    if (source / "data.mdb").exists() or any(source.glob("*_lmdb/data.mdb")):
        return "lsun"
    return "folder"


def _lmdb_dirs(source: Path) -> list[Path]:
    if (source / "data.mdb").exists():
        return [source]
    return sorted(p for p in source.glob("*_lmdb") if (p / "data.mdb").exists())


def list_items(source: Path, source_type: str, labels: bool) -> tuple[list[Item], list[str]]:
    """List every source image (sorted, deterministic) and the class names."""
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


def read_item(item: Item) -> bytes:
    """Raw encoded bytes of one source image."""
    if item.key is None:
        with open(item.ref, "rb") as f:
            return f.read()
    with _open_lmdb(item.ref).begin(write=False) as txn:
        value = txn.get(item.key)
    if value is None:
        raise KeyError("key vanished from LMDB")
    return bytes(value)


# ----------------------------------------------------------------------------- shards


def shard_name(index: int) -> str:
    """Deterministic shard file name."""
    return f"shard-{index:06d}.tar"


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


def _write_shard(task: tuple) -> dict:
    """Worker: process one shard's items and write it under a temp name, then rename."""
    out_dir, index, first_key, items, size, fmt, quality, fingerprint = task
    out_dir = Path(out_dir)
    ext = "jpg" if fmt == "jpeg" else "png"
    name = shard_name(index)
    tmp = out_dir / f".{name}.tmp{os.getpid()}"
    skipped, count = [], 0
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for offset, item in enumerate(items):
            key = f"{first_key + offset:09d}"
            try:
                encoded = process_image(read_item(item), size, fmt, quality)
            except (
                OSError,
                ValueError,
                KeyError,
                SyntaxError,
                UnidentifiedImageError,
                Image.DecompressionBombError,
            ) as e:
                reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                skipped.append({"path": item.describe(), "reason": reason})
                continue
            _add_member(tar, f"{key}.{ext}", encoded)
            if item.label >= 0:
                _add_member(tar, f"{key}.cls", str(item.label).encode())
            count += 1
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
        "fingerprint": fingerprint,
    }
    rec_path = out_dir / ".prepare" / f"{name}.json"
    rec_tmp = rec_path.with_suffix(f".tmp{os.getpid()}")
    rec_tmp.write_text(json.dumps(record))
    os.replace(rec_tmp, rec_path)
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


def prepare(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    image_size: int,
    source_type: str = "auto",
    fmt: str = "jpeg",
    quality: int = 95,
    shard_size: int = 1000,
    workers: int = 0,
    labels: bool = False,
    progress: bool = True,
    shuffle_seed: int = 0,
) -> Path:
    """Turn a source into tar shards + manifest.json in out_dir; resumable; returns the manifest path."""
    source, out_dir = Path(source), Path(out_dir)
    # ---- validate everything before any work
    if not source.exists():
        raise FileNotFoundError(f"source {source} does not exist")
    if not source.is_dir():
        raise NotADirectoryError(f"source {source} must be a folder or an LMDB directory")
    if fmt not in ("jpeg", "png"):
        raise ValueError(f"format must be jpeg or png, got {fmt!r}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    if image_size < 1 or shard_size < 1:
        raise ValueError("image_size and shard_size must be positive")
    if source_type not in ("auto", "folder", "lsun", "celebahq"):
        raise ValueError(f"unknown source type {source_type!r}")
    kind = detect_source_type(source) if source_type == "auto" else source_type
    if kind == "lsun" and not _lmdb_dirs(source):
        raise ValueError(f"{source} holds no LMDB (no data.mdb, no *_lmdb/data.mdb)")
    items, classes = list_items(source, "lsun" if kind == "lsun" else "folder", labels)
    if not items:
        raise ValueError(
            f"{source} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)}, recursively)"
            if kind != "lsun"
            else f"{source}: the LMDB holds no records"
        )
    # A fixed-seed shuffle spreads classes / sub-folders across shards; keys are positions in it.
    random.Random(shuffle_seed).shuffle(items)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / ".prepare").mkdir(exist_ok=True)
    options = {
        "image_size": image_size,
        "format": fmt,
        "quality": quality,
        "shard_size": shard_size,
        "labels": labels,
        "shuffle_seed": shuffle_seed,
    }
    fingerprint = hashlib.sha256(
        json.dumps([options, str(source.resolve()), kind, len(items)], sort_keys=True).encode()
    ).hexdigest()[:16]

    # ---- one task per shard; finished shards (matching fingerprint) are kept
    num_shards = (len(items) + shard_size - 1) // shard_size
    records: dict[int, dict] = {}
    tasks = []
    for j in range(num_shards):
        done = _load_done(out_dir, j, fingerprint)
        if done is not None:
            records[j] = done
            continue
        chunk = items[j * shard_size : (j + 1) * shard_size]
        tasks.append(
            (str(out_dir), j, j * shard_size, chunk, image_size, fmt, quality, fingerprint)
        )
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(
            total=num_shards,
            initial=num_shards - len(tasks),
            unit="shard",
            desc=f"prepare {source.name}",
            file=sys.stderr,
        )
    if workers > 0 and len(tasks) > 1:
        # spawn, not fork: safe next to threads (tqdm) and LMDB handles in the parent.
        with mp.get_context("spawn").Pool(min(workers, len(tasks))) as pool:
            for rec in pool.imap_unordered(_write_shard, tasks):
                records[int(rec["name"][6:12])] = rec
                if bar is not None:
                    bar.update(1)
    else:
        for task in tasks:
            rec = _write_shard(task)
            records[task[1]] = rec
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    for stale in out_dir.glob(".shard-*.tmp*"):  # leftovers of a killed earlier run
        stale.unlink(missing_ok=True)

    # ---- manifest, written atomically
    shards = [records[j] for j in range(num_shards)]
    skipped = [s for rec in shards for s in rec["skipped"]]
    manifest = {
        "version": MANIFEST_VERSION,
        "created_by": "data_pipeline.prepare",
        "source": str(source.resolve()),
        "source_type": kind,
        "image_size": image_size,
        "format": fmt,
        "options": options,
        "num_samples": sum(r["samples"] for r in shards),
        "classes": classes,
        "shards": [{k: r[k] for k in ("name", "samples", "bytes", "sha256")} for r in shards],
        "skipped": skipped,
    }
    path = out_dir / "manifest.json"
    tmp = out_dir / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, path)
    if progress:
        print(
            f"prepared {manifest['num_samples']} images into {num_shards} shards in {out_dir}; "
            f"skipped {len(skipped)}",
            file=sys.stderr,
        )
        for s in skipped[:20]:
            print(f"  skipped {s['path']}: {s['reason']}", file=sys.stderr)
    return path


def main(argv: list[str] | None = None) -> int:
    """Console entry point (ddpm-prepare)."""
    p = argparse.ArgumentParser(prog="ddpm-prepare", description=__doc__.split("\n")[0])
    p.add_argument(
        "source", help="image folder, LSUN *_lmdb directory (or its parent), CelebA-HQ folder"
    )
    p.add_argument("out_dir", help="output folder for shards and manifest.json")
    p.add_argument("--size", type=int, required=True, help="output image side in pixels")
    p.add_argument(
        "--format", choices=["jpeg", "png"], default="jpeg", help="encoding of the samples"
    )
    p.add_argument("--quality", type=int, default=95, help="JPEG quality")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    p.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="processes (0: in-process)"
    )
    p.add_argument(
        "--labels", action="store_true", help="class labels from sub-folder / LMDB names"
    )
    p.add_argument("--source-type", choices=["auto", "folder", "lsun", "celebahq"], default="auto")
    p.add_argument(
        "--shuffle-seed", type=int, default=0, help="seed of the order shuffle before sharding"
    )
    p.add_argument("--beton", default=None, help="also write an FFCV .beton file at this path")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
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
        )
        if args.beton:
            from data_pipeline.ffcv_backend import write_beton

            write_beton(manifest, args.beton, workers=max(1, args.workers))
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(manifest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
