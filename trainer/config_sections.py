"""The trainer's own config sections (run, train, ema, checkpoint, log, dist, eval).

Each is a dataclass whose every field carries a one-line doc in ``metadata["help"]``; the model,
diffusion and data sections are the dataclasses of the layers that own them. ``trainer.config``
assembles the tree and parses it; this module imports nothing of the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from models.diffusion import DDIM_EPS, DDIM_EPS_DEFAULT


def _f(default: Any, help: str) -> Any:
    """A dataclass field with a one-line doc (shorthand used throughout this file)."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda: default, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class RunConfig:
    """Where a run lives and how it is seeded."""

    name: str = _f("quickstart", "run name; the run directory defaults to runs/<name>")
    dir: str = _f("", "run directory (config, checkpoints, TensorBoard, samples); '' = runs/<name>")
    seed: int = _f(0, "base seed; every random draw derives from (seed, rank, images seen)")


@dataclass
class TrainConfig:
    """Optimisation: batch, duration, AdamW, precision and compilation."""

    batch_size: int = _f(128, "global batch per optimizer step (all GPUs and accumulation together)")
    batch_per_gpu: int = _f(0, "micro-batch per GPU; 0 = batch_size / world_size (no accumulation)")
    total_images: int = _f(102_400_000, "training length in images (steps x batch_size)")
    lr: float = _f(2e-4, "peak learning rate (DDPM: 2e-4 at 32x32, 2e-5 at 256x256)")
    warmup_images: int = _f(640_000, "linear learning-rate warm-up length in images (DDPM: 5000 steps)")
    weight_decay: float = _f(0.0, "AdamW decoupled weight decay (DDPM: 0)")
    betas: tuple[float, float] = _f((0.9, 0.999), "Adam betas")
    eps: float = _f(1e-8, "Adam epsilon")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this value; 0 = off")
    precision: str = _f("auto", "auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32")
    compile: str = _f("auto", "torch.compile the UNet: auto (on GPU only) | true | false")
    channels_last: bool = _f(True, "use the channels_last memory format on GPU")
    max_nonfinite_steps: int = _f(20, "stop after this many non-finite losses in a row")
    label_dropout: float = _f(0.1, "class-conditional models: drop labels with this probability (CFG)")


@dataclass
class EMAConfig:
    """Exponential moving averages of the weights (fp32 shadows): fixed decays, then power profiles."""

    decays: tuple[float, ...] = _f((0.9999,), "one or several EMA decays per optimizer step (EMA index 0, 1, ...)")
    warmup: bool = _f(False, "use min(decay, (1 + n) / (10 + n)) for the first updates")
    sigma_rels: tuple[float, ...] = _f(
        (0.05, 0.10), "power-function EMA widths (EDM2 sigma_rel, time in images), after the decays; "
        "snapshotted for ddpm-ema; [] = none")
    snapshot_every_images: int = _f(
        0, "snapshot the power profiles (fp16, <run>/ema/) every this many images; 0 = about 32 per run")


@dataclass
class CheckpointConfig:
    """Crash-safe checkpoints in <run>/checkpoints."""

    every_images: int = _f(1_280_000, "write a checkpoint every this many images")
    keep_last: int = _f(3, "keep this many most recent checkpoints")
    milestone_every_images: int = _f(0, "also keep every checkpoint at multiples of this; 0 = none")
    async_write: bool = _f(True, "write in a background thread (the step only waits for the host copy)")


@dataclass
class LogConfig:
    """Console, TensorBoard and sample grids."""

    every_images: int = _f(12_800, "log scalars every this many images")
    sample_every_images: int = _f(1_280_000, "write a fixed-noise EMA sample grid every this many images; 0 = off")
    sample_count: int = _f(64, "images in the sample grid")
    sample_sampler: str = _f("ddim", "sampler for the grid: ddim | ddpm")
    sample_steps: int = _f(50, "sampler steps for the grid")
    sample_ddim_eps: str = _f(DDIM_EPS_DEFAULT, "DDIM direction term for the grid: model (diffusers' default) | "
                              "clipped (eps from the clipped x0, guided-diffusion)")
    tensorboard: bool = _f(True, "write TensorBoard event files under <run>/tb")


@dataclass
class DistConfig:
    """Process group settings."""

    backend: str = _f("auto", "auto (nccl on GPU, gloo on CPU) | nccl | gloo")
    init_timeout_s: int = _f(1800, "collective timeout for start-up and the first steps (compile, data)")
    timeout_s: int = _f(600, "collective timeout after dist.warmup_steps; a dead rank ends the job")
    warmup_steps: int = _f(20, "steps run with the start-up timeout before switching to dist.timeout_s")


@dataclass
class EvalConfig:
    """FID/IS/KID during training (the ``eval:`` section of the run config)."""

    every_images: int = field(default=0, metadata={"help": "evaluate every N training images (0 = off)"})
    num_samples: int = field(default=10_000, metadata={"help": "samples per evaluation (K), split over all ranks"})
    sampler: str = field(default="ddim", metadata={"help": "sampler for evaluation samples: ddim or ddpm"})
    steps: int = field(default=50, metadata={"help": "sampling steps (0 = the sampler's default: T for ddpm)"})
    eta: float = field(default=0.0, metadata={"help": "DDIM eta (0 = deterministic DDIM)"})
    ddim_eps: str = field(default=DDIM_EPS_DEFAULT, metadata={
        "help": "DDIM direction term: model (the model's eps, diffusers' default) | clipped (eps from the clipped "
                "x0, guided-diffusion); part of the FID protocol"})
    batch_per_gpu: int = field(default=64, metadata={"help": "images sampled (and featurised) per GPU at once"})
    metrics: tuple[str, ...] = field(default=("fid",), metadata={"help": "metrics to compute: fid, is, kid"})
    feature_extractor: str = field(
        default="inception-v3-compat",
        metadata={"help": "feature extractor (torch-fidelity name, or package.module:factory)"},
    )
    weights: str = field(default="", metadata={"help": "offline Inception weights file ('' = library download)"})
    reference: str = field(
        default="", metadata={"help": "reference stats .npz ('' = from the training shards, cached by the manifest)"}
    )
    seed: int = field(default=0, metadata={"help": "base seed: image k of every evaluation has its own noise from (seed, k)"})
    val_shards: str = field(
        default="", metadata={"help": "held-out shards for the pinned-noise validation loss ('' = off)"}
    )
    val_images: int = field(default=256, metadata={"help": "held-out images used by the validation loss"})
    val_every_images: int = field(
        default=0, metadata={"help": "validation loss (EMA weights, fixed t and noise) every N images; 0 = off"}
    )

    def validate(self) -> None:
        """Raise ValueError on an invalid field."""
        if self.every_images < 0:
            raise ValueError(f"eval.every_images: must be >= 0, got {self.every_images}")
        if self.num_samples < 2:
            raise ValueError(f"eval.num_samples: need at least 2 for a covariance, got {self.num_samples}")
        if self.sampler not in ("ddim", "ddpm"):
            raise ValueError(f"eval.sampler: expected ddim or ddpm, got {self.sampler!r}")
        if self.ddim_eps not in DDIM_EPS:
            raise ValueError(f"eval.ddim_eps: expected one of {list(DDIM_EPS)}, got {self.ddim_eps!r}")
        if self.steps < 0 or self.batch_per_gpu <= 0:
            raise ValueError("eval.steps must be >= 0 and eval.batch_per_gpu > 0")
        if self.val_every_images < 0 or self.val_images < 1:
            raise ValueError("eval.val_every_images must be >= 0 and eval.val_images >= 1")
        if self.val_every_images and not self.val_shards:
            raise ValueError("eval.val_every_images is set but eval.val_shards is empty: give held-out shards")
        bad = [m for m in self.metrics if m not in ("fid", "is", "kid")]
        if bad or not self.metrics:
            raise ValueError(f"eval.metrics: choose from fid, is, kid; got {list(self.metrics)!r}")
