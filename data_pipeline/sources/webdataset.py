"""Webdataset shards written by any tool: a .tar, a folder of them, a brace pattern, http(s), pipe:.

Streamed, one unit per shard. Labels are kept from the .cls part (or ``--labels-from json:FIELD``);
class names come from a manifest beside local shards (our own shards, re-prepared).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from braceexpand import braceexpand

from data_pipeline.images import IMAGE_EXTS
from data_pipeline.shards import image_part, is_remote, iter_tar, raw_label
from data_pipeline.sources import (
    Sample,
    Source,
    SourceArgs,
    expand,
    has_images,
    is_pattern,
    register_source,
)


def shard_urls(source: str) -> list[str]:
    """One entry per shard: a .tar, a folder of .tar files, a brace pattern, http(s) or pipe:."""
    if is_remote(source):
        if source.startswith("pipe:"):
            return ["pipe:" + u for u in braceexpand(source[5:])]
        return list(braceexpand(source))
    path = Path(source)
    if path.is_dir():
        urls = sorted(str(p) for p in path.glob("*.tar"))
        if not urls:
            raise ValueError(f"{source} holds no .tar shards")
        return urls
    urls = expand(source)
    missing = [u for u in urls if not os.path.exists(u)]
    if not urls or missing:
        raise FileNotFoundError(
            f"the shard pattern {source!r} matches no file"
            if not urls
            else f"{len(missing)} shards of {source!r} do not exist, e.g. {missing[0]}"
        )
    return urls


def known_classes(urls: list[str]) -> list[str]:
    """Class names of a manifest beside local source shards (our own shards re-prepared)."""
    if not urls or is_remote(urls[0]):
        return []
    man = Path(urls[0]).parent / "manifest.json"
    try:
        return list(json.loads(man.read_text()).get("classes", [])) if man.exists() else []
    except (OSError, json.JSONDecodeError):
        return []


@register_source
class ShardsSource(Source):
    """Each shard is read once, whole, by one worker into prepare's staging area."""

    kind = "shards"
    streamed = True
    rank = 3

    def __init__(self, spec: str, args: SourceArgs) -> None:
        super().__init__(spec, args)
        self._classes: list[str] = []

    @classmethod
    def detect(cls, spec: str) -> bool:
        """URLs and pipes; patterns and files other than parquet; a folder of .tar without images."""
        if is_remote(spec):
            return True
        if is_pattern(spec):
            names = expand(spec)
            return not (names and all(n.endswith(".parquet") for n in names))
        path = Path(spec)
        if path.is_file():
            return path.suffix != ".parquet"
        return path.is_dir() and not has_images(path) and any(path.glob("*.tar"))

    def units(self) -> list[str]:
        """The shard URLs (paths), in the order given."""
        urls = shard_urls(self.spec)
        self._classes = known_classes(urls)
        return urls

    def options(self) -> dict:
        """Which part the labels come from."""
        return {"labels_from": self.args.labels_from}

    def classes(self) -> list[str]:
        """Names from a manifest beside the shards (string labels are indexed into them)."""
        return self._classes

    def read(self, units: Sequence[str]) -> Iterator[Sample]:
        """Every sample of each shard; a shard without any image is one sample saying so."""
        for url in units:
            yield from self._read_shard(url)

    def _read_shard(self, url: str) -> Iterator[Sample]:
        errors: list[str] = []
        part = "cls" if self.args.labels_from == "cls" else "json"
        no_image: list[Sample] = []  # held back until the first image: one line for a shard of none
        seen_image = False
        for key, parts in iter_tar(url, lambda u, k, reason: errors.append(f"{k}: {reason}")):
            label, note = None, ""
            if part in parts:  # a sample without the part simply has no label
                try:
                    label = raw_label(parts, self.args.labels_from)
                except ValueError as e:
                    note = f"label: {e}"
            found = image_part(parts)
            if found is None:
                have = ", ".join(sorted(parts)) or "nothing"
                no_image.append(
                    Sample(
                        f"{url}: {key}",
                        None,
                        label,
                        f"no image part ({', '.join(IMAGE_EXTS)}); parts: {have}",
                    )
                )
                if seen_image:
                    yield from no_image
                    no_image = []
                continue
            if not seen_image:
                seen_image = True
                yield from no_image
                no_image = []
            yield Sample(f"{url}: {key}", found[1], label, note)
        if no_image:
            kinds = {s.note.rsplit("parts: ", 1)[-1] for s in no_image}
            yield Sample(
                None,
                None,
                None,
                f"no image of a known type ({', '.join(IMAGE_EXTS)}) in its {len(no_image)} "
                f"samples (parts: {'; '.join(sorted(kinds)) or '-'})",
            )
        for err in errors:  # the shard itself is damaged: its later samples are lost
            yield Sample(None, None, None, err)
