"""What every section of the GPU check shares: the Check, the tiny model, child-process settings."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
MODULE = "benchmarks.gpu_check"

# The CPU mode's model and the tiny run of the resume and DDP sections: 2 levels at 16x16.
tiny_overrides = (
    "model.image_size=16", "model.base_channels=32", "model.channel_mult=[1,2]", "model.num_res_blocks=1",
    "model.attn_resolutions=[8]", "model.dropout=0.1", "diffusion.timesteps=100", "train.batch_size=8",
    "train.lr=1e-3", "train.warmup_images=80",
)
grad_stride_warning = "Grad strides do not match"
# What the sections import besides torch (a GPU machine may have torch alone), by import name.
packages_needed = {
    "einops": "every section", "yaml": "every section", "numpy": "every section", "PIL": "every section",
    "webdataset": "every section", "braceexpand": "every section", "tqdm": "every section",
    "torchvision": "resume, decode, gpu_tests", "pytest": "gpu_tests", "diffusers": "diffusers",
}


@dataclass
class Check:
    """What every section gets: the mode, the device, the model config, the budget."""

    mode: str  # "gpu" or "cpu"
    device: torch.device
    cfg: Any  # trainer.config.Config of the model the step, diffusers and EMA sections time
    batches: list[int]
    steps: int
    warmup: int
    work: Path
    deadline: float  # time.monotonic() by which the whole check ends
    section_deadline: float = 0.0  # this section's end, leaving the later sections their minimum
    results: dict[str, Any] = field(default_factory=dict)

    def left(self) -> float:
        """Seconds left to the running section."""
        return self.section_deadline - time.monotonic()


def env_for_children(check: Check) -> dict[str, str]:
    """The environment of the torchrun and pytest children: this repository first, one inductor cache."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("WORLD_SIZE", None)
    # One inductor cache for every child run: the second compile of the same graph is a cache hit.
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(check.work / "inductor_cache"))
    if check.mode == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def tail(text: str, n: int = 3000) -> str:
    """The end of a child's output, for the report."""
    return text[-n:]
