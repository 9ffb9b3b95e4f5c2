"""Small build_* functions: the components of a run, each from the config, and how the model is
parallelised (DDP and torch.compile are applied from outside the pure nn.Module).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from data_pipeline import build_loader
from models.unet import UNet
from trainer import distributed as du
from trainer.config import BatchPlan, Config, ConfigError


def resolve_precision(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16 on GPU by default, fp32 (None) on CPU unless asked."""
    p = cfg.train.precision
    if p == "bf16" or (p == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def resolve_compile(cfg: Config, device: torch.device) -> bool:
    """Compile on GPU by default, on CPU only when asked."""
    return cfg.train.compile == "true" or (cfg.train.compile == "auto" and device.type == "cuda")


def build_data(cfg: Config, plan: BatchPlan, info: du.DistInfo) -> Any:
    """Make the synthetic shards on first use (rank 0), then the loader of data_pipeline/, checked
    against the model (image size, classes)."""
    if cfg.data.synthetic_images > 0:
        if du.is_main():
            from data_pipeline.synthetic import ensure_synthetic_shards

            ensure_synthetic_shards(cfg.data.shards, cfg.data.synthetic_images, cfg.model.image_size,
                                    seed=cfg.run.seed)
        du.barrier()
    loader = build_loader(cfg.data, batch_size=plan.batch_per_gpu, rank=info.rank,
                          world_size=info.world_size, seed=cfg.run.seed, device=info.device)
    if cfg.data.use_labels and cfg.model.num_classes != loader.num_classes:
        loader.close()
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} but the data has {loader.num_classes} classes")
    if loader.image_size != cfg.model.image_size:
        loader.close()
        raise ConfigError(f"model.image_size={cfg.model.image_size} but the shards hold {loader.image_size}px images")
    return loader


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
