"""What an earlier ddpm-prepare left in OUT_DIR, and whether this run may use, keep or replace it.

OUT_DIR/.prepare/ holds the run's options (options.json) and one record per finished shard
(shard-NNNNNN.tar.json): a re-run with the same options keeps every shard whose record matches.
ddpm-prepare writes only into a folder that is absent, empty, or holds its own earlier output
(.prepare/, or a manifest it made); other folders are refused unless --overwrite, and even then
only files of its own names are replaced.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

from data_pipeline.config import SetupError
from data_pipeline.storage import atomic_write

MADE_BY = "ddpm-prepare"
STATE = ".prepare"
IGNORED = ("lost+found",)  # a fresh filesystem's root is empty for us
# Option name -> command-line flag, for the "prepared with other options" message.
FLAGS = {
    "image_size": "--size",
    "format": "--format",
    "quality": "--quality",
    "shard_size": "--shard-size",
    "labels": "--labels",
    "shuffle_seed": "--shuffle-seed",
    "labels_from": "--labels-from",
    "image_column": "--image-column",
    "label_column": "--label-column",
    "source": "SOURCE",
    "source_type": "--source-type",
}


def write_json(path: Path, obj: Any, what: str = "") -> None:
    """Write JSON atomically (temporary name, fsync, rename) through data_pipeline.storage."""
    atomic_write(path, json.dumps(obj), what=what)


def read_json(path: Path) -> dict | None:
    """A JSON object from a file, or None when missing or unreadable."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def record_path(out_dir: Path, name: str) -> Path:
    """Where the record of a finished shard lives."""
    return out_dir / STATE / f"{name}.json"


def own_manifest(out_dir: Path) -> dict | None:
    """OUT_DIR's manifest.json if ddpm-prepare made it (earlier versions wrote only created_by)."""
    man = read_json(out_dir / "manifest.json")
    if man is None or MADE_BY not in (man.get("made_by"), man.get("created_by")):
        return None
    return man


def is_own(out_dir: Path) -> bool:
    """Whether OUT_DIR holds output of an earlier ddpm-prepare (its state folder or its manifest)."""
    return (out_dir / STATE).is_dir() or own_manifest(out_dir) is not None


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse (before any work) a file, or a non-empty folder of someone else's, unless overwrite."""
    if out_dir.exists() and not out_dir.is_dir():
        raise SetupError(f"{out_dir} exists and is not a folder: choose a folder for the shards")
    if not out_dir.is_dir() or overwrite or is_own(out_dir):
        return
    example = next((p.name for p in out_dir.iterdir() if p.name not in IGNORED), None)
    if example is not None:
        raise SetupError(
            f"{out_dir} is not empty (e.g. {example}) and holds no output of ddpm-prepare: "
            "choose a new or empty output folder, or add --overwrite to write the shards into it "
            "anyway (replacing any shard-NNNNNN.tar and manifest.json there)"
        )


def earlier_options(out_dir: Path) -> dict | None:
    """The options of ddpm-prepare's earlier run into OUT_DIR (from .prepare/, else its manifest)."""
    opts = read_json(out_dir / STATE / "options.json")
    if opts is not None:
        return opts
    man = own_manifest(out_dir)
    if man is None:
        return None
    prev = {
        **man.get("options", {}),
        "source": man.get("source"),
        "source_type": man.get("source_type"),
    }
    prev.pop("shard_size", None)  # the manifest holds the resolved size, not the request
    return prev


def check_options(out_dir: Path, options: dict, overwrite: bool) -> dict | None:
    """The earlier run's options (None if none); refuses other options unless overwrite."""
    prev = earlier_options(out_dir)
    if prev is None:
        return None
    changed = [k for k in options if k != "num_items" and k in prev and prev[k] != options[k]]
    if changed and not overwrite:
        k = changed[0]
        flag = FLAGS.get(k, k)
        if isinstance(options[k], bool):
            was = f"{'with' if prev[k] else 'without'} {flag} (now {'with' if options[k] else 'without'})"
        else:
            was = f"{flag} {prev[k]} (now {options[k]})"
        raise ValueError(
            f"{out_dir} was prepared with other options: {was}; add --overwrite to rebuild it, "
            "or choose another output folder"
        )
    if changed:
        clear(out_dir)
        return None
    return prev


def own_shards(out_dir: Path) -> set[str]:
    """Names of the shards ddpm-prepare wrote into OUT_DIR (its records and its manifest)."""
    names = {p.name.removesuffix(".json") for p in (out_dir / STATE).glob("shard-*.tar.json")}
    man = own_manifest(out_dir)
    if man is not None:
        names |= {str(s.get("name", "")) for s in man.get("shards", [])}
    return {n for n in names if n.startswith("shard-") and "/" not in n}


def clear(out_dir: Path) -> None:
    """Remove what an earlier prepare wrote (its shards, manifest, .prepare); other files stay."""
    for name in own_shards(out_dir):
        (out_dir / name).unlink(missing_ok=True)
    if own_manifest(out_dir) is not None:
        (out_dir / "manifest.json").unlink()
    shutil.rmtree(out_dir / STATE, ignore_errors=True)


def remove_stale(out_dir: Path, num_shards: int) -> None:
    """Delete our shards (and records) beyond this run's layout: an earlier run had more."""
    for name in own_shards(out_dir):
        if name[6:12].isdigit() and int(name[6:12]) >= num_shards:
            (out_dir / name).unlink(missing_ok=True)
            record_path(out_dir, name).unlink(missing_ok=True)


def load_done(out_dir: Path, name: str, fingerprint: str) -> dict | None:
    """A finished shard's record if it matches these options and its file is in place (or none was due)."""
    rec = read_json(record_path(out_dir, name))
    if rec is None or rec.get("fingerprint") != fingerprint:
        return None
    path = out_dir / name
    if rec.get("samples", 0) == 0:  # every image of it was broken: no file was written
        return None if path.exists() else rec
    if not path.exists() or path.stat().st_size != rec.get("bytes"):
        return None
    return rec


def complete(out_dir: Path, prev: dict | None, options: dict) -> bool:
    """A finished earlier run of the same options on the same blocks (every shard in place)."""
    if prev is None or prev.get("blocks") != options.get("blocks"):
        return False
    man = own_manifest(out_dir)
    if man is None:
        return False
    return all(
        (out_dir / s["name"]).exists() and (out_dir / s["name"]).stat().st_size == s["bytes"]
        for s in man.get("shards", [])
    )


def remove_leftovers(folder: Path, *names: str) -> None:
    """Delete the hidden temporary files that interrupted writes of ``names`` (globs; default: any)
    left in ``folder``: ``.NAME.TOKEN.tmp`` (data_pipeline.storage), ``.NAME.tmpPID`` (older runs)."""
    with contextlib.suppress(
        OSError
    ):  # a vanished filesystem: nothing to clean, the fault is reported
        for name in names or ("*",):
            for p in folder.glob(f".{name}.*tmp*"):
                if p.is_file():
                    p.unlink(missing_ok=True)


def earlier_output(out_dir: str | Path) -> tuple[dict | None, dict | None]:
    """(manifest, options) that ddpm-prepare left in OUT_DIR; either is None when absent."""
    out_dir = Path(out_dir)
    return own_manifest(out_dir), read_json(out_dir / STATE / "options.json")
