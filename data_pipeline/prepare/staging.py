"""The staging area of streamed sources (shards, parquet): every block read once, processed, kept.

OUT_DIR/.prepare/stage/NNNNNN.tar holds block N's samples already decoded, resized and encoded,
NNNNNN.json their offsets, raw labels and skips. The shuffle and the shard writing then copy staged
bytes, so a remote shard is downloaded exactly once, and a re-run keeps every block already read.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_pipeline.prepare.pool import Bar, run_tasks, say
from data_pipeline.prepare.resume import read_json, remove_leftovers, write_json
from data_pipeline.prepare.writer import add_member, ext_of, process_image, reason
from data_pipeline.sources import Sample, Source
from data_pipeline.storage import atomic_open

StagedUnit = tuple[str, int, int, int, str]  # (staging tar, offset, size, class index, name)


@dataclass(frozen=True)
class StageTask:
    """One source block to read into the staging area."""

    stage_dir: str
    index: int
    source: Source
    block: Any
    size: int
    fmt: str
    quality: int
    fingerprint: str


class StagedSource:
    """Reads staged samples back for the shard writer (their bytes are final: copied as they are)."""

    def describe(self, unit: StagedUnit) -> str:
        """Where the staged sample came from (its source block and key)."""
        return unit[4]

    def read(self, units: Sequence[StagedUnit]) -> Iterator[Sample]:
        """One sample per unit; a staging tar opened once per call."""
        files: dict[str, Any] = {}
        try:
            for path, offset, size, label, name in units:
                try:
                    f = files.get(path)
                    if f is None:
                        f = files[path] = open(path, "rb")  # noqa: SIM115 - closed below
                    f.seek(offset)
                    data = f.read(size)
                except OSError as e:
                    yield Sample(name, None, label, reason(e))
                    continue
                yield Sample(name, data, label if label >= 0 else None)
        finally:
            for f in files.values():
                f.close()


def stage_block(task: StageTask) -> dict:
    """Worker: read one block, process its images into a staging tar; returns (and saves) its record."""
    stage_dir = Path(task.stage_dir)
    ext = ext_of(task.fmt)
    describe = task.source.describe(task.block)
    samples: list[list] = []
    skipped: list[dict] = []
    notes: list[str] = []
    with atomic_open(stage_dir / f"{task.index:06d}.tar", what="staged block") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for s in task.source.read([task.block]):
                where = s.key or describe
                if s.image is None:
                    skipped.append({"path": where, "reason": s.note})
                    continue
                if s.note:
                    notes.append(f"{where}: {s.note}")
                try:
                    encoded, up = process_image(s.image, task.size, task.fmt, task.quality)
                except (OSError, ValueError) as e:
                    skipped.append({"path": where, "reason": reason(e)})
                    continue
                offset = tar.offset + 512  # USTAR, short name: one header block before the data
                add_member(tar, f"{len(samples):09d}.{ext}", encoded)
                samples.append([offset, len(encoded), s.label, int(up), where])
    record = {
        "samples": samples,
        "skipped": skipped,
        "notes": notes,
        "fingerprint": task.fingerprint,
    }
    write_json(stage_dir / f"{task.index:06d}.json", record, what="staging record")
    return {"index": task.index, **record}


def load_staged(stage_dir: Path, index: int, fingerprint: str) -> dict | None:
    """A block's record if it was read by an earlier run with the same options."""
    if not (stage_dir / f"{index:06d}.tar").exists():
        return None
    rec = read_json(stage_dir / f"{index:06d}.json")
    return {"index": index, **rec} if rec and rec.get("fingerprint") == fingerprint else None


def class_index(raw: list[Any], known: list[str]) -> tuple[list[int], list[str]]:
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


@dataclass
class Staged:
    """What the staging area holds: units for the shard writer, classes, and the report's lines."""

    units: list[StagedUnit]
    classes: list[str]
    skipped: list[dict]
    notes: list[str]
    upscaled: int


def stage(
    source: Source,
    blocks: list,
    out_dir: Path,
    options: dict,
    workers: int,
    progress: bool,
    verbose: bool,
) -> Staged:
    """Read every block once into OUT_DIR/.prepare/stage (blocks read earlier are kept)."""
    stage_dir = out_dir / ".prepare" / "stage"
    stage_dir.mkdir(parents=True, exist_ok=True)
    remove_leftovers(stage_dir)
    fingerprint = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:16]
    size, fmt, quality = options["image_size"], options["format"], options["quality"]
    records: dict[int, dict] = {}
    tasks = []
    for i, block in enumerate(blocks):
        done = load_staged(stage_dir, i, fingerprint)
        if done is not None:
            records[i] = done
        else:
            tasks.append(
                StageTask(str(stage_dir), i, source, block, size, fmt, quality, fingerprint)
            )
    if records:
        say(
            verbose,
            f"resuming: kept {len(records)} of {len(blocks)} source blocks read by an earlier run",
        )
    unit = (
        "shard" if source.kind == "shards" else "row group" if source.kind == "parquet" else "block"
    )
    bar = Bar(progress, len(blocks), len(records), "read source", unit)

    def finished(rec: dict) -> None:
        records[rec["index"]] = rec
        bar.update()

    try:
        run_tasks(stage_block, tasks, workers, finished)
    finally:
        bar.close()
    flat = [(i, smp) for i in range(len(blocks)) for smp in records[i]["samples"]]
    skipped = [s for i in range(len(blocks)) for s in records[i]["skipped"]]
    if not flat:
        what = {"shards": "shards", "parquet": "row groups"}.get(source.kind, "blocks")
        first = f" (first problem: {skipped[0]['path']}: {skipped[0]['reason']})" if skipped else ""
        raise ValueError(f"{source.spec}: no readable image in {len(blocks)} {what}{first}")
    labels, classes = class_index([smp[2] for _, smp in flat], source.classes())
    units = [
        (str(stage_dir / f"{i:06d}.tar"), smp[0], smp[1], lab, smp[4])
        for (i, smp), lab in zip(flat, labels)
    ]
    notes = [n for i in range(len(blocks)) for n in records[i]["notes"]]
    unlabelled = sum(1 for lab in labels if lab < 0)
    if classes and unlabelled:
        notes.insert(0, f"{unlabelled} images carry no label and are written without .cls")
    return Staged(units, classes, skipped, notes, sum(smp[3] for _, smp in flat))
