"""The result of a prepare run: manifest.json (what readers need, who made it, what was skipped) and
the summary a user reads on stderr."""

from __future__ import annotations

import json
from pathlib import Path

from data_pipeline.prepare.pool import say
from data_pipeline.prepare.resume import MADE_BY, STATE
from data_pipeline.storage import atomic_write

# Readers (data_pipeline.shards) take shards[].name/samples/sha256, image_size and classes; new
# keys are additions only, so version 1 readers keep working.
MANIFEST_VERSION = 1
SHOWN_SKIPS = 20


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during prepare: finished shards are kept; the message says how to resume."""


def interrupted(out_dir: Path) -> Interrupted:
    """The one line a Ctrl-C prints: what is kept and how to resume."""
    kept = len(list((out_dir / STATE).glob("shard-*.json")))
    read = len(list((out_dir / STATE / "stage").glob("*.json")))
    what = f"{kept} finished shards" + (f" and {read} read source blocks" if read else "")
    return Interrupted(
        f"interrupted: {what} are kept in {out_dir}; run the same command again to resume"
    )


def build_manifest(
    options: dict,
    shard_size: int,
    records: list[dict],
    classes: list[str],
    skipped: list[dict],
    upscaled: int,
    extra: dict,
) -> dict:
    """manifest.json's content: the shards that hold images, in layout order, and the options."""
    shards = [r for r in records if r["samples"] > 0]  # never list (or write) an empty shard
    return {
        "version": MANIFEST_VERSION,
        "made_by": MADE_BY,
        "created_by": MADE_BY,  # the key earlier versions wrote
        "source": options["source"],
        "source_type": options["source_type"],
        "image_size": options["image_size"],
        "format": options["format"],
        "options": {
            k: options[k] for k in ("image_size", "format", "quality", "labels", "shuffle_seed")
        }
        | {"shard_size": shard_size},
        "num_samples": sum(r["samples"] for r in shards),
        "classes": classes,
        "upscaled": upscaled,
        "shards": [{k: r[k] for k in ("name", "samples", "bytes", "sha256")} for r in shards],
        "skipped": skipped,
        **extra,
    }


def write_manifest(out_dir: Path, manifest: dict) -> Path:
    """Write manifest.json atomically (fsynced): a reader sees the old one or the new one."""
    path = out_dir / "manifest.json"
    atomic_write(path, json.dumps(manifest, indent=1), what="manifest")
    return path


def summarize(
    manifest: dict, path: Path, out_dir: Path, kept: int, notes: list[str], verbose: bool
) -> None:
    """The summary: counts, what was kept, the first skipped files, notes, upscaled images."""
    shards, skipped, classes = manifest["shards"], manifest["skipped"], manifest["classes"]
    size = manifest["options"]["shard_size"]
    kept_note = f" ({kept} kept from an earlier run)" if kept else ""
    say(
        verbose,
        f"prepared {manifest['num_samples']} images into {len(shards)} shards of up to {size} in "
        f"{out_dir}{kept_note}; skipped {len(skipped)}"
        + (f"; {len(classes)} classes" if classes else ""),
    )
    for s in skipped[:SHOWN_SKIPS]:
        say(verbose, f"  skipped {s['path']}: {s['reason']}")
    if len(skipped) > SHOWN_SKIPS:
        say(verbose, f"  ... and {len(skipped) - SHOWN_SKIPS} more (all listed in {path})")
    for n in notes[:5]:
        say(verbose, f"  note: {n}")
    if manifest["upscaled"]:
        say(
            verbose,
            f"warning: {manifest['upscaled']} images were smaller than {manifest['image_size']}px "
            "and were upscaled",
        )
