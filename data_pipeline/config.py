"""DataConfig: the `data:` section of the trainer's config tree."""

from __future__ import annotations

from dataclasses import dataclass, field

BACKENDS = ("webdataset", "ffcv", "memory")
CROPS = ("center", "random", "none")
ON_DATA_CHANGE = ("restart_epoch", "error")
ORDERS = ("global", "streaming")


class SetupError(ValueError):
    """A user's set-up mistake found before work starts (exit code 2): the message names the fix."""


@dataclass
class DataConfig:
    """Where the shards are and how the loader reads them."""

    backend: str = field(
        default="webdataset", metadata={"help": "loader backend: webdataset | ffcv | memory"}
    )
    shards: str = field(
        default="",
        metadata={
            "help": "manifest.json, a folder of .tar shards (with or without a manifest), a brace "
            "pattern, pipe:CMD, http(s)://...; ffcv: a .beton path"
        },
    )
    image_size: int = field(
        default=0,
        metadata={
            "help": "side of the yielded images (= model.image_size); 0: the manifest's, else the "
            "first image's"
        },
    )
    crop: str = field(
        default="center",
        metadata={
            "help": "images of another size are resized (shorter side, antialiased) in the loader "
            "workers, then cropped: center (DDPM/ADM) | random | none (they are bad samples)"
        },
    )
    num_workers: int = field(default=2, metadata={"help": "DataLoader worker processes per rank"})
    hflip: bool = field(default=True, metadata={"help": "random horizontal flips (seeded)"})
    order: str = field(
        default="global",
        metadata={
            "help": "global (sample order independent of the cluster; local files and http(s)) | "
            "streaming (per-worker shard streams: pipe: sources)"
        },
    )
    shuffle_shards: int = field(
        default=8,
        metadata={"help": "global order: the samples of this many consecutive shards are shuffled together"},
    )
    shuffle_buffer: int = field(
        default=256, metadata={"help": "streaming order: samples in the seeded within-shard shuffle buffer"}
    )
    prefetch_factor: int = field(default=2, metadata={"help": "batches prefetched per worker"})
    gpu_decode: bool = field(
        default=False,
        metadata={"help": "ship JPEG bytes, decode with nvJPEG on the device (CPU fallback)"},
    )
    max_bad_fraction: float = field(
        default=0.01, metadata={"help": "stop with an error above this rate of corrupt samples"}
    )
    bad_min_samples: int = field(
        default=1000,
        metadata={"help": "the bad rate is taken over at least this many samples (early grace)"},
    )
    use_labels: bool = field(
        default=False, metadata={"help": "yield class labels from the shards (class-conditional)"}
    )
    labels_from: str = field(
        default="cls",
        metadata={"help": "label source: cls (the .cls part) | json:FIELD (an int field of .json)"},
    )
    num_classes: int = field(
        default=0,
        metadata={
            "help": "labels must lie in [0, num_classes) (= model.num_classes); 0: the manifest's "
            "class count"
        },
    )
    on_data_change: str = field(
        default="restart_epoch",
        metadata={
            "help": "resuming after the shard list changed: restart_epoch (next epoch, fresh "
            "shard order) | error"
        },
    )
    synthetic_images: int = field(
        default=0,
        metadata={"help": "> 0: generate this many synthetic images into `shards` if missing"},
    )
    audit: bool = field(
        default=False,
        metadata={"help": "write every consumed sample (epoch, key, shard, index, nimg) to <run dir>/audit/"},
    )
    memory_device_max_gb: float = field(
        default=4.0,
        metadata={
            "help": "memory backend: keep the dataset on the GPU when it is at most this big"
        },
    )

    def validate(self) -> None:
        """Raise ValueError on an inconsistent data config."""
        if self.backend not in BACKENDS:
            raise ValueError(f"data.backend must be one of {BACKENDS}, got {self.backend!r}")
        if not self.shards:
            raise ValueError("data.shards is empty: give a manifest, folder, pattern or URL")
        if self.crop not in CROPS:
            raise ValueError(f"data.crop must be one of {CROPS}, got {self.crop!r}")
        if self.on_data_change not in ON_DATA_CHANGE:
            raise ValueError(
                f"data.on_data_change must be one of {ON_DATA_CHANGE}, got {self.on_data_change!r}"
            )
        if self.labels_from != "cls" and not (
            self.labels_from.startswith("json:") and len(self.labels_from) > 5
        ):
            raise ValueError(
                f"data.labels_from must be cls or json:FIELD (e.g. json:label), got {self.labels_from!r}"
            )
        if self.num_classes < 0:
            raise ValueError(f"data.num_classes must be >= 0, got {self.num_classes}")
        if self.image_size < 0:
            raise ValueError(f"data.image_size must be >= 0, got {self.image_size}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.order not in ORDERS:
            raise ValueError(f"data.order must be one of {ORDERS}, got {self.order!r}")
        if self.shuffle_shards < 1:
            raise ValueError(f"data.shuffle_shards must be >= 1, got {self.shuffle_shards}")
        if self.shuffle_buffer < 1:
            raise ValueError(f"data.shuffle_buffer must be >= 1, got {self.shuffle_buffer}")
        if self.prefetch_factor < 1:
            raise ValueError(f"data.prefetch_factor must be >= 1, got {self.prefetch_factor}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(
                f"data.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}"
            )
        if self.bad_min_samples < 1:
            raise ValueError(f"data.bad_min_samples must be >= 1, got {self.bad_min_samples}")
        if self.synthetic_images < 0:
            raise ValueError(f"data.synthetic_images must be >= 0, got {self.synthetic_images}")
