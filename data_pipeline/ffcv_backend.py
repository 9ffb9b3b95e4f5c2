"""FFCV backend (optional extra): write a .beton from prepared shards, and a resumable loader on it.

Order: FFCV's own Random traversal (np.random seeded by seed + epoch, or torch's
DistributedSampler with that seed when world_size > 1, which gives every rank the same length),
drop_last=True, so every rank yields len(loader) batches per epoch, forever.
Flips are drawn by us from (seed, rank, step), not by FFCV's unseeded RandomHorizontalFlip,
so resume is exact.

Resume: the cursor is (epoch, batches delivered in that epoch). Resuming slices the epoch's index
order past the delivered batches (no decoding). Exact for the same world size; with another
world size the run resumes at the start of the same epoch (DistributedSampler reshuffles per
world size, so finished samples cannot be told apart).
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from data_pipeline.config import DataConfig
from data_pipeline.images import IMAGE_EXTS, decode_image
from data_pipeline.restore import restore_from_ranks
from data_pipeline.shards import resolve_shards, sample_key
from data_pipeline.storage import atomic_path, atomic_write


class TarIndex:
    """Random access to the samples of local tar shards (index of member offsets): an FFCV source."""

    def __init__(self, urls: list[str], use_labels: bool) -> None:
        self.entries: list[tuple[str, int, int, int]] = []  # (path, offset, size, label)
        for url in urls:
            with tarfile.open(url) as tar:
                labels: dict[str, int] = {}
                images: list[tuple[str, int, int]] = []
                for m in tar.getmembers():
                    key, ext = sample_key(m.name)  # webdataset's keys, as the loaders read them
                    if key is None:
                        continue
                    if ext == "cls":
                        labels[key] = int(tar.extractfile(m).read())
                    elif ext in IMAGE_EXTS:
                        images.append((key, m.offset_data, m.size))
            self.entries += [
                (url, off, size, labels.get(k, 0) if use_labels else 0) for k, off, size in images
            ]

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        path, off, size, label = self.entries[i]
        with open(path, "rb") as f:
            f.seek(off)
            data = f.read(size)
        img = decode_image(data).permute(1, 2, 0).numpy()  # (H, W, 3) uint8, the shared decode
        return img, label


def write_beton(manifest: str | os.PathLike, path: str | os.PathLike, workers: int = 1) -> Path:
    """Write an FFCV .beton with fields image (RGB) and label (int) from prepared shards."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    man = json.loads(Path(manifest).read_text())
    shards = resolve_shards(str(manifest))
    source = TarIndex(shards.urls, use_labels=bool(man.get("classes")))
    size = int(man["image_size"])
    quality = int(man.get("options", {}).get("quality", 95))
    # Small images are stored raw (decode is then a memcpy); big ones as JPEG like the shards.
    mode = "raw" if size <= 64 else "jpg"
    path = Path(path)
    fields = {
        "image": RGBImageField(write_mode=mode, max_resolution=size, jpeg_quality=quality),
        "label": IntField(),
    }
    with atomic_path(path, what="FFCV file") as tmp:  # a .beton under its final name is complete
        DatasetWriter(str(tmp), fields, num_workers=max(1, workers)).from_indexed_dataset(source)
    meta = {"image_size": size, "num_samples": len(source), "classes": man.get("classes", [])}
    atomic_write(path.with_name(path.name + ".json"), json.dumps(meta), what="FFCV file metadata")
    return path


class FFCVLoader:
    """Endless, resumable loader over a .beton; same interface as Loader."""

    def __init__(
        self, cfg: DataConfig, *, batch_size: int, rank: int, world_size: int, seed: int, device
    ) -> None:
        from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
        from ffcv.loader import Loader as FfcvLoader
        from ffcv.loader import OrderOption
        from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage

        meta_path = Path(cfg.shards + ".json")
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        self.cfg = cfg
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.device = device
        image_pipe: list = [SimpleRGBImageDecoder(), ToTensor(), ToTorchImage(channels_last=False)]
        label_pipe: list = [IntDecoder(), ToTensor(), Squeeze(-1)]
        if device is not None and device.type == "cuda":
            image_pipe.append(ToDevice(device, non_blocking=True))
            label_pipe.append(ToDevice(device, non_blocking=True))
        self.ffcv = FfcvLoader(
            cfg.shards,
            batch_size=batch_size,
            num_workers=max(1, cfg.num_workers),
            order=OrderOption.RANDOM,
            distributed=world_size > 1,  # FFCV's distributed ordering (needs the process group)
            seed=seed,
            pipelines={"image": image_pipe, "label": label_pipe},
            drop_last=True,
        )
        self.num_samples = len(self.ffcv.indices)
        self.batches_per_epoch = len(self.ffcv)
        if self.batches_per_epoch == 0:
            raise ValueError(f"{self.num_samples} samples give no batch of {batch_size} per rank")
        self.image_size = int(meta.get("image_size", 0))
        self.num_classes = len(meta.get("classes", []))
        self.epoch, self.done, self.step = 0, 0, 0

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        base = self.ffcv.traversal_order
        while True:
            skip = self.done * self.batch_size
            epoch = self.epoch

            class Skipping:  # the epoch's own order, past the delivered batches: no decoding
                def sample_order(self, e: int, _base=base, _skip=skip, _epoch=epoch):
                    order = _base.sample_order(e)
                    return order[_skip:] if e == _epoch else order

            self.ffcv.traversal_order = Skipping()
            self.ffcv.next_epoch = epoch
            try:
                for images, labels in self.ffcv:
                    # FFCV recycles its output buffers a few batches later: copy out.
                    x, labels = images.clone(), labels.clone()  # (B, 3, H, W) uint8
                    if self.cfg.hflip:
                        g = torch.Generator().manual_seed(
                            (self.seed * 65_537 + self.rank) * 1_000_003 + self.step
                        )
                        flip = (torch.rand(len(x), generator=g) < 0.5).to(x.device)[
                            :, None, None, None
                        ]
                        x = torch.where(flip, x.flip(-1), x)
                    self.done += 1
                    self.step += 1
                    yield {"image": x, "label": labels.long()}
            finally:
                self.ffcv.traversal_order = base
            self.epoch, self.done = self.epoch + 1, 0

    def state_dict(self) -> dict:
        """Cursor after the last delivered batch."""
        return {
            "version": 1,
            "backend": "ffcv",
            "rank": self.rank,
            "world_size": self.world_size,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "epoch": self.epoch,
            "done": self.done,
            "step": self.step,
        }

    def load_rank_states(self, states: list[dict], rank: int, world_size: int) -> None:
        """Resume from every old rank's state (see data_pipeline.loader.restore_from_ranks)."""
        restore_from_ranks(self, states, rank, world_size)

    def load_state_dict(self, state: dict) -> None:
        """Exact for the same world size; otherwise restart the same epoch (module docstring)."""
        if "resharded_from" in state:
            st = state["resharded_from"][0]
            self.epoch, self.done, self.step = st["epoch"], 0, st["step"]
            return
        if state.get("backend") != "ffcv" or state["seed"] != self.seed:
            raise ValueError("loader state belongs to another backend or seed")
        if state["world_size"] != self.world_size:
            raise ValueError(
                "ffcv loader state of another world size: pass {'resharded_from': states}"
            )
        self.epoch, self.done, self.step = state["epoch"], state["done"], state["step"]

    def stats(self) -> dict[str, float]:
        """Samples delivered and epoch (the .beton holds no bad samples)."""
        return {
            "bad_samples": 0.0,
            "samples": float(self.step * self.batch_size),
            "epoch": float(self.epoch),
        }

    def close(self) -> None:
        """FFCV stops its threads when the epoch iterator is dropped."""


def build_ffcv_loader(
    cfg: DataConfig, *, batch_size: int, rank: int, world_size: int, seed: int, device
) -> FFCVLoader:
    """Validate the .beton and build the FFCV loader (ImportError with the install hint if missing)."""
    if not cfg.shards.endswith(".beton"):
        raise ValueError(
            f"data.backend=ffcv needs a .beton path in data.shards, got {cfg.shards!r}"
        )
    if not Path(cfg.shards).exists():
        raise FileNotFoundError(f"{cfg.shards} does not exist (prepare ... --beton {cfg.shards})")
    try:
        import ffcv  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "data.backend=ffcv needs the ffcv extra: apt-get install libopencv-dev libturbojpeg0-dev "
            "pkg-config && pip install ffcv==1.0.2"
        ) from e
    loader = FFCVLoader(
        cfg, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed, device=device
    )
    if cfg.image_size and loader.image_size and cfg.image_size != loader.image_size:
        raise ValueError(
            f"data.image_size={cfg.image_size} but the .beton holds {loader.image_size}px images"
        )
    return loader
