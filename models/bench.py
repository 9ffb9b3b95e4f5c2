"""Benchmark one forward+backward of this UNet next to diffusers' UNet2DModel of the same config.

    python -m models.bench --config paper256 --batch 1 --repeats 5

Both models get the same weights and inputs; their steps are timed interleaved (ours,
theirs, ours, ...) in one process so that machine noise hits both alike, and the
median of each is reported with the ratio. diffusers is needed only here and in tests.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from models.flops import training_flops_per_image
from models.interop import convert_state_dict_to_diffusers, diffusers_config_from_unet
from models.unet import UNet, UNetConfig, count_parameters

PRESETS = {
    "paper32": UNetConfig(dropout=0.0),  # CIFAR-10 (dropout off: timing, not training)
    "paper256": UNetConfig(image_size=256, channel_mult=(1, 1, 2, 2, 4, 4), dropout=0.0),
    "tiny": UNetConfig(image_size=16, base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                       attn_resolutions=(8,), dropout=0.0),
}


def _step_fn(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, ours: bool) -> Callable[[], None]:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        out = model(x, t) if ours else model(x, t).sample
        out.float().pow(2).mean().backward()

    return step


def _time(step: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    """Print parameter counts, training FLOPs per image and fwd+bwd seconds of ours vs diffusers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(PRESETS), default="paper256")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    from diffusers import UNet2DModel  # benchmark-only dependency

    cfg = PRESETS[args.config]
    device = torch.device(args.device)
    torch.manual_seed(0)
    ours = UNet(cfg).to(device).train()
    theirs = UNet2DModel(**diffusers_config_from_unet(cfg)).to(device).train()
    theirs.load_state_dict(convert_state_dict_to_diffusers(ours.state_dict(), cfg))
    x = torch.randn(args.batch, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)
    t = torch.randint(0, 1000, (args.batch,), device=device)

    flops = training_flops_per_image(cfg)
    print(f"config {args.config}: {cfg}")
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, batch {args.batch}")
    print(f"parameters: ours {count_parameters(ours):,}  diffusers {count_parameters(theirs):,}")
    print(f"training FLOPs per image (fwd+bwd): {flops / 1e9:.2f} GFLOP")

    steps = {"ours": _step_fn(ours, x, t, True), "diffusers": _step_fn(theirs, x, t, False)}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for i in range(args.warmup + args.repeats):
        for name, step in steps.items():  # interleaved
            dt = _time(step, device)
            if i >= args.warmup:
                times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, v in times.items():
        rate = flops * args.batch / med[name] / 1e9
        print(
            f"{name:>9}: median {med[name]:.3f} s per fwd+bwd ({rate:.1f} GFLOP/s); "
            f"runs {', '.join(f'{s:.3f}' for s in v)}"
        )
    print(f"ratio ours / diffusers: {med['ours'] / med['diffusers']:.3f}")


if __name__ == "__main__":
    main()
