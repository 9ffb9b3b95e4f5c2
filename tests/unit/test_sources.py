"""data_pipeline.sources: the interface, the registry, detection, and a source kind added from outside."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipeline import sources
from data_pipeline.prepare import main, prepare
from data_pipeline.prepare.cli import parser
from data_pipeline.sources import Sample, Source, detect_source_type, register_source, source_kinds
from tests.data_helpers import make_image_folder, make_lsun_lmdb, write_parquet, write_wds_shards

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]


class TinySource(Source):
    """A source kind written by a user: 'tiny:N' is N flat PIL images, the 4th one broken."""

    kind = "tiny"

    @classmethod
    def detect(cls, spec: str) -> bool:
        return spec.startswith("tiny:")

    def exists(self) -> bool:
        return True

    def units(self) -> list[int]:
        return list(range(int(self.spec[5:])))

    def classes(self) -> list[str]:
        return ["red", "green", "blue"]

    def read(self, units: Sequence[int]) -> Iterator[Sample]:
        for i in units:
            if i == 3:
                yield Sample(f"tiny[{i}]", None, None, "broken on purpose")
                continue
            img = Image.new("RGB", (20, 12), COLOURS[i % 3])
            yield Sample(f"tiny[{i}]", img, ["red", "green", "blue"][i % 3])


class TinyStream(TinySource):
    """The same images, read block by block (blocks of 5) through the staging area."""

    kind = "tinystream"
    streamed = True

    @classmethod
    def detect(cls, spec: str) -> bool:
        return False

    def units(self) -> list[range]:
        n = int(self.spec[5:])
        return [range(i, min(i + 5, n)) for i in range(0, n, 5)]

    def length(self, units: Sequence[range]) -> int:
        return sum(len(u) for u in units)

    def read(self, units: Sequence[range]) -> Iterator[Sample]:
        for block in units:
            yield from super().read(list(block))


@pytest.fixture
def tiny_kinds() -> Iterator[None]:
    """Register the two test kinds as a module of data_pipeline/sources would, then forget them."""
    register_source(TinySource)
    register_source(TinyStream)
    yield
    for kind in ("tiny", "tinystream"):
        sources._REGISTRY.pop(kind, None)


def shard_samples(out: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for path in sorted(out.glob("shard-*.tar")):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


@pytest.mark.parametrize("kind,workers", [("tiny", 0), ("tinystream", 0), ("tiny", 2)])
def test_a_source_kind_registered_from_outside_prepares(
    tiny_kinds, tmp_path: Path, kind: str, workers: int
) -> None:
    out = tmp_path / "out"
    man = json.loads(
        prepare(
            "tiny:10",
            out,
            image_size=8,
            source_type="auto" if kind == "tiny" else kind,
            shard_size=3,
            workers=workers,
            progress=False,
        ).read_text()
    )
    assert man["source_type"] == kind and man["num_samples"] == 9
    assert man["classes"] == ["red", "green", "blue"]
    assert [s["path"] for s in man["skipped"]] == ["tiny[3]"]
    assert man["skipped"][0]["reason"] == "broken on purpose"
    # Every image kept its label: the colour of the pixels says which class it is.
    for parts in shard_samples(out).values():
        pixel = np.asarray(Image.open(io.BytesIO(parts["jpg"])))[4, 4].astype(int)
        assert np.abs(pixel - COLOURS[int(parts["cls"])]).max() < 12
    assert kind in parser().parse_args(["x", "y", "--size", "8", "--source-type", kind]).source_type


def test_builtin_kinds_in_the_help_order() -> None:
    assert source_kinds()[:5] == ["folder", "lsun", "celebahq", "shards", "parquet"]


def test_detection(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "imgs", 2)
    make_lsun_lmdb(tmp_path / "lsun" / "cat_lmdb", 2)
    write_wds_shards(tmp_path / "wds", 2, 2)
    samples = write_wds_shards(tmp_path / "pqsrc", 1, 3)
    write_parquet(tmp_path / "pq" / "a.parquet", samples)
    assert detect_source_type(str(tmp_path / "imgs")) == "folder"
    assert detect_source_type(str(tmp_path / "lsun")) == "lsun"
    assert detect_source_type(str(tmp_path / "lsun" / "cat_lmdb")) == "lsun"
    assert detect_source_type(str(tmp_path / "wds")) == "shards"
    assert detect_source_type(str(tmp_path / "wds" / "part-0000.tar")) == "shards"
    assert detect_source_type(str(tmp_path / "wds" / "part-{0000..0001}.tar")) == "shards"
    assert detect_source_type("https://example.org/part-{0..9}.tar") == "shards"
    assert detect_source_type("pipe:cat x.tar") == "shards"
    assert detect_source_type(str(tmp_path / "pq")) == "parquet"
    assert detect_source_type(str(tmp_path / "pq" / "a.parquet")) == "parquet"
    assert detect_source_type(str(tmp_path / "pq" / "*.parquet")) == "parquet"
    assert detect_source_type(str(tmp_path / "missing")) == "folder"  # then: "does not exist"


@pytest.mark.parametrize(
    "module,extra,make", [("lmdb", "lsun", "lsun"), ("pyarrow", "parquet", "pq")]
)
def test_missing_optional_package_is_one_line_naming_the_extra(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    module: str,
    extra: str,
    make: str,
) -> None:
    if make == "lsun":
        src = make_lsun_lmdb(tmp_path / "church_outdoor_train_lmdb", 3)
    else:
        src = write_parquet(tmp_path / "a.parquet", write_wds_shards(tmp_path / "w", 1, 2))
    # A plain `pip install -e .`: the package cannot be imported.
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)
    if module == "pyarrow":
        monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    monkeypatch.setattr("data_pipeline.sources.lsun._envs", {})
    rc = main([str(src), str(tmp_path / "out"), "--size", "8", "--workers", "0", "--no-progress"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, lines
    assert f'pip install -e ".[{extra}]"' in lines[0] and f"pip install {module}" in lines[0]
    assert not (tmp_path / "out").exists()  # found before any work
