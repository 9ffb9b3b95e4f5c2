"""The in-training evaluator: K samples from the EMA weights over all ranks -> FID/IS/KID.

``build_evaluator`` is called once on every rank and ``evaluator.evaluate`` every
``eval.every_images``: each rank samples its contiguous block of the K images with a fast
sampler, extracts features, and only features travel to the other ranks. Image k always
uses seed ``image_seed(eval.seed, k)`` (and label ``k % num_classes``), so it is the same
picture at any world size and at every evaluation (pinned noise: the FID curve moves with
the model, not with the noise).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from trainer import distributed as du
from trainer.config import EvalConfig
from trainer.evaluation.features import FeatureExtractor, extract_features, make_extractor
from trainer.evaluation.metrics import compute_metrics, library_version
from trainer.evaluation.reference import ReferenceStats, load_reference, reference_from_data
from trainer.sampling import rank_block, sample_images

log = logging.getLogger("ddpm")


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
            "ddim_eps": c.ddim_eps if c.sampler == "ddim" else None,  # DDIM's direction term (README: FID)
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
                    device=self.device, ddim_eps=c.ddim_eps,
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
