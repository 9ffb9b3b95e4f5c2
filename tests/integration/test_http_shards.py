"""Shards over HTTP from a local server on loopback: the global order reads samples by HTTP Range
requests; a server that ignores Range (or data.order=streaming) streams whole shards (curl)."""

from __future__ import annotations

import functools
import logging
import os
import re
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
    """Static files with byte-range requests (206), as nginx and object stores serve them; no log."""

    ranges = True
    tar_bytes = 0  # bytes of .tar files served (class attribute, reset by the tests)

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        m = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
        path = self.translate_path(self.path)
        if not (m and type(self).ranges and os.path.isfile(path)):
            return super().do_GET()
        start, end = int(m.group(1)), int(m.group(2))
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(start)
            data = f.read(min(end, size - 1) - start + 1)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{start + len(data) - 1}/{size}")
        self.send_header("Content-Length", str(len(data)))
        if path.endswith(".tar"):  # counted before the client can have the bytes, so a test never sees it lag
            QuietHandler.tar_bytes += len(data)
        self.end_headers()
        self.wfile.write(data)

    def copyfile(self, source, outputfile) -> None:
        if self.path.split("?")[0].endswith(".tar"):
            data = source.read()
            QuietHandler.tar_bytes += len(data)
            outputfile.write(data)
        else:
            super().copyfile(source, outputfile)


class NoRangeHandler(QuietHandler):
    """A server that answers every Range request with the whole file (HTTP 200)."""

    ranges = False


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


@pytest.mark.parametrize("order", ["global", "streaming"])
@pytest.mark.parametrize("spec", ["/manifest.json", "/shard-{000000..000005}.tar"])
def test_http_matches_local(served: tuple[str, Path], spec: str, order: str) -> None:
    url, out = served
    kw = dict(batch_size=4, rank=1, world_size=2, seed=0)
    remote = build_loader(DataConfig(shards=url + spec, num_workers=1, order=order), **kw)
    assert remote.num_samples == 30 and remote.image_size == 16 and remote.order == order
    local = build_loader(DataConfig(shards=str(out), num_workers=1, order=order), **kw)
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
    second.load_rank_states([first.state_dict()], 0, 1)
    got += take(second, 5)
    assert torch.equal(torch.cat(got), ref)
    from data_pipeline.config import SetupError

    with pytest.raises(SetupError, match="missing.json: HTTP 404"):
        build_loader(DataConfig(shards=url + "/missing.json"), **kw)


def test_a_server_without_ranges_is_read_in_the_streaming_order(served: tuple[str, Path],
                                                               caplog: pytest.LogCaptureFixture) -> None:
    _, out = served
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(NoRangeHandler, directory=str(out)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/manifest.json"
        with caplog.at_level(logging.INFO, logger="ddpm.data"):
            lo = build_loader(DataConfig(shards=url, num_workers=0), batch_size=4, rank=0, world_size=1, seed=0)
        assert lo.order == "streaming"
        assert [r.message for r in caplog.records if "ignores HTTP Range" in r.message]
        assert next(iter(lo))["image"].shape == (4, 3, 16, 16)
    finally:
        server.shutdown()
        server.server_close()


CountingHandler = QuietHandler  # counts the .tar bytes it serves in QuietHandler.tar_bytes


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


def test_manifestless_http_shards_are_indexed_once(served_wds, tmp_path: Path) -> None:
    url, samples, root = served_wds
    spec = url + "/part-{0000..0003}.tar"
    total = sum(p.stat().st_size for p in root.glob("*.tar"))
    cfg = DataConfig(shards=spec, image_size=16, num_workers=1, use_labels=True, num_classes=3)
    CountingHandler.tar_bytes = 0
    streaming = build_loader(DataConfig(**{**cfg.__dict__, "order": "streaming"}), batch_size=4, rank=0,
                             world_size=2, seed=0)
    assert CountingHandler.tar_bytes == 0  # streaming order: start-up reads no shard byte
    streaming.close()
    # The global order reads every shard once to index its samples (plus one 512-byte Range probe),
    # then keeps the index in the run directory: the next start reads only the probe.
    cache = tmp_path / "data_index.npz"
    loader = build_loader(cfg, batch_size=4, rank=0, world_size=2, seed=0, index_cache=cache)
    assert total <= CountingHandler.tar_bytes <= total + 512
    CountingHandler.tar_bytes = 0
    loader = build_loader(cfg, batch_size=4, rank=0, world_size=2, seed=0, index_cache=cache)
    assert CountingHandler.tar_bytes == 512
    batch = next(iter(loader))
    loader.close()
    assert batch["image"].shape == (4, 3, 16, 16) and set(batch["label"].tolist()) <= {0, 1, 2}
    assert CountingHandler.tar_bytes > 512


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
