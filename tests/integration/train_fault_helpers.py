"""The trainer as a user runs it, for the fault suite: a job whose output lines are time-stamped as
they arrive, that can be paused while a fault is set up, and the checks every fault case makes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "configs" / "tiny.yaml"

# tiny.yaml made smaller and faster: a 16-channel UNet (a 4.5 MB checkpoint), 24 steps of 8 images,
# a checkpoint every 2 steps, a log line and an EMA snapshot every step, sample grids every 6 steps,
# and rank records and the run lock refreshed every second (dist.timeout_s / 6), so a fault under
# any of them shows within a few steps.
FAST = ["model.base_channels=16", "model.norm_groups=8", "train.total_images=192", "train.warmup_images=16",
        "checkpoint.every_images=16", "log.every_images=8", "log.sample_every_images=48", "log.sample_steps=2",
        "dist.timeout_s=6", "ema.snapshot_every_images=8"]
FINAL = "ckpt-000000000192.pt"


def command(nproc: int = 1) -> list[str]:
    """python trainer/main.py, or torchrun with ``nproc`` processes on this host."""
    main = str(REPO / "trainer" / "main.py")
    if nproc == 1:
        return [sys.executable, main]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", main]


def environment(**extra: str) -> dict[str, str]:
    """The caller's environment, the repository importable, one thread per process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    for key in ("WORLD_SIZE", "RANK", "TORCHINDUCTOR_CACHE_DIR", "TORCHELASTIC_ERROR_FILE"):
        env.pop(key, None)
    env.update(extra)
    return env


def train_args(run: Path, data: str | Path, *overrides: str, nproc: int = 1, config: Path | None = TINY) -> list[str]:
    """The training command on ``run`` and ``data`` with the fault suite's small settings."""
    head = ["--config", str(config)] if config is not None else []
    return command(nproc) + head + [f"run.dir={run}", f"data.shards={data}", *FAST, *overrides]


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (torchrun's workers run in their own sessions)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += parents.get(p, [])
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class Job:
    """A training command running in its own session; stdout and stderr lines with their arrival times."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.args = args
        self.started = time.monotonic()
        self.proc = subprocess.Popen(args, cwd=REPO, env=env or environment(), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.out: list[tuple[float, str]] = []
        self.err: list[tuple[float, str]] = []
        self.ended: float | None = None
        self.seen: list[int] = []  # the job's processes when it was last paused
        self._readers = [threading.Thread(target=self._read, args=(s, lines), daemon=True)
                         for s, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self._readers:
            t.start()

    @staticmethod
    def _read(stream, lines: list[tuple[float, str]]) -> None:
        for line in stream:
            lines.append((time.monotonic(), line.rstrip("\n")))

    @property
    def stdout(self) -> str:
        return "\n".join(line for _, line in self.out)

    @property
    def stderr(self) -> str:
        return "\n".join(line for _, line in self.err)

    def report(self) -> str:
        """Both streams, for an assertion message."""
        return f"\nSTDOUT:\n{self.stdout[-5000:]}\nSTDERR:\n{self.stderr[-5000:]}"

    def wait(self, timeout: float = 300) -> int:
        """The exit code; the whole job is killed (and the test fails) if it outlives ``timeout``."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{' '.join(self.args)} did not exit within {timeout} s{self.report()}") from None
        self.ended = time.monotonic()
        for t in self._readers:
            t.join(timeout=10)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the job and everything it started."""
        for pid in reversed(descendants(self.proc.pid)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Stop every process of the job (SIGSTOP) for the block, so a fault lands mid-run."""
        pids = self.seen = descendants(self.proc.pid)
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass

    def wait_for(self, ready: Callable[[], bool], timeout: float = 240, what: str = "") -> None:
        """Poll until ``ready()``; fail if the job ends first or it takes longer than ``timeout``."""
        deadline = time.monotonic() + timeout
        while not ready():
            if self.proc.poll() is not None:
                self.wait()
                raise AssertionError(f"the job ended (exit {self.proc.returncode}) before {what}{self.report()}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"no {what} within {timeout} s{self.report()}")
            time.sleep(0.02)

    def left_behind(self, grace_s: float = 10.0) -> list[int]:
        """Processes of the job seen while paused (workers, torchrun's ranks) still alive after it
        exited, once ``grace_s`` is over (zombies count as gone)."""
        deadline = time.monotonic() + grace_s
        while True:
            alive = [p for p in self.seen if _alive(p)]
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.1)

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.kill()


def run(args: list[str], timeout: float = 300, env: dict[str, str] | None = None) -> Job:
    """Run a command to its end."""
    job = Job(args, env)
    job.wait(timeout)
    return job


def latest(run_dir: Path) -> str:
    """The checkpoint ``latest`` names ('' when none)."""
    try:
        return (run_dir / "checkpoints" / "latest").read_text().strip()
    except OSError:
        return ""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint's model and EMA shadows, by name."""
    s = torch.load(path, map_location="cpu", weights_only=True)
    out = {f"model.{k}": v for k, v in s["model"].items()}
    for i, shadow in enumerate(s["ema"]["shadows"]):
        out.update({f"ema{i}.{k}": v for k, v in shadow.items()})
    return out


def assert_same_weights(a: Path, b: Path) -> None:
    """Bit-exact: the same tensors, every one ``torch.equal``."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    unequal = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not unequal, f"{len(unequal)} tensors differ, e.g. {unequal[:3]}"


def partial_files(run_dir: Path) -> list[Path]:
    """Temporary files of interrupted writes left anywhere in the run directory."""
    return [p for p in run_dir.rglob("*") if p.name.endswith(".tmp") and p.name != ".filler"]


def error_lines(job: Job) -> list[str]:
    """The non-empty lines on stderr."""
    return [line for _, line in job.err if line.strip()]


def mount(*args: str) -> None:
    """mount(8) with ``args``; a failure fails the test (the suite runs as root, never skips)."""
    proc = subprocess.run(["mount", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"mount {' '.join(args)} failed: {proc.stderr.strip()}")


def umount(path: Path, lazy: bool = False) -> None:
    """Unmount ``path`` (retried while a write holds it; lazily as the last resort)."""
    for _ in range(40):
        if subprocess.run(["umount", *(["-l"] if lazy else []), str(path)], capture_output=True).returncode == 0:
            return
        time.sleep(0.25)
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount(path: Path, mode: str, job: Job | None = None) -> None:
    """Switch the bind mount at ``path`` to ``mode`` ('ro' or 'rw'); while ``job`` is paused when
    given (retried: a file open for writing, e.g. a checkpoint mid-write, makes it busy)."""
    for _ in range(100):
        with job.paused() if job is not None else contextlib.nullcontext():
            proc = subprocess.run(["mount", "-o", f"remount,bind,{mode}", str(path)], capture_output=True, text=True)
        if proc.returncode == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"remount {mode} of {path} failed: {proc.stderr.strip()}")


@contextmanager
def bind(src: Path, dst: Path) -> Iterator[Path]:
    """Bind-mount ``src`` at ``dst`` for the block (unmounted at the end if still mounted)."""
    dst.mkdir(parents=True, exist_ok=True)
    mount("--bind", str(src), str(dst))
    try:
        yield dst
    finally:
        if mounted(dst):  # (os.path.ismount misses a folder bound onto itself)
            umount(dst)


def mounted(path: Path) -> bool:
    """Whether ``path`` is a mount point now (from /proc/self/mounts)."""
    target = str(path.absolute())
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == target for line in f)
