"""The convergence benchmark's real image set and its offline judge.

The set is scikit-learn's handwritten digits (1,797 grayscale scans, 8x8, shipped inside the
package: no download), upscaled to the model's size and made into shards by ddpm-prepare's code
(``make_digit_shards``). ``DigitsJudge`` scores uint8 samples without downloaded weights: a
classifier trained on the real images plus a "not a digit" class of noise (its mean confidence in
the top digit, and the Inception-score-like class spread exp E[KL(p(y|x) || p(y))], 10 at best), a
Frechet distance in a PCA feature space fitted on the real images, and channel consistency
(every training image has R = G = B).
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

NOT_A_DIGIT = 10  # the judge's reject class


# ----------------------------------------------------------------------------- the real image set


def digits(size: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 digit scans as uint8 (N, size, size) (bilinear from 8x8, 0..16 -> 0..255) and labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] * (255.0 / 16.0)  # (N, 1, 8, 8)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)[:, 0].numpy(), d.target.astype(np.int64)


def make_digit_shards(shards: str | os.PathLike, size: int, *, shard_size: int = 200,
                      images_dir: str | os.PathLike | None = None) -> Path:
    """The digits at ``size`` px as class folders of grayscale PNGs, made into shards at ``shards`` by ddpm-prepare.

    Kept when ``shards`` already holds them at this size; ValueError when it holds another set.
    """
    import json

    from PIL import Image

    from data_pipeline.prepare import prepare

    shards = Path(shards)
    manifest = shards / "manifest.json"
    if manifest.is_file():
        have = json.loads(manifest.read_text()).get("image_size")
        if have != size:
            raise ValueError(f"{shards} already holds {have}px shards, not {size}px: remove it or pick another folder")
        return shards
    images, labels = digits(size)
    with contextlib.ExitStack() as stack:
        folder = Path(images_dir) if images_dir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        for i, (img, y) in enumerate(zip(images, labels)):
            (folder / str(y)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img, "L").save(folder / str(y) / f"{i:05d}.png")
        prepare(folder, shards, image_size=size, shard_size=shard_size, labels=True, progress=False)
    return shards


def prepare_digits(out: str | os.PathLike, size: int, shard_size: int = 200) -> Path:
    """The digits as ``out/images`` (class folders of PNGs) and ``out/shards``; returns the shards folder."""
    out = Path(out)
    return make_digit_shards(out / "shards", size, shard_size=shard_size, images_dir=out / "images")


def read_shards(shards: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of a shard set, decoded as the loader decodes it: uint8 (N, 3, H, W) and labels (N,)."""
    from data_pipeline.loader import decode_image
    from data_pipeline.shards import image_part, iter_tar, resolve_shards

    images, labels = [], []
    for url in resolve_shards(str(shards)).urls:
        for _key, parts in iter_tar(url, lambda *a: None):
            ext, data = image_part(parts)
            images.append(decode_image(data, ext))
            labels.append(int(parts.get("cls", b"-1")))
    return torch.stack(images), torch.tensor(labels)


# ----------------------------------------------------------------------------- the judge


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch and BLAS on one thread, restored afterwards.

    Small convolutions and sklearn's matrix products gain nothing from threads, and on a
    loaded 2-core machine spinning OpenMP threads made sampling and the judge ~30x slower.
    """
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(before)


def frechet_distance(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians (FID's formula)."""
    from scipy import linalg

    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():  # near-singular product: regularise as FID code does
        eye = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + eye) @ (s2 + eye))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def noise_images(n: int, size: int, seed: int) -> np.ndarray:
    """n uint8 (size, size) non-digits: uniform, clipped Gaussian and blurred noise in equal parts."""
    rng = np.random.default_rng(seed)
    k = n // 3
    uniform = rng.integers(0, 256, (k, size, size))
    clipped = np.where(rng.standard_normal((k, size, size)) > 0, 255, 0)  # what x0 = x_T / sqrt(abar) clips to
    coarse = rng.integers(0, 256, (n - 2 * k, 1, size // 2, size // 2)).astype(np.float32)
    blurred = F.interpolate(torch.from_numpy(coarse), size=(size, size), mode="bilinear", align_corners=False)
    return np.concatenate([uniform, clipped, blurred[:, 0].round().numpy()]).astype(np.uint8)


class DigitsJudge:
    """Offline sample quality for the digits: a classifier and a PCA feature space fitted on real images."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, pca_dims: int = 32, seed: int = 0) -> None:
        from sklearn.decomposition import PCA
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.neural_network import MLPClassifier

        x = images.reshape(len(images), -1).astype(np.float64) / 255.0  # (N, H*W) in [0, 1]
        order = np.random.default_rng(seed).permutation(len(x))
        cut = int(0.8 * len(x))
        train, held = order[:cut], order[cut:]
        self.size = images.shape[-1]
        self.pca = PCA(pca_dims, random_state=seed).fit(x[train])
        feats = self.pca.transform(x[train])
        self.mu, self.sigma = feats.mean(0), np.cov(feats, rowvar=False)
        # An 11th class, "not a digit", of noise images: a ReLU classifier is confidently wrong far
        # from its data, and an untrained diffusion model samples clipped noise.
        junk = noise_images(len(train) // 10, self.size, seed).reshape(-1, self.size**2) / 255.0
        fit_x = np.concatenate([x[train], junk])
        fit_y = np.concatenate([labels[train], np.full(len(junk), NOT_A_DIGIT)])
        with warnings.catch_warnings(), one_thread():
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.clf = MLPClassifier((128,), max_iter=400, random_state=seed).fit(fit_x, fit_y)
        self.held_accuracy = float(self.clf.score(x[held], labels[held]))
        rgb = np.repeat(images[held][:, None], 3, axis=1)  # real held-out images: the row to aim for
        self.reference = self.score(torch.from_numpy(rgb))

    def score(self, samples: torch.Tensor) -> dict[str, float]:
        """Quality and channel consistency of uint8 (N, 3, H, W) samples."""
        if samples.ndim != 4 or samples.shape[1] != 3 or samples.shape[-1] != self.size:
            raise ValueError(f"samples: expected uint8 (N, 3, {self.size}, {self.size}), got {tuple(samples.shape)}")
        s = samples.double()
        gray = (s.mean(1) / 255.0).reshape(len(s), -1).numpy()  # the classifier sees the luminance
        p = self.clf.predict_proba(gray)  # (N, 11): ten digits, then "not a digit"
        py = p.mean(0, keepdims=True)
        kl = (p * (np.log(p + 1e-12) - np.log(py + 1e-12))).sum(1).mean()
        feats = self.pca.transform(gray)
        fd = frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), self.mu, self.sigma)
        means = s.mean((0, 2, 3)) / 127.5 - 1.0  # per-channel mean on the [-1, 1] scale
        return {
            "confidence": float(p[:, :NOT_A_DIGIT].max(1).mean()),  # in the most likely digit
            "class_spread": float(math.exp(kl)),
            "fd_pca": fd,
            "abs_r_minus_b": float((s[:, 0] - s[:, 2]).abs().mean()),  # 0-255 scale, 0 for gray
            "channel_bias": float((means - means.mean()).abs().max()),
        }
