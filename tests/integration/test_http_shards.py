"""Streaming shards over HTTP from a local server on loopback (webdataset gopen -> curl)."""

from __future__ import annotations

import functools
import shutil
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from data_pipeline import DataConfig, build_loader
from tests.data_helpers import make_shards

pytestmark = pytest.mark.skipif(
    shutil.which("curl") is None, reason="webdataset streams http via curl"
)


class QuietHandler(SimpleHTTPRequestHandler):
    """Static files, no request log on stderr."""

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    out = make_shards(tmp_path_factory.mktemp("http") / "out", 30, size=16, shard_size=5).parent
    handler = functools.partial(QuietHandler, directory=str(out))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)  # port 0: a free port
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", out
    server.shutdown()
    server.server_close()


def take(loader, n: int) -> list[torch.Tensor]:
    """Images of the first n batches."""
    out = []
    for batch in loader:
        out.append(batch["image"])
        if len(out) == n:
            break
    return out


@pytest.mark.parametrize("spec", ["/manifest.json", "/shard-{000000..000005}.tar"])
def test_http_stream_matches_local(served: tuple[str, Path], spec: str) -> None:
    url, out = served
    kw = dict(batch_size=4, rank=1, world_size=2, seed=0)
    remote = build_loader(DataConfig(shards=url + spec, num_workers=1), **kw)
    assert remote.num_samples == 30 and remote.image_size == 16
    local = build_loader(DataConfig(shards=str(out), num_workers=1), **kw)
    a, b = take(remote, 10), take(local, 10)  # 10 x 4 > 15 per rank: crosses an epoch
    remote.close()
    local.close()
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_http_resume_and_missing_shard(served: tuple[str, Path]) -> None:
    url, _ = served
    cfg = DataConfig(shards=url + "/manifest.json", num_workers=0)
    kw = dict(batch_size=3, rank=0, world_size=1, seed=2)
    ref = torch.cat(take(build_loader(cfg, **kw), 8))
    first = build_loader(cfg, **kw)
    got = take(first, 3)
    second = build_loader(cfg, **kw)
    second.load_state_dict(first.state_dict())
    got += take(second, 5)
    assert torch.equal(torch.cat(got), ref)
    with pytest.raises(FileNotFoundError):
        build_loader(DataConfig(shards=url + "/missing.json"), **kw)


class CountingHandler(QuietHandler):
    """Static files; counts the bytes of .tar files served (class attribute, reset by the tests)."""

    tar_bytes = 0

    def copyfile(self, source, outputfile) -> None:
        if self.path.split("?")[0].endswith(".tar"):
            data = source.read()
            CountingHandler.tar_bytes += len(data)
            outputfile.write(data)
        else:
            super().copyfile(source, outputfile)


@pytest.fixture(scope="module")
def served_wds(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, list[dict], Path]]:
    """ShardWriter shards (varied sizes, labels, no manifest) behind an HTTP server."""
    from tests.data_helpers import write_wds_shards

    root = tmp_path_factory.mktemp("http-wds")
    samples = write_wds_shards(root, 4, 6, min_size=10, max_size=40)
    handler = functools.partial(CountingHandler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", samples, root
    server.shutdown()
    server.server_close()


def test_manifestless_http_shards_start_without_reading_them(served_wds) -> None:
    url, samples, _ = served_wds
    spec = url + "/part-{0000..0003}.tar"
    CountingHandler.tar_bytes = 0
    cfg = DataConfig(shards=spec, image_size=16, num_workers=1, use_labels=True, num_classes=3)
    loader = build_loader(cfg, batch_size=4, rank=0, world_size=2, seed=0)
    assert CountingHandler.tar_bytes == 0  # start-up: no shard byte crossed the network
    batch = next(iter(loader))
    loader.close()
    assert batch["image"].shape == (4, 3, 16, 16) and set(batch["label"].tolist()) <= {0, 1, 2}
    assert CountingHandler.tar_bytes > 0


def test_prepare_from_http_shards_keeps_labels(served_wds, tmp_path: Path) -> None:
    import json
    from collections import Counter

    from data_pipeline.prepare import prepare
    from data_pipeline.shards import iter_tar

    url, samples, root = served_wds
    CountingHandler.tar_bytes = 0
    man = prepare(url + "/part-{0000..0003}.tar", tmp_path / "out", image_size=16, progress=False)
    labels = Counter(
        int(parts["cls"])
        for shard in sorted((tmp_path / "out").glob("shard-*.tar"))
        for _, parts in iter_tar(str(shard), lambda *a: None)
    )
    assert labels == Counter(s["label"] for s in samples)
    assert json.loads(man.read_text())["num_samples"] == len(samples)
    # Every remote shard crossed the network exactly once (staged, then shuffled locally).
    assert CountingHandler.tar_bytes == sum(p.stat().st_size for p in root.glob("*.tar"))
