"""EMA update cost: the fused fixed-decay EMA alone against fixed decays plus power-function profiles.

    python -m benchmarks.ema                                   # celebahq_256's 114M-parameter UNet, CPU
    python -m benchmarks.ema --config cifar10_32 --device cuda --repeats 20

Both arms are the trainer's own ``trainer.ema.EMA`` on the same model: ``fixed`` tracks the
config's ``ema.decays`` (what the trainer did before power profiles), ``fixed+power`` also tracks
``--sigma-rels`` (default: the config's ``ema.sigma_rels``). One update is one fused
``torch._foreach_lerp_`` per profile; the arms run interleaved (fixed, fixed+power, fixed, ...)
and the report gives each arm's median seconds per update and the ratio to ``fixed``. The weights
move between updates (a fused add outside the clock), so every update reads fresh values.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import torch

from benchmarks import timing
from benchmarks.timing import UsageError

MODULE = "benchmarks.ema"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="celebahq_256", help="preset name or trainer YAML whose model and ema are used")
    p.add_argument("--sigma-rels", default="", help="comma-separated widths of the power arm (default: the config's)")
    p.add_argument("--device", default="cpu", help="cpu | cuda[:k]")
    timing.add_common_args(p, repeats=7, warmup=2)
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    return p.parse_args(argv)


def measure(cfg: Any, sigma_rels: Sequence[float], device: torch.device, repeats: int,
            warmup: int) -> dict[str, Any]:
    """Seconds per EMA update of both arms, interleaved, and their ratio."""
    from models.unet import UNet
    from trainer.ema import EMA

    torch.manual_seed(0)
    model = UNet(cfg.model).to(device)
    params = [p.detach() for p in model.parameters()]
    decays = cfg.ema.decays or (0.9999,)
    arms = {"fixed": EMA(model, decays, cfg.ema.warmup),
            "fixed+power": EMA(model, decays, cfg.ema.warmup, sigma_rels)}
    batch, clock = cfg.train.batch_size, {"nimg": 0}

    def advance() -> None:  # fresh weights for the next round, outside the clock
        with torch.no_grad():
            torch._foreach_add_(params, 1e-6)
        clock["nimg"] += batch

    samples: dict[str, list[float]] = {name: [] for name in arms}
    for i in range(warmup + repeats):
        advance()
        for name, ema in arms.items():
            seconds = timing.timed(lambda e=ema: e.update(model, clock["nimg"]), device)
            if i >= warmup:
                samples[name].append(seconds)
    summary = timing.summarize(samples, base="fixed")
    n = sum(p.numel() for p in params)
    return {"parameters": n, "decays": list(decays), "sigma_rels": list(sigma_rels),
            "profiles": {name: ema.num_profiles for name, ema in arms.items()}, "device": str(device),
            "arms": summary}


def run(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    """Measure and print."""
    from benchmarks.trainer_internals import load_cfg

    timing.check_common_args(args)
    cfg = load_cfg(args.config, list(args.overrides) + ["data.shards=unused"])
    try:
        sigma_rels = [float(v) for v in args.sigma_rels.split(",") if v] if args.sigma_rels else list(
            cfg.ema.sigma_rels or (0.05, 0.10))
    except ValueError:
        raise UsageError(f"--sigma-rels takes comma-separated numbers, got {args.sigma_rels!r}") from None
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no GPU visible here")
    res = measure(cfg, sigma_rels, device, args.repeats, args.warmup)
    arms = res["arms"]
    print(f"EMA update of {res['parameters'] / 1e6:.1f}M parameters ({args.config}) on {device}, "
          f"{args.repeats} interleaved repeats after {args.warmup} warm-up; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    for name, s in arms.items():
        print(f"  {name:<12} {res['profiles'][name]} profile(s)  median {s['median'] * 1e3:8.1f} ms/update  "
              f"ratio {s['ratio']:.2f}")
    timing.finish(MODULE, argv, args, res)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; 2 with one line on stderr for a mistake."""
    args = parse_args(argv)
    return timing.run_cli(MODULE, lambda: run(args, argv))


if __name__ == "__main__":
    sys.exit(main())
