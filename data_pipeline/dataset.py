"""What both loaders need at start-up (shards, output size, classes) and the per-sample decode.

open_dataset resolves data.shards (reading at most a manifest, or one image when the size must be
guessed), decides the output size and the class count, refuses what cannot work in one line, and
logs once which path the images take. SampleDecoder turns a sample's parts into the uint8 image at
that size and its label, with the shared decode and resize_crop of data_pipeline.images.
"""

from __future__ import annotations

import logging
import tarfile
from dataclasses import dataclass

from torch import Tensor

from data_pipeline.config import DataConfig, SetupError
from data_pipeline.images import IMAGE_EXTS, decode_image, is_upscaled, resize_crop
from data_pipeline.shards import (
    ShardSet,
    image_part,
    is_remote,
    open_shard,
    resolve_shards,
    sample_key,
    sample_label,
    tar_members,
)

log = logging.getLogger("ddpm.data")  # under the trainer's "ddpm" logger: rank logs get it


@dataclass
class Dataset:
    """The resolved data of a run."""

    shards: ShardSet
    image_size: int  # the side of every yielded image
    num_classes: int  # 0 without labels
    presized: bool  # the manifest says every image already has image_size (decode only)


def first_image_size(url: str) -> int:
    """The shorter side of the first image of a shard (reads up to it, not the shard); 0 if none."""
    # Local files unbuffered: the first members only, not a megabyte of read-ahead.
    try:
        stream = open(url, "rb", buffering=0) if not is_remote(url) else open_shard(url)  # noqa: SIM115
    except OSError:
        return 0
    try:
        for name, data in tar_members(stream):
            if sample_key(name)[1] in IMAGE_EXTS:
                try:
                    return min(decode_image(data).shape[-2:])
                except ValueError:
                    continue
    except (OSError, tarfile.TarError, UnicodeDecodeError):
        pass
    finally:
        try:
            stream.close()
        except Exception:  # a pipe: or curl stream closed early may report its exit status
            pass
    return 0


def open_dataset(cfg: DataConfig, *, rank: int = 0, backend: str = "webdataset",
                 log_path: bool = True) -> Dataset:
    """Resolve the shards, the output size and the classes; one SetupError line where it cannot work."""
    try:
        shards = resolve_shards(cfg.shards)
    except (FileNotFoundError, ValueError) as e:  # no shards, a missing path, an unreachable manifest
        raise SetupError(str(e)) from None
    size = cfg.image_size or shards.image_size
    if not size:
        size = first_image_size(shards.urls[0])
        if not size:
            raise SetupError(
                f"cannot tell the image size: no readable image at the start of {shards.urls[0]}; "
                "set data.image_size"
            )
    presized = shards.image_size == size
    if shards.image_size and not presized and cfg.crop == "none":
        raise SetupError(
            f"data.image_size={size} but the shards hold {shards.image_size}px images and "
            f"data.crop=none: set data.crop=center to resize them in the loader, or prepare them "
            f"at this size (ddpm-prepare SOURCE OUT_DIR --size {size})"
        )
    num_classes = 0
    if cfg.use_labels:
        if shards.manifest is not None:
            if not shards.classes:
                raise SetupError(
                    "data.use_labels is on but the manifest lists no classes: prepare the shards with "
                    "ddpm-prepare --labels, or set data.use_labels=false"
                )
            num_classes = len(shards.classes)
        elif cfg.num_classes:
            num_classes = cfg.num_classes
        else:
            raise SetupError(
                "data.use_labels is on and the shards have no manifest listing the classes: "
                "set data.num_classes (the trainer passes model.num_classes)"
            )
    if rank == 0 and log_path:
        _log_path(shards, size, presized, cfg, backend)
    return Dataset(shards, size, num_classes, presized)


def _log_path(shards: ShardSet, size: int, presized: bool, cfg: DataConfig, backend: str) -> None:
    where = "at load" if backend == "memory" else "in the loader workers"
    src = f"{len(shards.urls)} shards" + ("" if shards.manifest else " without a manifest")
    if presized:
        log.info("data: %s of %dpx images: decode only (no resize)", src, size)
    elif shards.image_size:
        log.info(
            "data: %s of %dpx images: resized to %dpx and %s-cropped %s",
            src,
            shards.image_size,
            size,
            cfg.crop,
            where,
        )
        if shards.image_size < size:
            log.warning("data: every image is upscaled (%dpx -> %dpx)", shards.image_size, size)
    else:
        log.info(
            "data: %s: %dx%d images are decoded only, others resized (shorter side) and "
            "%s-cropped to %dpx %s",
            src,
            size,
            size,
            cfg.crop,
            size,
            where,
        )


class SampleDecoder:
    """Parts of one sample -> ((3, S, S) uint8 image, label, upscaled?); ValueError on bad data."""

    def __init__(self, cfg: DataConfig, image_size: int, num_classes: int) -> None:
        self.size = image_size
        self.use_labels, self.labels_from = cfg.use_labels, cfg.labels_from
        self.num_classes = num_classes
        self.crop = cfg.crop

    def label(self, parts: dict[str, bytes]) -> int:
        """The class index (0 without labels); checked before any decoding."""
        if not self.use_labels:
            return 0
        return sample_label(parts, self.labels_from, self.num_classes)

    def image_bytes(self, parts: dict[str, bytes]) -> tuple[str, bytes]:
        """(part, bytes) of the sample's image, or a ValueError naming the parts it has."""
        found = image_part(parts)
        if found is None:
            have = ", ".join(sorted(parts)) or "nothing"
            raise ValueError(f"no image part ({', '.join(IMAGE_EXTS)}); the sample has: {have}")
        return found

    def __call__(
        self, parts: dict[str, bytes], pos: float | None = None
    ) -> tuple[Tensor, int, bool]:
        label = self.label(parts)
        ext, data = self.image_bytes(parts)
        img = decode_image(data, ext)
        s = self.size
        if img.shape[-2] == s and img.shape[-1] == s:
            return img, label, False  # the fast path: no resize, no copy
        if self.crop == "none":
            raise ValueError(
                f"image is {img.shape[-1]}x{img.shape[-2]}, not {s}x{s} (data.crop=none)"
            )
        return resize_crop(img, s, pos), label, is_upscaled(img, s)
