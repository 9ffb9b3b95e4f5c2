"""Sample-quality metrics: feature extractors, FID / IS / KID and reference statistics.

The numbers come from torch-fidelity (pinned 0.4.0), whose "inception-v3-compat" extractor
reproduces the TensorFlow Inception-v3 (2015-12-05) graph that the DDPM paper's FID/IS were
measured with (same resize, same pool_3 2048-d features, same 1008-way logits). Everything
here works on features, not images, so ranks exchange a few kilobytes per sample.

Feature extractors are callables ``uint8 (B, 3, H, W) -> {"features": (B, D), "logits": (B, K)}``
("logits" only where IS is wanted). They come from a small registry so tests inject a tiny
deterministic network and never download Inception weights.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer import distributed as du

FeatureExtractor = Callable[[torch.Tensor], dict[str, torch.Tensor]]
ExtractorFactory = Callable[[str, torch.device], FeatureExtractor]

# torch-fidelity's own defaults, written down here because they are part of the protocol.
isc_splits_default = 10
kid_subsets_default = 100
kid_subset_size_default = 1000
metric_rng_seed = 2020

_registry: dict[str, ExtractorFactory] = {}


# --------------------------------------------------------------------------- extractors


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
        self.net = FeatureExtractorInceptionV3(
            "inception-v3-compat",
            ["2048", "logits_unbiased"],
            feature_extractor_weights_path=weights or None,
            verbose=False,
        ).to(device)

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


# --------------------------------------------------------------------------- metrics


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """FID between N(mu1, sigma1) and N(mu2, sigma2): |mu1-mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    s1 = {"mu": np.asarray(mu1, np.float64), "sigma": np.atleast_2d(np.asarray(sigma1, np.float64))}
    s2 = {"mu": np.asarray(mu2, np.float64), "sigma": np.atleast_2d(np.asarray(sigma2, np.float64))}
    return float(fid_statistics_to_metric(s1, s2, verbose=False)[KEY_METRIC_FID])


def inception_score(
    logits: torch.Tensor, splits: int = isc_splits_default
) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))) over ``splits`` shuffled splits; (mean, std)."""
    from torch_fidelity.metric_isc import (
        KEY_METRIC_ISC_MEAN,
        KEY_METRIC_ISC_STD,
        isc_features_to_metric,
    )

    splits = max(1, min(splits, logits.shape[0]))
    out = isc_features_to_metric(logits.cpu(), splits=splits, shuffle=True, rng_seed=metric_rng_seed)
    return float(out[KEY_METRIC_ISC_MEAN]), float(out[KEY_METRIC_ISC_STD])


def kernel_inception_distance(
    features1: torch.Tensor | np.ndarray,
    features2: torch.Tensor | np.ndarray,
    subsets: int = kid_subsets_default,
    subset_size: int = kid_subset_size_default,
) -> tuple[float, float]:
    """KID (unbiased MMD^2, cubic polynomial kernel) over random subsets; (mean, std)."""
    from torch_fidelity.metric_kid import (
        KEY_METRIC_KID_MEAN,
        KEY_METRIC_KID_STD,
        kid_features_to_metric,
    )

    f1 = torch.as_tensor(np.asarray(features1, np.float64))
    f2 = torch.as_tensor(np.asarray(features2, np.float64))
    subset_size = min(subset_size, f1.shape[0], f2.shape[0])
    out = kid_features_to_metric(
        f1,
        f2,
        kid_subsets=subsets,
        kid_subset_size=subset_size,
        kid_kernel="poly",
        kid_kernel_poly_degree=3,
        kid_kernel_poly_gamma=None,
        kid_kernel_poly_coef0=1,
        rng_seed=metric_rng_seed,
        verbose=False,
    )
    return float(out[KEY_METRIC_KID_MEAN]), float(out[KEY_METRIC_KID_STD])


class FeatureMoments:
    """Running count, sum and sum of outer products of features (float64), summable over ranks."""

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        self.count = 0
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)  # (D,)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)  # (D, D)

    def update(self, features: torch.Tensor) -> None:
        """Add a (B, D) batch."""
        f = features.to(self.sum.device, torch.float64)
        self.count += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def all_reduce(self) -> FeatureMoments:
        """Sum the moments over all ranks (one collective of D^2 + D + 1 float64)."""
        if du.is_initialized():
            flat = torch.cat(
                [self.sum, self.outer.flatten(), self.sum.new_tensor([float(self.count)])]
            )
            du.all_reduce_sum(flat)
            d = self.sum.shape[0]
            self.sum = flat[:d].clone()
            self.outer = flat[d : d + d * d].view(d, d).clone()
            self.count = int(round(flat[-1].item()))
        return self

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean (D,) and unbiased covariance (D, D), as np.cov(rowvar=False) gives them."""
        if self.count < 2:
            raise ValueError(f"need at least 2 samples for a covariance, have {self.count}")
        n = self.count
        mu = self.sum / n
        cov = (self.outer - n * torch.outer(mu, mu)) / (n - 1)
        return mu.cpu().numpy(), cov.cpu().numpy()


def feature_statistics(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of a (N, D) feature matrix (float64)."""
    m = FeatureMoments(features.shape[1])
    m.update(features.cpu())
    return m.mean_cov()


# --------------------------------------------------------------------------- reference


@dataclasses.dataclass
class ReferenceStats:
    """Reference-set statistics: FID moments, a feature subset for KID, and how they were made."""

    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64
    num_images: int
    features: np.ndarray | None = None  # (M, D) float32 subset for KID, or None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (tmp file + rename) so a crash never leaves a half cache."""
        path = Path(path)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        arrays: dict[str, Any] = {
            "mu": self.mu,
            "sigma": self.sigma,
            "num_images": np.int64(self.num_images),
            "meta": np.array(json.dumps(self.meta)),
        }
        if self.features is not None:
            arrays["features"] = self.features.astype(np.float32)
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ReferenceStats:
        """Read our cache or an ADM-style reference batch (keys mu, sigma)."""
        with np.load(path, allow_pickle=False) as z:
            if "mu" not in z or "sigma" not in z:
                raise ValueError(f"{path}: no 'mu'/'sigma' arrays (images? use reference_from_images)")
            meta = json.loads(str(z["meta"])) if "meta" in z else {"source": str(path)}
            return cls(
                mu=z["mu"].astype(np.float64),
                sigma=z["sigma"].astype(np.float64),
                num_images=int(z["num_images"]) if "num_images" in z else -1,
                features=z["features"].astype(np.float32) if "features" in z else None,
                meta=meta,
            )


def image_hash(images: torch.Tensor) -> torch.Tensor:
    """A deterministic 31-bit hash per uint8 (B, C, H, W) image, (B,) int64 (same on any rank)."""
    flat = images.reshape(images.shape[0], -1).cpu().to(torch.int64)
    g = torch.Generator().manual_seed(20200619)  # fixed: the hash must not depend on the run
    w = torch.randint(1, 2**31 - 1, (flat.shape[1],), generator=g, dtype=torch.int64)
    # 255 * 2^31 * (3 * 1024 * 1024) < 2^63: no overflow up to 1024px RGB.
    return (flat * w).sum(1) % (2**31 - 1)


def reference_from_batches(
    batches: Iterable[torch.Tensor],
    extractor: FeatureExtractor,
    device: torch.device | str,
    max_images: int,
    kid_features: int = 10_000,
    meta: dict[str, Any] | None = None,
) -> ReferenceStats:
    """Reference statistics over this rank's uint8 (B, 3, H, W) batches, summed over all ranks.

    Every rank must call this (collectives); ``max_images`` is this rank's share. For KID,
    the ``kid_features`` images with the smallest image hashes are kept, in hash order: the
    same subset whatever the world size or the order the ranks read the data in.
    """
    moments: FeatureMoments | None = None
    pool_f = pool_h = None  # this rank's candidates: (<= kid_features, D) features, (n,) hashes
    seen = 0
    for images in batches:
        if seen >= max_images:
            break
        images = images[: max_images - seen]
        seen += images.shape[0]
        feats = extract_features(extractor, images, device)["features"]  # (B, D)
        if moments is None:
            moments = FeatureMoments(feats.shape[1], device=feats.device)
        moments.update(feats)
        if kid_features > 0:
            f, h = feats.cpu(), image_hash(images)
            if pool_f is not None:
                f, h = torch.cat([pool_f, f]), torch.cat([pool_h, h])
            keep = torch.argsort(h)[:kid_features]
            pool_f, pool_h = f[keep], h[keep]
    if moments is None:
        raise ValueError("reference set is empty on this rank")
    moments.all_reduce()
    mu, sigma = moments.mean_cov()
    features = None
    if kid_features > 0:
        dev = moments.sum.device
        # Two rounds so only kid_features rows travel: agree on the hash threshold, then send.
        all_h = du.all_gather_tensor(pool_h.to(dev)).cpu()
        threshold = torch.sort(all_h).values[min(kid_features, all_h.numel()) - 1]
        mine = pool_h <= threshold
        f = du.all_gather_tensor(pool_f[mine].to(dev)).cpu()
        h = du.all_gather_tensor(pool_h[mine].to(dev)).cpu()
        # Hash order makes the row order canonical too (equal hashes: identical images).
        order = torch.argsort(h, stable=True)
        features = f[order][:kid_features].numpy()
    return ReferenceStats(mu, sigma, moments.count, features, dict(meta or {}))


def reference_from_images(
    images: np.ndarray,
    extractor: FeatureExtractor,
    device: torch.device | str,
    batch_size: int = 100,
    meta: dict[str, Any] | None = None,
) -> ReferenceStats:
    """Statistics of an ADM-style uint8 (N, H, W, 3) image array (single process)."""
    batches = (
        torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])).permute(0, 3, 1, 2)
        for i in range(0, images.shape[0], batch_size)
    )
    return reference_from_batches(batches, extractor, device, images.shape[0], meta=meta)


def compute_metrics(
    features: dict[str, torch.Tensor],
    reference: ReferenceStats,
    metrics: Iterable[str] = ("fid",),
    isc_splits: int = isc_splits_default,
    kid_subsets: int = kid_subsets_default,
    kid_subset_size: int = kid_subset_size_default,
) -> dict[str, float]:
    """FID / IS / KID of generated features against a reference; keys fid, is, is_std, kid, kid_std."""
    out: dict[str, float] = {}
    feats = features["features"]  # (N, D)
    for name in metrics:
        if name == "fid":
            mu, sigma = feature_statistics(feats)
            out["fid"] = frechet_distance(mu, sigma, reference.mu, reference.sigma)
        elif name == "is":
            if "logits" not in features:
                raise ValueError("IS needs an extractor that returns 'logits'")
            out["is"], out["is_std"] = inception_score(features["logits"], isc_splits)
        elif name == "kid":
            if reference.features is None:
                raise ValueError("KID needs reference features; recompute the reference cache")
            out["kid"], out["kid_std"] = kernel_inception_distance(
                feats.cpu(), reference.features, kid_subsets, kid_subset_size
            )
        else:
            raise ValueError(f"unknown metric {name!r} (fid, is, kid)")
    return out


def library_version() -> str:
    """The metric library and version, for the protocol record."""
    try:
        from torch_fidelity.version import __version__
    except ImportError:  # pragma: no cover - the library is a declared dependency
        return "torch-fidelity (missing)"
    return f"torch-fidelity {__version__}"
