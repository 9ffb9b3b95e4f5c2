"""Every call from benchmarks/ into the trainer's internals, in this one file.

The step, the builders, the EMA and the checkpoint layout change as the trainer evolves; the
benchmarks (trainer, GPU check, convergence) reach them only through the functions here, so a
refactor of trainer/ adapts this file and nothing else. What the benchmarks use of trainer/
otherwise is its command line (``trainer/main.py`` under torchrun) and its config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.timing import UsageError

TRAINER_MAIN = Path(__file__).resolve().parents[1] / "trainer" / "main.py"


# ----------------------------------------------------------------------------- config


def config_path(name_or_path: str) -> Path:
    """A preset name or a YAML path -> the file; UsageError naming the presets if neither."""
    from trainer.main import find_config

    try:
        return find_config(name_or_path)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None


def load_cfg(config: str | None, overrides: Sequence[str] = ()) -> Any:
    """The trainer's Config of a preset or YAML (None: the defaults) with key=value overrides."""
    from trainer.config import ConfigError, load_config

    try:
        return load_config(config_path(config) if config else None, list(overrides))
    except (ConfigError, FileNotFoundError, ValueError) as e:
        raise UsageError(f"config error: {e}") from None


def with_section(cfg: Any, section: str, **changes: Any) -> Any:
    """``cfg`` with fields of one section replaced (e.g. ``with_section(cfg, "train", compile="false")``)."""
    setattr(cfg, section, dataclasses.replace(getattr(cfg, section), **changes))
    return cfg


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML (a file the trainer's command line reads back)."""
    from trainer.config import to_yaml as dump

    return dump(cfg)


# ----------------------------------------------------------------------------- model, data, step


def build_model(cfg: Any, device: torch.device) -> nn.Module:
    """The trainer's UNet on ``device`` in the trainer's memory format."""
    from trainer.build import build_model as build

    return build(cfg, device)


def memory_format(cfg: Any, device: torch.device) -> torch.memory_format:
    """The layout the trainer runs the UNet in on ``device``."""
    from trainer.build import memory_format as fmt

    return fmt(cfg, device)


def build_data(cfg: Any, device: torch.device) -> tuple[Any, int]:
    """(the trainer's own loader for one rank, its per-GPU batch): synthetic shards made on first use."""
    from trainer.build import build_data as build
    from trainer.config import ConfigError, plan_batches
    from trainer.distributed import DistInfo

    plan = plan_batches(cfg, world_size=1)
    try:
        return build(cfg, plan, DistInfo(0, 1, 0, device)), plan.batch_per_gpu
    except (ConfigError, FileNotFoundError, ValueError) as e:
        raise UsageError(f"data: {e}") from None


def memory_gb(device: torch.device) -> float:
    """Peak memory of this process (CUDA allocator peak, or max RSS on the CPU)."""
    from trainer.step import memory_gb as peak

    return peak(device)


def lr_at(cfg: Any, nimg: int) -> float:
    """The trainer's learning rate after ``nimg`` images (warm-up, then constant)."""
    from trainer.step import lr_at as lr

    return lr(cfg, nimg)


class StepRig:
    """The trainer's step on one device: model, DDP/compile wrapper, loss, AdamW, EMA."""

    def __init__(self, cfg: Any, device: torch.device, *, model: nn.Module | None = None, rank: int = 0,
                 world_size: int = 1, local_rank: int = 0, ddp: bool | None = None) -> None:
        from models.diffusion import GaussianDiffusion
        from trainer.build import build_optimizer, parallelize, resolve_compile, resolve_precision
        from trainer.distributed import DistInfo
        from trainer.ema import EMA

        self.cfg, self.device = cfg, device
        self.model = model if model is not None else build_model(cfg, device)
        self.info = DistInfo(rank, world_size, local_rank, device)
        self.train_model = parallelize(self.model, cfg, self.info, ddp=ddp)
        self.optimizer, self.fused = build_optimizer(self.model, cfg, device)
        self.ema = EMA(self.model, cfg.ema.decays, warmup=cfg.ema.warmup)
        self.diffusion = GaussianDiffusion(cfg.diffusion).to(device)
        self.amp = resolve_precision(cfg, device)
        self.compiled = resolve_compile(cfg, device)
        self.loss = self.make_loss(memory_format(cfg, device))
        self.nimg, self.micro, self.pending = 0, 0, 0

    def make_loss(self, fmt: torch.memory_format) -> Any:
        """The trainer's loss object, putting its input in layout ``fmt``."""
        from trainer.loss import DiffusionLoss

        c = self.cfg
        return DiffusionLoss(self.diffusion, seed=c.run.seed, num_classes=c.model.num_classes,
                             label_dropout=c.train.label_dropout, device=self.device, memory_format=fmt,
                             amp_dtype=self.amp)

    def forward_backward(self, batch: dict[str, torch.Tensor], *, loss: Any = None, scale: float = 1.0,
                         sync_grads: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """One micro-batch's loss and backward: (per-sample losses, timesteps) on the device."""
        from trainer.loss import batch_positions
        from trainer.step import dropout_seed, micro_step

        b, rank, world = batch["image"].shape[0], self.info.rank, self.info.world_size
        out = micro_step(self.train_model, loss or self.loss, batch,
                         batch_positions(self.nimg, self.micro, rank, world, b),
                         dropout_seed=dropout_seed(self.cfg.run.seed, rank, self.nimg, self.micro),
                         scale=scale, sync_grads=sync_grads)
        self.micro += 1
        self.pending += b * world
        return out

    def optimizer_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip, AdamW (a non-finite step skipped): (grad norm, found_inf) on the device."""
        from trainer.step import optimizer_step

        out = optimizer_step(self.model, self.optimizer, self.fused, self.cfg.train.grad_clip)
        self.nimg, self.micro, self.pending = self.nimg + self.pending, 0, 0
        return out

    def ema_update(self) -> None:
        """The trainer's fused EMA update."""
        self.ema.update(self.model)

    def step_stats(self) -> Any:
        """The trainer's device-side step statistics (reduced over ranks by ``.reduce()``)."""
        from trainer.step import StepStats

        return StepStats(self.device, self.diffusion.num_timesteps)


def make_ema(model: nn.Module, decays: Sequence[float]) -> Any:
    """The trainer's fused EMA of ``model`` (``.update(model)``)."""
    from trainer.ema import EMA

    return EMA(model, decays)


def ema_tensors(ema: Any, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(the EMA's first shadow tensors, the model tensors it follows), for a per-tensor loop to compare."""
    return ema.shadows[0], ema._sources(model)


def collectives_ok(rank: int, device: torch.device) -> tuple[bool, bool]:
    """Whether the trainer's helpers work: (all_gather of a device tensor, broadcast of an object)."""
    from trainer import distributed as du

    gathered = du.all_gather_tensor(torch.arange(3, device=device))
    echoed = du.broadcast_object({"rank": rank})
    du.barrier()
    return gathered.tolist() == [0, 1, 2], echoed == {"rank": 0}


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_state(rig: StepRig) -> dict[str, Any]:
    """What the trainer's checkpoint holds for this rig's model, EMA and AdamW state (through its registry)."""
    from trainer.checkpoint import StateRegistry

    parts = {"model": rig.model, "ema": rig.ema, "optimizer": rig.optimizer}
    meta = {"train_state": {"nimg": rig.nimg}, "loader": [{}], "config": {}, "fingerprint": "benchmark"}
    return StateRegistry(parts, meta).state_dict()


def state_tensors(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint state (model, EMA shadows, optimizer moments) by a flat name."""
    out = {f"model.{k}": v for k, v in state["model"].items()}
    for i, sh in enumerate(state["ema"]["shadows"]):
        out.update({f"ema{i}.{k}": v for k, v in sh.items()})
    for pid, st in state["optimizer"]["state"].items():
        out.update({f"opt.{pid}.{k}": v for k, v in st.items() if isinstance(v, torch.Tensor)})
    return out


def checkpoint_file_tensors(run_dir: Path, nimg: int) -> dict[str, torch.Tensor]:
    """``state_tensors`` of the checkpoint a run wrote at ``nimg`` images."""
    from trainer.checkpoint import ckpt_name

    path = Path(run_dir) / "checkpoints" / ckpt_name(nimg)
    return state_tensors(torch.load(path, map_location="cpu", weights_only=True))


def checkpoint_manager(directory: Path) -> Any:
    """The trainer's background checkpoint writer (``.save(state, nimg=)``, ``.wait()``)."""
    from trainer.checkpoint import CheckpointManager

    return CheckpointManager(directory, keep_last=1, async_write=True)


def load_run(run_dir: Path, which: str = "ema") -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode, resolved config dict) of a finished run; ``which``: ema | model (raw weights)."""
    from trainer.checkpoint import load_for_inference

    model, _, saved = load_for_inference(run_dir, which=which)
    return model, saved


def image_seed(seed: int, index: int) -> int:
    """The trainer's per-image sampling seed: image k depends only on (seed, k)."""
    from trainer.sampling import image_seed as seed_of

    return seed_of(seed, index)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images to uint8, the trainer's quantisation."""
    from trainer.sampling import to_uint8 as quantise

    return quantise(x)
