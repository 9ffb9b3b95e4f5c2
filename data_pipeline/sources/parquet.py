"""Parquet files with an image-bytes column, as dataset hubs serve them: a file, a folder, a pattern.

Streamed, one unit per row group. The image column is Hugging Face's Image feature (a struct with
``bytes``) or plain binary; labels come from ``--label-column`` with Hugging Face ClassLabel names.
Needs pyarrow (the ``parquet`` extra).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from data_pipeline.shards import is_remote
from data_pipeline.sources import (
    Sample,
    Source,
    SourceArgs,
    expand,
    has_images,
    is_pattern,
    need,
    register_source,
)

Unit = tuple[str, int, int]  # (file, row group, rows)


def _pq() -> Any:
    return need("pyarrow.parquet", "parquet", "parquet sources")


def parquet_files(source: str) -> list[str]:
    """The parquet files of a file, a folder (recursive) or a pattern."""
    path = Path(source)
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*.parquet"))
    else:
        files = [u for u in expand(source) if os.path.exists(u)]
    if not files:
        raise FileNotFoundError(f"{source} holds no .parquet files")
    return files


def _columns(schema: Any) -> str:
    return ", ".join(f"{f.name} ({f.type})" for f in schema)


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


def hf_class_names(schema: Any, column: str) -> list[str]:
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


@register_source
class ParquetSource(Source):
    """Each row group is read once by one worker into prepare's staging area."""

    kind = "parquet"
    streamed = True
    rank = 4

    def __init__(self, spec: str, args: SourceArgs) -> None:
        super().__init__(spec, args)
        self.image_col, self.struct, self.label_col = "", False, ""
        self._classes: list[str] = []

    @classmethod
    def detect(cls, spec: str) -> bool:
        """A .parquet file, a pattern of them, a folder of them (without images or .tar)."""
        if is_remote(spec):
            return False
        if is_pattern(spec):
            names = expand(spec)
            return bool(names) and all(n.endswith(".parquet") for n in names)
        path = Path(spec)
        if path.is_file():
            return path.suffix == ".parquet"
        return path.is_dir() and not has_images(path) and any(path.rglob("*.parquet"))

    def units(self) -> list[Unit]:
        """One unit per row group (metadata only); resolves the columns and class names."""
        files = parquet_files(self.spec)
        pq = _pq()
        units: list[Unit] = []
        first = True
        for path in files:
            pf = pq.ParquetFile(path)
            schema = pf.schema_arrow
            col, struct = image_column(schema, self.args.image_column, path)
            lab = self.args.label_column if self.args.label_column in schema.names else ""
            if not first and (self.image_col, self.label_col) != (col, lab):
                raise ValueError(
                    f"{path}: columns differ from the first file's ({col}/{lab or '-'} vs "
                    f"{self.image_col}/{self.label_col or '-'})"
                )
            if first and lab:
                self._classes = hf_class_names(schema, lab)
            self.image_col, self.struct, self.label_col, first = col, struct, lab, False
            for rg in range(pf.metadata.num_row_groups):
                units.append((path, rg, pf.metadata.row_group(rg).num_rows))
        return units

    def options(self) -> dict:
        """The columns asked for."""
        return {"image_column": self.args.image_column, "label_column": self.args.label_column}

    def classes(self) -> list[str]:
        """Hugging Face ClassLabel names of the label column, if the schema holds them."""
        return self._classes

    def length(self, units: Sequence[Unit]) -> int:
        """Rows, from the metadata."""
        return sum(u[2] for u in units)

    def describe(self, unit: Unit) -> str:
        """``file[row group N]``."""
        return f"{unit[0]}[row group {unit[1]}]"

    def read(self, units: Sequence[Unit]) -> Iterator[Sample]:
        """Every row of each row group; labels only where the label column exists."""
        pq = _pq()
        for path, rg, _ in units:
            cols = [self.image_col] + ([self.label_col] if self.label_col else [])
            table = pq.ParquetFile(path).read_row_group(rg, columns=cols)
            images = table.column(self.image_col).combine_chunks()
            if self.struct:
                images = images.field("bytes")
            labels = table.column(self.label_col).to_pylist() if self.label_col else None
            where = f"{path}[row group {rg}]"
            for i, data in enumerate(images.to_pylist()):
                label = labels[i] if labels is not None else None
                yield Sample(
                    f"{where}: {Path(path).stem}/rg{rg}/{i}",
                    data or None,
                    label,
                    "" if data else "no image bytes",
                )
