"""The ddpm-prepare command: options, and every outcome as an exit code and at most one line.

Exit codes (the project's): 0 done; 2 a set-up mistake found before work (a bad option, a missing
or empty source, a missing optional package, someone else's or a read-only OUT_DIR); 74 a storage
fault mid-work (full disk, quota, read-only or vanished filesystem: finished shards are kept, run
the same command again); 130 Ctrl-C (finished shards are kept); 1 a crash, with its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from data_pipeline.prepare.report import Interrupted
from data_pipeline.prepare.run import prepare
from data_pipeline.prepare.writer import MAX_SHARD_SIZE, TARGET_SHARDS
from data_pipeline.sources import source_kinds
from data_pipeline.storage import StorageError, find_fault, storage_error

EXIT_OK = 0
EXIT_SETUP = 2
EXIT_STORAGE = 74  # EX_IOERR of sysexits.h; the trainer's storage-fault code too
EXIT_INTERRUPTED = 130


def parser() -> argparse.ArgumentParser:
    """ddpm-prepare's options, each with its default in --help."""
    p = argparse.ArgumentParser(
        prog="ddpm-prepare",
        description="Prepare images (a folder, an LSUN LMDB, CelebA-HQ, webdataset shards or parquet "
        "files) into webdataset tar shards + manifest.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "source",
        help="image folder, LSUN *_lmdb directory (or its parent), CelebA-HQ folder, webdataset "
        "shards (a .tar, a folder of them, a brace pattern, http(s)://..., pipe:CMD) or parquet "
        "files (a file, a folder, a pattern)",
    )
    p.add_argument("out_dir", help="output folder for shards and manifest.json")
    p.add_argument("--size", type=int, required=True, help="output image side in pixels")
    p.add_argument(
        "--format", choices=["jpeg", "png"], default="jpeg", help="encoding of the samples"
    )
    p.add_argument("--quality", type=int, default=95, help="JPEG quality")
    p.add_argument(
        "--shard-size",
        type=int,
        default=0,
        help=f"images per shard; 0: auto (about {TARGET_SHARDS} shards, at most {MAX_SHARD_SIZE} "
        "images each, so every worker of many ranks gets shards)",
    )
    p.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="processes (0: in-process)"
    )
    p.add_argument(
        "--labels",
        action="store_true",
        help="folder / LSUN: class labels from sub-folder / LMDB names (shards and parquet keep "
        "their labels without it)",
    )
    p.add_argument("--source-type", choices=["auto", *source_kinds()], default="auto")
    p.add_argument(
        "--labels-from", default="cls", help="shards: label from the .cls part, or json:FIELD"
    )
    p.add_argument(
        "--image-column", default="", help="parquet: the image column ('': found by type)"
    )
    p.add_argument("--label-column", default="label", help="parquet: the label column, if present")
    p.add_argument(
        "--shuffle-seed", type=int, default=0, help="seed of the order shuffle before sharding"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="rebuild an output folder prepared with other options",
    )
    p.add_argument("--beton", default=None, help="also write an FFCV .beton file at this path")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the summary stays)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Console entry point (ddpm-prepare)."""
    args = parser().parse_args(argv)
    try:
        manifest = prepare(
            args.source,
            args.out_dir,
            image_size=args.size,
            source_type=args.source_type,
            fmt=args.format,
            quality=args.quality,
            shard_size=args.shard_size,
            workers=args.workers,
            labels=args.labels,
            progress=not args.no_progress,
            shuffle_seed=args.shuffle_seed,
            labels_from=args.labels_from,
            image_column=args.image_column,
            label_column=args.label_column,
            overwrite=args.overwrite,
            verbose=True,
        )
        if args.beton:
            from data_pipeline.ffcv_backend import write_beton

            write_beton(manifest, args.beton, workers=max(1, args.workers))
    except Interrupted as e:
        print(e, file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except StorageError as e:  # already one line: the path, the space needed and free, the fix
        print(e, file=sys.stderr)
        return EXIT_STORAGE
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_SETUP
    except OSError as e:
        fault = find_fault(e)  # a write outside data_pipeline.storage (a folder made mid-work)
        if fault is None:
            raise
        print(storage_error(fault, fault.filename or args.out_dir), file=sys.stderr)
        return EXIT_STORAGE
    print(manifest)
    return EXIT_OK
