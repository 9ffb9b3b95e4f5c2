"""prepare(): a source into tar shards + manifest.json, resumable, in fixed steps.

1. check everything that can be checked before any work (options, source, OUT_DIR);
2. streamed sources: read every block once into the staging area;
3. shuffle with a fixed seed, cut into shards, keep the shards an earlier run finished;
4. write the missing shards in parallel; 5. the manifest and the summary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
from pathlib import Path

from data_pipeline.config import SetupError
from data_pipeline.prepare.pool import Bar, run_tasks, say
from data_pipeline.prepare.report import build_manifest, interrupted, summarize, write_manifest
from data_pipeline.prepare.resume import (
    STATE,
    check_options,
    check_out_dir,
    complete,
    load_done,
    remove_leftovers,
    remove_stale,
    write_json,
)
from data_pipeline.prepare.staging import Staged, StagedSource, stage
from data_pipeline.prepare.writer import ShardTask, auto_shard_size, shard_name, write_shard
from data_pipeline.sources import Source, SourceArgs, open_source, source_kinds
from data_pipeline.storage import StorageError, check_writable, storage_error

# Manifest keys of prepare's own that ``extra`` may not replace.
RESERVED = {"version", "made_by", "created_by", "shards", "classes", "blocks", "num_samples"}


def _validate(
    image_size: int, source_type: str, fmt: str, quality: int, shard_size: int, labels_from: str
) -> None:
    if fmt not in ("jpeg", "png"):
        raise ValueError(f"format must be jpeg or png, got {fmt!r}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    if image_size < 1 or shard_size < 0:
        raise ValueError("--size must be positive and --shard-size >= 0 (0: auto)")
    if source_type != "auto" and source_type not in source_kinds():
        raise ValueError(f"unknown source type {source_type!r}")
    if labels_from != "cls" and not (labels_from.startswith("json:") and len(labels_from) > 5):
        raise ValueError(f"--labels-from must be cls or json:FIELD, got {labels_from!r}")


def _check_writable(out_dir: Path) -> None:
    """OUT_DIR can be written: a read-only or forbidden folder is a set-up mistake (exit 2), a full
    disk a storage fault (exit 74); either way one line naming the folder."""
    try:
        check_writable(out_dir, what="output folder")
    except StorageError as e:
        line = storage_error(OSError(e.errno, os.strerror(e.errno)), out_dir, what="output folder")
        if line.kind in ("full", "quota"):
            raise line from None
        raise SetupError(str(line)) from None


def _cleanup(out_dir: Path) -> None:
    """After a failure or Ctrl-C: no temporary file of this run stays (finished shards do)."""
    with contextlib.suppress(OSError):
        remove_leftovers(out_dir, "shard-*", "manifest.json")
        remove_leftovers(out_dir / STATE)
        remove_leftovers(out_dir / STATE / "stage")


def _fingerprint(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


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
    extra: dict | None = None,
) -> Path:
    """Turn a source into tar shards + manifest.json in out_dir; resumable; returns the manifest path.

    shard_size 0 = auto (about TARGET_SHARDS shards, at most MAX_SHARD_SIZE images each);
    progress shows the bars, verbose prints the summary, the skip list and resume notes (stderr);
    extra: keys added to the manifest and the recorded options (synthetic data marks itself).
    """
    source_str = os.fspath(source)
    out_dir = Path(out_dir)
    # ---- 1. everything that can be checked before any work
    _validate(image_size, source_type, fmt, quality, shard_size, labels_from)
    args = SourceArgs(labels, labels_from, image_column, label_column)
    src = open_source(source_str, source_type, args)
    if not src.exists():
        raise FileNotFoundError(f"source {source_str} does not exist")
    check_out_dir(out_dir, overwrite)  # someone else's folder: refused before the source is listed
    units = src.units()  # lists the source; an empty or unusable one is one line, nothing written
    if not units or src.length(units) == 0:  # e.g. parquet files without rows: known from metadata
        raise ValueError(f"{source_str} holds no images")
    common = {"image_size": image_size, "format": fmt, "quality": quality}
    options = _options(src, common | {"shard_size": shard_size, "labels": labels}, shuffle_seed)
    extra = dict(extra or {})
    if set(extra) & (set(options) | RESERVED):
        raise ValueError(f"extra manifest keys {sorted(extra)} collide with prepare's own")
    options.update(extra)
    _check_writable(out_dir)
    prev = check_options(out_dir, options, overwrite)
    try:
        remove_leftovers(out_dir, "shard-*", "manifest.json")  # of a killed earlier run
        (out_dir / "manifest.json.tmp").unlink(missing_ok=True)  # the name earlier versions used
        write_json(out_dir / STATE / "options.json", options, what="prepare options")
        remove_leftovers(out_dir / STATE)

        # ---- 2. streamed sources: every block read once into the staging area (resumable)
        if src.streamed:
            options["blocks"] = _fingerprint(
                "\n".join(f"{src.describe(u)} {src.length([u]) or 0}" for u in units)
            )
            if complete(out_dir, prev, options):
                say(verbose, f"{out_dir} is complete and matches these options: nothing to do")
                return out_dir / "manifest.json"
            staged = stage(src, units, out_dir, options, workers, progress, verbose)
            items, classes, reader = staged.units, staged.classes, StagedSource()
        else:
            staged = Staged(units, src.classes(), [], [], 0)
            items, classes, reader = units, staged.classes, src

        # ---- 3. a fixed-seed shuffle spreads classes / sub-folders / source shards over the
        # output shards; keys are positions in it. Shards an earlier run finished are kept.
        random.Random(shuffle_seed).shuffle(items)
        size = shard_size or auto_shard_size(len(items))
        fingerprint = _fingerprint([options, size, len(items)])
        num_shards = math.ceil(len(items) / size)
        template = ShardTask(
            str(out_dir),
            0,
            0,
            reader,
            [],
            image_size,
            fmt,
            quality,
            fingerprint,
            classes,
            src.streamed,
        )
        records, tasks = _plan(out_dir, items, size, template)
        remove_stale(out_dir, num_shards)  # shards of an earlier, larger run
        if records:
            say(
                verbose,
                f"resuming: kept {len(records)} of {num_shards} shards finished by an earlier run",
            )
        elif prev is not None and prev.get("num_items") not in (None, len(items)):
            say(
                verbose,
                f"the source changed since the last run ({prev['num_items']} -> "
                f"{len(items)} images): rebuilding every shard",
            )
        write_json(
            out_dir / STATE / "options.json",
            {**options, "num_items": len(items)},
            what="prepare options",
        )

        # ---- 4. the missing shards, in parallel
        name = Path(source_str).name
        bar = Bar(progress, num_shards, num_shards - len(tasks), f"prepare {name}", "shard")

        def finished(rec: dict) -> None:
            records[int(rec["name"][6:12])] = rec
            bar.update()

        try:
            run_tasks(write_shard, tasks, workers, finished)
        finally:
            bar.close()

        # ---- 5. manifest (atomic, fsynced), staging removed, summary
        ordered = [records[j] for j in range(num_shards)]
        skipped = staged.skipped + [s for rec in ordered for s in rec["skipped"]]
        upscaled = staged.upscaled + sum(rec.get("upscaled", 0) for rec in ordered)
        manifest = build_manifest(options, size, ordered, classes, skipped, upscaled, extra)
        path = write_manifest(out_dir, manifest)
    except KeyboardInterrupt:
        _cleanup(out_dir)
        raise interrupted(out_dir) from None
    except BaseException:
        _cleanup(out_dir)
        raise
    if src.streamed:
        shutil.rmtree(out_dir / STATE / "stage", ignore_errors=True)
    summarize(manifest, path, out_dir, num_shards - len(tasks), staged.notes, verbose)
    return path


def _options(src: Source, common: dict, shuffle_seed: int) -> dict:
    """The options this run records: a re-run with others is refused (or, --overwrite, rebuilt)."""
    return {
        **common,
        "shuffle_seed": shuffle_seed,
        "source": src.identity(),
        "source_type": src.kind,
        **src.options(),
    }


def _plan(
    out_dir: Path, items: list, size: int, template: ShardTask
) -> tuple[dict[int, dict], list[ShardTask]]:
    """The records of shards an earlier run finished with these options, and the others' tasks."""
    records: dict[int, dict] = {}
    tasks: list[ShardTask] = []
    for j in range(math.ceil(len(items) / size)):
        done = load_done(out_dir, shard_name(j), template.fingerprint)
        if done is not None:
            records[j] = done
        else:
            chunk = items[j * size : (j + 1) * size]
            tasks.append(dataclasses.replace(template, index=j, first_key=j * size, units=chunk))
    return records, tasks
