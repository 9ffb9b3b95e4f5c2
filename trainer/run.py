"""The parts of one training run, built once by small build_* functions and held together, so the
loop's helpers take the run instead of ten arguments; plus resume and checkpoint through the
registry of stateful parts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from data_pipeline.storage import StorageError, atomic_write, fmt_bytes, free_bytes
from models.diffusion import GaussianDiffusion
from trainer import distributed as du
from trainer import startup
from trainer.audit import Audit, clean_for_resume
from trainer.build import (
    build_data,
    build_model,
    build_optimizer,
    memory_format,
    parallelize,
    resolve_precision,
)
from trainer.checkpoint import CheckpointManager, StateRegistry
from trainer.config import (
    BatchPlan,
    Config,
    ConfigError,
    fingerprint,
    fingerprint_diff,
    flatten,
    to_dict,
    to_yaml,
)
from trainer.ema import EMA
from trainer.ema_snapshots import (
    SnapshotWriter,
    prune_after,
    snapshot_bytes,
    snapshot_dir,
    snapshot_interval,
)
from trainer.evaluation.evaluator import Evaluator, build_evaluator
from trainer.evaluation.validation import load_validation_images
from trainer.loss import DiffusionLoss, seed_for
from trainer.monitor import Monitor, Stopwatch, route_log_faults
from trainer.run_lock import RunLock, StepRecord
from trainer.step import StepStats
from trainer.stop import StopRequest

log = logging.getLogger("ddpm")


@dataclass
class TrainState:
    """The loop's own state; everything else lives in the parts' state dicts."""

    nimg: int = 0  # training images seen, all ranks together
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss or gradient
    best_fid: float = float("inf")

    def state_dict(self) -> dict[str, Any]:
        """Plain numbers (weights_only-safe)."""
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from ``state_dict()`` output (unknown keys of other versions are ignored)."""
        for f in dataclasses.fields(self):
            if f.name in state:
                setattr(self, f.name, type(getattr(self, f.name))(state[f.name]))


@dataclass
class Progress:
    """Where this (re)start began: intervals, throughput and ETA are measured from here."""

    start_nimg: int
    global_batch: int
    last_log_nimg: int = 0
    t_start: float = field(default_factory=time.perf_counter)

    @property
    def start_step(self) -> int:
        """The step this process started (or resumed) at."""
        return self.start_nimg // self.global_batch

    def due(self, interval: int, nimg: int) -> bool:
        """True when ``nimg`` is a multiple of ``interval`` reached by this process (0 = never)."""
        return interval > 0 and nimg % interval == 0 and nimg > self.start_nimg


class GatheredLoader:
    """The loader as a checkpoint part: its state is every rank's cursor (a collective to save)."""

    def __init__(self, loader: Any, info: du.DistInfo) -> None:
        self.loader, self.info = loader, info

    def state_dict(self) -> Any:
        """This rank's cursor; the registry gathers every rank's (``gathered=("loader",)``)."""
        return self.loader.state_dict()

    def load_state_dict(self, states: list[Any]) -> None:
        """Hand every old rank's cursor to the loader, which resumes its order from them."""
        self.loader.load_rank_states(list(states), self.info.rank, self.info.world_size)


@dataclass
class Run:
    """Everything one training run holds, built by ``build_run``."""

    cfg: Config
    plan: BatchPlan
    info: du.DistInfo
    lock: RunLock | None
    record: StepRecord
    loader: Any
    model: nn.Module  # the unwrapped, uncompiled module: its state_dict has no prefixes
    ema: EMA
    optimizer: torch.optim.Optimizer
    fused: bool
    diffusion: GaussianDiffusion
    ckpt: CheckpointManager
    registry: StateRegistry
    state: TrainState
    stop: StopRequest
    # after resume: the rest of the run
    train_model: nn.Module | None = None
    ema_model: nn.Module | None = None
    loss: DiffusionLoss | None = None
    progress: Progress | None = None
    monitor: Monitor | None = None
    evaluator: Evaluator | None = None
    validation: tuple | None = None
    stats: StepStats | None = None
    audit: Audit | None = None
    snapshots: SnapshotWriter | None = None  # rank 0's writer of the power profiles' snapshots
    watch: Stopwatch = field(default_factory=Stopwatch)

    @property
    def device(self) -> torch.device:
        """This rank's device."""
        return self.info.device

    @property
    def step(self) -> int:
        """The optimizer step about to run (images seen // global batch)."""
        return self.state.nimg // self.plan.global_batch


def checkpoint_bytes(model: nn.Module, num_ema: int) -> int:
    """The size of one checkpoint: weights, EMA shadows (fp32; ``num_ema`` = fixed decays + power
    profiles) and AdamW's two moments (fp32)."""
    n = sum(p.numel() for p in model.parameters())
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return weights + 4 * n * (num_ema + 2) + (1 << 20)


def build_run(cfg: Config, plan: BatchPlan, info: du.DistInfo, lock: RunLock | None, record: StepRecord) -> Run:
    """Data first (a bad data path fails before any GPU work), then model, EMA, optimizer; resumed."""
    run_dir = cfg.run_dir
    ckpt = CheckpointManager(run_dir / "checkpoints", cfg.checkpoint.keep_last,
                             cfg.checkpoint.milestone_every_images, cfg.checkpoint.async_write)
    if du.is_main():
        ckpt.remove_partial()  # files of a writer killed mid-write
        startup.remove_compile_partials(run_dir / startup.COMPILE_CACHE)  # and of a compile that met a full disk
    stop = StopRequest(watch=record.watch)  # every step also checks that the run directory is still there
    record.on_fault = stop.note_fault
    if lock is not None:
        lock.on_fault = stop.note_fault
    route_log_faults(stop.note_fault)
    loader = build_data(cfg, plan, info, run_dir)
    torch.manual_seed(seed_for(cfg.run.seed, "init"))  # same initial weights on every rank and every run
    model = build_model(cfg, info.device)
    ema = EMA(model, cfg.ema.decays, cfg.ema.warmup, cfg.ema.sigma_rels)
    optimizer, fused = build_optimizer(model, cfg, info.device)
    diffusion = GaussianDiffusion(cfg.diffusion).to(info.device)
    state = TrainState()
    cfg_dict = to_dict(cfg)
    registry = StateRegistry(
        {"model": model, "ema": ema, "optimizer": optimizer, "loader": GatheredLoader(loader, info),
         "train_state": state},
        {"config": cfg_dict, "fingerprint": fingerprint(cfg_dict)},
        gathered=("loader",),
    )
    run = Run(cfg, plan, info, lock, record, loader, model, ema, optimizer, fused, diffusion, ckpt, registry,
              state, stop)
    resume(run)
    if du.is_main():
        run.snapshots = build_snapshots(run)
    du.run_on_main(lambda: startup.preflight_space(ckpt.dir, checkpoint_bytes(model, len(ema.shadows)),
                                                   cfg.checkpoint.keep_last, len(ckpt.complete_checkpoints())),
                   ConfigError)
    if du.is_main():
        try:
            atomic_write(run_dir / "config.yaml", to_yaml(cfg), what="resolved config")
        except StorageError as e:
            raise ConfigError(str(e)) from None
    return run


def build_snapshots(run: Run) -> SnapshotWriter | None:
    """Rank 0's EMA snapshot writer (None without power profiles), after removing the snapshots taken
    after the checkpoint this start resumed from (the steps it redoes write them again)."""
    cfg, ema = run.cfg, run.ema
    directory = snapshot_dir(cfg.run_dir)
    prune_after(directory, run.state.nimg)
    if not ema.sigma_rels:
        return None
    every = snapshot_interval(cfg.ema.snapshot_every_images, cfg.train.total_images, run.plan.global_batch)
    size = snapshot_bytes(sum(t.numel() for t in ema.power_shadows[0]), len(ema.sigma_rels), len(ema.names))
    total = cfg.train.total_images
    count = len(range(every, total + 1, every)) + (total % every > 0)
    log.info("EMA snapshots of sigma_rel %s every %d images into %s: %s each, %s for the run (%d)",
             ema.sigma_rels, every, directory, fmt_bytes(size), fmt_bytes(size * count), count)
    to_come = size * (len(range(run.state.nimg // every * every + every, total + 1, every)) + (total % every > 0))
    free = free_bytes(directory)
    if free is not None and free < to_come:
        log.warning("the EMA snapshots still to come need %s but %s is free under %s: free space, or raise "
                    "ema.snapshot_every_images", fmt_bytes(to_come), fmt_bytes(free), directory)
    return SnapshotWriter(directory, every, background=cfg.checkpoint.async_write)


def resume(run: Run) -> None:
    """Rank 0 picks the newest usable checkpoint; every rank loads that file. A fresh state if none."""
    cfg = run.cfg
    found = run.ckpt.load_latest(required=run.registry.required) if du.is_main() else None
    path = du.broadcast_object(str(found[1]) if found else None)
    if path is None:
        return
    from trainer.checkpoint import load_checkpoint

    saved = found[0] if found else load_checkpoint(path, required=run.registry.required)
    cfg_dict = to_dict(cfg)
    diff = fingerprint_diff(saved["config"], cfg_dict)
    if diff:
        raise ConfigError(
            f"{cfg.run_dir} holds a run whose model or math differ from this config:\n  "
            + "\n  ".join(diff)
            + "\nUse a new run.dir, or restore these values."
        )
    run.registry.load_state_dict(saved)
    position = getattr(run.loader, "position", None)
    if position is not None and position != run.state.nimg:
        raise RuntimeError(f"{path}: the loader's position {position} is not the images seen {run.state.nimg}")
    log.info("resumed from %s at step %d (%d images)", path, run.step, run.state.nimg)


def finish_building(run: Run) -> None:
    """The parts a resumed run needs from here on: wrapped model, loss, EMA copy, monitors, evaluation."""
    cfg, info = run.cfg, run.info
    run.train_model = parallelize(run.model, cfg, info)
    run.loss = DiffusionLoss(run.diffusion, seed=cfg.run.seed, num_classes=cfg.model.num_classes,
                             label_dropout=cfg.train.label_dropout, device=info.device,
                             memory_format=memory_format(cfg, info.device),
                             amp_dtype=resolve_precision(cfg, info.device))
    run.ema_model = build_model(cfg, info.device).eval().requires_grad_(False)  # holds EMA weights for sampling
    run.progress = Progress(start_nimg=run.state.nimg, global_batch=run.plan.global_batch,
                            last_log_nimg=run.state.nimg)
    start = run.progress.start_step
    # Events logged at the checkpoint's step belong to it; later ones (by an interrupted run) are purged.
    run.monitor = Monitor(cfg.run_dir, du.is_main(), cfg.log.tensorboard,
                          purge_step=start + 1 if run.progress.start_nimg else None, on_fault=run.stop.note_fault)
    run.monitor.run_info(to_yaml(cfg), flatten(to_dict(cfg)), start)
    run.evaluator = build_evaluator(cfg.eval, data_cfg=cfg.data, image_size=cfg.model.image_size,
                                    num_classes=cfg.model.num_classes, device=info.device)  # None when off
    if run.evaluator is not None:
        run.monitor.text("eval/protocol", "```\n" + json.dumps(run.evaluator.protocol(), indent=2) + "\n```", start)
    run.validation = load_validation_images(cfg, info.rank, info.world_size)
    run.stats = StepStats(info.device, run.diffusion.num_timesteps)
    if du.is_main():
        clean_for_resume(cfg.run_dir / "audit", run.state.nimg)  # segments of steps this start redoes
    du.barrier()
    run.audit = Audit(cfg.run_dir, info.rank, cfg.data.audit, run.state.nimg)


def save_checkpoint(run: Run, best: str | None = None) -> None:
    """Every rank sends its loader cursor; rank 0 writes the checkpoint (in the background); the
    audit segment up to here waits for that write to complete."""
    state = run.registry.state_dict()  # a collective: the loader cursors of every rank
    # The EMA snapshots up to here are complete before the checkpoint that a resume would start after
    # them; none is past a snapshot that failed (the run stops at the next agreement instead).
    snapshot_error = run.snapshots.flush() if run.snapshots is not None else None
    if snapshot_error is not None:
        run.stop.note_fault(snapshot_error)
    elif du.is_main():
        run.ckpt.save(state, run.state.nimg, best=best)
    try:
        run.audit.cut(run.state.nimg)
    except OSError as e:
        run.stop.note_fault(e)
