"""The training loop: components from trainer.build, then one loop in fixed, commented blocks
(status, pictures and metrics, checkpoint, done?, step, EMA), as in EDM2's training_loop.

Progress is counted in images (``nimg``); the step index is nimg // global batch. Every
interval derives from nimg; every random draw from (seed, rank, nimg) (see trainer.step).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from data_pipeline.loader import ReshardNeeded
from models.diffusion import GaussianDiffusion
from models.flops import training_flops_per_image
from models.unet import UNet, count_parameters
from trainer import distributed as du
from trainer.build import build_data, build_model, build_optimizer, parallelize, resolve_precision
from trainer.checkpoint import CheckpointManager, load_checkpoint
from trainer.config import (
    BatchPlan,
    Config,
    ConfigError,
    fingerprint,
    fingerprint_diff,
    flatten,
    plan_batches,
    to_dict,
    to_yaml,
)
from trainer.ema import EMA
from trainer.evaluation.evaluator import Evaluator, build_evaluator
from trainer.evaluation.validation import (
    load_validation_images,
    pinned_validation_loss,
    val_fractions,
)
from trainer.monitor import Monitor, Stopwatch
from trainer.sampling import sample_grid
from trainer.step import StepStats, forward_backward, lr_at, memory_gb, optimizer_step, seed_for

log = logging.getLogger("ddpm")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2
EXIT_REQUEUE = 75  # stopped by a signal after writing a checkpoint: "resume me" (EX_TEMPFAIL)

# Name of the signal behind the last EXIT_REQUEUE ("SIGUSR2", "SIGTERM", ...), agreed by all
# ranks; launchers that run the trainer in-process read it (SLURM: USR2 is the time-limit
# warning, so requeue; SIGTERM is scancel or preemption, so do not).
last_stop_signal: str | None = None


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row."""


@dataclass
class TrainState:
    """The loop's own state; everything else lives in the components' state dicts."""

    nimg: int = 0  # training images seen, all ranks together
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss or gradient
    best_fid: float = float("inf")


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


@dataclass
class Trainables:
    """What a checkpoint holds besides the loop state: the registry of state_dicts."""

    model: nn.Module  # the unwrapped, uncompiled module: its state_dict has no prefixes
    ema: EMA
    optimizer: torch.optim.Optimizer
    loader: Any


# ----------------------------------------------------------------------------- checkpoints


def prepare_run_dir(cfg: Config) -> CheckpointManager:
    """Create the run directory (rank 0), drop partial checkpoint files; every rank gets the manager."""
    ckpt = CheckpointManager(cfg.run_dir / "checkpoints", cfg.checkpoint.keep_last,
                             cfg.checkpoint.milestone_every_images, cfg.checkpoint.async_write)
    if du.is_main():
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_partial()
    du.barrier()
    return ckpt


def restore_loader(loader: Any, states: list[Any], rank: int, world_size: int) -> None:
    """Give the loader its cursor back: exact with the same world size and workers, else resharded."""
    if len(states) == world_size:
        try:
            loader.load_state_dict(states[rank])
            return
        except ReshardNeeded as e:  # e.g. data.num_workers changed: the loader asks for the reshard form
            reason = str(e)
    else:
        reason = f"world size changed from {len(states)} to {world_size}"
    log.warning("%s: the data loader resumes in the same epoch without repeating finished shards "
                "(the weaker guarantee; see data_pipeline/loader.py)", reason)
    loader.load_state_dict({"resharded_from": states})


def resume(ckpt: CheckpointManager, cfg: Config, parts: Trainables, info: du.DistInfo) -> TrainState:
    """Rank 0 picks the newest usable checkpoint; every rank loads that file. A fresh state if none."""
    found = ckpt.load_latest() if du.is_main() else None
    path = du.broadcast_object(str(found[1]) if found else None)
    if path is None:
        return TrainState()
    saved = found[0] if found else load_checkpoint(path)
    cfg_dict = to_dict(cfg)
    if saved["fingerprint"] != fingerprint(cfg_dict):
        diff = fingerprint_diff(saved["config"], cfg_dict)
        raise ConfigError(
            f"{cfg.run_dir} holds a run whose model or math differ from this config:\n  "
            + "\n  ".join(diff or ["(fingerprint differs)"])
            + "\nUse a new run.dir, or restore these values."
        )
    parts.model.load_state_dict(saved["model"])
    parts.ema.load_state_dict(saved["ema"])
    parts.optimizer.load_state_dict(saved["optimizer"])
    state = TrainState(**saved["train_state"])
    restore_loader(parts.loader, saved["loader"], info.rank, info.world_size)
    log.info("resumed from %s at step %d (%d images)", path, state.nimg // cfg.train.batch_size, state.nimg)
    return state


def save_checkpoint(ckpt: CheckpointManager, cfg: Config, parts: Trainables, state: TrainState,
                    best: str | None = None) -> None:
    """Every rank sends its loader cursor; rank 0 writes the checkpoint (in the background)."""
    loader_states = du.gather_objects(parts.loader.state_dict())  # a list indexed by rank
    if du.is_main():
        cfg_dict = to_dict(cfg)
        ckpt.save({
            "model": parts.model.state_dict(),
            "ema": parts.ema.state_dict(),
            "optimizer": parts.optimizer.state_dict(),
            "lr_schedule": {"kind": "linear_warmup", "warmup_images": cfg.train.warmup_images},
            "train_state": asdict(state),
            "loader": loader_states,
            "config": cfg_dict,
            "fingerprint": fingerprint(cfg_dict),
        }, state.nimg, best=best)


# ----------------------------------------------------------------------------- status and EMA work


def log_status(cfg: Config, plan: BatchPlan, state: TrainState, progress: Progress, stats: StepStats,
               watch: Stopwatch, loader: Any, monitor: Monitor, device: torch.device) -> None:
    """Reduce the interval's statistics over ranks (the sync point), log them, check non-finite runs."""
    B, step = plan.global_batch, state.nimg // plan.global_batch
    values = stats.reduce(bad_samples=loader.stats().get("bad_samples", 0))
    wall, phases = watch.lap()
    interval_wall = max(1e-9, wall - phases.get("pause", 0.0))  # sampling, eval, checkpoint copies excluded
    done_imgs = max(B, state.nimg - progress.last_log_nimg)
    progress.last_log_nimg = state.nimg
    state.skipped_steps += int(round(values.pop("train/skipped_steps_interval")))
    values.update({
        "train/lr": lr_at(cfg, state.nimg - B),
        "perf/images_per_s": done_imgs / interval_wall,
        "perf/images_per_s_per_gpu": done_imgs / interval_wall / du.get_world_size(),
        "perf/step_time_s": interval_wall * B / done_imgs,
        "perf/data_wait_frac": min(1.0, phases.get("data", 0.0) / interval_wall),
        "perf/memory_gb": memory_gb(device),
        "train/skipped_steps": float(state.skipped_steps),
    })
    monitor.scalars(values, step)
    monitor.console(step, plan.total_steps, state.nimg, values, time.perf_counter() - progress.t_start,
                    progress.start_step)
    if float(stats.max_run.item()) >= cfg.train.max_nonfinite_steps:
        raise NonFiniteLossError(
            f"{cfg.train.max_nonfinite_steps} non-finite losses in a row, first reaching that count "
            f"at step {int(stats.first_bad_step.item())}; stopping. The last good checkpoint is kept "
            f"in {cfg.run_dir / 'checkpoints'}. Lower train.lr or check the data."
        )
    stats.reset()


def ema_pictures_and_metrics(cfg: Config, state: TrainState, progress: Progress, ema: EMA, ema_model: nn.Module,
                             diffusion: GaussianDiffusion, monitor: Monitor, evaluator: Evaluator | None,
                             validation: tuple | None, device: torch.device) -> str | None:
    """Sample grid, validation loss and FID from the EMA weights when due (every rank takes part).

    Returns "fid" when this evaluation is the best so far (the checkpoint is then kept as best).
    """
    step, done = state.nimg // cfg.train.batch_size, state.nimg >= cfg.train.total_images
    if progress.due(cfg.log.sample_every_images, state.nimg) or (
            done and cfg.log.sample_every_images > 0 and state.nimg > progress.start_nimg):
        ema.copy_to(ema_model)
        sample_grid(cfg, diffusion, ema_model, monitor, cfg.run_dir, step, state.nimg, device)
    if validation is not None and progress.due(cfg.eval.val_every_images, state.nimg):
        ema.copy_to(ema_model)
        images, indices, labels = validation
        ts = tuple(sorted({int(f * diffusion.num_timesteps) for f in val_fractions}))
        val = pinned_validation_loss(ema_model, diffusion, images, indices, timesteps=ts,
                                     seed=cfg.run.seed, labels=labels, device=device)
        monitor.scalars({f"val/{k.removeprefix('val_')}": v for k, v in val.items()}, step)
        log.info("validation loss (EMA, pinned noise): %.5f", val["val_loss"])
    if evaluator is not None and progress.due(cfg.eval.every_images, state.nimg):
        ema.copy_to(ema_model)
        metrics = evaluator.evaluate(ema_model, diffusion, state.nimg)
        monitor.scalars({f"eval/{k}": v for k, v in metrics.items()}, step)
        if metrics.get("fid", float("inf")) < state.best_fid:
            state.best_fid = metrics["fid"]
            return "fid"
    return None


# ----------------------------------------------------------------------------- the loop


def train(cfg: Config, info: du.DistInfo) -> int:
    """Run (or resume) training in ``cfg.run_dir``; returns a process exit code."""
    global last_stop_signal
    last_stop_signal = None
    plan = plan_batches(cfg, info.world_size)
    run_dir, rank, world, device, B = cfg.run_dir, info.rank, info.world_size, info.device, plan.global_batch
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str((run_dir / "inductor_cache").resolve()))
    # --- claim the run directory before touching it: the same config on every rank, one live job
    # per run directory (rank 0 holds run.lock), a directory every node sees; then this rank's
    # "last step reached" record with its heartbeat (ranks/rank<k>.json)
    lock, record = du.claim_run_dir(run_dir, flatten(to_dict(cfg)), rank, cfg.dist.timeout_s)
    ckpt = prepare_run_dir(cfg)

    # --- build: data first, so a bad data path fails before any GPU work
    loader = build_data(cfg, plan, info)
    torch.manual_seed(seed_for(cfg.run.seed, "init"))  # same initial weights on every rank and every run
    model = build_model(cfg, device)
    ema = EMA(model, cfg.ema.decays, cfg.ema.warmup)
    optimizer, fused = build_optimizer(model, cfg, device)
    diffusion = GaussianDiffusion(cfg.diffusion).to(device)
    parts = Trainables(model, ema, optimizer, loader)

    # --- resume: the newest usable checkpoint, or a fresh start
    state = resume(ckpt, cfg, parts, info)
    if du.is_main():
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    if state.nimg >= cfg.train.total_images:
        log.info("run %s already finished at step %d (%d images); nothing to do. Raise train.total_images "
                 "to train longer.", run_dir, state.nimg // B, state.nimg)
        loader.close()
        record.close("finished")
        if lock is not None:
            lock.release()
        return EXIT_OK

    # --- the rest of the run: wrapped model, EMA sampling copy, monitors, evaluation, signals
    train_model = parallelize(model, cfg, info)
    amp_dtype = resolve_precision(cfg, device)
    ema_model = build_model(cfg, device).eval().requires_grad_(False)  # holds EMA weights for sampling
    progress = Progress(start_nimg=state.nimg, global_batch=B, last_log_nimg=state.nimg)
    # Events logged at the checkpoint's step belong to it; later ones (by an interrupted run) are purged.
    monitor = Monitor(run_dir, du.is_main(), cfg.log.tensorboard,
                      purge_step=progress.start_step + 1 if progress.start_nimg else None)
    evaluator = build_evaluator(cfg.eval, data_cfg=cfg.data, image_size=cfg.model.image_size,
                                num_classes=cfg.model.num_classes, device=device)  # None when eval is off
    if evaluator is not None:
        monitor.text("eval/protocol", "```\n" + json.dumps(evaluator.protocol(), indent=2) + "\n```",
                     progress.start_step)
    validation = load_validation_images(cfg, rank, world)
    stats = StepStats(device, diffusion.num_timesteps)
    watch = Stopwatch()
    gen = torch.Generator(device=device)
    stop = du.StopRequest().install()
    data_iter = iter(loader)
    log.info("training %s: %d steps of %d images (%d per GPU x %d GPUs x %d accumulation), from step %d",
             run_dir, plan.total_steps, B, plan.batch_per_gpu, world, plan.accum_steps, progress.start_step)

    exit_code = EXIT_OK
    try:
        while True:
            step = state.nimg // B
            done = state.nimg >= cfg.train.total_images
            record.reached(step, state.nimg)  # in memory; the heartbeat thread writes it

            # --- status: reduced metrics, console line, TensorBoard (sync point: log steps only)
            if progress.due(cfg.log.every_images, state.nimg) or done:
                log_status(cfg, plan, state, progress, stats, watch, loader, monitor, device)

            # --- pictures and metrics from the EMA weights (every rank takes part)
            t_pause = time.perf_counter()
            best = ema_pictures_and_metrics(cfg, state, progress, ema, ema_model, diffusion, monitor, evaluator,
                                            validation, device)

            # --- checkpoint; done?; stop request agreed by all ranks (one gloo all-reduce)
            stop_now = stop.agreed()
            if progress.due(cfg.checkpoint.every_images, state.nimg) or best or (
                    (done or stop_now) and state.nimg > progress.start_nimg):
                save_checkpoint(ckpt, cfg, parts, state, best)
            watch.add("pause", time.perf_counter() - t_pause)
            if done:
                log.info("finished: step %d, %d images, in %.1f min", step, state.nimg,
                         (time.perf_counter() - progress.t_start) / 60)
                break
            if stop_now:
                last_stop_signal = signal.Signals(stop_now).name
                log.info("stopped by %s at step %d; checkpoint written, exit code %d. Run the same command "
                         "again to resume.", last_stop_signal, step, EXIT_REQUEUE)
                exit_code = EXIT_REQUEUE
                break
            if step - progress.start_step == cfg.dist.warmup_steps:
                du.set_collective_timeout(cfg.dist.timeout_s)

            # --- step: accumulate micro-batches, clip, AdamW (skips non-finite steps on device)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(cfg, state.nimg)
            for micro in range(plan.accum_steps):
                t0 = time.perf_counter()
                batch = next(data_iter)
                watch.add("data", time.perf_counter() - t0)
                losses, t = forward_backward(
                    train_model, diffusion, batch, cfg, device, gen, amp_dtype,
                    seed=seed_for(cfg.run.seed, rank, state.nimg, micro), scale=1.0 / plan.accum_steps,
                    sync_grads=micro == plan.accum_steps - 1 or world == 1,
                )
                stats.add_losses(losses, t)
            grad_norm, found_inf = optimizer_step(model, optimizer, fused, cfg.train.grad_clip)
            stats.add_step(grad_norm, found_inf, step, cfg.train.max_nonfinite_steps)

            # --- EMA: one fused lerp per decay over all tensors
            ema.update(model)
            state.nimg += B
        # The final checkpoint is complete before any rank exits: under torchrun the first
        # rank to exit makes the agent SIGTERM the others, which must not cut rank 0's write.
        ckpt.wait()
        monitor.flush()  # the last TensorBoard events too, before a peer's exit can end this task
        du.barrier()
    except NonFiniteLossError as e:
        log.error("%s", e)
        exit_code = EXIT_ERROR
    except Exception:
        # e.g. a collective that timed out or lost its peer: name the rank that went silent
        exit_code = EXIT_ERROR
        if why := record.diagnose_failure(world):
            log.error("%s", why)
        raise
    finally:
        record.close({EXIT_OK: "finished", EXIT_REQUEUE: "stopped"}.get(exit_code, "failed"))
        ckpt.wait()
        stop.uninstall()
        monitor.flush()
        if evaluator is not None and state.best_fid < float("inf"):
            monitor.hparams(flatten(to_dict(cfg)), {"hparam/best_fid": state.best_fid})
        monitor.close()
        loader.close()
        if lock is not None:
            lock.release()  # after the last checkpoint write
    return exit_code


def dry_run_summary(cfg: Config, world_size: int) -> str:
    """The --dry-run summary: world size, batches, steps, parameters, training FLOPs per image."""
    plan = plan_batches(cfg, world_size)
    with torch.device("meta"):
        n_params = count_parameters(UNet(cfg.model))
    flops = training_flops_per_image(cfg.model)
    return "\n".join([
        f"run directory      {cfg.run_dir}",
        f"world size         {world_size}",
        f"batch              {plan.global_batch} global = {plan.batch_per_gpu} per GPU x {world_size} GPUs "
        f"x {plan.accum_steps} accumulation",
        f"duration           {plan.total_steps} steps ({cfg.train.total_images} images)",
        f"parameters         {n_params / 1e6:.2f}M",
        f"training FLOPs     {flops / 1e9:.2f} GFLOP per image (forward + backward); "
        f"{flops * plan.global_batch / 1e12:.2f} TFLOP per step",
    ])
