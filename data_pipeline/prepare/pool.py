"""Running prepare's tasks: a spawn pool that stops at once on Ctrl-C or a failed task, and the bars."""

from __future__ import annotations

import multiprocessing as mp
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any


def say(verbose: bool, msg: str) -> None:
    """A line for the user on stderr (stdout carries only the manifest path)."""
    if verbose:
        print(msg, file=sys.stderr, flush=True)


def _worker_init() -> None:
    """Pool workers leave Ctrl-C to the parent, which terminates them (no traceback per worker)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_tasks(
    fn: Callable[[Any], dict], tasks: list, workers: int, on_done: Callable[[dict], None]
) -> None:
    """Run tasks in a spawn pool (or in-process); on_done(record) as each finishes.

    The first failed task (a full disk, a read-only folder) or a Ctrl-C terminates every worker
    now and is raised here: nothing keeps writing, no process is left behind.
    """
    if workers > 0 and len(tasks) > 1:
        main = threading.current_thread() is threading.main_thread()
        # Children start with SIGINT ignored (the disposition survives exec, and Python keeps it),
        # so a Ctrl-C during their start-up cannot print a traceback either.
        old = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            # spawn, not fork: safe next to threads (tqdm) and LMDB handles in the parent.
            pool = mp.get_context("spawn").Pool(min(workers, len(tasks)), initializer=_worker_init)
        finally:
            if main:
                signal.signal(signal.SIGINT, old)
        try:
            for rec in pool.imap_unordered(
                fn, tasks
            ):  # completion order: a failure arrives at once
                on_done(rec)
            pool.close()
        except BaseException:
            pool.terminate()  # Ctrl-C or an error: stop the workers now, keep what is finished
            raise
        finally:
            pool.join()
    else:
        for task in tasks:
            on_done(fn(task))


class Bar:
    """A tqdm bar on stderr, or nothing."""

    def __init__(self, show: bool, total: int, initial: int, desc: str, unit: str) -> None:
        self.bar = None
        if show and total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit=unit, desc=desc, file=sys.stderr)

    def update(self) -> None:
        """One more task done."""
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        """Leave the bar's last state on the terminal."""
        if self.bar is not None:
            self.bar.close()
