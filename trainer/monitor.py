"""What a person watches: one console line per log interval and TensorBoard (rank 0 only).

Metrics arrive already reduced over ranks. After a resume the writer purges
events at or after the resumed step, so curves never duplicate. A write that fails for the storage
(full disk, read-only filesystem) does not raise here: it goes to ``on_fault`` (the stop request),
and every rank stops at the next agreed step with one line naming the path.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from data_pipeline.storage import existing_parent, find_fault, is_fault, storage_error

log = logging.getLogger("ddpm")


def setup_logging(rank: int, log_file: Path | None = None) -> None:
    """Console logging on rank 0 (warnings and errors from every rank), plus a per-rank log file.

    Progress and warnings go to stdout, errors to stderr: the line that names a fix lands where
    a shell (``2>``) and SLURM (``*_log.err``) keep errors.
    """
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(message)s", "%Y-%m-%d %H:%M:%S")
    root = logging.getLogger("ddpm")
    root.setLevel(logging.INFO)
    root.propagate = False
    for h in list(root.handlers):
        root.removeHandler(h)
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    console.addFilter(lambda record: record.levelno < logging.ERROR)
    root.addHandler(console)
    errors = logging.StreamHandler(sys.stderr)
    errors.setFormatter(fmt)
    errors.setLevel(logging.ERROR)
    root.addHandler(errors)
    if log_file is not None:
        try:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            fh = FaultAwareFileHandler(log_file)
        except OSError as e:  # log to the console only
            if not (is_fault(e) and not os.access(existing_parent(log_file), os.W_OK)):
                root.warning("cannot write the log file %s (%s)", log_file, e.strerror or e)
            # else an unwritable run directory: start-up's check names it in one line (exit 2)
            return
        fh.setFormatter(fmt)
        root.addHandler(fh)


class FaultAwareFileHandler(logging.FileHandler):
    """A log file that reports a storage fault once (to ``on_fault``) instead of a traceback per record."""

    on_fault: Callable[[BaseException], None] | None = None

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        err = sys.exc_info()[1]
        if err is not None and is_fault(err):
            if self.on_fault is not None and not getattr(self, "_reported", False):
                self._reported = True
                self.on_fault(storage_error(err, self.baseFilename, what="log file"))
            return
        super().handleError(record)


def route_log_faults(on_fault: Callable[[BaseException], None]) -> None:
    """Send storage faults of the ddpm log files to ``on_fault`` (the stop request)."""
    for h in logging.getLogger("ddpm").handlers:
        if isinstance(h, FaultAwareFileHandler):
            h.on_fault = on_fault


def format_duration(seconds: float) -> str:
    """``3d 04:05:06`` style."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d " if d else "") + f"{h:02d}:{m:02d}:{s:02d}"


# The metrics the HPARAMS tab shows for a run (scalar tags of this run, filled in as they are logged).
HPARAM_METRICS = ("train/loss", "val/loss", "eval/fid")


class Monitor:
    """TensorBoard writer and console printer; a no-op on ranks other than 0.

    ``on_fault`` receives a storage fault of the event files (then TensorBoard writing stops);
    without it such a fault raises. TensorBoard writes in a background thread that dies on the
    error (printing a traceback) and re-raises it at the next add or flush: the thread's error goes
    to ``on_fault`` at once instead, and the next write finds it too.
    """

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, purge_step: int | None,
                 on_fault: Callable[[BaseException], None] | None = None) -> None:
        self.enabled = enabled
        self.writer = None
        self.on_fault = on_fault
        self.dir = run_dir / "tb"
        self._previous_hook = None
        if enabled and tensorboard and on_fault is not None:
            self._previous_hook = threading.excepthook
            threading.excepthook = self._writer_thread_failed
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events logged at or after the resumed step by an
            # interrupted run, so curves do not fold back on themselves.
            self._guard(lambda: setattr(self, "writer", SummaryWriter(log_dir=str(self.dir),
                                                                      purge_step=purge_step)))

    def _writer_thread_failed(self, args: threading.ExceptHookArgs) -> None:
        """threading.excepthook while TensorBoard writes: its writer thread's OSError is a fault, quietly."""
        if isinstance(args.exc_value, OSError) and type(args.thread).__module__.startswith("tensorboard"):
            self.on_fault(storage_error(args.exc_value, self.dir, what="TensorBoard events"))
        elif self._previous_hook is not None:
            self._previous_hook(args)

    def _guard(self, write: Callable[[], Any]) -> None:
        """Run one TensorBoard write; a storage fault goes to on_fault and ends TensorBoard writing.

        Any OSError counts: the event writer does nothing but file I/O, and a folder that vanished
        with its filesystem gives ENOENT.
        """
        try:
            write()
        except Exception as e:
            fault = e if isinstance(e, OSError) else find_fault(e)
            if fault is None or self.on_fault is None:
                raise
            self.writer = None
            self.on_fault(storage_error(fault, self.dir, what="TensorBoard events"))

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Log scalars under their tags at ``step``."""
        if self.writer is None:
            return

        def write() -> None:
            for tag, v in values.items():
                if v is not None and math.isfinite(v):
                    self.writer.add_scalar(tag, v, step)

        self._guard(write)

    def image(self, tag: str, image_uint8: torch.Tensor, step: int) -> None:
        """Log one (3, H, W) uint8 image."""
        if self.writer is not None:
            self._guard(lambda: self.writer.add_image(tag, image_uint8, step))

    def text(self, tag: str, text: str, step: int) -> None:
        """Log markdown text (e.g. the evaluation protocol)."""
        if self.writer is not None:
            self._guard(lambda: self.writer.add_text(tag, text, step))

    def run_info(self, config_yaml: str, flat_config: dict[str, Any], step: int) -> None:
        """At the start of every (re)start: the resolved config as text and the HPARAMS entry of this run.

        The hparams session is written into the run's own event file, so the HPARAMS tab lists the
        run from its first minute and fills its metric columns (HPARAM_METRICS) from the run's own
        scalars as they are logged.
        """
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams

        clean = {k: (v if isinstance(v, int | float | str | bool) else str(v)) for k, v in flat_config.items()}
        exp, ssi, sei = hparams(clean, {m: 0.0 for m in HPARAM_METRICS})

        def write() -> None:
            self.writer.add_text("config", "```yaml\n" + config_yaml + "\n```", step)
            for summary in (exp, ssi, sei):
                self.writer.file_writer.add_summary(summary, step)

        self._guard(write)

    def console(self, step: int, total_steps: int, nimg: int, values: dict[str, float],
                elapsed: float, start_step: int) -> None:
        """One concise line: progress, loss, throughput, data wait, lr, ETA."""
        if not self.enabled:
            return
        done = step - start_step
        eta = elapsed / done * (total_steps - step) if done > 0 else float("nan")
        log.info(
            "step %d/%d | kimg %.1f | loss %.4f | %.1f img/s | data %.0f%% | lr %.2e | gnorm %.3f | ETA %s",
            step, total_steps, nimg / 1000, values.get("train/loss", float("nan")),
            values.get("perf/images_per_s", float("nan")), 100 * values.get("perf/data_wait_frac", 0.0),
            values.get("train/lr", float("nan")), values.get("train/grad_norm", float("nan")),
            format_duration(eta),
        )

    def flush(self) -> None:
        """Flush the event file."""
        if self.writer is not None:
            self._guard(self.writer.flush)

    def close(self) -> None:
        """Close the event file."""
        if self.writer is not None:
            self._guard(self.writer.close)
            self.writer = None
        if self._previous_hook is not None:
            threading.excepthook, self._previous_hook = self._previous_hook, None


class Stopwatch:
    """Accumulates wall time per phase between log steps (data wait, pauses)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.t0 = time.perf_counter()

    def add(self, name: str, seconds: float) -> None:
        """Add time to one phase."""
        self.totals[name] = self.totals.get(name, 0.0) + seconds

    def lap(self) -> tuple[float, dict[str, float]]:
        """Start a new interval; return the wall time and the phase totals of the one that ended."""
        now = time.perf_counter()
        wall, self.t0 = now - self.t0, now
        phases, self.totals = self.totals, {}
        return wall, phases
