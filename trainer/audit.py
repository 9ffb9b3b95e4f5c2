"""data.audit: which samples reached the weights, one JSON line per sample a step consumed.

Each rank writes ``<run dir>/audit/rank<k>-<from>-<to>.jsonl``: the samples of the steps whose
images-seen lie in [from, to). A segment becomes final (renamed from its hidden pending name)
only once the checkpoint at ``to`` is complete, so a run killed between checkpoints leaves no final
line for the steps it will redo, and at every start rank 0 removes pending segments and final ones
beyond the checkpoint the run resumed from (the steps they describe are redone). The union of the
final files is exactly the samples that reached the weights of the newest checkpoint.

Line: {"epoch": e, "key": "...", "shard": "shard-000012.tar", "index": global sample index,
"nimg": images seen before its step}.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import IO, Any

from data_pipeline.storage import fsync_dir, storage_error

log = logging.getLogger("ddpm")

_FINAL = re.compile(r"^rank(\d{5})-(\d{12})-(\d{12})\.jsonl$")
_PENDING = re.compile(r"^\.rank(\d{5})-(\d{12})\.pending\.jsonl$")


def clean_for_resume(audit_dir: Path, resume_nimg: int) -> int:
    """Rank 0 at start-up: drop pending segments and final ones past ``resume_nimg``; returns how many."""
    if not audit_dir.is_dir():
        return 0
    removed = 0
    for p in audit_dir.iterdir():
        m = _FINAL.match(p.name)
        if _PENDING.match(p.name) or (m and int(m.group(3)) > resume_nimg):
            p.unlink(missing_ok=True)
            removed += 1
    if removed:
        log.info("audit: removed %d segment(s) of steps after image %d (they are redone)", removed, resume_nimg)
    return removed


class Audit:
    """One rank's audit writer (a no-op when data.audit is off)."""

    def __init__(self, run_dir: Path, rank: int, enabled: bool, start_nimg: int) -> None:
        self.dir = run_dir / "audit"
        self.rank, self.enabled = rank, enabled
        self.start = start_nimg  # the open segment's first nimg
        self.closed: list[tuple[Path, int, int]] = []  # pending segments waiting for their checkpoint
        self._f: IO[str] | None = None
        if enabled:
            self.dir.mkdir(parents=True, exist_ok=True)

    def _pending(self, start: int) -> Path:
        return self.dir / f".rank{self.rank:05d}-{start:012d}.pending.jsonl"

    def add(self, nimg: int, positions: range, samples: list[tuple[Any, ...]] | None) -> None:
        """The samples of one micro-batch consumed by the step at ``nimg`` (their loader positions)."""
        if not self.enabled:
            return
        if samples is None:
            raise RuntimeError("data.audit needs the webdataset backend's per-sample records")
        if self._f is None:
            self._f = open(self._pending(self.start), "a")  # noqa: SIM115 - kept open across steps
        lines = []
        for p, (epoch, key, shard, *loader_pos) in zip(positions, samples):
            if loader_pos and loader_pos[0] != p:
                raise RuntimeError(f"loader sample position {loader_pos[0]} != the step's position {p}")
            lines.append(json.dumps({"epoch": epoch, "key": key, "shard": shard, "index": p, "nimg": nimg}))
        try:
            self._f.write("\n".join(lines) + "\n")
        except OSError as e:
            raise storage_error(e, self._pending(self.start), what="audit log") from e

    def cut(self, nimg: int) -> None:
        """A checkpoint at ``nimg`` is being written: close the open segment [start, nimg)."""
        if not self.enabled or nimg <= self.start:
            return
        path = self._pending(self.start)
        if self._f is not None:
            try:
                self._f.flush()
                os.fsync(self._f.fileno())
                self._f.close()
            except OSError as e:
                raise storage_error(e, path, what="audit log") from e
            self._f = None
            self.closed.append((path, self.start, nimg))
        self.start = nimg

    def commit(self, committed_nimg: int) -> None:
        """Checkpoints up to ``committed_nimg`` are complete: their segments become final."""
        if not self.enabled:
            return
        keep = []
        for path, a, b in self.closed:
            if b <= committed_nimg:
                final = self.dir / f"rank{self.rank:05d}-{a:012d}-{b:012d}.jsonl"
                try:
                    os.replace(path, final)
                    fsync_dir(self.dir)
                except OSError as e:
                    raise storage_error(e, final, what="audit log") from e
            else:
                keep.append((path, a, b))
        self.closed = keep

    def close(self) -> None:
        """Close the open segment's file (its lines stay pending: no checkpoint covers them)."""
        if self._f is not None:
            self._f.close()
            self._f = None


def read_audit(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every final audit line of a run, sorted by (nimg, index)."""
    rows = []
    for p in sorted((Path(run_dir) / "audit").glob("rank*.jsonl")):
        if _FINAL.match(p.name):
            rows += [json.loads(line) for line in p.read_text().splitlines() if line]
    return sorted(rows, key=lambda r: (r["nimg"], r["index"]))
