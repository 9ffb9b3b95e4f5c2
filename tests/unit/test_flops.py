"""Training FLOPs per image, checked against an independent count from forward hooks."""

import pytest
import torch
from torch import nn

from models.flops import training_flops_per_image
from models.unet import AttnBlock, UNet, UNetConfig


def hook_count(cfg: UNetConfig) -> int:
    """Forward + backward FLOPs from layer shapes: 2 per multiply-add; backward = 2x forward.

    The first conv and the first time-MLP layer get no input gradient (their inputs are
    data), so their backward is only the weight gradient (1x forward).
    """
    model = UNet(cfg).eval()
    fwd: dict[str, int] = {}

    def conv_hook(name):
        def hook(mod, inp, out):
            k = mod.kernel_size[0] * mod.kernel_size[1]
            fwd[name] = 2 * out.numel() * mod.in_channels // mod.groups * k

        return hook

    def linear_hook(name):
        def hook(mod, inp, out):
            fwd[name] = 2 * out.numel() * mod.in_features

        return hook

    def attn_hook(name):
        def hook(mod, inp, out):
            _, c, h, w = out.shape
            fwd[name + ".sdpa"] = 2 * 2 * (h * w) ** 2 * c  # q k^T and (attn) v

        return hook

    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            mod.register_forward_hook(conv_hook(name))
        elif isinstance(mod, nn.Linear):
            mod.register_forward_hook(linear_hook(name))
        elif isinstance(mod, AttnBlock):
            mod.register_forward_hook(attn_hook(name))
    with torch.no_grad():
        model(torch.zeros(1, cfg.in_channels, cfg.image_size, cfg.image_size), torch.zeros(1, dtype=torch.long))
    total = sum(fwd.values())
    return 3 * total - fwd["conv_in"] - fwd["time_embed.linear_1"]


@pytest.mark.parametrize(
    "cfg",
    [
        UNetConfig(image_size=16, base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                   attn_resolutions=(8,), dropout=0.0),
        UNetConfig(image_size=16, base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2,
                   attn_resolutions=(16, 4), num_head_channels=16, scale_shift_norm=True),
    ],
    ids=["tiny", "multihead-scale-shift"],
)
def test_flops_match_an_independent_count(cfg):
    assert training_flops_per_image(cfg) == hook_count(cfg)


def test_flops_scale_with_resolution_and_width():
    base = UNetConfig(image_size=16, base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                      attn_resolutions=(), dropout=0.0)
    f = training_flops_per_image(base)
    # convs dominate: 4x the pixels is 4x their FLOPs, plus the mid block's attention, which is
    # quadratic in the pixels; 2x the width is ~4x
    bigger = UNetConfig(**{**base.__dict__, "image_size": 32})
    wider = UNetConfig(**{**base.__dict__, "base_channels": 64})
    assert 4.0 < training_flops_per_image(bigger) / f < 4.3
    assert 3.5 < training_flops_per_image(wider) / f < 4.1


def test_paper_cifar10_flops_are_in_the_expected_range():
    # the DDPM CIFAR-10 UNet does ~6 GMAC forward; training (fwd + bwd) is ~3x, 2 FLOPs per MAC
    flops = training_flops_per_image(UNetConfig())
    assert 30e9 < flops < 45e9
    assert flops == hook_count(UNetConfig(dropout=0.0))


def test_flops_rejects_bad_config():
    with pytest.raises(ValueError, match="model.image_size"):
        training_flops_per_image(UNetConfig(image_size=33))
