"""Model benchmark: parameters, training FLOPs, and this UNet's fwd+bwd next to diffusers' UNet2DModel.

    python -m benchmarks.model --config celebahq_256 --batch 1              # the paper's 256x256 UNet vs diffusers
    python -m benchmarks.model --config cifar10_32 --count-only             # parameters and FLOPs only
    python -m benchmarks.model --config my_run.yaml --device cuda --batch 8 model.dropout=0.0

--config is a preset name or a trainer YAML: its `model:` section (plus key=value overrides) is the
UNet. Both models get the same weights and inputs; their steps run interleaved (ours, theirs,
ours, ...) in one process so that machine noise hits both alike, and the median of each is
reported with the ratio. Dropout stays as configured (the presets' 256x256 models have none).
diffusers is needed for the timing only (pip install -e ".[diffusers]").
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from benchmarks import timing
from benchmarks.timing import UsageError

MODULE = "benchmarks.model"


def _step_fn(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, ours: bool) -> Callable[[], None]:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        out = model(x, t) if ours else model(x, t).sample
        out.float().pow(2).mean().backward()

    return step


def unet_config(config: str, overrides: Sequence[str]) -> Any:
    """The UNetConfig of a preset or trainer YAML with overrides."""
    from benchmarks.trainer_internals import load_cfg

    return load_cfg(config, overrides).model


def counts(cfg: Any) -> dict[str, float]:
    """Parameters and training FLOPs per image, counted on the meta device."""
    from models.flops import training_flops_per_image
    from models.unet import UNet, count_parameters

    with torch.device("meta"):
        params = count_parameters(UNet(cfg))
    return {"parameters": params, "training_gflop_per_image": training_flops_per_image(cfg) / 1e9}


def compare(cfg: Any, batch: int, repeats: int, warmup: int, device: torch.device) -> dict[str, Any]:
    """fwd+bwd of ours vs diffusers' UNet2DModel with the same weights and input, interleaved."""
    from diffusers import UNet2DModel

    from models.interop import convert_state_dict_to_diffusers, diffusers_config_from_unet
    from models.unet import UNet, count_parameters

    torch.manual_seed(0)
    ours = UNet(cfg).to(device).train()
    theirs = UNet2DModel(**diffusers_config_from_unet(cfg)).to(device).train()
    theirs.load_state_dict(convert_state_dict_to_diffusers(ours.state_dict(), cfg))
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    runs = timing.time_arms({"ours": _step_fn(ours, x, t, True), "diffusers": _step_fn(theirs, x, t, False)},
                            repeats, warmup, device)
    s = timing.summarize(runs)
    return {"parameters_ours": count_parameters(ours), "parameters_diffusers": count_parameters(theirs),
            "seconds": {k: v["median"] for k, v in s.items()}, "runs_s": runs,
            "ours_over_diffusers": s["ours"]["median"] / s["diffusers"]["median"]}


def main(argv: Sequence[str] | None = None) -> int:
    """Print parameters, training FLOPs per image and fwd+bwd seconds of ours vs diffusers."""
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="celebahq_256", help="preset name or YAML path (default celebahq_256)")
    p.add_argument("--batch", type=int, default=1, help="images per fwd+bwd (default 1)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--count-only", action="store_true", help="parameters and FLOPs only: no timing, no diffusers")
    timing.add_common_args(p, repeats=5, warmup=1)
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. model.dropout=0.0")
    args = p.parse_args(argv)

    def run() -> int:
        timing.check_common_args(args)
        if args.count_only:
            timing.refuse_unused(timing.explicit(p, argv), ["batch", "device", "repeats", "warmup"],
                                 "with --count-only (nothing is timed)")
        if args.batch < 1:
            raise UsageError(f"--batch must be >= 1, got {args.batch}")
        try:
            device = torch.device(args.device)
        except RuntimeError as e:
            raise UsageError(f"--device: {e}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: no CUDA device here")
        if device.type not in ("cpu", "cuda"):
            raise UsageError(f"--device: expected cpu or cuda[:N], got {args.device!r}")
        cfg = unet_config(args.config, args.overrides)
        c = counts(cfg)
        print(f"config {args.config}: {cfg}")
        print(f"parameters {c['parameters']:,}; training FLOPs per image (fwd+bwd) "
              f"{c['training_gflop_per_image']:.2f} GFLOP")
        results: dict[str, Any] = {"config": args.config, "model": vars(cfg), **c}
        if not args.count_only:
            try:
                import diffusers  # noqa: F401 - benchmark-only dependency
            except ImportError as e:
                raise UsageError(f"diffusers is not installed ({e}): pip install -e \".[diffusers]\", "
                                 "or run with --count-only") from None
            r = compare(cfg, args.batch, args.repeats, args.warmup, device)
            print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
                  f"batch {args.batch}, median of {args.repeats} interleaved runs")
            for name, runs in r["runs_s"].items():
                rate = c["training_gflop_per_image"] * args.batch / r["seconds"][name]
                print(f"{name:>9}: median {r['seconds'][name]:.3f} s per fwd+bwd ({rate:.1f} GFLOP/s); "
                      f"runs {', '.join(f'{s:.3f}' for s in runs)}")
            print(f"ratio ours / diffusers (time): {r['ours_over_diffusers']:.3f}")
            results.update(r)
        timing.finish(MODULE, argv, args, results)
        return 0

    return timing.run_cli(MODULE, run)


if __name__ == "__main__":
    sys.exit(main())
