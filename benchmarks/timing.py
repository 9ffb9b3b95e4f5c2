"""The one way benchmarks/ times things: warm-up, interleaved arms, medians and ratios, CPU-seconds, JSON.

Every comparison runs its arms round-robin in one process (A, B, A, B, ...), so the load of a
shared machine hits all of them alike; the report gives each arm's median, its runs and its
ratio to the first arm. On a shared machine CPU-seconds are the fairer clock: ``rate`` and
``stream_rate`` report items per CPU-second next to items per wall-second.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class UsageError(Exception):
    """A user's mistake found before any work starts: one line on stderr, exit code 2."""


def sync(device: Any = None) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so a clock reads finished work."""
    if device is not None and getattr(device, "type", device) == "cuda":
        import torch

        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: Any = None) -> float:
    """Wall seconds of one call of ``fn``, the device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def interleave(arms: Mapping[str, Callable[[], T]], repeats: int, warmup: int = 0) -> dict[str, list[T]]:
    """Call the arms round-robin ``warmup + repeats`` times; the results of the last ``repeats`` rounds."""
    out: dict[str, list[T]] = {name: [] for name in arms}
    for i in range(warmup + repeats):
        for name, fn in arms.items():
            value = fn()
            if i >= warmup:
                out[name].append(value)
    return out


def time_arms(arms: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 1,
              device: Any = None) -> dict[str, list[float]]:
    """Seconds per call of each arm, interleaved (see ``interleave``)."""
    return interleave({name: (lambda f=fn: timed(f, device)) for name, fn in arms.items()}, repeats, warmup)


def median(values: Iterable[float]) -> float:
    """The median (NaN for no values)."""
    vals = [v for v in values if v == v]  # drop NaN
    return statistics.median(vals) if vals else float("nan")


def summarize(samples: Mapping[str, Sequence[float]], base: str | None = None) -> dict[str, dict[str, Any]]:
    """Per arm: its median, its runs, and ``ratio`` = its median / the median of ``base`` (the first arm)."""
    meds = {name: median(v) for name, v in samples.items()}
    base = base if base is not None else next(iter(samples), None)
    ref = meds.get(base, float("nan")) if base is not None else float("nan")
    return {name: {"median": meds[name], "runs": list(v),
                   "ratio": meds[name] / ref if ref and ref == ref else float("nan")}
            for name, v in samples.items()}


# ----------------------------------------------------------------------------- rates and CPU time


def rate(fn: Callable[[], int], seconds: float) -> tuple[float, float]:
    """(items per wall second, items per CPU second of this process) of repeated ``fn()`` calls.

    ``fn`` returns how many items it handled; one call is a warm-up, then calls repeat for ``seconds``.
    """
    fn()
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while True:
        n += fn()
        wall = time.perf_counter() - t0
        if wall >= seconds:
            break
    cpu = time.process_time() - c0
    return n / wall, (n / cpu if cpu > 0 else float("nan"))


def child_pids() -> set[int]:
    """Process ids whose parent is this process (Linux /proc): DataLoader workers, whoever built them."""
    me, found = os.getpid(), set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == me:
            found.add(int(entry))
    return found


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU seconds of processes (Linux /proc); a process gone meanwhile counts 0."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def stream_rate(batches: Iterable[Any], seconds: float, warmup_batches: int = 3) -> dict[str, Any]:
    """Images per wall second and per CPU-second of the loading processes, after ``warmup_batches``.

    The CPU clock is the worker processes this iteration started (children that appear with it);
    an in-process loader's is this process. Also returns the first batch's image shape.
    """
    before = child_pids()
    it = iter(batches)
    first = next(it)  # worker start-up and the first shard opens are not throughput
    for _ in range(warmup_batches - 1):
        next(it)
    workers = sorted(child_pids() - before)
    clock = (lambda: cpu_seconds(workers)) if workers else time.process_time
    n, t0, c0 = 0, time.perf_counter(), clock()
    for b in it:  # a loader is endless; a finite iterable ends the measurement early
        n += len(b["image"] if isinstance(b, dict) else b[0])
        if time.perf_counter() - t0 >= seconds:
            break
    wall, cpu = time.perf_counter() - t0, clock() - c0
    image = first["image"] if isinstance(first, dict) else first[0]
    return {"images_per_s": n / wall, "images_per_cpu_s": n / cpu if cpu > 0 else float("nan"),
            "images": n, "processes": len(workers) or 1, "batch_shape": list(image.shape),
            "dtype": str(image.dtype).replace("torch.", "")}


# ----------------------------------------------------------------------------- the command line and the report


def add_common_args(p: argparse.ArgumentParser, *, repeats: int, warmup: int | None = None) -> None:
    """--repeats, --warmup (where the benchmark has one) and --json, the same in every benchmark."""
    p.add_argument("--repeats", type=int, default=repeats,
                   help=f"timed repetitions per arm, interleaved; medians reported (default {repeats})")
    if warmup is not None:
        p.add_argument("--warmup", type=int, default=warmup,
                       help=f"untimed repetitions first (compile, caches; default {warmup})")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the figures to this JSON file")


def explicit(p: argparse.ArgumentParser, argv: Sequence[str] | None) -> set[str]:
    """The options the user gave on the command line (by dest), defaults left out."""
    unset = object()
    saved = [(a, a.default) for a in p._actions]
    try:
        for a, _ in saved:
            a.default = unset
        ns = p.parse_args(argv)
    finally:
        for a, d in saved:
            a.default = d
    return {k for k, v in vars(ns).items() if v is not unset}


def refuse_unused(given: set[str], unused: Sequence[str], why: str) -> None:
    """UsageError if any option in ``unused`` was given: it would be silently ignored (``why``)."""
    hit = [n for n in unused if n in given]
    if hit:
        names = ", ".join("--" + n.replace("_", "-") for n in hit)
        raise UsageError(f"{names} {'has' if len(hit) == 1 else 'have'} no effect {why}")


def check_common_args(args: argparse.Namespace) -> None:
    """Refuse counts that cannot be honoured."""
    if args.repeats < 1:
        raise UsageError(f"--repeats must be >= 1, got {args.repeats}")
    if getattr(args, "warmup", 0) < 0:
        raise UsageError(f"--warmup must be >= 0, got {args.warmup}")


def environment() -> dict[str, Any]:
    """Where the figures come from: host, versions, cores, load."""
    import torch

    env: dict[str, Any] = {"host": platform.node(), "python": platform.python_version(),
                           "torch": torch.__version__, "cpu_count": os.cpu_count(),
                           "torch_threads": torch.get_num_threads(),
                           "load_average": round(os.getloadavg()[0], 2)}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def command(module: str, argv: Sequence[str] | None) -> str:
    """The command line that reproduces a report."""
    return " ".join(["python -m", module, *(sys.argv[1:] if argv is None else argv)])


def write_json(path: str | os.PathLike, payload: Mapping[str, Any]) -> Path:
    """Write a report atomically (data_pipeline.storage: a reader never sees half a file)."""
    from data_pipeline.storage import atomic_write

    text = json.dumps(payload, indent=2, default=str, allow_nan=True) + "\n"
    return atomic_write(path, text, what="benchmark report")


def report(module: str, argv: Sequence[str] | None, args: argparse.Namespace,
           results: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON document every benchmark writes: its command, options, environment and results."""
    return {"benchmark": module, "command": command(module, argv),
            "options": {k: v for k, v in vars(args).items()}, "environment": environment(),
            "results": dict(results)}


def finish(module: str, argv: Sequence[str] | None, args: argparse.Namespace, results: Mapping[str, Any]) -> None:
    """Write the report to --json, if asked, and say where."""
    if getattr(args, "json", None):
        path = write_json(args.json, report(module, argv, args, results))
        print(f"report: {path}")


def run_cli(prog: str, main: Callable[[], int]) -> int:
    """Run a benchmark's main; a UsageError becomes one line on stderr and exit code 2."""
    try:
        return main()
    except UsageError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
