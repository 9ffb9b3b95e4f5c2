"""ddpm-scale: data_pipeline (prepare shards, stream them with exact resume, ffcv/memory backends).

Names load lazily, so ``data_pipeline.storage`` (standard library only) imports without torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DataConfig", "Loader", "build_loader"]


def __getattr__(name: str) -> Any:
    if name == "DataConfig":
        from data_pipeline.config import DataConfig

        return DataConfig
    if name in ("Loader", "build_loader"):
        from data_pipeline import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'data_pipeline' has no attribute {name!r}")
