"""The training loop: the run's parts from trainer.run, then one loop in fixed, commented blocks
(status, pictures and metrics, faults and stops, checkpoint, done?, step, EMA), as in EDM2's
training_loop.

Progress is counted in images (``nimg``); the step index is nimg // global batch. Every interval
derives from nimg; every random draw of a sample from (seed, its global sample index).
"""

from __future__ import annotations

import logging
import os
import time

import torch
import yaml

from models.flops import training_flops_per_image
from models.unet import UNet, count_parameters
from trainer import distributed as du
from trainer.config import Config, adopt_added_keys, flatten, plan_batches, to_dict
from trainer.errors import EXIT_OK, EXIT_REQUEUE, NonFiniteLossError, Outcome, StorageFault
from trainer.evaluation.validation import pinned_validation_loss, val_fractions
from trainer.loss import batch_positions
from trainer.run import Run, build_run, finish_building, save_checkpoint
from trainer.sampling import sample_grid
from trainer.startup import COMPILE_CACHE, claim_run_dir
from trainer.step import dropout_seed, lr_at, memory_gb, micro_step, optimizer_step

log = logging.getLogger("ddpm")


# ----------------------------------------------------------------------------- status and EMA work


def log_status(run: Run) -> None:
    """Reduce the interval's statistics over ranks (the sync point), log them, check non-finite runs."""
    cfg, state, progress, stats = run.cfg, run.state, run.progress, run.stats
    B, step = run.plan.global_batch, run.step
    values = stats.reduce(bad_samples=run.loader.stats().get("bad_samples", 0))
    wall, phases = run.watch.lap()
    interval_wall = max(1e-9, wall - phases.get("pause", 0.0))  # sampling, eval, checkpoint copies excluded
    done_imgs = max(B, state.nimg - progress.last_log_nimg)
    progress.last_log_nimg = state.nimg
    state.skipped_steps += int(round(values.pop("train/skipped_steps_interval")))
    values.update({
        "train/lr": lr_at(cfg, state.nimg - B),  # the schedule's value: the same on every rank
        "perf/images_per_s": done_imgs / interval_wall,  # rank 0's clock (ranks step together)
        "perf/images_per_s_per_gpu": done_imgs / interval_wall / du.get_world_size(),
        "perf/step_time_s": interval_wall * B / done_imgs,
        "perf/data_wait_frac": min(1.0, phases.get("data", 0.0) / interval_wall),  # rank 0's wait
        "perf/memory_gb": memory_gb(run.device),  # rank 0's peak
        "train/skipped_steps": float(state.skipped_steps),
    })
    run.monitor.scalars(values, step)
    run.monitor.console(step, run.plan.total_steps, state.nimg, values, time.perf_counter() - progress.t_start,
                        progress.start_step)
    if float(stats.max_run.item()) >= cfg.train.max_nonfinite_steps:
        raise NonFiniteLossError(
            f"{cfg.train.max_nonfinite_steps} non-finite losses in a row, first reaching that count "
            f"at step {int(stats.first_bad_step.item())}; stopping. The last good checkpoint is kept "
            f"in {cfg.run_dir / 'checkpoints'}. Lower train.lr or check the data."
        )
    stats.reset()


def ema_pictures_and_metrics(run: Run) -> str | None:
    """Sample grid, validation loss and FID from the EMA weights when due (every rank takes part).

    Returns "fid" when this evaluation is the best so far (the checkpoint is then kept as best).
    A storage fault writing the grid is noted (every rank stops at the next agreement).
    """
    cfg, state, progress = run.cfg, run.state, run.progress
    step, done = run.step, state.nimg >= cfg.train.total_images
    if progress.due(cfg.log.sample_every_images, state.nimg) or (
            done and cfg.log.sample_every_images > 0 and state.nimg > progress.start_nimg):
        run.ema.copy_to(run.ema_model)
        try:
            sample_grid(cfg, run.diffusion, run.ema_model, run.monitor, cfg.run_dir, step, state.nimg, run.device)
        except OSError as e:  # rank 0's PNG writes, after the last collective of sample_grid
            run.stop.note_fault(e)
    if run.validation is not None and progress.due(cfg.eval.val_every_images, state.nimg):
        run.ema.copy_to(run.ema_model)
        images, indices, labels = run.validation
        ts = tuple(sorted({int(f * run.diffusion.num_timesteps) for f in val_fractions}))
        val = pinned_validation_loss(run.ema_model, run.diffusion, images, indices, timesteps=ts,
                                     seed=cfg.run.seed, labels=labels, device=run.device)
        run.monitor.scalars({f"val/{k.removeprefix('val_')}": v for k, v in val.items()}, step)
        log.info("validation loss (EMA, pinned noise): %.5f", val["val_loss"])
    if run.evaluator is not None and progress.due(cfg.eval.every_images, state.nimg):
        run.ema.copy_to(run.ema_model)
        metrics = run.evaluator.evaluate(run.ema_model, run.diffusion, state.nimg)
        run.monitor.scalars({f"eval/{k}": v for k, v in metrics.items()}, step)
        if metrics.get("fid", float("inf")) < state.best_fid:
            state.best_fid = metrics["fid"]
            return "fid"
    return None


def train_step(run: Run, data_iter) -> None:
    """One optimizer step: accumulate micro-batches, clip, AdamW (skips non-finite steps on device)."""
    cfg, plan, info, state = run.cfg, run.plan, run.info, run.state
    for group in run.optimizer.param_groups:
        group["lr"] = lr_at(cfg, state.nimg)
    for micro in range(plan.accum_steps):
        t0 = time.perf_counter()
        batch = next(data_iter)
        run.watch.add("data", time.perf_counter() - t0)
        positions = batch_positions(state.nimg, micro, info.rank, info.world_size, plan.batch_per_gpu)
        if run.audit.enabled:
            try:
                run.audit.add(state.nimg, positions, batch.get("samples"))
            except OSError as e:  # noted; every rank stops at the next agreement (no collective skipped)
                run.stop.note_fault(e)
                run.audit.enabled = False
        losses, t = micro_step(run.train_model, run.loss, batch, positions,
                               dropout_seed=dropout_seed(cfg.run.seed, info.rank, state.nimg, micro),
                               scale=1.0 / plan.accum_steps,
                               sync_grads=micro == plan.accum_steps - 1 or info.world_size == 1)
        run.stats.add_losses(losses, t)
    grad_norm, found_inf = optimizer_step(run.model, run.optimizer, run.fused, cfg.train.grad_clip)
    run.stats.add_step(grad_norm, found_inf, run.step, cfg.train.max_nonfinite_steps)


def agree(run: Run):
    """Faults and stop requests of every rank, agreed (one gloo all-reduce); a fault ends the run here."""
    err = run.ckpt.failure()  # a background checkpoint write that failed (rank 0)
    if err is not None:
        run.stop.note_fault(err)
    agreement = run.stop.agreed(run.ckpt.committed_nimg)
    if agreement.fault_rank is not None:
        raise StorageFault(run.stop.fault_message(agreement))
    try:
        run.audit.commit(agreement.committed_nimg)  # audit lines of steps a complete checkpoint covers
    except OSError as e:
        run.stop.note_fault(e)
    return agreement


# ----------------------------------------------------------------------------- the loop


def adopt_earlier_behaviour(cfg: Config) -> list[str]:
    """A run directory from before a fingerprinted key existed continues as it began (its config.yaml)."""
    saved = cfg.run_dir / "config.yaml"
    try:
        data = yaml.safe_load(saved.read_text()) if saved.is_file() else None
    except (OSError, yaml.YAMLError):
        return []
    return adopt_added_keys(cfg, data) if isinstance(data, dict) else []


def train(cfg: Config, info: du.DistInfo) -> Outcome:
    """Run (or resume) training in ``cfg.run_dir``; returns the exit code and the agreed stop signal."""
    plan = plan_batches(cfg, info.world_size)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str((cfg.run_dir / COMPILE_CACHE).resolve()))
    # --- claim the run directory before touching it: the same config on every rank, a writable
    # directory, one live job per run directory (rank 0 holds run.lock), a directory every node
    # sees; then this rank's "last step reached" record with its heartbeat (ranks/rank<k>.json)
    for note in adopt_earlier_behaviour(cfg):
        log.info("config: %s", note)
    lock, record = claim_run_dir(cfg.run_dir, flatten(to_dict(cfg)), info.rank, cfg.dist.timeout_s)
    run: Run | None = None
    outcome = Outcome(1)
    try:
        run = build_run(cfg, plan, info, lock, record)  # data, model, EMA, optimizer; resumed
        if run.state.nimg >= cfg.train.total_images:
            log.info("run %s already finished at step %d (%d images); nothing to do. Raise train.total_images "
                     "to train longer.", cfg.run_dir, run.step, run.state.nimg)
            outcome = Outcome(EXIT_OK)
            return outcome
        finish_building(run)
        outcome = loop(run)
        return outcome
    except Exception:
        # e.g. a collective that timed out or lost its peer: name the rank that went silent
        if why := record.diagnose_failure(info.world_size):
            log.error("%s", why)
        raise
    finally:
        closers = [lambda: record.close({EXIT_OK: "finished", EXIT_REQUEUE: "stopped"}.get(outcome.code, "failed"))]
        if run is not None:
            closers += [lambda: run.ckpt.wait(raise_error=False), run.stop.uninstall, run.loader.close]
            closers += [c.close for c in (run.monitor, run.audit) if c is not None]
        if lock is not None:
            closers.append(lock.release)  # after the last checkpoint write
        close_all(closers)


def close_all(closers: list) -> None:
    """Call every closer, in order; one that fails is logged and does not skip the rest (a vanished
    disk must not leave the loader's worker processes or the lock's heartbeat holding the exit)."""
    for close in closers:
        try:
            close()
        except Exception as e:  # noqa: BLE001 - the run's own outcome is already decided
            log.warning("while shutting down: %s: %s", type(e).__name__, e)


def loop(run: Run) -> Outcome:
    """The loop over steps, in fixed blocks; returns how it ended."""
    cfg, state, progress, B = run.cfg, run.state, run.progress, run.plan.global_batch
    run.stop.install()
    data_iter = iter(run.loader)
    log.info("training %s: %d steps of %d images (%d per GPU x %d GPUs x %d accumulation), from step %d",
             cfg.run_dir, run.plan.total_steps, B, run.plan.batch_per_gpu, run.info.world_size,
             run.plan.accum_steps, progress.start_step)
    outcome = Outcome(EXIT_OK)
    while True:
        step, done = run.step, state.nimg >= cfg.train.total_images
        run.record.reached(step, state.nimg)  # in memory; the heartbeat thread writes it

        # --- status: reduced metrics, console line, TensorBoard (sync point: log steps only)
        if progress.due(cfg.log.every_images, state.nimg) or done:
            log_status(run)

        # --- pictures and metrics from the EMA weights (every rank takes part)
        t_pause = time.perf_counter()
        best = ema_pictures_and_metrics(run)

        # --- EMA snapshots for ddpm-ema: the power profiles in fp16, every ema.snapshot_every_images
        # and at the end (rank 0, in the background; a failed write is noted, and no checkpoint
        # follows it: save_checkpoint waits for the snapshot writes first)
        if run.snapshots is not None:
            if progress.due(run.snapshots.every, state.nimg) or (done and state.nimg > progress.start_nimg):
                run.snapshots.save(run.ema, state.nimg, B, run.registry.meta["config"])
            if (err := run.snapshots.failure()) is not None:
                run.stop.note_fault(err)

        # --- faults and stop requests, agreed by all ranks; a storage fault stops here, before a
        # checkpoint the full disk could not take (the newest complete one stays in use)
        agreement = agree(run)

        # --- checkpoint
        if progress.due(cfg.checkpoint.every_images, state.nimg) or best or (
                (done or agreement) and state.nimg > progress.start_nimg):
            save_checkpoint(run, best)
        run.watch.add("pause", time.perf_counter() - t_pause)

        # --- done?
        if done:
            log.info("finished: step %d, %d images, in %.1f min", step, state.nimg,
                     (time.perf_counter() - progress.t_start) / 60)
            break
        if agreement:
            outcome = Outcome(EXIT_REQUEUE, agreement.signal)
            log.info("stopped by %s at step %d; checkpoint written, exit code %d. Run the same command "
                     "again to resume.", agreement.signal, step, EXIT_REQUEUE)
            break
        if step - progress.start_step == cfg.dist.warmup_steps:
            du.set_collective_timeout(cfg.dist.timeout_s)

        # --- step: accumulate micro-batches, clip, AdamW
        train_step(run, data_iter)

        # --- EMA: one fused lerp per profile over all tensors (power profiles: time = images after this step)
        run.ema.update(run.model, state.nimg + B)
        state.nimg += B
    # The final checkpoint is complete before any rank exits: under torchrun the first rank to exit
    # makes the agent SIGTERM the others, which must not cut rank 0's write. The agreement after it
    # (instead of a barrier) also stops every rank if that write failed.
    run.ckpt.wait(raise_error=False)
    run.monitor.flush()  # the last TensorBoard events too, before a peer's exit can end this task
    agree(run)
    return outcome


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
