"""The training step: one micro-batch's backward, the optimizer step, and the device-side
statistics between log steps (no host sync inside the step).

The loss (trainer.loss) draws t and eps per sample from (seed, global sample index); dropout
inside the UNet is seeded per (seed, rank, nimg, micro-step), so a resume at the same world size
draws exactly what an uninterrupted run would have drawn.
"""

from __future__ import annotations

import contextlib
import resource
from collections.abc import Sequence

import torch
from torch import nn

from trainer import distributed as du
from trainer.config import Config
from trainer.loss import DiffusionLoss, seed_for


def lr_at(cfg: Config, nimg: int) -> float:
    """Linear warm-up over train.warmup_images, then constant (DDPM)."""
    w = cfg.train.warmup_images
    return cfg.train.lr * min(1.0, (nimg + cfg.train.batch_size) / w) if w > 0 else cfg.train.lr


def micro_step(train_model: nn.Module, loss: DiffusionLoss, batch: dict[str, torch.Tensor],
               positions: Sequence[int], *, dropout_seed: int, scale: float = 1.0,
               sync_grads: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and backward of one micro-batch; gradients all-reduced only when ``sync_grads``.

    Returns the per-sample losses (b,) and their timesteps (b,), still on the device.
    """
    torch.manual_seed(dropout_seed)  # dropout draws (eager and inductor read the default generator)
    # no_sync: accumulate locally, all-reduce only on the last micro-batch
    sync_ctx = (contextlib.nullcontext() if sync_grads or not hasattr(train_model, "no_sync")
                else train_model.no_sync())
    with sync_ctx:
        losses, t = loss(train_model, batch, positions)
        (losses.float().mean() * scale).backward()
    return losses.detach(), t


def dropout_seed(seed: int, rank: int, nimg: int, micro: int) -> int:
    """The dropout seed of one micro-step (per rank: the one draw that depends on the cluster)."""
    return seed_for(seed, "dropout", rank, nimg, micro)


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, fused: bool,
                   grad_clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip, then AdamW; a non-finite gradient skips the update. Returns (grad norm, found_inf) on the device.

    With the fused AdamW nothing here reads a device value, so the host never waits for the GPU.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    if grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)  # no sync: clamp on device
    else:  # only the norm (for logging and the skip): no multiply of every gradient by 1.0
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
    found_inf = (~torch.isfinite(grad_norm)).float()  # a non-finite loss makes the norm non-finite
    if fused:
        # The fused AdamW kernel skips the update when found_inf is 1 (the GradScaler protocol,
        # without a sync): params, exp_avg and exp_avg_sq are untouched, and step is
        # incremented and then decremented by found_inf (torch/optim/adam.py _fused_adam, the
        # same since torch 2.1; the kernels return early on *found_inf == 1). Proven per torch
        # version and device by tests/unit/test_fused_adamw_skip.py (CUDA: python -m trainer.gpu_check).
        optimizer.found_inf = found_inf
        optimizer.grad_scale = None
        optimizer.step()
    elif not bool(found_inf.item()):  # non-fused fallback: one sync per step
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, found_inf


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
            "train/bad_samples": v[13],
        }
        for i in range(4):
            out[f"loss_by_t/q{i}"] = v[2 + i] / v[6 + i] if v[6 + i] else float("nan")
        return out


def memory_gb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
