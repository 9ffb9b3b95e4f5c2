"""What a person watches: one console line per log interval and TensorBoard (rank 0 only).

Metrics arrive already reduced over ranks. After a resume the writer purges
events at or after the resumed step, so curves never duplicate.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

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
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file)
        fh.setFormatter(fmt)
        root.addHandler(fh)


def format_duration(seconds: float) -> str:
    """``3d 04:05:06`` style."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d " if d else "") + f"{h:02d}:{m:02d}:{s:02d}"


class Monitor:
    """TensorBoard writer and console printer; a no-op on ranks other than 0."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, purge_step: int | None) -> None:
        self.enabled = enabled
        self.writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events logged at or after the resumed step by an
            # interrupted run, so curves do not fold back on themselves.
            self.writer = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=purge_step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Log scalars under their tags at ``step``."""
        if self.writer is None:
            return
        for tag, v in values.items():
            if v is not None and math.isfinite(v):
                self.writer.add_scalar(tag, v, step)

    def image(self, tag: str, image_uint8: torch.Tensor, step: int) -> None:
        """Log one (3, H, W) uint8 image."""
        if self.writer is not None:
            self.writer.add_image(tag, image_uint8, step)

    def text(self, tag: str, text: str, step: int) -> None:
        """Log markdown text (e.g. the evaluation protocol)."""
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        """The run's hyperparameters with its final metrics (TensorBoard HPARAMS tab)."""
        if self.writer is not None:
            clean = {k: (v if isinstance(v, int | float | str | bool) else str(v)) for k, v in hparams.items()}
            self.writer.add_hparams(clean, metrics, run_name=".")

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
            self.writer.flush()

    def close(self) -> None:
        """Close the event file."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None


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
