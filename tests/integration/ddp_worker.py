"""A torchrun worker for test_ddp_grads.py: the trainer's DDP step with accumulation, then checks.

Builds the tiny model with trainer.build (DDP through ``parallelize``), runs a few optimizer
steps of two micro-batches each (no_sync on the first) with the trainer's step functions, feeding
the input in ``--input-format`` (channels_last against a contiguous model reproduces the
1x1-conv stride mismatch a channels_last GPU run has), and prints one line per check.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from models.diffusion import GaussianDiffusion  # noqa: E402
from trainer import distributed as du  # noqa: E402
from trainer.build import build_model, build_optimizer, parallelize  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.loss import DiffusionLoss, batch_positions  # noqa: E402
from trainer.startup import init_distributed  # noqa: E402
from trainer.step import micro_step, optimizer_step  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--input-format", choices=("contiguous", "channels_last"), default="contiguous")
    args = p.parse_args()
    cfg = load_config(args.config, ["train.compile=false"])
    # oneDNN gives a 1x1 conv weight channels_last gradient strides only with more than one thread
    torch.set_num_threads(2)
    info = init_distributed("gloo")
    device = info.device
    fmt = torch.channels_last if args.input_format == "channels_last" else torch.contiguous_format
    s = cfg.model.image_size
    torch.manual_seed(0)
    model = build_model(cfg, device)
    # The precondition, without DDP or hooks: how many weight gradients differ from their weight's strides
    x = torch.randn(2, 3, s, s).contiguous(memory_format=fmt)
    model(x, torch.tensor([1, 2])).pow(2).mean().backward()
    odd = sum(q.grad.stride() != q.stride() for q in model.parameters())
    print(f"rank {info.rank}: gradients with other strides than their weight: {odd}", flush=True)
    model.zero_grad(set_to_none=True)
    train_model = parallelize(model, cfg, info)
    opt, fused = build_optimizer(model, cfg, device)
    diffusion = GaussianDiffusion(cfg.diffusion).to(device)
    loss = DiffusionLoss(diffusion, seed=0, num_classes=0, label_dropout=0.0, device=device, memory_format=fmt)
    for step in range(3):
        for micro in range(2):
            g = torch.Generator().manual_seed(1000 * info.rank + 10 * step + micro)  # different data per rank
            x = torch.randint(0, 256, (2, 3, s, s), generator=g, dtype=torch.uint8)
            batch = {"image": x.contiguous(memory_format=torch.channels_last)}
            positions = batch_positions(8 * step, micro, info.rank, info.world_size, 2)
            micro_step(train_model, loss, batch, positions, dropout_seed=step * 2 + micro, scale=0.5,
                       sync_grads=micro == 1)
        optimizer_step(model, opt, fused, cfg.train.grad_clip)
    flat = torch.cat([q.detach().reshape(-1) for q in model.parameters()])
    everyone = [torch.empty_like(flat) for _ in range(info.world_size)]
    torch.distributed.all_gather(everyone, flat)
    same = all(torch.equal(everyone[0], e) for e in everyone)
    print(f"rank {info.rank}: weights identical on all ranks: {same}", flush=True)
    du.destroy()
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
