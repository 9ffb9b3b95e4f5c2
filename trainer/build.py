"""Small build_* functions: the components of a run, each from the config, and how the model is
parallelised (DDP and torch.compile are applied from outside the pure nn.Module).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from data_pipeline.config import SetupError
from data_pipeline.loader import build_loader, prepare_index
from data_pipeline.shards import is_remote
from models.unet import UNet
from trainer import distributed as du
from trainer.config import BatchPlan, Config, ConfigError

log = logging.getLogger("ddpm")


def resolve_precision(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16 on GPU by default, fp32 (None) on CPU unless asked."""
    p = cfg.train.precision
    if p == "bf16" or (p == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def resolve_compile(cfg: Config, device: torch.device) -> bool:
    """Compile on GPU by default, on CPU only when asked."""
    return cfg.train.compile == "true" or (cfg.train.compile == "auto" and device.type == "cuda")


def synthetic_data(cfg: Config) -> None:
    """Rank 0 makes the quickstart's synthetic shards on first use; every rank waits for them.

    Only into a folder that is absent, empty or holds the trainer's own synthetic shards: a folder
    of data the trainer did not make (a prepared dataset) is never touched, and the run trains on
    it as it is (one line says so).
    """
    if cfg.data.synthetic_images <= 0:
        return
    spec = str(cfg.data.shards)
    if is_remote(spec) or any(c in spec for c in "{}*?[") or spec.endswith((".tar", ".json")):
        # A URL, a pattern or a file names someone's shards: never a folder to make images in
        # (a URL would otherwise become a local folder named "http:").
        log.info("data: %s is not a local folder: training on it as it is (data.synthetic_images=%d only "
                 "fills an empty folder)", spec, cfg.data.synthetic_images)
        return

    def make() -> str:
        from data_pipeline.synthetic import ensure_synthetic_shards

        return ensure_synthetic_shards(cfg.data.shards, cfg.data.synthetic_images, cfg.model.image_size,
                                       seed=cfg.run.seed)

    status = du.run_on_main(make, SetupError)
    if status == "foreign":
        log.info("data: %s holds shards the trainer did not make: training on them as they are "
                 "(data.synthetic_images=%d only fills an empty folder)", cfg.data.shards, cfg.data.synthetic_images)


def build_data(cfg: Config, plan: BatchPlan, info: du.DistInfo, run_dir: Path | None = None) -> Any:
    """The synthetic shards on first use, the shard index (rank 0, cached in ``run_dir``), then the
    loader of data_pipeline/, checked against the model (image size, classes)."""
    synthetic_data(cfg)
    # The loader resizes/crops online to the model's size and checks labels against its classes
    # (set here, not in the config, so data.image_size in the fingerprint stays as the user wrote it).
    data_cfg = dataclasses.replace(cfg.data, image_size=cfg.data.image_size or cfg.model.image_size,
                                   num_classes=cfg.data.num_classes or cfg.model.num_classes)
    cache = run_dir / "data_index.npz" if run_dir is not None else None
    if cfg.data.backend == "webdataset":
        # Rank 0 reads the tar headers once (or checks the cached index against the shard list);
        # the other ranks then load the cache instead of reading every header themselves.
        du.run_on_main(lambda: prepare_index(data_cfg, cache), SetupError)
    loader = build_loader(data_cfg, batch_size=plan.batch_per_gpu, rank=info.rank, world_size=info.world_size,
                          seed=cfg.run.seed, device=info.device, global_batch=plan.global_batch, index_cache=cache)
    if cfg.data.use_labels and cfg.model.num_classes != loader.num_classes:
        loader.close()
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} but the data has {loader.num_classes} classes")
    if loader.image_size != cfg.model.image_size:
        loader.close()
        raise ConfigError(f"model.image_size={cfg.model.image_size} but the shards hold {loader.image_size}px images")
    return loader


def memory_format(cfg: Config, device: torch.device) -> torch.memory_format:
    """The layout the UNet runs in: channels_last on GPU (train.channels_last), else contiguous.

    The step puts its input in this layout too, so activations and weight gradients come out
    in the parameters' own layout (no layout copies in the convolutions or in AccumulateGrad).
    """
    if cfg.train.channels_last and device.type == "cuda":
        return torch.channels_last
    return torch.contiguous_format


def _same_memory_layout(grad: torch.Tensor, param: torch.Tensor) -> bool:
    """True when ``grad`` and ``param`` differ at most in the strides of size-1 dims."""
    return all(s == 1 or g == p for s, g, p in zip(param.shape, grad.stride(), param.stride()))


def align_grad_strides(model: nn.Module) -> int:
    """Give the gradients of weights with size-1 dims (1x1 convs) exactly their weight's strides.

    A 1x1 conv weight (O, I, 1, 1) has the same memory layout with strides (I, 1, 1, 1) and
    (I, 1, I, I); which one its gradient gets depends on the kernel (a channels_last cuDNN or
    oneDNN backward gives the second, a compiled backward may give the first). DDP compares
    strides exactly and warns "Grad strides do not match bucket view strides" for each such
    weight. The hook returns a view with the weight's strides: same bytes, no copy. Returns the
    number of hooked parameters.
    """
    n = 0
    for p in model.parameters():
        if p.requires_grad and 1 in p.shape and p.ndim > 1:

            def hook(g: torch.Tensor, p: torch.Tensor = p) -> torch.Tensor:
                if g.stride() != p.stride() and _same_memory_layout(g, p):
                    return g.as_strided(p.shape, p.stride(), g.storage_offset())
                return g

            p.register_hook(hook)
            n += 1
    return n


def build_model(cfg: Config, device: torch.device) -> nn.Module:
    """The plain UNet on ``device`` in its memory format (no DDP, no compile: see ``parallelize``)."""
    return UNet(cfg.model).to(device).to(memory_format=memory_format(cfg, device))


def parallelize(model: nn.Module, cfg: Config, info: du.DistInfo, ddp: bool | None = None) -> nn.Module:
    """Apply DDP and torch.compile from outside the model; returns the module the step calls.

    ``ddp``: wrap in DDP (default: when there is more than one process; ``trainer.gpu_check``
    forces it on one GPU to run the multi-GPU composition of DDP, compile and NCCL).
    """
    wrapped: nn.Module = model
    if info.world_size > 1 if ddp is None else ddp:
        align_grad_strides(model)  # before DDP: its buckets take the parameters' strides
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(
            model,
            device_ids=[info.device.index] if info.device.type == "cuda" else None,
            # Grads are set to None after each step, so DDP copies each fresh gradient into its
            # bucket while dividing by the world size, then points .grad at the bucket (no second
            # gradient buffer between steps). Keeping .grad in the bucket instead costs a zeroing,
            # an accumulation and a division: 184 vs 90 ms for 114M gradients on 2 CPU cores
            # (trainer.gpu_check measures both on a GPU).
            gradient_as_bucket_view=True,
            # Not static_graph: with no_sync() accumulation it fails on the first backward
            # ("expect_autograd_hooks_ INTERNAL ASSERT", torch 2.1 to 2.14, pytorch#143580 and
            # pytorch#187732), and once past that it stops all-reducing. Every UNet parameter is
            # used every step, so the default (find_unused_parameters=False) does no graph search.
            static_graph=False,
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
