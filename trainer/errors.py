"""Exit codes, the same for every command and under SLURM, and the one line behind each.

    0   done
    2   a user's mistake found before work starts (config, data set-up, a missing optional
        dependency, an unwritable or too small run directory): one line naming the fix
    74  a storage fault while working (full disk, quota, read-only or vanished filesystem):
        one line naming the path, the space needed and free, and the fix; never requeued
    75  stopped by a signal at a checkpoint: run the same command again to resume
    1   a crash, with its traceback in the log
    130 interrupted before a checkpoint could be written (the last complete one is kept)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from data_pipeline.config import SetupError
from data_pipeline.storage import EXIT_STORAGE, StorageError, find_fault, storage_error

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2
EXIT_REQUEUE = 75  # EX_TEMPFAIL: "resume me"
EXIT_INTERRUPTED = 130


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row."""


class StorageFault(RuntimeError):
    """A rank stopped because one rank of the job hit a storage fault (the message names it)."""


@dataclass(frozen=True)
class Outcome:
    """How a command ended: its exit code, and for a stop (75) the signal all ranks agreed on."""

    code: int
    signal: str | None = None


def _written(e: BaseException, fault: OSError) -> tuple[str, str]:
    """(path, what) a bare OSError was writing: its file name, else torch.compile's cache when the
    compiler raised it (its ENOSPC from a write() names no file)."""
    if fault.filename:
        return str(fault.filename), ""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if type(e).__module__.startswith(("torch._inductor", "torch._dynamo")):
            return os.environ.get("TORCHINDUCTOR_CACHE_DIR", "?"), "torch.compile cache"
        e = e.__cause__ or e.__context__
    return "?", ""


def classify(e: BaseException, *, started: bool = True) -> tuple[int, str | None]:
    """(exit code, one line or None for a crash) for an exception that ended a command.

    ``started``: work had begun; a storage fault before it is a set-up mistake (exit 2).
    """
    if isinstance(e, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted: exiting without writing a checkpoint; the last complete one is kept"
    if isinstance(e, SetupError):
        return EXIT_CONFIG, f"config error: {e}"
    if isinstance(e, StorageFault):
        return EXIT_STORAGE, str(e)
    fault = find_fault(e)
    if fault is not None:
        path, what = _written(e, fault)
        err = fault if isinstance(fault, StorageError) else storage_error(fault, path, what=what)
        return (EXIT_STORAGE if started else EXIT_CONFIG), f"storage error: {err}"
    if isinstance(e, NonFiniteLossError):
        return EXIT_ERROR, str(e)
    return EXIT_ERROR, None
