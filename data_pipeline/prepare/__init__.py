"""Prepare image sources into webdataset tar shards + manifest.json (the ddpm-prepare command).

Sources (data_pipeline.sources, one module per kind):
    folder     images (jpg, png, webp, bmp), recursive; --labels: class names from sub-folders
    lsun       an LSUN *_lmdb directory, or a folder of them (--labels: one class per LMDB)
    celebahq   a folder (as folder)
    shards     webdataset shards written by any tool: a .tar, a folder of .tar files, a brace
               pattern, http(s)://..., pipe:CMD; labels kept from .cls (or --labels-from json:FIELD)
    parquet    parquet files with an image-bytes column (Hugging Face's Image feature or plain
               binary), a file, a folder of them or a pattern; labels kept from --label-column
               (default: `label`, with Hugging Face ClassLabel names); needs pyarrow

Every image is decoded (any mode to RGB, EXIF honoured), resized (shorter side, antialiased) and
center-cropped by data_pipeline.images, the same functions the loaders use, then encoded as JPEG
(or PNG). Shards and parquet files are first read once, block by block (a shard, a row group),
in parallel, into a staging area of already-processed samples; the fixed-seed shuffle and the
shard writing then copy staged bytes. So a remote shard is downloaded exactly once.

Layout of OUT_DIR:
    shard-000000.tar ...   samples "<key>.jpg" (or .png) and, with labels, "<key>.cls"; a shard
                           whose every source image was broken is not written (nor listed)
    manifest.json          shard list, per-shard counts / bytes / sha256, options, skipped files,
                           "made_by": "ddpm-prepare"
    .prepare/              options, one record per finished shard (a re-run keeps finished
                           shards) and, while shards or parquet are converted, the staging area

Modules: cli (the command), run (prepare's steps), writer (one shard), staging (streamed
sources), resume (OUT_DIR's earlier output), report (manifest and summary), pool (workers).
"""

from data_pipeline.prepare.cli import main
from data_pipeline.prepare.run import prepare

__all__ = ["main", "prepare"]
