"""LSUN's LMDB release: one ``*_lmdb`` directory, or a folder of them (one class each with --labels).

Random access, one unit per record. Needs the ``lmdb`` package (the ``lsun`` extra).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from data_pipeline.shards import is_remote
from data_pipeline.sources import Sample, Source, SourceArgs, is_pattern, need, register_source

Unit = tuple[str, bytes, int | None]  # (LMDB directory, key, class index or None)

_envs: dict[str, Any] = {}


def _lmdb() -> Any:
    return need("lmdb", "lsun", "LSUN LMDB sources")


def open_lmdb(path: str) -> Any:
    """One read-only env per (process, path): LMDB refuses a second open and handles must not cross fork()."""
    env = _envs.get(path)
    if env is None:
        env = _lmdb().open(path, readonly=True, lock=False, readahead=False, max_readers=4)
        _envs[path] = env
    return env


def lmdb_dirs(source: Path) -> list[Path]:
    """The LMDB itself, or the ``*_lmdb`` directories inside a folder."""
    if (source / "data.mdb").exists():
        return [source]
    return sorted(p for p in source.glob("*_lmdb") if (p / "data.mdb").exists())


@register_source
class LsunSource(Source):
    """Records of one or several LSUN LMDBs, keys sorted: the same list on every run."""

    kind = "lsun"
    rank = 1

    def __init__(self, spec: str, args: SourceArgs) -> None:
        super().__init__(spec, args)
        self._classes: list[str] = []

    @classmethod
    def detect(cls, spec: str) -> bool:
        """A directory holding data.mdb, or *_lmdb/data.mdb."""
        if is_remote(spec) or is_pattern(spec):
            return False
        return bool(lmdb_dirs(Path(spec))) if Path(spec).is_dir() else False

    def units(self) -> list[Unit]:
        """Every record's key (sorted) with its LMDB's class index under --labels."""
        root = Path(self.spec)
        if not root.is_dir():
            raise NotADirectoryError(f"source {self.spec} must be a folder or an LMDB directory")
        dirs = lmdb_dirs(root)
        if not dirs:
            raise ValueError(f"{self.spec} holds no LMDB (no data.mdb, no *_lmdb/data.mdb)")
        _lmdb()  # a missing package is one line now, not a traceback in a worker
        labels = self.args.labels
        self._classes = [d.name.removesuffix("_lmdb") for d in dirs] if labels else []
        units: list[Unit] = []
        for ci, d in enumerate(dirs):
            with open_lmdb(str(d)).begin(write=False) as txn:
                keys = [bytes(k) for k in txn.cursor().iternext(keys=True, values=False)]
            units += [(str(d), k, ci if labels else None) for k in sorted(keys)]
        if not units:
            raise ValueError(f"{self.spec}: the LMDB holds no records")
        return units

    def classes(self) -> list[str]:
        """LMDB names without ``_lmdb`` under --labels."""
        return self._classes

    def describe(self, unit: Unit) -> str:
        """``directory[key]``."""
        return f"{unit[0]}[{unit[1].decode(errors='replace')}]"

    def read(self, units: Sequence[Unit]) -> Iterator[Sample]:
        """The encoded bytes of each record."""
        for unit in units:
            path, key, label = unit
            with open_lmdb(path).begin(write=False) as txn:
                value = txn.get(key)
            if value is None:
                yield Sample(self.describe(unit), None, label, "KeyError: 'key vanished from LMDB'")
            else:
                yield Sample(self.describe(unit), bytes(value), label)
