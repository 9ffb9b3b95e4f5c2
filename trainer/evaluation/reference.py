"""Reference statistics, in one place: computed from the training shards (cached next to the
manifest), loaded from a precomputed file (ours, or ADM's mu/sigma), or computed from an image batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_pipeline.storage import StorageError, atomic_write
from trainer import distributed as du
from trainer.evaluation.features import FeatureExtractor, extract_features
from trainer.evaluation.metrics import FeatureMoments, library_version
from trainer.sampling import rank_block

log = logging.getLogger("ddpm")


@dataclasses.dataclass
class ReferenceStats:
    """Reference-set statistics: FID moments, a feature subset for KID, and how they were made."""

    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64
    num_images: int
    features: np.ndarray | None = None  # (M, D) float32 subset for KID, or None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (data_pipeline.storage) so a crash never leaves a half cache."""
        arrays: dict[str, Any] = {
            "mu": self.mu,
            "sigma": self.sigma,
            "num_images": np.int64(self.num_images),
            "meta": np.array(json.dumps(self.meta)),
        }
        if self.features is not None:
            arrays["features"] = self.features.astype(np.float32)
        atomic_write(path, lambda f: np.savez(f, **arrays), what="reference statistics")

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



def _manifest_path(data_cfg: Any) -> Path | None:
    """manifest.json of local training shards (data.shards: the manifest, its folder or a pattern)."""
    spec = str(data_cfg.shards)
    if spec.startswith("pipe:") or "://" in spec:
        return None  # remote shards: no local folder to cache next to
    p = Path(spec)
    if p.is_dir():
        return p / "manifest.json"
    if p.suffix in (".json", ".beton"):
        return p if p.suffix == ".json" else p.with_name("manifest.json")
    return p.parent / "manifest.json"


def reference_cache_path(data_cfg: Any, extractor_name: str, image_size: int) -> Path:
    """Where reference statistics for these shards are cached: next to the manifest.

    Remote shards (http, pipe:) cache under ~/.cache/ddpm-scale, keyed by the shard spec.
    """
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", extractor_name)
    manifest = _manifest_path(data_cfg)
    if manifest is None:
        key = hashlib.sha1(str(data_cfg.shards).encode()).hexdigest()[:12]
        return Path.home() / ".cache" / "ddpm-scale" / f"fid_ref_{key}_{safe}_{image_size}.npz"
    return manifest.parent / f"fid_ref_{safe}_{image_size}.npz"


def _file_sha1(path: Path | None) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest() if path is not None and path.is_file() else ""


def reference_from_data(
    data_cfg: Any,
    extractor: FeatureExtractor,
    extractor_name: str,
    image_size: int,
    batch_per_gpu: int,
    device: torch.device,
) -> ReferenceStats:
    """Reference statistics of the training set (no flips), computed over all ranks, cached.

    Every rank must call this. The cache sits next to the manifest and is reused while the
    manifest (its SHA-1), the extractor and the image size are unchanged.
    """
    cache = reference_cache_path(data_cfg, extractor_name, image_size)
    manifest_sha1 = _file_sha1(_manifest_path(data_cfg))
    want = {"extractor": extractor_name, "image_size": image_size, "manifest_sha1": manifest_sha1}
    status = None
    if du.is_main() and cache.is_file():
        try:
            cached = ReferenceStats.load(cache)
            stale = {k: v for k, v in want.items() if cached.meta.get(k) != v}
            status = "ok" if not stale else f"stale ({sorted(stale)})"
        except Exception as e:  # noqa: BLE001 - an unreadable cache is recomputed
            status = f"unreadable ({e})"
    status = du.broadcast_object(status)
    if status == "ok":
        log.info("reference statistics: %s (cached)", cache)
        return ReferenceStats.load(cache)
    if status:
        log.warning("reference cache %s is %s; recomputing", cache, status)

    from data_pipeline import build_loader

    rank, world = du.get_rank(), du.get_world_size()
    # One pass without flips: augmentation is not part of the data distribution FID compares with.
    cfg = dataclasses.replace(data_cfg, hflip=False, image_size=image_size)
    # The streaming order (asked for, or pipe: sources, which cannot seek; data_pipeline.loader).
    streaming = cfg.backend == "webdataset" and (cfg.order == "streaming" or str(cfg.shards).startswith("pipe:"))
    if streaming:
        # No DataLoader workers: this rank then reads exactly its shards of epoch 0, in order,
        # so all ranks together see every image once (workers would interleave unevenly).
        cfg = dataclasses.replace(cfg, num_workers=0)
    loader = build_loader(cfg, batch_size=batch_per_gpu, rank=rank, world_size=world, seed=0)
    total = int(loader.num_samples)
    share = _exact_share(loader, total, batch_per_gpu, rank, world, streaming)
    log.info("computing reference statistics of %d training images on %d ranks -> %s", total, world, cache)
    t0 = time.time()
    try:
        batches = (b["image"] for b in loader)
        ref = reference_from_batches(batches, extractor, device, share, meta=dict(want))
    finally:
        loader.close()
    ref.meta.update(
        source=str(_manifest_path(data_cfg) or data_cfg.shards),
        num_images=ref.num_images,
        library=library_version(),
        seconds=round(time.time() - t0, 1),
    )
    if du.is_main():
        try:
            ref.save(cache)
        except StorageError as e:  # a read-only or full dataset folder: the statistics are still good
            log.warning("reference statistics not cached (%s); they are computed again next time", e)
    du.barrier()
    return ref


def _exact_share(loader: Any, total: int, batch_per_gpu: int, rank: int, world: int, streaming: bool) -> int:
    """How many of its first images this rank reads so that all ranks together read epoch 0 once.

    The global order (data_pipeline.order): rank r's j-th batch holds stream positions
    j G + r b + [0, b) (G = b x world, positions in increasing order), and epoch 0 is positions
    [0, N): the rank's positions below N. The streaming order (pipe: sources): the samples of the
    shards the rank's one reader is dealt in epoch 0. Other backends: an even split of N.
    """
    if getattr(loader, "order", None) == "global":
        from data_pipeline.order import micro_batch_positions

        share, j = 0, 0
        while (pos := micro_batch_positions(j, rank=rank, world_size=world, batch_per_gpu=batch_per_gpu,
                                            accum=1, global_batch=batch_per_gpu * world)).start < total:
            share += min(pos.stop, total) - pos.start
            j += 1
        return share
    if streaming:
        from data_pipeline.streaming import worker_shards

        counts = loader.shards.counts
        return sum(counts[i] for i in worker_shards(len(counts), 0, 0, rank, world, None))
    return len(rank_block(total, rank, world))


def load_reference(
    path: str,
    extractor: FeatureExtractor,
    extractor_name: str,
    device: torch.device,
) -> ReferenceStats:
    """A precomputed reference: our cache / ADM ``mu``/``sigma`` batch, or an ``arr_0`` image batch."""
    with np.load(path) as z:
        has_stats = "mu" in z and "sigma" in z
    if has_stats:
        ref = ReferenceStats.load(path)
    else:
        with np.load(path) as z:
            images = z["arr_0"]  # (N, H, W, 3) uint8, ADM layout
        # Every rank computes the same statistics; reference image batches are small (<=50k).
        ref = reference_from_images(images, extractor, device, meta={"extractor": extractor_name})
    ref.meta.setdefault("source", str(path))
    return ref
