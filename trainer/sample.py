"""The ``ddpm-sample`` command: images from a run's EMA weights, split over ranks, resumable.

    torchrun --nproc_per_node=8 -m trainer.sample --run-dir runs/celebahq_256 --num-samples 1000 --sampler ddim --steps 100

Writes ``<k>.png`` per image, ``grid.png`` and ``samples.npz`` (ADM layout) into the output
folder, through a ``SampleSet`` (trainer.sample_set): an interrupted run keeps its finished
chunks, more samples extend a set, and other settings on the same folder are refused. A set
never shrinks: asking for fewer images than the folder holds samples nothing, and ``grid.png``
and ``samples.npz`` keep every image of the set (the images asked for are its first N).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_pipeline.storage import find_fault, storage_error
from trainer import distributed as du
from trainer.checkpoint import open_for_inference
from trainer.errors import EXIT_CONFIG, EXIT_OK, StorageFault, classify
from trainer.sample_set import ProtocolMismatchError, SampleSet, adm_npz_images
from trainer.sampling import (
    add_ddim_eps_option,
    class_labels,
    ddim_eps_suffix,
    make_grid,
    sample_uint8,
    save_png,
)
from trainer.startup import init_distributed

log = logging.getLogger("ddpm")


class SampleArgsError(ValueError):
    """Options that do not fit the checkpoint's model."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of ``ddpm-sample``."""
    p = argparse.ArgumentParser(
        prog="ddpm-sample", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Sample images from a ddpm-scale run (EMA weights by default).",
    )
    p.add_argument("--run-dir", required=True, help="run directory (newest complete checkpoint) or checkpoint file")
    p.add_argument("--out", default=None,
                   help="output folder (default: <run>/samples/<checkpoint>-<sampler>-<steps>-seed<seed>[-eps-clipped][-g<guidance>]"
                        "[-label<label>])")
    p.add_argument("--num-samples", type=int, default=64, help="number of images")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm", help="ddpm = the paper's ancestral sampler")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: T for ddpm, 50 for ddim)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    add_ddim_eps_option(p)
    p.add_argument("--seed", type=int, default=0, help="base seed: image k's noise derives from (seed, k)")
    p.add_argument("--batch-per-gpu", type=int, default=64, help="images per GPU per sampler call (one chunk)")
    p.add_argument("--guidance", type=float, default=1.0,
                   help="classifier-free guidance scale (class-conditional models; 1 = none)")
    p.add_argument("--label", type=int, default=None,
                   help="class of every image (conditional models; default: image k gets class k %% num_classes)")
    p.add_argument("--weights", choices=("ema", "model"), default="ema", help="EMA or raw weights")
    p.add_argument("--ema-index", type=int, default=0,
                   help="which EMA profile (0 = the first: the fixed decay on the paper presets; ddpm-ema writes "
                   "one profile per file)")
    args = p.parse_args(argv)
    if args.num_samples < 1 or args.batch_per_gpu < 1:
        p.error("--num-samples and --batch-per-gpu must be >= 1")
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be >= 1")
    return args


def check_against_model(args: argparse.Namespace, num_classes: int) -> None:
    """Raise SampleArgsError (one line naming the fix) when --label/--guidance do not fit the model."""
    if num_classes <= 0:
        if args.label is not None:
            raise SampleArgsError("--label needs a class-conditional model; this one is unconditional "
                                  "(model.num_classes=0): drop --label")
        if args.guidance != 1.0:
            raise SampleArgsError("--guidance needs a class-conditional model; this one is unconditional "
                                  "(model.num_classes=0): drop --guidance")
    elif args.label is not None and not 0 <= args.label < num_classes:
        raise SampleArgsError(f"--label {args.label} is not a class of this model: give 0..{num_classes - 1} "
                              f"(model.num_classes={num_classes})")


def default_out(args: argparse.Namespace, run_dir: Path, ckpt: Path, steps: int | None) -> Path:
    """<run>/samples/<checkpoint>-<sampler>-<steps>-seed<seed>, plus a non-default DDIM eps, guidance and label."""
    name = f"{ckpt.stem}-{args.sampler}-{steps or 'T'}-seed{args.seed}"
    name += ddim_eps_suffix(args.sampler, args.ddim_eps)
    if args.guidance != 1.0:
        name += f"-g{args.guidance:g}"
    if args.label is not None:
        name += f"-label{args.label}"
    if args.ema_index:
        name += f"-ema{args.ema_index}"
    return run_dir / "samples" / name


def run(args: argparse.Namespace, info: du.DistInfo) -> Path:
    """Sample on every rank into the sample set; rank 0 writes grid.png and samples.npz. Returns the folder."""
    steps = args.steps if args.steps is not None else (50 if args.sampler == "ddim" else None)
    # The newest usable checkpoint of a run directory (or the file given), else one line and exit 2.
    got = open_for_inference(args.run_dir, which=args.weights, ema_index=args.ema_index)
    model, diffusion, cfg, ckpt = got.model, got.diffusion, got.config, got.path
    m = cfg["model"]
    num_classes = int(m.get("num_classes", 0) or 0)
    check_against_model(args, num_classes)
    model.to(info.device)
    diffusion.to(info.device)
    shape = (m["in_channels"], m["image_size"], m["image_size"])
    run_dir = Path(args.run_dir) if Path(args.run_dir).is_dir() else ckpt.parent.parent
    out = Path(args.out) if args.out else default_out(args, run_dir, ckpt, steps)
    samples = SampleSet(out, {
        "checkpoint": str(ckpt.resolve()), "weights": args.weights, "sampler": args.sampler, "steps": steps,
        "eta": args.eta if args.sampler == "ddim" else None,
        "ddim_eps": args.ddim_eps if args.sampler == "ddim" else None, "seed": args.seed, "guidance": args.guidance,
        "label": args.label, "image_size": m["image_size"], "num_classes": num_classes,
        **({"ema_index": args.ema_index} if args.ema_index else {}),  # profile 0: as sets made before the option
    })
    samples.claim_everywhere("use another --out, or the default folder, which names these settings")

    def make_chunk(start: int, end: int) -> tuple[np.ndarray, np.ndarray | None]:
        labels = class_labels(range(start, end), num_classes)
        if labels is not None and args.label is not None:
            labels.fill_(args.label)
        imgs = sample_uint8(model, diffusion, range(start, end), image_shape=shape, seed=args.seed,
                            batch_size=args.batch_per_gpu, sampler=args.sampler, steps=steps, eta=args.eta,
                            guidance_scale=args.guidance, labels=labels, device=info.device, ddim_eps=args.ddim_eps)
        for k, img in zip(range(start, end), imgs):
            save_png(img, out / f"{k:06d}.png")
        return imgs.permute(0, 2, 3, 1).numpy(), labels.numpy() if labels is not None else None

    samples.fill(args.num_samples, args.batch_per_gpu, make_chunk, progress=True)
    du.run_on_main(lambda: finish_set(samples, args.num_samples, num_classes > 0), (StorageFault,))
    return out


def finish_set(samples: SampleSet, asked: int, conditional: bool) -> None:
    """Rank 0: ``grid.png`` (first 64 images) and ``samples.npz`` of the whole set, never fewer images.

    The set holds at least ``asked`` images; one that holds more keeps them all in both files, and
    files already covering the whole set are left as they are.
    """
    out, npz = samples.root, samples.root / "samples.npz"
    total = max(asked, samples.held())
    kept = adm_npz_images(npz) or 0  # an archive of a larger set is never replaced by a smaller one
    if max(total, kept) > asked:
        log.info("%s holds %d samples; the %d asked for are its first %d (%06d.png to %06d.png, samples.npz "
                 "arr_0[:%d]); grid.png and samples.npz keep all %d", out, max(total, kept), asked, asked, 0,
                 asked - 1, asked, max(total, kept))
    write_npz = kept < total
    if not write_npz and (out / "grid.png").is_file():
        log.info("grid.png and samples.npz in %s already hold the whole set (%d images)", out, kept)
        return
    try:
        first: list[Any] = []
        for _, images, _ in samples.iter_images(min(total, 64)):
            first.append(torch.from_numpy(images).permute(0, 3, 1, 2))
        save_png(make_grid(torch.cat(first)), out / "grid.png")
        if write_npz:
            samples.write_adm_npz(npz, total, conditional=conditional)
    except OSError as e:  # a StorageError (full disk...): every rank ends with this one line
        fault = find_fault(e)
        if fault is None:
            raise
        raise StorageFault(f"storage error: {storage_error(fault, npz)}") from e
    log.info("wrote %d images, grid.png%s to %s", total, " and samples.npz" if write_npz else "", out)


def main(argv: list[str] | None = None) -> int:
    """The ``ddpm-sample`` command; returns the exit code (2 for a usage problem, one line on stderr)."""
    from trainer.monitor import setup_logging

    args = parse_args(argv)
    info = init_distributed()
    setup_logging(info.rank)
    try:
        run(args, info)
    except (FileNotFoundError, SampleArgsError, ProtocolMismatchError) as e:
        if du.is_main():
            print(f"ddpm-sample: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except Exception as e:
        code, line = classify(e)  # a set-up mistake (2) or a storage fault (74): one line; else a crash
        if line is None:
            raise
        if du.is_main():
            print(f"ddpm-sample: {line.replace('config error: ', 'error: ', 1)}", file=sys.stderr)
        return code
    finally:
        du.destroy()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
