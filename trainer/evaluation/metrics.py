"""Metric formulas on features: FID, IS, KID (torch-fidelity's implementations) and feature moments.

Everything here works on features, not images, so ranks exchange a few kilobytes per sample.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import numpy as np
import torch

from trainer import distributed as du


class Reference(Protocol):
    """What the formulas need of a reference set (trainer.evaluation.reference.ReferenceStats)."""

    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64
    features: np.ndarray | None  # (M, D) subset for KID

# torch-fidelity's own defaults, written down here because they are part of the protocol.
isc_splits_default = 10
kid_subsets_default = 100
kid_subset_size_default = 1000
metric_rng_seed = 2020


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


def compute_metrics(
    features: dict[str, torch.Tensor],
    reference: Reference,
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
