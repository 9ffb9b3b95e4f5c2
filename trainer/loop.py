"""The training loop: small build_* functions, then one loop in fixed, commented blocks.

Progress is counted in images (``nimg``); the step index is nimg // global batch.
All randomness of a step derives from (seed, rank, nimg, micro-step), so a resumed
run draws exactly what an uninterrupted one would have drawn.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import resource
import signal
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from data_pipeline import build_loader
from models.diffusion import GaussianDiffusion, drop_labels
from models.flops import training_flops_per_image
from models.unet import UNet, count_parameters
from trainer import distributed as du
from trainer.checkpoint import CheckpointManager
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
from trainer.evaluate import build_evaluator, denoising_strip, pinned_validation_loss
from trainer.monitor import Monitor, Stopwatch
from trainer.sample import class_labels, image_seed, make_grid, rank_block, sample_uint8, save_png

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


def seed_for(*parts: Any) -> int:
    """A 63-bit seed from any tuple of values (stable across processes and runs)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# ----------------------------------------------------------------------------- builders


def resolve_precision(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16 on GPU by default, fp32 (None) on CPU unless asked."""
    p = cfg.train.precision
    if p == "bf16" or (p == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def resolve_compile(cfg: Config, device: torch.device) -> bool:
    """Compile on GPU by default, on CPU only when asked."""
    return cfg.train.compile == "true" or (cfg.train.compile == "auto" and device.type == "cuda")


def build_data(cfg: Config, plan: BatchPlan, info: du.DistInfo):
    """Make the synthetic shards on first use (rank 0), then the loader of data_pipeline/."""
    if cfg.data.synthetic_images > 0:
        if du.is_main():
            from data_pipeline.synthetic import ensure_synthetic_shards

            ensure_synthetic_shards(cfg.data.shards, cfg.data.synthetic_images, cfg.model.image_size,
                                    seed=cfg.run.seed)
        du.barrier()
    return build_loader(cfg.data, batch_size=plan.batch_per_gpu, rank=info.rank,
                        world_size=info.world_size, seed=cfg.run.seed, device=info.device)


def build_validation(cfg: Config, info: du.DistInfo) -> tuple[torch.Tensor, list[int], torch.Tensor | None] | None:
    """This rank's share of the held-out images for the pinned-noise validation loss, or None."""
    e = cfg.eval
    if not (e.val_every_images and e.val_shards):
        return None
    # The same first val_images images on every rank (a one-process view, no flips), then a rank block.
    vcfg = replace(cfg.data, shards=e.val_shards, hflip=False, num_workers=0, synthetic_images=0)
    loader = build_loader(vcfg, batch_size=e.val_images, rank=0, world_size=1, seed=0, device=None)
    try:
        batch = next(iter(loader))
    finally:
        loader.close()
    mine = list(rank_block(e.val_images, info.rank, info.world_size))
    labels = batch["label"][mine] if cfg.model.num_classes > 0 and cfg.data.use_labels else None
    return batch["image"][mine].contiguous(), mine, labels


def build_model(cfg: Config, device: torch.device) -> nn.Module:
    """The plain UNet on ``device`` (no DDP, no compile: those are applied by ``parallelize``)."""
    model = UNet(cfg.model).to(device)
    if cfg.train.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def parallelize(model: nn.Module, cfg: Config, info: du.DistInfo) -> nn.Module:
    """Apply DDP and torch.compile from outside the model; returns the module the step calls."""
    wrapped: nn.Module = model
    if info.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(
            model,
            device_ids=[info.device.index] if info.device.type == "cuda" else None,
            gradient_as_bucket_view=True,  # grads live in the all-reduce buckets: saves one copy of 114M grads
            static_graph=True,  # the UNet's graph never changes: lets DDP overlap and skip unused-param search
            bucket_cap_mb=25,
        )
    if resolve_compile(cfg, info.device):
        # Compiling the DDP module lets dynamo split graphs at bucket boundaries so
        # all-reduce overlaps backward (DDPOptimizer).
        wrapped = torch.compile(wrapped)
    return wrapped


def build_optimizer(model: nn.Module, cfg: Config, device: torch.device) -> tuple[torch.optim.Optimizer, bool]:
    """AdamW, fused where the build supports it (it can skip a non-finite step without a host sync)."""
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = dict(lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs), True
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, foreach=True, **kwargs), False


def lr_at(cfg: Config, nimg: int) -> float:
    """Linear warm-up over train.warmup_images, then constant (DDPM)."""
    w = cfg.train.warmup_images
    return cfg.train.lr * min(1.0, (nimg + cfg.train.batch_size) / w) if w > 0 else cfg.train.lr


# ----------------------------------------------------------------------------- the step


def forward_backward(train_model: nn.Module, diffusion, batch: dict[str, torch.Tensor], cfg: Config,
                     device: torch.device, gen: torch.Generator, amp_dtype: torch.dtype | None, *, seed: int,
                     scale: float = 1.0, sync_grads: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-batch: uint8 -> [-1, 1] on the device, draw (t, eps), loss (eq. 14), backward.

    Returns the per-sample losses (b,) and their timesteps (b,), still on the device.
    """
    x = batch["image"].to(device, non_blocking=True)  # (b, 3, H, W) uint8, pinned by the loader
    x0 = x.float().div_(127.5).sub_(1.0)  # [-1, 1]
    if cfg.train.channels_last and device.type == "cuda":
        x0 = x0.contiguous(memory_format=torch.channels_last)
    gen.manual_seed(seed)
    torch.manual_seed(seed ^ 0x5DEECE66D)  # dropout draws
    T = diffusion.num_timesteps
    t = torch.randint(0, T, (x0.shape[0],), generator=gen, device=device)  # t ~ U{1..T}, 0-indexed
    noise = torch.randn(x0.shape, generator=gen, device=device, dtype=x0.dtype)  # eps ~ N(0, I)
    y = None
    if cfg.model.num_classes > 0:
        y = drop_labels(batch["label"].to(device, non_blocking=True), cfg.train.label_dropout, gen)
    # no_sync: accumulate locally, all-reduce only on the last micro-batch
    sync_ctx = contextlib.nullcontext() if sync_grads or not hasattr(train_model, "no_sync") else train_model.no_sync()
    amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    with sync_ctx:
        with amp:
            losses = diffusion.training_losses(train_model, x0, t, noise, y=y)  # (b,)
        (losses.float().mean() * scale).backward()
    return losses.detach(), t


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, fused: bool,
                   grad_clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip, then AdamW; a non-finite gradient skips the update. Returns (grad norm, found_inf) on the device."""
    grad_norm = torch.nn.utils.clip_grad_norm_(
        model.parameters(), grad_clip if grad_clip > 0 else float("inf"), foreach=True
    )
    found_inf = (~torch.isfinite(grad_norm)).float()  # a non-finite loss makes the norm non-finite
    if fused:
        # The fused AdamW kernel skips the update (and un-counts the step) when
        # found_inf is 1, on the device: the GradScaler protocol, without a sync.
        optimizer.found_inf = found_inf
        optimizer.grad_scale = None
        optimizer.step()
    elif not bool(found_inf.item()):  # non-fused fallback: one sync per step
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, found_inf


# ----------------------------------------------------------------------------- helpers


class StepStats:
    """Device-side accumulators between log steps: no host sync inside the step."""

    def __init__(self, device: torch.device, num_timesteps: int) -> None:
        self.device = device
        self.T = num_timesteps
        self.nonfinite_run = torch.zeros((), device=device)  # carries over log intervals
        self.first_bad_step = torch.full((), -1.0, device=device)
        self.reset()

    def reset(self) -> None:
        """Zero the per-interval sums."""
        z = lambda n: torch.zeros(n, device=self.device, dtype=torch.float64)  # noqa: E731
        self.loss_sum, self.count = z(()), z(())
        self.q_sum, self.q_count = z(4), z(4)
        self.gnorm_sum, self.steps, self.skipped = z(()), z(()), z(())
        self.max_run = torch.zeros((), device=self.device)

    def add_losses(self, losses: torch.Tensor, t: torch.Tensor) -> None:
        """Per-sample losses (B,) with their timesteps (B,)."""
        losses = losses.detach().double()
        ok = torch.isfinite(losses)
        safe = torch.where(ok, losses, 0.0)
        self.loss_sum += safe.sum()
        self.count += ok.sum()
        q = (t * 4 // self.T).clamp(0, 3)  # timestep quartile
        self.q_sum.index_add_(0, q, safe)
        self.q_count.index_add_(0, q, ok.double())

    def add_step(self, grad_norm: torch.Tensor, found_inf: torch.Tensor, step: int, max_run: int) -> None:
        """Grad norm and the non-finite bookkeeping of one optimizer step."""
        finite = 1.0 - found_inf
        self.gnorm_sum += torch.nan_to_num(grad_norm.double(), nan=0.0, posinf=0.0) * finite
        self.steps += finite.double()
        self.skipped += found_inf.double()
        self.nonfinite_run = (self.nonfinite_run + found_inf) * found_inf
        hit = (self.nonfinite_run >= max_run) & (self.first_bad_step < 0)
        self.first_bad_step = torch.where(hit, float(step), self.first_bad_step)
        self.max_run = torch.maximum(self.max_run, self.nonfinite_run)

    def reduce(self, bad_samples: float = 0.0) -> dict[str, float]:
        """All-reduce over ranks (one collective, with the loader's bad-sample count) and move to the
        host: the one sync point, on log steps."""
        vec = torch.cat([
            self.loss_sum.view(1), self.count.view(1), self.q_sum, self.q_count,
            self.gnorm_sum.view(1), self.steps.view(1), self.skipped.view(1),
            torch.tensor([float(bad_samples)], dtype=torch.float64, device=self.device),
        ])
        du.all_reduce_sum(vec)
        v = vec.tolist()
        world = du.get_world_size()
        out = {
            "train/loss": v[0] / v[1] if v[1] else float("nan"),
            "train/grad_norm": v[10] / v[11] if v[11] else float("nan"),
            "train/skipped_steps_interval": v[12] / world,  # identical on every rank (grads are all-reduced)
            "data/bad_samples": v[13],
        }
        for i in range(4):
            out[f"loss_by_t/q{i}"] = v[2 + i] / v[6 + i] if v[6 + i] else float("nan")
        return out


def memory_gb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def restore_loader(loader, states: list[Any], rank: int, world_size: int) -> None:
    """Give the loader its cursor back: exact with the same world size and workers, else resharded."""
    if len(states) == world_size:
        try:
            loader.load_state_dict(states[rank])
            return
        except ValueError as e:  # e.g. data.num_workers changed: the loader asks for the reshard form
            reason = str(e)
    else:
        reason = f"world size changed from {len(states)} to {world_size}"
    log.warning("%s: the data loader resumes in the same epoch without repeating finished shards "
                "(the weaker guarantee; see data_pipeline/loader.py)", reason)
    loader.load_state_dict({"resharded_from": states})


# ----------------------------------------------------------------------------- the loop


def train(cfg: Config, info: du.DistInfo) -> int:
    """Run (or resume) training in ``cfg.run_dir``; returns a process exit code."""
    global last_stop_signal
    last_stop_signal = None
    plan = plan_batches(cfg, info.world_size)
    run_dir = cfg.run_dir
    rank, world, device = info.rank, info.world_size, info.device
    cfg_dict = to_dict(cfg)
    fp = fingerprint(cfg_dict)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str((run_dir / "inductor_cache").resolve()))

    ckpt = CheckpointManager(run_dir / "checkpoints", cfg.checkpoint.keep_last,
                             cfg.checkpoint.milestone_every_images, cfg.checkpoint.async_write)
    if du.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_partial()
    du.barrier()

    # --- build: data first, so a bad data path fails before any GPU work
    loader = build_data(cfg, plan, info)
    if cfg.data.use_labels and cfg.model.num_classes != loader.num_classes:
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} but the data has {loader.num_classes} classes")
    if loader.image_size != cfg.model.image_size:
        raise ConfigError(f"model.image_size={cfg.model.image_size} but the shards hold {loader.image_size}px images")
    torch.manual_seed(seed_for(cfg.run.seed, "init"))  # same initial weights on every rank and every run
    model = build_model(cfg, device)
    ema = EMA(model, cfg.ema.decays, cfg.ema.warmup)
    optimizer, fused = build_optimizer(model, cfg, device)
    diffusion = GaussianDiffusion(cfg.diffusion).to(device)
    state = TrainState()

    # --- resume: rank 0 picks the newest usable checkpoint; every rank loads that file
    found = ckpt.load_latest() if du.is_main() else None
    path = du.broadcast_object(str(found[1]) if found else None)
    if path is not None:
        from trainer.checkpoint import load_checkpoint

        saved = found[0] if found else load_checkpoint(path)
        if saved["fingerprint"] != fp:
            diff = fingerprint_diff(saved["config"], cfg_dict)
            raise ConfigError(
                f"{run_dir} holds a run whose model or math differ from this config:\n  "
                + "\n  ".join(diff or ["(fingerprint differs)"])
                + "\nUse a new run.dir, or restore these values."
            )
        model.load_state_dict(saved["model"])
        ema.load_state_dict(saved["ema"])
        optimizer.load_state_dict(saved["optimizer"])
        state = TrainState(**saved["train_state"])
        restore_loader(loader, saved["loader"], rank, world)
        log.info("resumed from %s at step %d (%d images)", path, state.nimg // plan.global_batch, state.nimg)
        del saved, found
    if du.is_main():
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    if state.nimg >= cfg.train.total_images:
        log.info("run %s already finished at step %d (%d images); nothing to do. Raise train.total_images "
                 "to train longer.", run_dir, state.nimg // plan.global_batch, state.nimg)
        loader.close()
        return EXIT_OK

    train_model = parallelize(model, cfg, info)
    amp_dtype = resolve_precision(cfg, device)
    ema_model = build_model(cfg, device).eval().requires_grad_(False)  # holds EMA weights for sampling
    start_nimg, start_step = state.nimg, state.nimg // plan.global_batch
    # Events logged at the checkpoint's step belong to it; later ones (by an interrupted run) are purged.
    monitor = Monitor(run_dir, du.is_main(), cfg.log.tensorboard, purge_step=start_step + 1 if start_nimg else None)
    evaluator = build_evaluator(cfg.eval, data_cfg=cfg.data, image_size=cfg.model.image_size,
                                num_classes=cfg.model.num_classes, device=device)  # None when eval is off
    if evaluator is not None:
        monitor.text("eval/protocol", "```\n" + json.dumps(evaluator.protocol(), indent=2) + "\n```", start_step)
    validation = build_validation(cfg, info)
    stats = StepStats(device, diffusion.num_timesteps)
    watch = Stopwatch()
    gen = torch.Generator(device=device)
    stop = du.StopRequest().install()
    data_iter = iter(loader)
    B = plan.global_batch
    t_start = time.perf_counter()
    last_log_nimg = state.nimg
    log.info("training %s: %d steps of %d images (%d per GPU x %d GPUs x %d accumulation), from step %d",
             run_dir, plan.total_steps, B, plan.batch_per_gpu, world, plan.accum_steps, start_step)

    def every(interval: int) -> bool:
        return interval > 0 and state.nimg % interval == 0 and state.nimg > start_nimg

    def save(best: str | None = None) -> None:
        loader_states = du.gather_objects(loader.state_dict())  # a list indexed by rank
        if du.is_main():
            ckpt.save({
                "model": model.state_dict(),  # the unwrapped, uncompiled module: no prefixes
                "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(),
                "lr_schedule": {"kind": "linear_warmup", "warmup_images": cfg.train.warmup_images},
                "train_state": asdict(state),
                "loader": loader_states,
                "config": cfg_dict,
                "fingerprint": fp,
            }, state.nimg, best=best)

    exit_code = EXIT_OK
    try:
        while True:
            step = state.nimg // B

            # --- status: reduced metrics, console line, TensorBoard (sync point: log steps only)
            if every(cfg.log.every_images) or state.nimg >= cfg.train.total_images:
                values = stats.reduce(bad_samples=loader.stats().get("bad_samples", 0))
                wall, phases = watch.lap()
                # sampling, evaluation and checkpoint copies are not training time
                interval_wall = max(1e-9, wall - phases.get("pause", 0.0))
                done_imgs = max(B, state.nimg - last_log_nimg)
                last_log_nimg = state.nimg
                state.skipped_steps += int(round(values.pop("train/skipped_steps_interval")))
                values.update({
                    "train/lr": lr_at(cfg, state.nimg - B),
                    "perf/images_per_s": done_imgs / interval_wall,
                    "perf/images_per_s_per_gpu": done_imgs / interval_wall / world,
                    "perf/step_time_s": interval_wall * B / done_imgs,
                    "perf/data_wait_frac": min(1.0, phases.get("data", 0.0) / interval_wall),
                    "perf/memory_gb": memory_gb(device),
                    "train/skipped_steps": float(state.skipped_steps),
                })
                monitor.scalars(values, step)
                monitor.console(step, plan.total_steps, state.nimg, values, time.perf_counter() - t_start,
                                start_step)
                if float(stats.max_run.item()) >= cfg.train.max_nonfinite_steps:
                    raise NonFiniteLossError(
                        f"{cfg.train.max_nonfinite_steps} non-finite losses in a row, first reaching that count "
                        f"at step {int(stats.first_bad_step.item())}; stopping. The last good checkpoint is kept "
                        f"in {ckpt.dir}. Lower train.lr or check the data."
                    )
                stats.reset()

            # --- pictures and metrics from the EMA weights (every rank takes part)
            t_pause = time.perf_counter()
            if every(cfg.log.sample_every_images) or (state.nimg >= cfg.train.total_images and
                                                      cfg.log.sample_every_images > 0 and
                                                      state.nimg > start_nimg):
                ema.copy_to(ema_model)
                sample_grid(cfg, diffusion, ema_model, monitor, run_dir, step, state.nimg, device)
            if validation is not None and every(cfg.eval.val_every_images):
                ema.copy_to(ema_model)
                images, indices, labels = validation
                T = diffusion.num_timesteps  # the same fractions of T as (10, 100, ..., 990) at T=1000
                ts = tuple(sorted({int(f * T) for f in (0.01, 0.1, 0.25, 0.5, 0.75, 0.99)}))
                val = pinned_validation_loss(ema_model, diffusion, images, indices, timesteps=ts,
                                             seed=cfg.run.seed, labels=labels, device=device)
                monitor.scalars({f"val/{k.removeprefix('val_')}": v for k, v in val.items()}, step)
                log.info("validation loss (EMA, pinned noise): %.5f", val["val_loss"])
            best = None
            if evaluator is not None and every(cfg.eval.every_images):
                ema.copy_to(ema_model)
                metrics = evaluator.evaluate(ema_model, diffusion, state.nimg)
                monitor.scalars({f"eval/{k}": v for k, v in metrics.items()}, step)
                if metrics.get("fid", float("inf")) < state.best_fid:
                    state.best_fid = metrics["fid"]
                    best = "fid"

            # --- checkpoint; done?; stop request agreed by all ranks (one gloo all-reduce)
            done = state.nimg >= cfg.train.total_images
            stop_now = stop.agreed()
            if every(cfg.checkpoint.every_images) or best or ((done or stop_now) and state.nimg > start_nimg):
                save(best)
            watch.add("pause", time.perf_counter() - t_pause)
            if done:
                log.info("finished: step %d, %d images, in %.1f min", step, state.nimg,
                         (time.perf_counter() - t_start) / 60)
                break
            if stop_now:
                last_stop_signal = signal.Signals(stop_now).name
                log.info("stopped by %s at step %d; checkpoint written, exit code %d. Run the same command "
                         "again to resume.", last_stop_signal, step, EXIT_REQUEUE)
                exit_code = EXIT_REQUEUE
                break
            if step - start_step == cfg.dist.warmup_steps:
                du.set_collective_timeout(cfg.dist.timeout_s)

            # --- step: accumulate micro-batches, clip, AdamW (skips non-finite steps on device)
            lr = lr_at(cfg, state.nimg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for micro in range(plan.accum_steps):
                t0 = time.perf_counter()
                batch = next(data_iter)
                watch.add("data", time.perf_counter() - t0)
                last = micro == plan.accum_steps - 1
                losses, t = forward_backward(
                    train_model, diffusion, batch, cfg, device, gen, amp_dtype,
                    seed=seed_for(cfg.run.seed, rank, state.nimg, micro), scale=1.0 / plan.accum_steps,
                    sync_grads=last or world == 1,
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
        du.barrier()
    except NonFiniteLossError as e:
        log.error("%s", e)
        exit_code = EXIT_ERROR
    finally:
        ckpt.wait()
        stop.uninstall()
        monitor.flush()
        if evaluator is not None and state.best_fid < float("inf"):
            monitor.hparams(flatten(cfg_dict), {"hparam/best_fid": state.best_fid})
        monitor.close()
        loader.close()
    return exit_code


@torch.no_grad()
def sample_grid(cfg: Config, diffusion, ema_model: nn.Module, monitor: Monitor, run_dir: Path, step: int,
                nimg: int, device: torch.device) -> None:
    """A fixed-noise grid from the EMA weights, split over ranks, saved as PNG and to TensorBoard."""
    n = cfg.log.sample_count
    mine = list(rank_block(n, du.get_rank(), du.get_world_size()))
    m = cfg.model
    labels = class_labels(mine, m.num_classes)
    imgs = sample_uint8(ema_model, diffusion, mine, image_shape=(m.in_channels, m.image_size, m.image_size),
                        seed=cfg.run.seed, batch_size=max(1, cfg.train.batch_size // du.get_world_size()),
                        sampler=cfg.log.sample_sampler, steps=cfg.log.sample_steps, labels=labels, device=device)
    allimgs = du.all_gather_tensor(imgs.to(device)).cpu()
    idx = du.all_gather_tensor(torch.tensor(mine, dtype=torch.long, device=device)).cpu()
    if du.is_main():
        grid = make_grid(allimgs[torch.argsort(idx)])
        out = run_dir / "samples"
        out.mkdir(parents=True, exist_ok=True)
        save_png(grid, out / f"grid-{nimg:012d}.png")
        monitor.image("samples/ema_grid", grid, step)
        # The paper's figure: x_t from noise to image for a few fixed seeds (rank 0; small).
        k = min(4, n)
        strip_labels = class_labels(range(k), m.num_classes)
        strip = denoising_strip(diffusion, ema_model, [image_seed(cfg.run.seed, i) for i in range(k)], m.image_size,
                                sampler=cfg.log.sample_sampler, steps=cfg.log.sample_steps,
                                y=strip_labels.to(device) if strip_labels is not None else None, device=device)
        save_png(strip, out / f"denoise-{nimg:012d}.png")
        monitor.image("samples/denoising", strip, step)
        log.info("sample grid written: %s", out / f"grid-{nimg:012d}.png")


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
