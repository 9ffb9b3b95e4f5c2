"""Sample quality during training and from the command line (FID, IS, KID).

In training, ``build_evaluator`` is called once on every rank and ``evaluator.evaluate``
every ``eval.every_images``: each rank samples its contiguous block of the K images from
the EMA weights with a fast sampler, extracts features, and only features travel to the
other ranks. Image k always uses seed ``image_seed(eval.seed, k)`` (and label ``k % num_classes``), so
it is the same picture at any world size and at every evaluation (pinned noise: the FID
curve moves with the model, not with the noise).

Standalone (the paper's protocol, 50k samples, 1000-step ancestral sampler by default)::

    torchrun --nproc_per_node 8 -m trainer.evaluate --run-dir runs/cifar10 [--sampler ddim --steps 100]

writes ``<out>/samples/chunk_<start>_<end>.npz`` as it goes (a restart keeps them), then
``samples_<N>x<H>x<W>x3.npz`` (ADM layout, ``arr_0`` uint8 (N, H, W, 3)), ``report.json``
and a printed table that states the whole protocol next to every number.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import re
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer import distributed as du
from trainer.metrics import (
    FeatureExtractor,
    ReferenceStats,
    build_feature_extractor,
    compute_metrics,
    extract_features,
    isc_splits_default,
    kid_subset_size_default,
    kid_subsets_default,
    library_version,
    reference_from_batches,
    reference_from_images,
)
from trainer.sample import class_labels, rank_block, sample_uint8, to_uint8

log = logging.getLogger("ddpm")

# Published DDPM results (Ho et al. 2020, Tables 1 and 3), printed next to ours for context.
paper_results = {
    "cifar10 32x32": "FID 3.17, IS 9.46 (50k samples, 1000-step ancestral sampler)",
    "lsun bedroom 256": "FID 6.36 (large model: 4.90)",
    "lsun church 256": "FID 7.89",
    "lsun cat 256": "FID 19.75",
}


@dataclass
class EvalConfig:
    """FID/IS/KID during training (the ``eval:`` section of the run config)."""

    every_images: int = field(default=0, metadata={"help": "evaluate every N training images (0 = off)"})
    num_samples: int = field(default=10_000, metadata={"help": "samples per evaluation (K), split over all ranks"})
    sampler: str = field(default="ddim", metadata={"help": "sampler for evaluation samples: ddim or ddpm"})
    steps: int = field(default=50, metadata={"help": "sampling steps (0 = the sampler's default: T for ddpm)"})
    eta: float = field(default=0.0, metadata={"help": "DDIM eta (0 = deterministic DDIM)"})
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
        if self.steps < 0 or self.batch_per_gpu <= 0:
            raise ValueError("eval.steps must be >= 0 and eval.batch_per_gpu > 0")
        if self.val_every_images < 0 or self.val_images < 1:
            raise ValueError("eval.val_every_images must be >= 0 and eval.val_images >= 1")
        if self.val_every_images and not self.val_shards:
            raise ValueError("eval.val_every_images is set but eval.val_shards is empty: give held-out shards")
        bad = [m for m in self.metrics if m not in ("fid", "is", "kid")]
        if bad or not self.metrics:
            raise ValueError(f"eval.metrics: choose from fid, is, kid; got {list(self.metrics)!r}")


# --------------------------------------------------------------------------- sampling


@torch.no_grad()
def sample_images(
    model: torch.nn.Module,
    diffusion: Any,
    indices: list[int],
    *,
    seed: int,
    image_size: int,
    num_classes: int = 0,
    sampler: str = "ddim",
    steps: int = 0,
    eta: float = 0.0,
    channels: int = 3,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """uint8 (len(indices), C, H, W); image k depends only on (image_seed(seed, k), label k % classes)."""
    return sample_uint8(
        model, diffusion, indices, image_shape=(channels, image_size, image_size), seed=seed,
        batch_size=max(1, len(indices)), sampler=sampler, steps=steps or None, eta=eta,
        labels=class_labels(indices, num_classes), device=device,
    )


# --------------------------------------------------------------------------- reference


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
    exact = cfg.backend == "webdataset"
    if exact:
        # No DataLoader workers: this rank then reads exactly its shards of epoch 0, in order
        # (the loader deals shard perm[rank::world] to it), so all ranks together see every
        # image once. With workers, batches interleave and cross into epoch 1 unevenly.
        cfg = dataclasses.replace(cfg, num_workers=0)
    loader = build_loader(cfg, batch_size=batch_per_gpu, rank=rank, world_size=world, seed=0)
    total = int(loader.num_samples)
    if exact:
        from data_pipeline.loader import worker_shards

        counts = loader.shards.counts
        share = sum(counts[i] for i in worker_shards(len(counts), 0, 0, rank, world, None))
    else:
        share = len(rank_block(total, rank, world))
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
        cache.parent.mkdir(parents=True, exist_ok=True)
        ref.save(cache)
    du.barrier()
    return ref


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


# --------------------------------------------------------------------------- evaluator


class Evaluator:
    """Samples K images over all ranks, extracts features, returns the same metrics everywhere."""

    def __init__(
        self,
        cfg: EvalConfig,
        reference: ReferenceStats,
        extractor: FeatureExtractor,
        image_size: int,
        num_classes: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        self.cfg = cfg
        self.reference = reference
        self.extractor = extractor
        self.image_size = image_size
        self.num_classes = num_classes
        self.device = torch.device(device)

    def protocol(self) -> dict[str, Any]:
        """The settings that make these numbers comparable, for logs and reports."""
        c = self.cfg
        return {
            "sampler": c.sampler,
            "steps": c.steps,
            "eta": c.eta,
            "num_samples": c.num_samples,
            "seed": c.seed,
            "feature_extractor": c.feature_extractor,
            "reference": self.reference.meta.get("source", c.reference),
            "reference_images": self.reference.num_images,
            "library": library_version(),
        }

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, diffusion: Any, cur_nimg: int) -> dict[str, float]:
        """Every rank calls this; returns the same {"fid": ..., ...} dict on every rank."""
        c = self.cfg
        t0 = time.time()
        rank, world = du.get_rank(), du.get_world_size()
        mine = list(rank_block(c.num_samples, rank, world))
        same_weights_everywhere(model)
        was_training = model.training
        model.eval()
        parts: dict[str, list[torch.Tensor]] = {}
        try:
            for i in range(0, len(mine), c.batch_per_gpu):
                idx = mine[i : i + c.batch_per_gpu]
                images = sample_images(
                    model, diffusion, idx, seed=c.seed, image_size=self.image_size,
                    num_classes=self.num_classes, sampler=c.sampler, steps=c.steps, eta=c.eta,
                    device=self.device,
                )
                for k, v in extract_features(self.extractor, images, self.device).items():
                    parts.setdefault(k, []).append(v)
        finally:
            model.train(was_training)
        # Blocks are contiguous and in rank order, so the gathered rows are images 0..K-1.
        features = {k: du.all_gather_tensor(torch.cat(v)).cpu() for k, v in sorted(parts.items())}
        out = None
        if du.is_main():
            out = compute_metrics(features, self.reference, c.metrics)
            out["seconds"] = time.time() - t0
            log.info(
                "eval at %d images: %s (%s)", cur_nimg,
                ", ".join(f"{k} {v:.4g}" for k, v in out.items()), self.protocol(),
            )
        return du.broadcast_object(out)


@torch.no_grad()
def same_weights_everywhere(model: torch.nn.Module) -> bool:
    """Check (one tiny all-gather) that all ranks hold the same weights; else use rank 0's.

    Rank 0's weights are the ones the checkpoint keeps, so every rank must sample from
    them or image k would depend on the world size. Returns True if they already agreed.
    """
    if du.get_world_size() == 1:
        return True
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    # A position-weighted checksum: cheap, and different weights practically never collide.
    check = sum((i + 1) * t.double().sum() for i, t in enumerate(tensors)).reshape(1)
    sums = du.all_gather_tensor(check)
    if bool((sums == sums[0]).all()):
        return True
    if du.is_main():
        log.warning(
            "ranks hold different weights for evaluation (checksums %s); sampling from rank 0's. "
            "The trainer should start every rank from the same EMA weights.", sums.tolist(),
        )
    import torch.distributed as dist  # a per-tensor broadcast, not in trainer.distributed

    for t in tensors:
        dist.broadcast(t, src=0)
    return False


def build_evaluator(
    cfg: EvalConfig,
    data_cfg: Any = None,
    image_size: int = 32,
    num_classes: int = 0,
    device: torch.device | str = "cpu",
    feature_extractor: FeatureExtractor | None = None,
) -> Evaluator | None:
    """The in-training evaluator (on every rank), or None when ``cfg.every_images == 0``.

    Builds the extractor (rank 0 first, so a weights download happens once) and loads or
    computes the reference statistics. ``feature_extractor`` injects a callable (tests).
    """
    if cfg.every_images == 0:
        return None
    cfg.validate()
    device = torch.device(device)
    if cfg.num_samples < du.get_world_size():
        raise ValueError(f"eval.num_samples={cfg.num_samples} is smaller than the world size")
    extractor = feature_extractor or make_extractor(cfg.feature_extractor, cfg.weights, device)
    name = cfg.feature_extractor if feature_extractor is None else getattr(
        feature_extractor, "name", type(feature_extractor).__name__
    )
    if cfg.reference:
        reference = load_reference(cfg.reference, extractor, name, device)
    else:
        if data_cfg is None:
            raise ValueError("eval.reference is empty and no data config was given")
        reference = reference_from_data(data_cfg, extractor, name, image_size, cfg.batch_per_gpu, device)
    return Evaluator(cfg, reference, extractor, image_size, num_classes, device)


def make_extractor(name: str, weights: str, device: torch.device) -> FeatureExtractor:
    """Build the named extractor on every rank, rank 0 first (it may download the weights)."""
    extractor = None
    if du.is_main():
        extractor = build_feature_extractor(name, weights, device)
    du.barrier()
    if extractor is None:
        extractor = build_feature_extractor(name, weights, device)
    return extractor


# --------------------------------------------------------------------------- validation loss


@torch.no_grad()
def pinned_validation_loss(
    model: torch.nn.Module,
    diffusion: Any,
    images: torch.Tensor,
    indices: list[int],
    timesteps: tuple[int, ...] = (10, 100, 250, 500, 750, 990),
    seed: int = 0,
    batch_size: int = 64,
    labels: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Loss of eq. 14 at fixed t with fixed noise per held-out image: comparable across steps.

    ``images`` are this rank's uint8 (N, C, H, W) held-out images, ``indices`` their global
    ids (image i's noise at t is seeded by (seed, i, t), so any rank split gives the same
    numbers). Every rank calls it; returns {"val_loss_t<t>": mean, ..., "val_loss": mean of those}.
    """
    device = torch.device(device)
    ts = [t for t in timesteps if 0 <= t < diffusion.num_timesteps]
    sums = torch.zeros(len(ts) + 1, dtype=torch.float64, device=device)  # per-t sums, then count
    was_training = model.training
    model.eval()
    try:
        for i in range(0, images.shape[0], batch_size):
            x0 = images[i : i + batch_size].to(device).float() / 127.5 - 1  # (B, C, H, W) in [-1, 1]
            idx = indices[i : i + batch_size]
            y = labels[i : i + batch_size].to(device) if labels is not None else None
            for j, t in enumerate(ts):
                noise = torch.stack([
                    torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(
                        (seed * 1_000_003 + k) * 10_007 + t)) for k in idx
                ]).to(device)
                tt = torch.full((x0.shape[0],), t, dtype=torch.long, device=device)
                sums[j] += diffusion.training_losses(model, x0, tt, noise, y).double().sum()
            sums[-1] += x0.shape[0]
    finally:
        model.train(was_training)
    du.all_reduce_sum(sums)
    n = max(sums[-1].item(), 1.0)
    out = {f"val_loss_t{t}": sums[j].item() / n for j, t in enumerate(ts)}
    out["val_loss"] = sum(out.values()) / max(len(ts), 1)
    return out


# --------------------------------------------------------------------------- pictures


@torch.no_grad()
def denoising_strip(
    diffusion: Any,
    model: torch.nn.Module,
    seeds: list[int],
    image_size: int,
    num_columns: int = 8,
    sampler: str = "ddpm",
    steps: int | None = None,
    y: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    padding: int = 2,
) -> torch.Tensor:
    """One row per seed: x_t from pure noise x_T (left) to x_0 (right), as in the DDPM figures.

    Returns uint8 (3, H', W') for TensorBoard's add_image.
    """
    from torchvision.utils import make_grid

    _, frames = diffusion.sample(
        model, shape=(3, image_size, image_size), seeds=list(seeds), sampler=sampler,
        steps=steps, y=y, device=torch.device(device), progress=False,
        return_intermediates=True, intermediate_steps=num_columns,
    )  # frames: list over time of (B, C, H, W) on the CPU, x_T first, x_0 last
    # Evenly spaced columns over the trajectory, always the noise and the result.
    pick = sorted({round(i * (len(frames) - 1) / max(num_columns - 1, 1)) for i in range(num_columns)})
    cols = torch.stack([frames[i].float() for i in pick], dim=1)  # (B, T', C, H, W)
    b, t = cols.shape[:2]
    # x_t of early steps leaves [-1, 1] (it is mostly noise): clamp for display.
    tiles = to_uint8(cols.reshape(b * t, *cols.shape[2:]).clamp(-1, 1))  # (B*T', C, H, W)
    return make_grid(tiles, nrow=t, padding=padding, pad_value=255)  # (3, H', W') uint8


# --------------------------------------------------------------------------- standalone


_chunk_re = re.compile(r"^chunk_(\d{8})_(\d{8})\.npz$")


def _chunk_name(start: int, end: int) -> str:
    return f"chunk_{start:08d}_{end:08d}.npz"


def _complete_chunks(sample_dir: Path) -> list[tuple[int, int, Path]]:
    """(start, end, path) of complete chunk files; a truncated zip is not complete."""
    found = []
    for p in sorted(sample_dir.glob("chunk_*.npz")) if sample_dir.is_dir() else []:
        m = _chunk_re.match(p.name)
        if not m:
            continue
        try:
            with zipfile.ZipFile(p) as z:  # reads the central directory, at the end of the file
                if "images.npy" not in z.namelist():
                    continue
        except (zipfile.BadZipFile, OSError):
            continue
        found.append((int(m.group(1)), int(m.group(2)), p))
    return found


def _missing_runs(n: int, chunks: list[tuple[int, int, Path]], chunk_size: int) -> list[tuple[int, int]]:
    """[start, end) pieces (at most chunk_size long) of 0..n-1 not covered by chunks."""
    covered = np.zeros(n, dtype=bool)
    for s, e, _ in chunks:
        covered[s : min(e, n)] = True
    runs, k = [], 0
    while k < n:
        if covered[k]:
            k += 1
            continue
        e = k
        while e < n and not covered[e] and e - k < chunk_size:
            e += 1
        runs.append((k, e))
        k = e
    return runs


def _save_chunk(path: Path, images: np.ndarray, labels: np.ndarray | None, start: int) -> None:
    """Write one chunk via tmp + fsync + rename: a file with the final name is complete."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    arrays = {"images": images, "indices": np.arange(start, start + len(images), dtype=np.int64)}
    if labels is not None:
        arrays["labels"] = labels
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_adm_npz(path: Path, pieces: list[tuple[int, int, Path]], n: int, conditional: bool) -> None:
    """Stream chunks into an ADM-style .npz (arr_0 uint8 (N, H, W, 3), arr_1 labels) without holding N images."""
    with np.load(pieces[0][2]) as z:
        first = z["images"]
    shape, dtype = (n, *first.shape[1:]), first.dtype
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        names = [("arr_0.npy", "images", shape, dtype)]
        if conditional:
            names.append(("arr_1.npy", "labels", (n,), np.dtype(np.int64)))
        for member, key, shp, dt in names:
            with zf.open(member, "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(
                    f, {"descr": np.lib.format.dtype_to_descr(dt), "fortran_order": False, "shape": shp}
                )
                for s, e, p in pieces:
                    with np.load(p) as z:
                        f.write(np.ascontiguousarray(z[key][: min(e, n) - s].astype(dt)).tobytes())
    os.replace(tmp, path)


def _load_model(args: argparse.Namespace) -> tuple[torch.nn.Module, Any, dict[str, Any], Path]:
    from trainer.checkpoint import load_for_inference, resolve_checkpoint

    ckpt = resolve_checkpoint(args.checkpoint or args.run_dir)
    model, diffusion, config = load_for_inference(ckpt, which="ema", ema_index=args.ema_index)
    return model, diffusion, config, ckpt


def _data_config(config: dict[str, Any]) -> Any:
    """DataConfig from the checkpoint's resolved config dict (unknown keys dropped)."""
    from data_pipeline import DataConfig

    names = {f.name for f in dataclasses.fields(DataConfig)}
    return DataConfig(**{k: tuple(v) if isinstance(v, list) else v
                         for k, v in config.get("data", {}).items() if k in names})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of ``python -m trainer.evaluate``."""
    p = argparse.ArgumentParser(
        prog="python -m trainer.evaluate",
        description="Sample from a checkpoint's EMA weights and measure FID/IS/KID (resumable; torchrun-able).",
    )
    p.add_argument("--run-dir", default="", help="run directory (uses its newest complete checkpoint)")
    p.add_argument("--checkpoint", default="", help="a checkpoint file (overrides --run-dir's newest)")
    p.add_argument("--num-samples", type=int, default=50_000, help="number of samples (paper: 50000)")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm", help="ddpm = the paper's ancestral sampler")
    p.add_argument("--steps", type=int, default=0, help="sampling steps (0 = T for ddpm, 100 for ddim)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    p.add_argument("--batch-per-gpu", type=int, default=256, help="images per GPU per sampling call")
    p.add_argument("--out", default="", help="output folder (default <run-dir>/eval/<checkpoint>-<sampler><steps>-seed<S>)")
    p.add_argument("--reference", default="", help="reference .npz (stats or arr_0 images); default: training shards")
    p.add_argument("--weights", default="", help="offline Inception weights file ('' = library download)")
    p.add_argument("--feature-extractor", default="inception-v3-compat", help="extractor name or package.module:factory")
    p.add_argument("--metrics", default="fid,is", help="comma-separated: fid,is,kid")
    p.add_argument("--seed", type=int, default=0, help="base seed: image k's noise derives from (seed, k)")
    p.add_argument("--ema-index", type=int, default=0, help="which EMA decay's weights (index into ema.decays)")
    p.add_argument("--no-npz", action="store_true", help="skip writing the assembled ADM .npz")
    args = p.parse_args(argv)
    if not args.run_dir and not args.checkpoint:
        p.error("give --run-dir or --checkpoint")
    if args.num_samples < 2:
        p.error("--num-samples must be >= 2")
    bad = [m for m in args.metrics.split(",") if m not in ("fid", "is", "kid")]
    if bad:
        p.error(f"--metrics: unknown {bad}; choose from fid, is, kid")
    if args.sampler == "ddim" and args.steps == 0:
        args.steps = 100
    return args


def run_standalone(args: argparse.Namespace) -> dict[str, Any]:
    """The standalone evaluation; every rank runs it. Returns the report (on every rank)."""
    info = du.init_distributed()
    device, rank, world = info.device, du.get_rank(), du.get_world_size()
    model, diffusion, config, ckpt = _load_model(args)
    model.to(device)
    diffusion.to(device)
    mcfg = config.get("model", {})
    image_size = int(mcfg.get("image_size", 32))
    num_classes = int(mcfg.get("num_classes", 0) or 0)
    channels = int(mcfg.get("in_channels", 3) or 3)
    steps_name = args.steps or "T"
    out_dir = Path(args.out or Path(args.run_dir or ckpt.parent.parent) / "eval" / (
        f"{ckpt.stem}-{args.sampler}{steps_name}-seed{args.seed}"))
    sample_dir = out_dir / "samples"
    # What makes sample k what it is; a restart with other values would mix two protocols.
    protocol = {
        "checkpoint": str(ckpt.resolve()),
        "weights": f"ema[{args.ema_index}]",
        "sampler": args.sampler,
        "steps": args.steps or None,
        "eta": args.eta if args.sampler == "ddim" else None,
        "seed": args.seed,
        "image_size": image_size,
        "num_classes": num_classes,
    }
    problem = None
    if du.is_main():
        sample_dir.mkdir(parents=True, exist_ok=True)
        pfile = out_dir / "protocol.json"
        if pfile.is_file():
            old = json.loads(pfile.read_text())
            diff = {k: (old.get(k), v) for k, v in protocol.items() if old.get(k) != v}
            if diff:
                problem = f"{out_dir} holds samples made with other settings {diff}; use another --out"
        else:
            pfile.write_text(json.dumps(protocol, indent=2) + "\n")
    problem = du.broadcast_object(problem)  # every rank stops, none waits at a barrier
    if problem:
        raise SystemExit(problem)

    # ---- extractor and reference first: a missing weights file or dataset fails in seconds.
    metric_names = tuple(m for m in args.metrics.split(",") if m)
    extractor = make_extractor(args.feature_extractor, args.weights, device)
    if args.reference:
        reference = load_reference(args.reference, extractor, args.feature_extractor, device)
    else:
        reference = reference_from_data(
            _data_config(config), extractor, args.feature_extractor, image_size, args.batch_per_gpu, device
        )

    # ---- sampling: rank 0 decides what is missing, chunks go round-robin over ranks.
    todo = None
    if du.is_main():
        done = _complete_chunks(sample_dir)
        todo = _missing_runs(args.num_samples, done, args.batch_per_gpu)
        kept = args.num_samples - sum(e - s for s, e in todo)
        log.info("%s: %d of %d samples already there, %d chunks to make on %d ranks",
                 out_dir, kept, args.num_samples, len(todo), world)
    todo = du.broadcast_object(todo)
    t0 = time.time()
    for j, (s, e) in enumerate(todo):
        if j % world != rank:
            continue
        images = sample_images(
            model, diffusion, list(range(s, e)), seed=args.seed, image_size=image_size,
            num_classes=num_classes, sampler=args.sampler, steps=args.steps, eta=args.eta,
            channels=channels, device=device,
        )
        labels = (np.arange(s, e, dtype=np.int64) % num_classes) if num_classes else None
        _save_chunk(sample_dir / _chunk_name(s, e), images.permute(0, 2, 3, 1).cpu().numpy(), labels, s)
        if du.is_main() and (j // world) % 10 == 0:
            log.info("chunk %d/%d done (%.1f s)", j + 1, len(todo), time.time() - t0)
    sample_seconds = time.time() - t0
    du.barrier()

    # ---- features: every rank reads a share of the chunks; features travel, not images.
    pieces = [c for c in _complete_chunks(sample_dir) if c[0] < args.num_samples]
    parts: dict[str, list[torch.Tensor]] = {}
    index_parts: list[torch.Tensor] = []
    for j, (s, e, p) in enumerate(pieces):
        if j % world != rank:
            continue
        with np.load(p) as z:
            imgs = torch.from_numpy(z["images"][: min(e, args.num_samples) - s]).permute(0, 3, 1, 2)
        for i in range(0, imgs.shape[0], args.batch_per_gpu):
            for k, v in extract_features(extractor, imgs[i : i + args.batch_per_gpu], device).items():
                parts.setdefault(k, []).append(v)
        index_parts.append(torch.arange(s, s + imgs.shape[0], device=device))
    if not index_parts:  # more ranks than chunks: send empty rows of the right width
        probe = extract_features(extractor, torch.zeros(1, channels, image_size, image_size, dtype=torch.uint8), device)
        parts = {k: [v[:0]] for k, v in probe.items()}
        index_parts = [torch.zeros(0, dtype=torch.long, device=device)]
    order = torch.argsort(du.all_gather_tensor(torch.cat(index_parts)).cpu())
    features = {k: du.all_gather_tensor(torch.cat(v)).cpu()[order] for k, v in sorted(parts.items())}

    report = None
    if du.is_main():
        n = features["features"].shape[0]
        if n != args.num_samples:
            raise RuntimeError(f"expected {args.num_samples} samples, found {n}")
        metrics = compute_metrics(features, reference, metric_names)
        npz = out_dir / f"samples_{n}x{image_size}x{image_size}x{channels}.npz"
        if not args.no_npz:
            _write_adm_npz(npz, pieces, n, conditional=num_classes > 0)
        report = {
            "metrics": metrics,
            "protocol": {
                **protocol,
                "steps": args.steps or diffusion.num_timesteps,
                "num_samples": n,
                "feature_extractor": args.feature_extractor,
                "feature_layers": {"fid": "pool_3 (2048)", "kid": "pool_3 (2048)", "is": "logits_unbiased (1008)"},
                "inception_weights": args.weights or (
                    "torch-fidelity default (weights-inception-2015-12-05)"
                    if args.feature_extractor == "inception-v3-compat" else "n/a"),
                "library": library_version(),
                "fid": "Frechet distance of Gaussian fits (torch-fidelity fid_statistics_to_metric)",
                "is_splits": isc_splits_default,
                "kid": f"{kid_subsets_default} subsets of {kid_subset_size_default}, cubic polynomial kernel",
                "reference": {k: v for k, v in reference.meta.items()} | {"num_images": reference.num_images},
                "world_size": world,
            },
            "samples_npz": None if args.no_npz else str(npz),
            "sample_seconds_this_run": round(sample_seconds, 1),
        }
        (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(format_report(report))
    return du.broadcast_object(report)


def format_report(report: dict[str, Any]) -> str:
    """A plain-text table of the metrics with the protocol that produced them."""
    p = report["protocol"]
    ref = p.get("reference", {})
    rows = [(k.upper().replace("_STD", " std"), f"{v:.4f}") for k, v in report["metrics"].items()]
    rows += [
        ("checkpoint", f"{Path(p['checkpoint']).name} ({p['weights']})"),
        ("sampler", f"{p['sampler']}, {p['steps']} steps" + (f", eta {p['eta']}" if p.get("eta") is not None else "")),
        ("samples", f"{p['num_samples']} (seed {p['seed']} + k)"),
        ("features", f"{p['feature_extractor']} via {p['library']}, weights {p['inception_weights']}"),
        ("reference", f"{ref.get('source', '?')} ({ref.get('num_images', '?')} images)"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines.append("paper (Ho et al. 2020): " + "; ".join(f"{k}: {v}" for k, v in paper_results.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m trainer.evaluate``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    try:
        run_standalone(args)
    finally:
        du.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
