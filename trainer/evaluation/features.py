"""Feature extractors for sample-quality metrics: a small registry and the TF-compatible Inception.

Extractors are callables ``uint8 (B, 3, H, W) -> {"features": (B, D), "logits": (B, K)}``
("logits" only where IS is wanted). They come from a registry so tests inject a tiny
deterministic network and never download Inception weights. torch-fidelity (pinned 0.4.0)
provides "inception-v3-compat", the TensorFlow Inception-v3 (2015-12-05) graph the DDPM
paper's FID/IS were measured with (same resize, pool_3 2048-d features, 1008-way logits).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

import torch

from trainer import distributed as du
from trainer.config import ConfigError

FeatureExtractor = Callable[[torch.Tensor], dict[str, torch.Tensor]]
ExtractorFactory = Callable[[str, torch.device], FeatureExtractor]

_registry: dict[str, ExtractorFactory] = {}

# What torch-fidelity 0.4 downloads for "inception-v3-compat" (named in the offline hint).
inception_weights_url = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)


def register_feature_extractor(name: str, factory: ExtractorFactory) -> None:
    """Register ``factory(weights_path, device) -> extractor`` under ``name``."""
    _registry[name] = factory


def build_feature_extractor(
    name: str, weights: str = "", device: torch.device | str = "cpu"
) -> FeatureExtractor:
    """Build a registered extractor, or one named ``"package.module:factory"``."""
    device = torch.device(device)
    if name in _registry:
        return _registry[name](weights, device)
    if ":" in name:
        # An importable factory lets subprocesses (torchrun, the CLI) use injected extractors.
        module, attr = name.split(":", 1)
        return getattr(importlib.import_module(module), attr)(weights, device)
    raise ValueError(
        f"unknown feature extractor {name!r}; registered: {sorted(_registry)} "
        "(or give 'package.module:factory')"
    )


class _TorchFidelityInception(torch.nn.Module):
    """torch-fidelity's TF-compatible Inception-v3: pool_3 (2048) features and 1008 logits."""

    def __init__(self, weights: str, device: torch.device) -> None:
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        if weights and not os.path.isfile(weights):
            raise FileNotFoundError(f"Inception weights file not found: {weights}")
        # weights="" -> the library downloads its converted TF weights once into the torch hub
        # cache; a path is the offline option for clusters without internet.
        try:
            self.net = FeatureExtractorInceptionV3(
                "inception-v3-compat",
                ["2048", "logits_unbiased"],
                feature_extractor_weights_path=weights or None,
                verbose=False,
            ).to(device)
        except OSError as e:  # urllib's URLError is an OSError: an offline machine or a blocked proxy
            if weights:
                raise
            raise ConfigError(
                f"cannot download the Inception weights for FID ({getattr(e, 'reason', e)}); offline machines "
                f"download {inception_weights_url} once elsewhere and pass the file with eval.weights=PATH "
                "(training) or --weights PATH (trainer.evaluate)"
            ) from None

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 (B, 3, H, W) -> {"features": (B, 2048), "logits": (B, 1008)} float32."""
        feats, logits = self.net(images)
        return {"features": feats, "logits": logits}


register_feature_extractor("inception-v3-compat", _TorchFidelityInception)


@torch.no_grad()
def extract_features(
    extractor: FeatureExtractor, images: torch.Tensor, device: torch.device | str
) -> dict[str, torch.Tensor]:
    """Run the extractor in float32 (autocast off) on uint8 (B, 3, H, W) images."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    images = images.to(device, non_blocking=True)
    # The trainer may call us inside a bf16 autocast region; features must be float32.
    with torch.autocast(device_type=images.device.type, enabled=False):
        out = extractor(images)
    return {k: v.float() for k, v in out.items()}


def make_extractor(name: str, weights: str, device: torch.device) -> FeatureExtractor:
    """Build the named extractor on every rank, rank 0 first (it may download the weights).

    A failure on rank 0 (offline, bad path) reaches every rank as the same ConfigError, so
    no rank waits at a barrier for a peer that already gave up.
    """
    extractor, error = None, None
    if du.is_main():
        try:
            extractor = build_feature_extractor(name, weights, device)
        except (ConfigError, FileNotFoundError) as e:
            error = str(e)
    error = du.broadcast_object(error)  # also the barrier: the download is complete after it
    if error:
        raise ConfigError(error)
    if extractor is None:
        extractor = build_feature_extractor(name, weights, device)
    return extractor
