"""DataConfig: the `data:` section of the trainer's config tree."""

from __future__ import annotations

from dataclasses import dataclass, field

BACKENDS = ("webdataset", "ffcv", "memory")


@dataclass
class DataConfig:
    """Where the shards are and how the loader reads them."""

    backend: str = field(
        default="webdataset", metadata={"help": "loader backend: webdataset | ffcv | memory"}
    )
    shards: str = field(
        default="",
        metadata={
            "help": "manifest.json, a folder holding one, a brace pattern, pipe:CMD, http(s)://...; "
            "ffcv: a .beton path"
        },
    )
    image_size: int = field(
        default=0, metadata={"help": "0: take it from the manifest; else checked against it"}
    )
    num_workers: int = field(default=2, metadata={"help": "DataLoader worker processes per rank"})
    hflip: bool = field(default=True, metadata={"help": "random horizontal flips (seeded)"})
    shuffle_buffer: int = field(
        default=256, metadata={"help": "samples in the seeded within-shard shuffle buffer"}
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
    synthetic_images: int = field(
        default=0,
        metadata={"help": "> 0: generate this many synthetic images into `shards` if missing"},
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
        if self.image_size < 0:
            raise ValueError(f"data.image_size must be >= 0, got {self.image_size}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
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
