"""``ddpm-ema --sweep``: reconstruct a range of EMA widths and score each with the run's own measures.

Measures: the pinned-noise validation loss when the run has ``eval.val_shards``
(trainer.evaluation.validation), FID when Inception weights are at hand (``--weights``,
``eval.weights`` or torch-fidelity's cache; otherwise skipped with one line), and always a
fixed-noise sample grid per profile. The run's fixed-decay EMAs at the same time (from a checkpoint
taken there) are scored alongside. Writes ``sweep.md``, ``sweep.json``, ``sweep.png``, TensorBoard
entries under ``<out>/tb`` (scalars at step = round(sigma_rel x 10^4), so the axis reads sigma_rel)
and the best reconstructed profile's checkpoint; one process (CPU or one GPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_pipeline.config import SetupError
from data_pipeline.storage import atomic_write
from models.diffusion import GaussianDiffusion
from models.unet import UNet
from trainer.checkpoint import ckpt_name
from trainer.config import Config, from_dict
from trainer.ema_math import SIGMA_REL_WIDEST
from trainer.monitor import Monitor
from trainer.posthoc import (
    Plan,
    PosthocError,
    groups,
    inference_state,
    output_name,
    plan,
    read_snapshots,
    reconstruct,
    write_checkpoint,
)
from trainer.posthoc_plot import plot_scores
from trainer.sampling import class_labels, make_grid, sample_uint8, save_png

log = logging.getLogger("ddpm")

default_widths = (0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.1, 0.12, 0.15, 0.2, 0.25)
measures = (("val_loss", "validation loss (pinned noise, lower is better)"), ("fid", "FID (lower is better)"))


def decay_sigma_rel(decay: float, batch: int, at: int) -> float:
    """The relative width of a fixed per-step decay at ``at`` images (long-run std sqrt(d) / (1 - d) steps)."""
    return math.sqrt(decay) / (1.0 - decay) * batch / at


class Scorer:
    """The run's measures for one model at a time: validation loss, FID, a fixed-noise grid."""

    def __init__(self, cfg: Config, device: torch.device, out: Path, monitor: Monitor, num_samples: int = 0,
                 weights: str = "") -> None:
        self.cfg, self.device, self.out, self.monitor = cfg, device, out, monitor
        self.diffusion = GaussianDiffusion(cfg.diffusion).to(device)
        self.validation = self._validation()
        self.evaluator = self._fid(num_samples, weights)

    def _validation(self) -> tuple | None:
        from trainer.evaluation.validation import load_validation_images

        if not self.cfg.eval.val_shards:
            print("validation loss skipped: the run has no eval.val_shards")
            return None
        cfg = dataclasses.replace(self.cfg, eval=dataclasses.replace(self.cfg.eval, val_every_images=1))
        try:
            return load_validation_images(cfg, 0, 1)
        except (SetupError, FileNotFoundError, ValueError) as e:
            print(f"validation loss skipped: {e}")
            return None

    def _fid(self, num_samples: int, weights: str) -> Any:
        from trainer.evaluation.evaluator import build_evaluator
        from trainer.evaluation.features import inception_weights_url

        e = self.cfg.eval
        weights = weights or e.weights
        if e.feature_extractor == "inception-v3-compat":
            cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(inception_weights_url).name
            if weights and not Path(weights).is_file():
                print(f"FID skipped: Inception weights file {weights} not found")
                return None
            if not weights and not cached.is_file():
                print("FID skipped: no Inception weights (eval.weights is empty and torch-fidelity's cache has "
                      f"none): pass --weights PATH (download {inception_weights_url})")
                return None
            weights = weights or str(cached)
        ecfg = dataclasses.replace(e, every_images=1, weights=weights, num_samples=num_samples or e.num_samples)
        try:
            return build_evaluator(ecfg, data_cfg=self.cfg.data, image_size=self.cfg.model.image_size,
                                   num_classes=self.cfg.model.num_classes, device=self.device)
        except (SetupError, FileNotFoundError, ValueError) as err:
            print(f"FID skipped: {err}")
            return None

    @property
    def measures(self) -> list[tuple[str, str]]:
        """The (key, label) of the measures this run has."""
        have = {"val_loss": self.validation is not None, "fid": self.evaluator is not None}
        return [m for m in measures if have[m[0]]]

    @torch.no_grad()
    def score(self, model: torch.nn.Module, name: str, at: int, tb_step: int) -> dict[str, Any]:
        """Every measure of ``model`` (the same noise for every profile), and its grid's path."""
        from trainer.evaluation.validation import pinned_validation_loss, val_fractions

        cfg, out = self.cfg, {}
        model.eval()
        if self.validation is not None:
            images, indices, labels = self.validation
            ts = tuple(sorted({int(f * self.diffusion.num_timesteps) for f in val_fractions}))
            out["val_loss"] = pinned_validation_loss(model, self.diffusion, images, indices, timesteps=ts,
                                                     seed=cfg.run.seed, labels=labels, device=self.device)["val_loss"]
        if self.evaluator is not None:
            out["fid"] = self.evaluator.evaluate(model, self.diffusion, at)["fid"]
        m, n = cfg.model, cfg.log.sample_count
        imgs = sample_uint8(model, self.diffusion, range(n), image_shape=(m.in_channels, m.image_size, m.image_size),
                            seed=cfg.run.seed, batch_size=max(1, min(n, cfg.eval.batch_per_gpu)),
                            sampler=cfg.log.sample_sampler, steps=cfg.log.sample_steps,
                            labels=class_labels(range(n), m.num_classes), device=self.device)
        grid = make_grid(imgs)
        path = self.out / f"grid-{name}.png"
        save_png(grid, path)
        self.monitor.image("posthoc/grid", grid, tb_step)
        out["grid"] = path.name
        return out


def fixed_decay_weights(run_dir: Path, at: int) -> tuple[list[float], list[dict[str, torch.Tensor]]]:
    """The run's fixed-decay EMA weights at ``at`` images, from a checkpoint (or milestone) taken there."""
    from trainer.checkpoint import load_checkpoint

    for name in (ckpt_name(at), f"milestone-{at:012d}.pt"):
        path = run_dir / "checkpoints" / name
        if path.is_file():
            try:
                ema = load_checkpoint(path)["ema"]
            except Exception as e:  # noqa: BLE001 - the sweep goes on without them
                log.warning("checkpoint %s is unreadable (%s); the fixed-decay EMAs are not scored", path, e)
                return [], []
            decays = [float(d) for d in ema["decays"]]
            return decays, list(ema["shadows"][: len(decays)])
    print(f"fixed-decay EMAs not scored: no checkpoint at {at} images in {run_dir / 'checkpoints'}")
    return [], []


def markdown(rows: list[dict[str, Any]], keys: list[tuple[str, str]], best: dict[str, Any] | None) -> str:
    """The sweep as a Markdown table, the best row in bold."""
    head = ["profile", "sigma_rel", "gamma", "profile error", *[k for k, _ in keys], "grid"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["profile"], _width(r), f"{r['gamma']:.2f}" if r.get("gamma") is not None else "",
                 f"{r['profile_error']:.1e}" if r.get("profile_error") is not None else "",
                 *[f"{r[k]:.5g}" if r.get(k) is not None else "" for k, _ in keys], r["grid"]]
        if r is best:
            cells = [f"**{c}**" if c else c for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _width(row: dict[str, Any]) -> str:
    if row.get("sigma_rel") is not None:
        return f"{row['sigma_rel']:.4f}"
    approx = row["approx_sigma_rel"]
    return f"~{approx:.4f}" + ("" if approx < SIGMA_REL_WIDEST else " (wider than any power profile)")


def pick_device(name: str) -> torch.device:
    """auto: the first GPU if there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run_sweep(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Reconstruct, score, tabulate, plot and log a range of widths; write the best one's checkpoint."""
    run_dir = Path(args.run_dir)
    snaps = read_snapshots(run_dir)
    if args.sigma_rels:
        p: Plan = plan(snaps, args.sigma_rels, args.at_images, args.max_error)
    else:  # the default widths the snapshots reproduce within --max-error (one solve for all)
        p = plan(snaps, list(default_widths), args.at_images, max_error=1.0)
        keep = [i for i, e in enumerate(p.errors) if e <= args.max_error]
        left = [f"{p.sigma_rels[i]:g}" for i in range(len(p.errors)) if i not in keep]
        if left:
            print(f"widths left out (profile error above --max-error {args.max_error:g}): {', '.join(left)}")
        if not keep:
            raise PosthocError(f"none of the sweep's widths can be reconstructed within --max-error "
                               f"{args.max_error:g} at {p.at} images from {len(p.snapshots)} snapshots: choose a "
                               "later --at-images")
        p = p.subset(keep)
    cfg = from_dict(p.config)
    device = pick_device(args.device)
    out.mkdir(parents=True, exist_ok=True)
    monitor = Monitor(out, True, True, None)  # <out>/tb; a storage fault raises (exit 74)
    scorer = Scorer(cfg, device, out, monitor, args.num_samples, args.weights)
    keys = scorer.measures
    key = "fid" if scorer.evaluator is not None else "val_loss" if scorer.validation is not None else None
    model = UNet(cfg.model).to(device)
    rows: list[dict[str, Any]] = []
    best, best_weights = None, None
    for g in groups(len(p.sigma_rels), args.group):
        for i, weights in zip(g, reconstruct(p, g)):
            s = p.sigma_rels[i]
            model.load_state_dict(weights)
            step = round(s * 1e4)
            row = {"profile": f"sigma_rel {s:g}", "sigma_rel": s, "gamma": p.gammas[i],
                   "profile_error": float(p.errors[i]), **scorer.score(model, f"sigma{s:.4f}", p.at, step)}
            monitor.scalars({f"posthoc/{k}": row[k] for k, _ in keys}, step)
            rows.append(row)
            print(f"sigma_rel {s:g}: " + ", ".join(f"{k} {row[k]:.5g}" for k, _ in keys) + f" (grid {row['grid']})")
            if key is not None and (best is None or row[key] < best[key]):
                best, best_weights = row, (i, weights)
    decays, shadows = fixed_decay_weights(run_dir, p.at)
    batch = p.snapshots[0].batch
    for j, (d, weights) in enumerate(zip(decays, shadows)):
        model.load_state_dict(weights)
        row = {"profile": f"decay {d:g}", "sigma_rel": None, "approx_sigma_rel": decay_sigma_rel(d, batch, p.at),
               "ema_index": j, **scorer.score(model, f"decay{d:g}", p.at, 0)}
        rows.append(row)
        if key is not None and (best is None or row[key] < best[key]):
            best, best_weights = row, None
    result: dict[str, Any] = {"run_dir": str(run_dir), "at_images": p.at, "measure": key,
                              "tracked_sigma_rels": p.snapshots[0].sigma_rels, "snapshots": len(p.snapshots),
                              "rows": rows, "best": best}
    if best is not None and best_weights is not None:
        i, weights = best_weights
        path = write_checkpoint(out / output_name(p.sigma_rels[i], p.at), inference_state(p, i, weights))
        result["best_checkpoint"] = str(path)
        line = f"best by {key}: {best['profile']} ({key} {best[key]:.5g}); checkpoint {path}"
    elif best is not None:
        line = (f"best by {key}: the run's own {best['profile']} EMA ({key} {best[key]:.5g}): "
                f"ddpm-evaluate --ema-index {best['ema_index']}")
    else:
        line = "no measure to rank by (no eval.val_shards, no Inception weights): compare the grids by eye"
    table = markdown(rows, keys, best)
    atomic_write(out / "sweep.md", f"# Post-hoc EMA sweep of {run_dir} at {p.at} images\n\n{table}\n\n{line}\n",
                 what="sweep table")
    atomic_write(out / "sweep.json", json.dumps(result, indent=2, default=_plain) + "\n", what="sweep table")
    plot_scores(rows, [*keys, ("profile_error", "profile error (reconstruction, relative L2)")], out / "sweep.png",
                best, key, title=f"post-hoc EMA of {run_dir.name} at {p.at} images")
    monitor.text("posthoc/table", table + "\n\n" + line, 0)
    monitor.close()
    print(table)
    print(line)
    return result


def _plain(v: Any) -> Any:
    return float(v) if isinstance(v, np.floating) else str(v)

