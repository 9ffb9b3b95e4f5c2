"""The standalone sampling-and-scoring command: ``python -m trainer.evaluate`` (``ddpm-evaluate``).

The paper's protocol by default (50k samples, 1000-step ancestral sampler)::

    torchrun --nproc_per_node 8 -m trainer.evaluate --run-dir runs/cifar10 [--sampler ddim --steps 100]

Samples go into a resumable ``SampleSet`` (``<out>/samples/chunk_<start>_<end>.npz``, kept by a
restart), then ``samples_<N>x<H>x<W>x3.npz`` (ADM layout, ``arr_0`` uint8 (N, H, W, 3)),
``report.json`` and a printed table that states the whole protocol next to every number.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_pipeline.storage import StorageError, atomic_write
from trainer import distributed as du
from trainer.config import ConfigError
from trainer.errors import EXIT_CONFIG, EXIT_OK, StorageFault, classify
from trainer.evaluation.features import extract_features, make_extractor
from trainer.evaluation.metrics import (
    compute_metrics,
    isc_splits_default,
    kid_subset_size_default,
    kid_subsets_default,
    library_version,
)
from trainer.evaluation.reference import load_reference, reference_from_data
from trainer.sample_set import ProtocolMismatchError, SampleSet
from trainer.sampling import add_ddim_eps_option, ddim_eps_suffix, sample_images
from trainer.startup import init_distributed

log = logging.getLogger("ddpm")

# Published DDPM results (Ho et al. 2020, Tables 1 and 3), printed next to ours for context.
paper_results = {
    "cifar10 32x32": "FID 3.17, IS 9.46 (50k samples, 1000-step ancestral sampler)",
    "lsun bedroom 256": "FID 6.36 (large model: 4.90)",
    "lsun church 256": "FID 7.89",
    "lsun cat 256": "FID 19.75",
}


def _load_model(args: argparse.Namespace) -> tuple[torch.nn.Module, Any, dict[str, Any], Path]:
    from trainer.checkpoint import open_for_inference

    got = open_for_inference(args.checkpoint or args.run_dir, which="ema", ema_index=args.ema_index)
    return got.model, got.diffusion, got.config, got.path


def _data_config(config: dict[str, Any]) -> Any:
    """DataConfig from the checkpoint's resolved config dict (unknown keys dropped)."""
    from data_pipeline import DataConfig

    names = {f.name for f in dataclasses.fields(DataConfig)}
    return DataConfig(**{k: tuple(v) if isinstance(v, list) else v
                         for k, v in config.get("data", {}).items() if k in names})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of ``python -m trainer.evaluate``."""
    p = argparse.ArgumentParser(
        prog="python -m trainer.evaluate",
        description="Sample from a checkpoint's EMA weights and measure FID/IS/KID (resumable; torchrun-able).",
    )
    p.add_argument("--run-dir", default="", help="run directory (uses its newest complete checkpoint)")
    p.add_argument("--checkpoint", default="", help="a checkpoint file (overrides --run-dir's newest)")
    p.add_argument("--num-samples", type=int, default=50_000, help="number of samples (paper: 50000)")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm", help="ddpm = the paper's ancestral sampler")
    p.add_argument("--steps", type=int, default=0, help="sampling steps (0 = T for ddpm, 100 for ddim)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    add_ddim_eps_option(p)
    p.add_argument("--batch-per-gpu", type=int, default=256, help="images per GPU per sampling call")
    p.add_argument("--out", default="", help="output folder (default <run-dir>/eval/<checkpoint>-<sampler><steps>-seed<S>)")
    p.add_argument("--reference", default="", help="reference .npz (stats or arr_0 images); default: training shards")
    p.add_argument("--weights", default="", help="offline Inception weights file ('' = library download)")
    p.add_argument("--feature-extractor", default="inception-v3-compat", help="extractor name or package.module:factory")
    p.add_argument("--metrics", default="fid,is", help="comma-separated: fid,is,kid")
    p.add_argument("--seed", type=int, default=0, help="base seed: image k's noise derives from (seed, k)")
    p.add_argument("--ema-index", type=int, default=0, help="which EMA decay's weights (index into ema.decays)")
    p.add_argument("--no-npz", action="store_true", help="skip writing the assembled ADM .npz")
    args = p.parse_args(argv)
    if not args.run_dir and not args.checkpoint:
        p.error("give --run-dir or --checkpoint")
    if args.num_samples < 2:
        p.error("--num-samples must be >= 2")
    bad = [m for m in args.metrics.split(",") if m not in ("fid", "is", "kid")]
    if bad:
        p.error(f"--metrics: unknown {bad}; choose from fid, is, kid")
    if args.sampler == "ddim" and args.steps == 0:
        args.steps = 100
    return args


def run_standalone(args: argparse.Namespace) -> dict[str, Any]:
    """The standalone evaluation; every rank runs it. Returns the report (on every rank)."""
    info = init_distributed()
    device, rank, world = info.device, du.get_rank(), du.get_world_size()
    model, diffusion, config, ckpt = _load_model(args)
    model.to(device)
    diffusion.to(device)
    mcfg = config.get("model", {})
    image_size = int(mcfg.get("image_size", 32))
    num_classes = int(mcfg.get("num_classes", 0) or 0)
    channels = int(mcfg.get("in_channels", 3) or 3)
    steps_name = args.steps or "T"
    out_dir = Path(args.out or Path(args.run_dir or ckpt.parent.parent) / "eval" / (
        f"{ckpt.stem}-{args.sampler}{steps_name}-seed{args.seed}"
        + ddim_eps_suffix(args.sampler, args.ddim_eps)))
    # What makes sample k what it is; a restart with other values would mix two protocols.
    protocol = {
        "checkpoint": str(ckpt.resolve()),
        "weights": f"ema[{args.ema_index}]",
        "sampler": args.sampler,
        "steps": args.steps or None,
        "eta": args.eta if args.sampler == "ddim" else None,
        "ddim_eps": args.ddim_eps if args.sampler == "ddim" else None,
        "seed": args.seed,
        "image_size": image_size,
        "num_classes": num_classes,
    }
    samples = SampleSet(out_dir, protocol)
    samples.claim_everywhere()

    # ---- extractor and reference first: a missing weights file or dataset fails in seconds.
    metric_names = tuple(m for m in args.metrics.split(",") if m)
    extractor = make_extractor(args.feature_extractor, args.weights, device)
    if args.reference:
        reference = load_reference(args.reference, extractor, args.feature_extractor, device)
    else:
        reference = reference_from_data(
            _data_config(config), extractor, args.feature_extractor, image_size, args.batch_per_gpu, device
        )

    # ---- sampling: the missing chunks of the sample set, round-robin over ranks.
    def make_chunk(s: int, e: int) -> tuple[np.ndarray, np.ndarray | None]:
        images = sample_images(
            model, diffusion, list(range(s, e)), seed=args.seed, image_size=image_size,
            num_classes=num_classes, sampler=args.sampler, steps=args.steps, eta=args.eta,
            channels=channels, device=device, ddim_eps=args.ddim_eps,
        )
        labels = (np.arange(s, e, dtype=np.int64) % num_classes) if num_classes else None
        return images.permute(0, 2, 3, 1).cpu().numpy(), labels

    sample_seconds = samples.fill(args.num_samples, args.batch_per_gpu, make_chunk)

    # ---- features: every rank reads a share of the chunks; features travel, not images.
    pieces = samples.complete_chunks(limit=args.num_samples)
    parts: dict[str, list[torch.Tensor]] = {}
    index_parts: list[torch.Tensor] = []
    mine = [c for j, c in enumerate(pieces) if j % world == rank]
    for s, array, _ in samples.iter_images(args.num_samples, mine):
        imgs = torch.from_numpy(array).permute(0, 3, 1, 2)
        for i in range(0, imgs.shape[0], args.batch_per_gpu):
            for k, v in extract_features(extractor, imgs[i : i + args.batch_per_gpu], device).items():
                parts.setdefault(k, []).append(v)
        index_parts.append(torch.arange(s, s + imgs.shape[0], device=device))
    if not index_parts:  # more ranks than chunks: send empty rows of the right width
        probe = extract_features(extractor, torch.zeros(1, channels, image_size, image_size, dtype=torch.uint8), device)
        parts = {k: [v[:0]] for k, v in probe.items()}
        index_parts = [torch.zeros(0, dtype=torch.long, device=device)]
    order = torch.argsort(du.all_gather_tensor(torch.cat(index_parts)).cpu())
    features = {k: du.all_gather_tensor(torch.cat(v)).cpu()[order] for k, v in sorted(parts.items())}

    def finish() -> dict[str, Any]:
        """Rank 0: the metrics, the ADM .npz of the N images scored, report.json (one line on a full disk)."""
        n = features["features"].shape[0]
        if n != args.num_samples:
            raise RuntimeError(f"expected {args.num_samples} samples, found {n}")
        held = samples.held()
        if held > n:
            log.info("%s holds %d samples; scoring its first %d (the set and its other files stay as they are)",
                     out_dir, held, n)
        metrics = compute_metrics(features, reference, metric_names)
        npz = out_dir / f"samples_{n}x{image_size}x{image_size}x{channels}.npz"
        report = {
            "metrics": metrics,
            "protocol": {
                **protocol,
                "steps": args.steps or diffusion.num_timesteps,
                "num_samples": n,
                "feature_extractor": args.feature_extractor,
                "feature_layers": {"fid": "pool_3 (2048)", "kid": "pool_3 (2048)", "is": "logits_unbiased (1008)"},
                "inception_weights": args.weights or (
                    "torch-fidelity default (weights-inception-2015-12-05)"
                    if args.feature_extractor == "inception-v3-compat" else "n/a"),
                "library": library_version(),
                "fid": "Frechet distance of Gaussian fits (torch-fidelity fid_statistics_to_metric)",
                "is_splits": isc_splits_default,
                "kid": f"{kid_subsets_default} subsets of {kid_subset_size_default}, cubic polynomial kernel",
                "reference": {k: v for k, v in reference.meta.items()} | {"num_images": reference.num_images},
                "world_size": world,
            },
            "samples_npz": None if args.no_npz else str(npz),
            "sample_seconds_this_run": round(sample_seconds, 1),
        }
        try:
            if not args.no_npz:
                samples.write_adm_npz(npz, n, conditional=num_classes > 0)
            atomic_write(out_dir / "report.json", json.dumps(report, indent=2, default=str) + "\n",
                         what="evaluation report")
        except StorageError as e:  # every rank ends with this one line (exit code 74)
            raise StorageFault(f"storage error: {e}") from e
        print(format_report(report))
        return report

    report = du.run_on_main(finish, (StorageFault,))
    return du.broadcast_object(report)


def format_report(report: dict[str, Any]) -> str:
    """A plain-text table of the metrics with the protocol that produced them."""
    p = report["protocol"]
    ref = p.get("reference", {})
    rows = [(k.upper().replace("_STD", " std"), f"{v:.4f}") for k, v in report["metrics"].items()]
    rows += [
        ("checkpoint", f"{Path(p['checkpoint']).name} ({p['weights']})"),
        ("sampler", f"{p['sampler']}, {p['steps']} steps" + (f", eta {p['eta']}" if p.get("eta") is not None else "")
         + (f", eps {p['ddim_eps']}" if p.get("ddim_eps") else "")),
        ("samples", f"{p['num_samples']} (seed {p['seed']} + k)"),
        ("features", f"{p['feature_extractor']} via {p['library']}, weights {p['inception_weights']}"),
        ("reference", f"{ref.get('source', '?')} ({ref.get('num_images', '?')} images)"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines.append("paper (Ho et al. 2020): " + "; ".join(f"{k}: {v}" for k, v in paper_results.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m trainer.evaluate``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    try:
        run_standalone(args)
    except (ConfigError, ProtocolMismatchError, FileNotFoundError) as e:
        # A user's mistake or an offline machine: one line, the same on every rank.
        print(f"ddpm-evaluate: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except Exception as e:
        code, line = classify(e)  # a set-up mistake (2) or a storage fault (74): one line; else a crash
        if line is None:
            raise
        print(f"ddpm-evaluate: {line.replace('config error: ', 'error: ', 1)}", file=sys.stderr)
        return code
    finally:
        du.destroy()
    return EXIT_OK


