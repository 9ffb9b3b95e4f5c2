"""ddpm-scale: data_pipeline (prepare shards, stream them with exact resume, ffcv/memory backends)."""

from data_pipeline.config import DataConfig
from data_pipeline.loader import Loader, build_loader

__all__ = ["DataConfig", "Loader", "build_loader"]
