"""Training FLOPs per image of a UNet, counted on the meta device (no memory, no compute)."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from models.unet import UNet, UNetConfig


def training_flops_per_image(cfg: UNetConfig) -> int:
    """Forward + backward FLOPs for one image, counted with torch.utils.flop_counter on meta.

    FlopCounterMode counts matmuls, convolutions and attention (2 FLOPs per multiply-add);
    norms, activations and the optimizer are not counted. Weight gradients are included,
    the input gradient is not (the image does not require grad).
    """
    cfg.validate()
    with torch.device("meta"):
        model = UNet(cfg)
        x = torch.empty(1, cfg.in_channels, cfg.image_size, cfg.image_size)
        t = torch.zeros(1, dtype=torch.long)
        y = torch.zeros(1, dtype=torch.long) if cfg.num_classes > 0 else None
    with FlopCounterMode(display=False) as counter:
        model(x, t, y).float().pow(2).mean().backward()
    return int(counter.get_total_flops())
