"""The trainer on real faulty filesystems (issue 23): tmpfs mounts that fill up, read-only bind
mounts, a filesystem unmounted mid-run, a flaky manifest server, and a prepared dataset the
default command must not touch.

Each mid-run case runs the real command, puts the fault under one write point of the running job
(paused with SIGSTOP for that moment, after its first checkpoint), and asserts: the job exits
within a bounded time (the figure is printed: ``pytest -s``), one clear line, exit code 74, no
partial file, the checkpoint ``latest`` named before the fault still complete and loadable, and
after the fault is cleared the same command resumes and ends with weights equal (``torch.equal``,
every tensor of the model and the EMA) to those of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from tests.fault_helpers import fill, free_space, read_only, tmpfs
from tests.integration.train_fault_helpers import (
    FINAL,
    REPO,
    Job,
    assert_same_weights,
    bind,
    environment,
    error_lines,
    latest,
    mount,
    partial_files,
    remount,
    run,
    sha256,
    train_args,
    umount,
)

pytestmark = pytest.mark.slow

FAULT_EXIT_S = 30  # fault -> exit, at most (the measured figures are printed)
TIMES: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def print_times() -> Iterator[None]:
    """At the end of the module: the measured time from each fault to the job's exit."""
    yield
    for case, seconds in TIMES.items():
        print(f"fault -> exit {seconds:5.1f} s  {case}")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real shards made once by ddpm-prepare from 72 tiny images made here (9 shards of 8)."""
    from tests.data_helpers import make_image_folder

    root = tmp_path_factory.mktemp("faults-data")
    make_image_folder(root / "images", 72, size=20)
    job = run([sys.executable, "-m", "data_pipeline.prepare", str(root / "images"), str(root / "shards"),
               "--size", "16", "--shard-size", "8", "--workers", "0", "--no-progress"])
    assert job.proc.returncode == 0, job.report()
    return root / "shards"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, data: Path) -> Path:
    """The final checkpoint of an uninterrupted single-process run."""
    run_dir = tmp_path_factory.mktemp("faults-ref") / "run"
    job = run(train_args(run_dir, data))
    assert job.proc.returncode == 0, job.report()
    return run_dir / "checkpoints" / FINAL


@pytest.fixture(scope="module")
def reference2(tmp_path_factory: pytest.TempPathFactory, data: Path) -> Path:
    """The final checkpoint of an uninterrupted run of two processes (torchrun)."""
    run_dir = tmp_path_factory.mktemp("faults-ref2") / "run"
    job = run(train_args(run_dir, data, nproc=2))
    assert job.proc.returncode == 0, job.report()
    return run_dir / "checkpoints" / FINAL


# ----------------------------------------------------------------------------- the checks


def fault_mid_run(case: str, job: Job, run_dir: Path, inject: Callable[[], object], hold: float = 0.0
                  ) -> tuple[str, str]:
    """Wait for the first checkpoint, pause the job, ``inject()`` the fault, let it go on; wait for its
    exit and keep the time from the fault (from the job going on with it) to the exit. Returns
    (the checkpoint latest named, its sha256).

    ``hold``: seconds the job stays paused after the fault, so that a heartbeat of that period is
    due the moment it goes on (a run of a few dozen fast steps could otherwise end first).
    """
    job.wait_for(lambda: latest(run_dir) != "", what="a first checkpoint")
    with job.paused():
        name = latest(run_dir)
        digest = sha256(run_dir / "checkpoints" / name)
        inject()
        time.sleep(hold)
        t_fault = time.monotonic()
    job.wait(timeout=240)
    TIMES[case] = job.ended - t_fault
    assert TIMES[case] < FAULT_EXIT_S, (case, TIMES[case])
    assert not job.left_behind(), f"processes left after the exit: {job.left_behind(0)}"
    return name, digest


def one_line(job: Job, code: int, *needles: str) -> str:
    """Exit ``code`` and one line on stderr, without a traceback, holding every ``needle``."""
    assert job.proc.returncode == code, job.report()
    lines = error_lines(job)
    assert len(lines) == 1 and "Traceback" not in job.stderr, job.report()
    for needle in needles:
        assert needle in lines[0], lines[0]
    print(lines[0])
    return lines[0]


def kept(run_dir: Path, name: str, digest: str) -> None:
    """No partial file; latest names the same complete checkpoint (or a newer one) and it loads."""
    assert not partial_files(run_dir), partial_files(run_dir)
    now = latest(run_dir)
    assert now >= name, (now, name)
    if now == name:
        assert sha256(run_dir / "checkpoints" / name) == digest
    torch.load(run_dir / "checkpoints" / now, weights_only=True)


def resumes_bit_exact(args: list[str], run_dir: Path, reference: Path) -> None:
    """The same command again finishes from the kept checkpoint with the uninterrupted run's weights."""
    job = run(args)
    assert job.proc.returncode == 0, job.report()
    assert "resumed from" in job.stdout, job.report()
    assert_same_weights(run_dir / "checkpoints" / FINAL, reference)


def full_disk_case(case: str, tmp_path: Path, data: Path, reference: Path, folder: str, what: str,
                   *overrides: str, nproc: int = 1, size: str = "32m", leave: int = 0, hold: float = 0.0) -> None:
    """``<run>/<folder>`` on its own small tmpfs, filled mid-run: 74, one line, resume bit-exact."""
    run_dir = tmp_path / "run"
    args = train_args(run_dir, data, *overrides, nproc=nproc)
    with tmpfs(run_dir / folder, size) as target:
        fillers: list[Path] = []
        with Job(args) as job:
            name, digest = fault_mid_run(case, job, run_dir, lambda: fillers.append(fill(target, leave)), hold)
        if nproc == 1:
            line = one_line(job, 74, str(target), what, "no space left", "free", "run the same command again")
        else:  # torchrun's own code is 1; the trainer's line is on stderr and in torchrun's summary
            assert job.proc.returncode == 1, job.report()
            line = next(ln for ln in error_lines(job) if "storage error" in ln)
            assert str(target) in line and what in line and "no space left" in line, line
            assert job.stderr.count(line.split("storage error", 1)[1]) >= 2, job.report()
            print(line)
        kept(run_dir, name, digest)
        free_space(fillers[0])
        resumes_bit_exact(args, run_dir, reference)


# ----------------------------------------------------------------------------- a full disk, per write point


def test_full_disk_at_a_checkpoint(tmp_path: Path, data: Path, reference: Path) -> None:
    full_disk_case("full disk: checkpoint", tmp_path, data, reference, "checkpoints", "checkpoint", leave=1 << 20)


def test_full_disk_at_a_checkpoint_under_torchrun(tmp_path: Path, data: Path, reference2: Path) -> None:
    full_disk_case("full disk: checkpoint, torchrun 2 ranks", tmp_path, data, reference2, "checkpoints",
                   "checkpoint", nproc=2, leave=1 << 20)


def test_full_disk_in_tensorboard_events(tmp_path: Path, data: Path, reference: Path) -> None:
    full_disk_case("full disk: TensorBoard events", tmp_path, data, reference, "tb", "TensorBoard events")


def test_full_disk_in_tensorboard_events_under_torchrun(tmp_path: Path, data: Path, reference2: Path) -> None:
    full_disk_case("full disk: TensorBoard events, torchrun 2 ranks", tmp_path, data, reference2, "tb",
                   "TensorBoard events", nproc=2)


def test_full_disk_at_an_ema_snapshot(tmp_path: Path, data: Path, reference: Path) -> None:
    full_disk_case("full disk: EMA snapshot", tmp_path, data, reference, "ema", "EMA snapshot", leave=256 << 10)


def test_full_disk_at_a_sample_grid(tmp_path: Path, data: Path, reference: Path) -> None:
    full_disk_case("full disk: sample grid", tmp_path, data, reference, "samples", "image")


def test_full_disk_at_rank_records(tmp_path: Path, data: Path, reference: Path) -> None:
    full_disk_case("full disk: rank record heartbeat", tmp_path, data, reference, "ranks", "run record", hold=1.5)


def test_full_disk_at_the_log_file(tmp_path: Path, data: Path, reference: Path) -> None:
    full_disk_case("full disk: log file", tmp_path, data, reference, "logs", "log file")


def test_full_disk_at_the_run_lock(tmp_path: Path, data: Path, reference: Path) -> None:
    """The run directory's own filesystem fills (its sub-folders are other filesystems): the lock's
    heartbeat is the next write there."""
    case = "full disk: run lock heartbeat"
    run_dir = tmp_path / "run"
    args = train_args(run_dir, data)
    with contextlib.ExitStack() as stack:
        root = stack.enter_context(tmpfs(run_dir, "1m"))
        for sub in ("checkpoints", "ema", "logs", "ranks", "tb", "samples", "inductor_cache"):
            stack.enter_context(tmpfs(root / sub, "32m"))
        fillers: list[Path] = []
        with Job(args) as job:
            name, digest = fault_mid_run(case, job, run_dir, lambda: fillers.append(fill(root)), hold=1.5)
        one_line(job, 74, str(run_dir / "run.lock"), "no space left")
        kept(run_dir, name, digest)
        free_space(fillers[0])
        resumes_bit_exact(args, run_dir, reference)


def test_a_run_directory_on_a_small_tmpfs_fills_up_by_itself(tmp_path: Path, data: Path, reference: Path) -> None:
    """The reported case: the whole run directory on a 12 MB tmpfs, filled by the run's own files
    (checkpoints, EMA snapshots, ...): 74 and one line, no hang, no partial file; after the
    filesystem grows (the user frees space) the same command resumes bit-exact."""
    case = "run directory on a 12 MB tmpfs, filled by the run (from the fault noted)"
    run_dir = tmp_path / "run"
    args = train_args(run_dir, data)
    with tmpfs(run_dir, "12m"):
        with Job(args) as job:
            job.wait(timeout=240)
            noted = [t for t, line in job.out if "storage fault noted" in line]
        assert noted, job.report()
        TIMES[case] = job.ended - noted[0]
        one_line(job, 74, str(run_dir), "no space left", "run the same command again")
        assert not partial_files(run_dir), partial_files(run_dir)
        kept(run_dir, latest(run_dir), sha256(run_dir / "checkpoints" / latest(run_dir)))
        mount("-o", "remount,size=64m", str(run_dir))
        resumes_bit_exact(args, run_dir, reference)


# ----------------------------------------------------------------------------- before training


def test_a_run_directory_too_small_for_one_checkpoint_is_refused(tmp_path: Path, data: Path,
                                                                 reference: Path) -> None:
    run_dir = tmp_path / "run"
    with tmpfs(run_dir / "checkpoints", f"{reference.stat().st_size // 2048}k"):
        job = run(train_args(run_dir, data), timeout=120)
    one_line(job, 2, str(run_dir / "checkpoints"), "one checkpoint of this run needs")
    assert not list((run_dir / "checkpoints").glob("ckpt-*"))


def test_room_for_fewer_checkpoints_than_keep_last_is_a_warning(tmp_path: Path, data: Path,
                                                                reference: Path) -> None:
    run_dir = tmp_path / "run"
    # Room for one checkpoint (with the pre-flight's 1 MiB margin), not for keep_last=2.
    with tmpfs(run_dir / "checkpoints", f"{int(1.5 * (reference.stat().st_size + (1 << 20))) // 1024}k"):
        job = run(train_args(run_dir, data, "train.total_images=16"), timeout=120)
        assert job.proc.returncode == 0, job.report()
        warnings = [ln for ln in job.stdout.splitlines() if "checkpoint(s) of" in ln]
        assert len(warnings) == 1 and "checkpoint.keep_last=2" in warnings[0], job.report()


def test_a_read_only_run_directory_is_refused_at_start(tmp_path: Path, data: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with read_only(run_dir):
        t0 = time.monotonic()
        job = run(train_args(run_dir, data), timeout=120)
        TIMES["read-only run directory at start-up (whole command)"] = time.monotonic() - t0
    one_line(job, 2, str(run_dir), "read-only")
    assert not any(run_dir.iterdir())


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path: Path, data: Path,
                                                                      reference: Path) -> None:
    run_dir = tmp_path / "run"
    first = run(train_args(run_dir, data, "train.total_images=48"))
    assert first.proc.returncode == 0, first.report()
    newest = run_dir / "checkpoints" / "ckpt-000000000048.pt"
    assert latest(run_dir) == newest.name
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    job = run(train_args(run_dir, data))
    assert job.proc.returncode == 0, job.report()
    named = [ln for ln in job.stdout.splitlines() if "unreadable" in ln]
    assert len(named) == 1 and str(newest) in named[0] and "falling back to the previous one" in named[0], job.report()
    assert "resumed from " + str(run_dir / "checkpoints" / "ckpt-000000000032.pt") in job.stdout
    assert_same_weights(run_dir / "checkpoints" / FINAL, reference)


# ----------------------------------------------------------------------------- read-only and vanished mid-run


def test_a_run_directory_remounted_read_only_mid_run(tmp_path: Path, data: Path, reference: Path) -> None:
    """The run directory (a bind mount; its logs/ another filesystem, since an open log file keeps
    a mount from going read-only) turns read-only while training: 74, like a full disk."""
    case = "read-only remount mid-run"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    args = train_args(run_dir, data)
    with bind(run_dir, run_dir), tmpfs(run_dir / "logs", "4m"):
        with Job(args) as job:
            job.wait_for(lambda: latest(run_dir) != "", what="a first checkpoint")
            name = latest(run_dir)
            digest = sha256(run_dir / "checkpoints" / name)
            remount(run_dir, "ro", job)
            t_fault = time.monotonic()
            job.wait(timeout=240)
        TIMES[case] = job.ended - t_fault
        assert TIMES[case] < FAULT_EXIT_S
        assert not job.left_behind()
        one_line(job, 74, str(run_dir), "read-only filesystem", "run the same command again")
        kept(run_dir, name, digest)
        remount(run_dir, "rw")
        resumes_bit_exact(args, run_dir, reference)


def test_a_run_directory_unmounted_mid_run(tmp_path: Path, data: Path, reference: Path) -> None:
    """``umount -l`` of the filesystem holding the run directory while training: one line, a prompt
    exit; its files (kept by a second mount of the same tmpfs) resume once it is back."""
    case = "run directory unmounted (umount -l) mid-run"
    run_dir, store = tmp_path / "run", tmp_path / "store"
    args = train_args(run_dir, data)
    with tmpfs(store, "32m"):
        with bind(store, run_dir):
            with Job(args) as job:
                name, digest = fault_mid_run(case, job, run_dir, lambda: umount(run_dir, lazy=True))
            line = one_line(job, 74, str(run_dir))
            assert "run the same command again" in line
            assert not any(run_dir.iterdir()), list(run_dir.iterdir())  # nothing written where it was
        with bind(store, run_dir):
            kept(run_dir, name, digest)
            resumes_bit_exact(args, run_dir, reference)


# ----------------------------------------------------------------------------- torch.compile's cache


def test_full_disk_in_the_inductor_cache(tmp_path: Path, data: Path) -> None:
    """train.compile=true writes generated kernels under <run>/inductor_cache: full there (from the
    first compile, in the first step), 74 and one line naming it, none of its temporary files left.
    (No rerun after freeing the space: a full compile on a 2-core CPU takes minutes.)"""
    run_dir = tmp_path / "run"
    args = train_args(run_dir, data, "train.compile=true", "train.total_images=16")
    with tmpfs(run_dir / "inductor_cache", "64m") as cache:
        filler = fill(cache)
        t0 = time.monotonic()
        job = run(args, timeout=400)
        TIMES["full inductor cache (whole command, compile included)"] = time.monotonic() - t0
        one_line(job, 74, str(cache), "torch.compile cache", "no space left")
        assert not partial_files(run_dir)
        free_space(filler)


# ----------------------------------------------------------------------------- a flaky manifest server


class Flaky(SimpleHTTPRequestHandler):
    """Static files with byte ranges (as object stores serve them); manifest.json answers 503
    ``fail_manifest`` times first (class attributes)."""

    fail_manifest = 0
    manifest_requests = 0
    first_503: float | None = None

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path.endswith("manifest.json"):
            type(self).manifest_requests += 1
            if type(self).manifest_requests <= type(self).fail_manifest:
                type(self).first_503 = type(self).first_503 or time.monotonic()
                self.send_error(503, "Service Unavailable")
                return
        wanted = self.headers.get("Range", "")
        if not wanted.startswith("bytes="):
            super().do_GET()
            return
        data = Path(self.translate_path(self.path)).read_bytes()
        lo, hi = wanted[6:].split("-")
        first, last = int(lo), min(int(hi) if hi else len(data) - 1, len(data) - 1)
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {first}-{last}/{len(data)}")
        self.send_header("Content-Length", str(last - first + 1))
        self.end_headers()
        self.wfile.write(data[first:last + 1])

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server(data: Path) -> Iterator[type[Flaky]]:
    handler_type = type("FlakyHandler", (Flaky,), {})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler_type, directory=str(data)))
    handler_type.url = f"http://127.0.0.1:{srv.server_address[1]}/manifest.json"
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield handler_type
    srv.shutdown()
    srv.server_close()


def test_a_manifest_server_answering_503_a_few_times(tmp_path: Path, server: type[Flaky], reference: Path) -> None:
    server.fail_manifest = 3
    run_dir = tmp_path / "run"
    job = run(train_args(run_dir, server.url), env=environment(DDPM_HTTP_RETRY_S="60"))
    assert job.proc.returncode == 0, job.report()
    assert server.manifest_requests >= 4 and job.stdout.count("HTTP 503") == 3, job.report()
    assert_same_weights(run_dir / "checkpoints" / FINAL, reference)
    assert not (REPO / "http:").exists()  # no synthetic images made into a folder named after the URL


def test_a_manifest_server_that_keeps_answering_503(tmp_path: Path, server: type[Flaky]) -> None:
    server.fail_manifest = 10**9
    job = run(train_args(tmp_path / "run", server.url), env=environment(DDPM_HTTP_RETRY_S="4"), timeout=120)
    TIMES["manifest server answering 503, DDPM_HTTP_RETRY_S=4 (from its first 503)"] = job.ended - server.first_503
    one_line(job, 2, server.url, "HTTP 503", "retried for 4 s")
    assert server.manifest_requests >= 2
    assert job.ended - server.first_503 < 4 + FAULT_EXIT_S


# ----------------------------------------------------------------------------- a prepared dataset


def tree_digest(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``root`` (and every folder, as '')."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
            for p in sorted(root.rglob("*"))}


def test_the_default_command_trains_on_prepared_shards_without_touching_them(tmp_path: Path, data: Path) -> None:
    """``python trainer/main.py data.shards=DIR run.dir=RUN`` (the quickstart default, which makes
    synthetic data on first use) on ddpm-prepare's shards: trained on as they are, every byte kept."""
    before = tree_digest(data)
    assert len([n for n in before if n.endswith(".tar")]) == 9
    args = [sys.executable, str(Path(__file__).resolve().parents[2] / "trainer" / "main.py"),
            f"data.shards={data}", f"run.dir={tmp_path / 'run'}", "model.image_size=16", "train.batch_size=8",
            "train.total_images=16", "train.warmup_images=8", "checkpoint.every_images=16",
            "log.every_images=8", "log.sample_every_images=0"]
    job = run(args)
    assert job.proc.returncode == 0, job.report()
    said = [ln for ln in job.stdout.splitlines() if "the trainer did not make" in ln]
    assert len(said) == 1 and str(data) in said[0], job.report()
    assert tree_digest(data) == before
