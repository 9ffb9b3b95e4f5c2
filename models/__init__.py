"""ddpm-scale: models (pure modules: no torch.distributed, no environment, no files but interop)."""

from models.diffusion import DiffusionConfig, GaussianDiffusion, drop_labels
from models.flops import training_flops_per_image
from models.unet import UNet, UNetConfig

__all__ = [
    "DiffusionConfig",
    "GaussianDiffusion",
    "UNet",
    "UNetConfig",
    "drop_labels",
    "training_flops_per_image",
]
