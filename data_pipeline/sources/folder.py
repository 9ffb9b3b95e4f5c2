"""A folder of images (recursive), and CelebA-HQ, which is one: random access, one unit per file."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from data_pipeline.sources import IMAGE_EXTENSIONS, Sample, Source, SourceArgs, register_source


@register_source
class FolderSource(Source):
    """jpg, png, webp, bmp at any depth; --labels: the class is the first sub-folder's name."""

    kind = "folder"
    rank = 0

    def __init__(self, spec: str, args: SourceArgs) -> None:
        super().__init__(spec, args)
        self._classes: list[str] = []

    def units(self) -> list[tuple[str, int | None]]:
        """(path, class index or None) of every image, sorted: the same list on every run."""
        root = Path(self.spec)
        if not root.is_dir():
            raise NotADirectoryError(f"source {self.spec} must be a folder or an LMDB directory")
        files = sorted(
            p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not files:
            raise ValueError(
                f"{self.spec} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)}, "
                "recursively; shards and parquet files are taken with --source-type shards|parquet)"
            )
        if not self.args.labels:
            return [(str(p), None) for p in files]
        rel = [p.relative_to(root) for p in files]
        at_root = [str(r) for r in rel if len(r.parts) < 2]
        if at_root:
            raise ValueError(
                f"--labels takes class names from sub-folders, but {len(at_root)} images sit "
                f"directly in {self.spec} (e.g. {at_root[0]})"
            )
        self._classes = sorted({r.parts[0] for r in rel})
        index = {c: i for i, c in enumerate(self._classes)}
        return [(str(p), index[r.parts[0]]) for p, r in zip(files, rel)]

    def classes(self) -> list[str]:
        """Sub-folder names with --labels, else none."""
        return self._classes

    def describe(self, unit: tuple[str, int | None]) -> str:
        """The file's path."""
        return unit[0]

    def read(self, units: Sequence[tuple[str, int | None]]) -> Iterator[Sample]:
        """The bytes of each file (an unreadable file is a sample without image)."""
        for path, label in units:
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as e:
                yield Sample(path, None, label, f"{type(e).__name__}: {e.strerror or e}")
                continue
            yield Sample(path, data, label)


@register_source
class CelebAHQSource(FolderSource):
    """CelebA-HQ as its releases ship: a folder of images (never detected: ask for it)."""

    kind = "celebahq"
    rank = 2
