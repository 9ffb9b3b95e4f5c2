"""Where ddpm-prepare reads images from: one interface, one small module per source kind.

A source is a list of *units* (picklable, cheap) that worker processes read with ``read(units)``,
each yielding ``Sample(key, image bytes or PIL image, label)``. Two ways to be read, one flag:

* random access (``streamed = False``: folders, LSUN LMDB): one unit per image, listed up front;
  prepare shuffles them and each worker reads and processes the units of one output shard.
* streamed (``streamed = True``: webdataset shards, parquet): one unit per block (a shard, a row
  group); every block is read once, in parallel, into prepare's staging area, so a remote shard is
  downloaded exactly once.

Adding a source kind is adding one module to this package with a ``@register_source`` class: the
registry imports every module here on first use, and ``--source-type`` lists the kinds.
"""

from __future__ import annotations

import glob
import importlib
import pkgutil
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from braceexpand import braceexpand

from data_pipeline.config import SetupError
from data_pipeline.shards import is_remote

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
DEFAULT_KIND = "folder"  # what a source that no kind claims is taken for


@dataclass(frozen=True)
class Sample:
    """One image of a source, as a worker reads it.

    key: where it came from, as reports name it (a path, ``lmdb[key]``, ``shard: key``); None for
    a problem of the unit itself (a damaged tar), which ``note`` describes.
    image: encoded bytes or a PIL image; None when unreadable (``note`` says why).
    label: a class index, a class name, or None.
    note: why the image is missing, or a remark on a good image (a label that did not parse).
    """

    key: str | None
    image: bytes | Any | None
    label: int | str | None = None
    note: str = ""


@dataclass(frozen=True)
class SourceArgs:
    """The command line's source options; each kind reads the ones it understands."""

    labels: bool = False  # folder / LSUN: classes from sub-folder / LMDB names
    labels_from: str = "cls"  # shards: cls | json:FIELD
    image_column: str = ""  # parquet: '' = found by type
    label_column: str = "label"  # parquet


class Source(ABC):
    """A source of images for ddpm-prepare; instances are pickled to the worker processes."""

    kind: ClassVar[str]  # the --source-type name
    streamed: ClassVar[bool] = False  # True: read once, block by block, into the staging area
    rank: ClassVar[int] = 100  # place in --source-type's choices and in auto-detection

    def __init__(self, spec: str, args: SourceArgs) -> None:
        self.spec = spec
        self.args = args

    @classmethod
    def detect(cls, spec: str) -> bool:
        """Whether ``--source-type auto`` takes ``spec`` for this kind (checked in ``rank`` order)."""
        return False

    def exists(self) -> bool:
        """Whether the source is there (checked before anything else); URLs and patterns: later."""
        return is_remote(self.spec) or is_pattern(self.spec) or Path(self.spec).exists()

    def identity(self) -> str:
        """The source as the run's options record it: a re-run on another source is refused."""
        if is_remote(self.spec) or is_pattern(self.spec):
            return self.spec
        return str(Path(self.spec).resolve())

    def options(self) -> dict[str, Any]:
        """This kind's options as recorded; a re-run with other values is refused (--overwrite)."""
        return {}

    @abstractmethod
    def units(self) -> list[Any]:
        """List the source (before any work): images (random access) or blocks (streamed).

        Raises ValueError / FileNotFoundError with one readable line for an empty or unusable source.
        """

    def classes(self) -> list[str]:
        """Class names after ``units()``: label i is classes()[i]; streamed: names known up front."""
        return []

    def length(self, units: Sequence[Any]) -> int | None:
        """Images in these units when known without reading them (None: unknown)."""
        return None if self.streamed else len(units)

    def describe(self, unit: Any) -> str:
        """A unit's name in reports and progress (a file, a shard, a row group)."""
        return str(unit)

    @abstractmethod
    def read(self, units: Sequence[Any]) -> Iterator[Sample]:
        """The samples of ``units`` in order, in a worker; random access: exactly one per unit."""


_REGISTRY: dict[str, type[Source]] = {}
_loaded = False


def register_source(cls: type[Source]) -> type[Source]:
    """Class decorator: make a Source kind known to ddpm-prepare (``--source-type cls.kind``)."""
    _REGISTRY[cls.kind] = cls
    return cls


def _load() -> dict[str, type[Source]]:
    """Import every module of this package once, so each registers its kinds."""
    global _loaded
    if not _loaded:
        _loaded = True
        # Imported by name at first use, not at import time: the modules import this one.
        for mod in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{mod.name}")
    return _REGISTRY


def source_kinds() -> list[str]:
    """Every registered kind, in ``rank`` order (the --source-type choices after 'auto')."""
    reg = _load()
    return sorted(reg, key=lambda k: (reg[k].rank, k))


def open_source(spec: str, kind: str, args: SourceArgs) -> Source:
    """The source of kind ``kind`` (or the detected one for 'auto') for ``spec``."""
    reg = _load()
    if kind == "auto":
        kind = detect_source_type(spec)
    if kind not in reg:
        raise ValueError(
            f"unknown source type {kind!r} (one of: auto, {', '.join(source_kinds())})"
        )
    return reg[kind](spec, args)


def detect_source_type(source: str) -> str:
    """The kind that claims ``source`` first in rank order, else folder (CelebA-HQ: ask for it)."""
    reg = _load()
    for kind in source_kinds():
        if reg[kind].detect(source):
            return kind
    return DEFAULT_KIND


# ----------------------------------------------------------------------------- helpers for kinds


def expand(spec: str) -> list[str]:
    """A brace pattern / glob / plain path into a sorted list of local paths (or URLs)."""
    if is_remote(spec):
        return list(braceexpand(spec.removeprefix("pipe:")))
    out: list[str] = []
    for u in braceexpand(spec):
        out += sorted(glob.glob(u)) if glob.has_magic(u) else [u]
    return out


def is_pattern(spec: str) -> bool:
    """A brace pattern or a glob, not one path."""
    return "{" in spec or glob.has_magic(spec)


def has_images(path: Path) -> bool:
    """Whether a folder holds an image file at any depth."""
    return any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.rglob("*") if p.is_file())


def need(module: str, extra: str, what: str) -> Any:
    """Import an optional dependency, or stop with one line naming the extra to install (exit 2)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise SetupError(
            f"{what} need the {package} package, which a plain install leaves out: "
            f'pip install -e ".[{extra}]" (or pip install {package})'
        ) from None
