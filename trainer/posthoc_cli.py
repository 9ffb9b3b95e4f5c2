"""The ``ddpm-ema`` command (``python -m trainer.posthoc_cli``): choose the EMA after training.

    ddpm-ema --run-dir runs/celebahq_256 --sigma-rel 0.05,0.07 --out runs/celebahq_256/posthoc
    ddpm-ema --run-dir runs/celebahq_256 --sweep --out runs/celebahq_256/posthoc

The first writes ``ema-sigma<s>-<images>.pt`` per sigma_rel, reconstructed from the run's EMA
snapshots alone (trainer.posthoc), which ``ddpm-sample --run-dir FILE``, ``ddpm-evaluate
--checkpoint FILE`` and the diffusers export read. The second scores a range of reconstructed
profiles with the run's own measures (trainer.posthoc_sweep) and names the best.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from trainer.errors import EXIT_CONFIG, EXIT_OK, classify
from trainer.posthoc import (
    PosthocError,
    groups,
    inference_state,
    output_name,
    plan,
    read_snapshots,
    reconstruct,
    write_checkpoint,
)

log = logging.getLogger("ddpm")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of ``ddpm-ema``."""
    p = argparse.ArgumentParser(
        prog="ddpm-ema", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Reconstruct power-function EMA profiles of any width from a run's EMA snapshots "
                    "(post-hoc EMA, EDM2 section 3), or sweep widths and score them.",
    )
    p.add_argument("--run-dir", required=True, help="run directory (its ema/snapshot-*.pt files)")
    p.add_argument("--sigma-rel", default="",
                   help="comma-separated EMA widths (std of the profile / training time), e.g. 0.05,0.07; "
                        "with --sweep: the widths to score instead of the default range")
    p.add_argument("--at-images", type=int, default=None, help="a snapshot time (default: the newest snapshot)")
    p.add_argument("--out", default="", help="output folder (default: <run>/posthoc)")
    p.add_argument("--sweep", action="store_true",
                   help="score a range of widths: validation loss (eval.val_shards), FID (when Inception weights "
                        "are available), a fixed-noise grid each; writes a table, a plot and TensorBoard entries")
    p.add_argument("--max-error", type=float, default=0.05,
                   help="refuse a width whose profile the snapshots reproduce worse than this (relative L2)")
    p.add_argument("--group", type=int, default=4,
                   help="widths reconstructed per pass over the snapshots (each holds one fp32 model copy)")
    p.add_argument("--num-samples", type=int, default=0, help="--sweep: FID samples (0 = the run's eval.num_samples)")
    p.add_argument("--weights", default="", help="--sweep: Inception weights file (default: eval.weights, "
                                                 "else torch-fidelity's cache)")
    p.add_argument("--device", default="auto", help="--sweep: auto (cuda if available) | cpu | cuda[:k]")
    args = p.parse_args(argv)
    try:
        args.sigma_rels = [float(v) for v in args.sigma_rel.split(",") if v.strip()]
    except ValueError:
        p.error(f"--sigma-rel takes comma-separated numbers such as 0.05,0.07, got {args.sigma_rel!r}")
    if not args.sigma_rels and not args.sweep:
        p.error("give --sigma-rel (one or several widths) or --sweep")
    if not 0 < args.max_error < 1 or args.group < 1 or args.num_samples < 0:
        p.error("--max-error must lie in (0, 1), --group be >= 1 and --num-samples >= 0")
    return args


def reconstruct_to_files(run_dir: str | Path, sigma_rels: list[float], at: int | None, out: Path,
                         max_error: float = 0.05, group: int = 4) -> list[Path]:
    """Write one inference checkpoint per sigma_rel into ``out``; returns their paths."""
    p = plan(read_snapshots(run_dir), sigma_rels, at, max_error)
    log.info("reconstructing sigma_rel %s at %d images from %d snapshots (%s ... %s)", p.sigma_rels, p.at,
             len(p.snapshots), p.snapshots[0].path.name, p.snapshots[-1].path.name)
    paths = []
    for g in groups(len(p.sigma_rels), group):
        for i, weights in zip(g, reconstruct(p, g)):
            path = write_checkpoint(out / output_name(p.sigma_rels[i], p.at), inference_state(p, i, weights))
            log.info("sigma_rel %g (profile error %.2e): %s", p.sigma_rels[i], p.errors[i], path)
            paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    """The ``ddpm-ema`` command; 2 with one line for a request that cannot be met, 74 for a storage fault."""
    from trainer.monitor import setup_logging

    args = parse_args(argv)
    setup_logging(0)
    out = Path(args.out) if args.out else Path(args.run_dir) / "posthoc"
    try:
        if args.sweep:
            from trainer.posthoc_sweep import run_sweep

            run_sweep(args, out)
        else:
            for path in reconstruct_to_files(args.run_dir, args.sigma_rels, args.at_images, out, args.max_error,
                                             args.group):
                print(path)
    except PosthocError as e:
        print(f"ddpm-ema: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except Exception as e:
        code, line = classify(e)  # a set-up mistake (2) or a storage fault (74): one line; else a crash
        if line is None:
            raise
        print(f"ddpm-ema: {line.removeprefix('config error: ')}", file=sys.stderr)
        return code
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
