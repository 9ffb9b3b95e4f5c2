"""The two arms of the convergence benchmark: this trainer's real loop, and diffusers in a plain loop.

* ours: ``torchrun --nproc_per_node=N trainer/main.py`` reading the shards, keeping a checkpoint
  every twelfth of the run (``milestone_images``) so earlier points of the run can be scored. A
  finished run is reused by a later command on the same --out with the same recipe
  (``train_record.json``), so the sampler can be varied without training again.
* diffusers: ``UNet2DModel`` of the same configuration (``models.interop``),
  ``DDPMScheduler.add_noise`` and ``EMAModel`` in a plain PyTorch loop over the same decoded images,
  the same batches per step, learning-rate schedule, clipping and EMA decay.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.timing import UsageError, write_json
from benchmarks.trainer_internals import TRAINER_MAIN, load_run, lr_at

REPO = TRAINER_MAIN.parents[1]


class DiffusersEps(nn.Module):
    """A diffusers UNet2DModel behind the trainer's forward signature, so the same sampler runs both."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W), t (B,) -> eps (B, C, H, W)."""
        return self.net(x, t).sample


@dataclass
class ArmResult:
    """One trained arm: its EMA and raw models, its loss curve and timing."""

    models: dict[str, nn.Module]  # "ema" and "raw" (the trained weights themselves)
    losses: list[tuple[int, float]]  # (images seen at the end of a log interval, mean loss over it)
    wall_s: float
    images: int
    cores: int  # processes x threads it ran on
    reused: bool = False  # a finished run of an earlier command
    run_dir: Path | None = None  # the ours arm's run directory (its kept checkpoints)
    milestone_every: int = 0  # a checkpoint is kept at every multiple of this many images (0: none)

    def model_at(self, images: int, which: str = "ema") -> nn.Module:
        """The model after ``images`` training images (the final one, or a kept checkpoint)."""
        if images == self.images:
            return self.models[which]
        path = (self.run_dir / "checkpoints" / f"milestone-{images:012d}.pt") if self.run_dir else None
        if path is None or not self.milestone_every or images % self.milestone_every or not path.is_file():
            raise UsageError(f"no checkpoint of this run at {images} images (kept every {self.milestone_every or '-'}"
                             " images; runs of earlier versions keep only the last): use another --out")
        return load_run(path, "ema" if which == "ema" else "model")[0]


def milestone_images(cfg: Any) -> int:
    """The spacing of the kept checkpoints: a twelfth of the run, in whole batches."""
    batch = cfg.train.batch_size
    return batch * max(1, cfg.train.total_images // batch // 12)


def train_diffusers(cfg: Any, images: torch.Tensor, *, seed: int, threads: int = 1) -> ArmResult:
    """diffusers' UNet2DModel + DDPMScheduler + EMAModel in a plain loop with the recipe of cfg."""
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.training_utils import EMAModel

    from models.interop import diffusers_config_from_unet

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    t_cfg, d_cfg = cfg.train, cfg.diffusion
    if d_cfg.schedule != "linear" or d_cfg.target != "eps":
        raise ValueError("the diffusers arm runs the paper's linear schedule and eps target only")
    torch.manual_seed(seed)
    net = UNet2DModel(**diffusers_config_from_unet(cfg.model)).train()
    sched = DDPMScheduler(num_train_timesteps=d_cfg.timesteps, beta_start=d_cfg.beta_start,
                          beta_end=d_cfg.beta_end, beta_schedule="linear")
    opt = torch.optim.AdamW(net.parameters(), lr=t_cfg.lr, betas=tuple(t_cfg.betas), eps=t_cfg.eps,
                            weight_decay=t_cfg.weight_decay)
    ema = EMAModel(net.parameters(), decay=cfg.ema.decays[0])  # warms up as (1 + n) / (10 + n)
    x_all = images.float().div(127.5).sub(1.0)  # (N, 3, H, W) in [-1, 1]
    gen = torch.Generator().manual_seed(seed)
    B, total, every = t_cfg.batch_size, t_cfg.total_images, cfg.log.every_images
    perm, pos, nimg, window, losses = torch.randperm(len(x_all), generator=gen), 0, 0, [], []
    start = time.perf_counter()
    while nimg < total:
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, nimg)
        if pos + B > len(perm):  # a new epoch: a fresh permutation
            perm, pos = torch.randperm(len(x_all), generator=gen), 0
        x0 = x_all[perm[pos : pos + B]]
        pos += B
        if cfg.data.hflip:
            flip = torch.rand(B, generator=gen) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, d_cfg.timesteps, (B,), generator=gen)
        loss = F.mse_loss(net(sched.add_noise(x0, noise, t), t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if t_cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(net.parameters(), t_cfg.grad_clip)
        opt.step()
        ema.step(net.parameters())
        nimg += B
        window.append(loss.item())
        if nimg % every == 0 or nimg >= total:
            losses.append((nimg, statistics.fmean(window)))
            window = []
    wall = time.perf_counter() - start
    torch.set_num_threads(before)
    raw = DiffusersEps(copy.deepcopy(net).eval())
    ema.copy_to(net.parameters())
    return ArmResult({"ema": DiffusersEps(net.eval()), "raw": raw}, losses, wall, nimg, threads)


def recipe_key(cfg_path: Path, overrides: list[str], shards: Path, seed: int, nproc: int) -> str:
    """What makes two runs of the ours arm the same training: the config file, overrides, data, seed, ranks."""
    parts = [Path(cfg_path).read_text(), list(overrides), str(shards), seed, nproc]
    recipe = [o.split("=", 1)[1] for o in overrides if o.startswith("recipe=")]
    if recipe and recipe[-1].lower() not in ("", "none", "null", "false", "off"):  # the recipe's keys, not its name
        from trainer.recipes import read_recipe

        parts.append(read_recipe(recipe[-1])[0].read_text())
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def train_ours(cfg_path: Path, overrides: list[str], run_dir: Path, shards: Path, *, seed: int,
               nproc: int = 2, milestone_every: int = 0) -> ArmResult:
    """The real loop under torchrun (nproc ranks, one thread each), or the finished run of an earlier command.

    ``milestone_every``: keep a checkpoint at every multiple of this many images (not part of the
    recipe: checkpoints do not change the trajectory).
    """
    key = recipe_key(cfg_path, overrides, shards, seed, nproc)
    record_path = run_dir / "train_record.json"
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record["recipe"] != key:
            raise UsageError(f"{run_dir} holds a run of another recipe (config, overrides, seed or --nproc): "
                             "use another --out")
        models = {w: load_run(run_dir, "ema" if w == "ema" else "model")[0] for w in ("ema", "raw")}
        losses = [tuple(x) for x in record["losses"]]
        return ArmResult(models, losses, record["wall_s"], record["images"], record["cores"], reused=True,
                         run_dir=run_dir, milestone_every=record.get("milestone_every", 0))
    keep = [f"checkpoint.every_images={milestone_every}", f"checkpoint.milestone_every_images={milestone_every}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(TRAINER_MAIN), "--config", str(cfg_path), *overrides, *(keep if milestone_every else []),
           f"run.dir={run_dir}", f"data.shards={shards}", f"run.seed={seed}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("WORLD_SIZE", None)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"trainer exited {proc.returncode}: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")
    models = {"ema": load_run(run_dir, "ema")[0], "raw": load_run(run_dir, "model")[0]}
    saved = load_run(run_dir, "ema")[1]
    batch = int(saved["train"]["batch_size"])
    losses = [(step * batch, value) for step, value in tb_scalars(run_dir, "train/loss")]
    images = int(saved["train"]["total_images"])
    write_json(record_path, {"recipe": key, "command": cmd, "wall_s": wall, "images": images, "cores": nproc,
                             "losses": losses, "milestone_every": milestone_every})
    return ArmResult(models, losses, wall, images, nproc, run_dir=run_dir, milestone_every=milestone_every)


def tb_scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of one TensorBoard tag of a run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]
