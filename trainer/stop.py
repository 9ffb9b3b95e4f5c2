"""Stop requests and faults, agreed by all ranks: a signal or a storage fault on any rank becomes
a stop at the same step on every rank (one all-reduce of a few host integers per step).
"""

from __future__ import annotations

import logging
import signal
from typing import Any

from data_pipeline.storage import DirWatch, StorageError
from trainer import distributed as du

log = logging.getLogger("ddpm")


class Agreement:
    """What every rank agreed on at one step: a signal to stop at, or a rank's storage fault; and
    the newest checkpoint known complete (rank 0 writes it in the background)."""

    def __init__(self, signum: int, fault_rank: int | None, committed_nimg: int = 0) -> None:
        self.signum = signum
        self.fault_rank = fault_rank
        self.committed_nimg = committed_nimg

    @property
    def signal(self) -> str | None:
        """The agreed signal's name (SIGTERM, SIGUSR2, ...) or None."""
        return signal.Signals(self.signum).name if self.signum else None

    def __bool__(self) -> bool:
        return bool(self.signum) or self.fault_rank is not None


class StopRequest:
    """Turns SIGTERM/SIGINT/SIGUSR1/SIGUSR2 on any rank, or a storage fault noted on any rank, into
    one agreed stop step.

    The handler only sets a flag; ``agreed()`` all-reduces the flags (MAX) so every rank sees the
    same answer at the same step and they stop together. A fault stops without a checkpoint (the
    disk that failed would take it); a signal stops with one.
    """

    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self, watch: DirWatch | None = None) -> None:
        self.received: int | None = None
        self.fault: BaseException | None = None
        self.watch = watch  # the run directory: its filesystem going away is a fault too
        self._previous: dict[int, Any] = {}

    def install(self) -> StopRequest:
        """Install the handlers (main thread only)."""
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self) -> None:
        """Restore the previous handlers."""
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is None:
            log.warning(
                "rank %d received %s: stopping at the next step with a checkpoint",
                du.get_rank(), signal.Signals(signum).name,
            )
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C aborts at once
        self.received = signum

    def note_fault(self, e: BaseException) -> None:
        """Remember this rank's first storage fault; every rank stops at the next agreement."""
        if self.fault is None:
            self.fault = e
            log.info("storage fault noted, stopping at the next step: %s", e)

    def check_run_dir(self) -> None:
        """Note a run directory whose filesystem went away (one stat). It is the cause of whatever
        else failed with it (a write that found no folder), so its line replaces theirs."""
        vanished = self.watch.fault() if self.watch is not None else None
        if vanished is not None and not (isinstance(self.fault, StorageError) and self.fault.kind == "vanished"):
            self.fault = None
            self.note_fault(vanished)

    def agreed(self, committed_nimg: int = 0) -> Agreement:
        """On every rank the same answer: the received signal (MAX picks SIGTERM (15) over SIGUSR2
        (12), SIGUSR1 (10) and SIGINT (2): a cancel or preemption wins over a time-limit warning),
        the highest rank that noted a storage fault, and the newest complete checkpoint (``images``
        of it: rank 0 knows it). One collective."""
        self.check_run_dir()
        mine = [int(self.received or 0), du.get_rank() + 1 if self.fault is not None else 0, int(committed_nimg)]
        signum, fault, committed = du.all_reduce_max_ints(mine)
        return Agreement(signum, fault - 1 if fault else None, committed)

    def fault_message(self, agreement: Agreement) -> str:
        """The faulting rank's one line, on every rank (a broadcast from it: only when stopping for a fault)."""
        src = int(agreement.fault_rank or 0)
        mine = str(self.fault) if self.fault is not None and du.get_rank() == src else None
        line = du.broadcast_object(mine, src=src) or "a storage fault"
        where = f" (rank {src})" if du.get_world_size() > 1 else ""
        return f"storage error{where}: {line}; the newest complete checkpoint is kept"
