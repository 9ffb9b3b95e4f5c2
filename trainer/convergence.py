"""Convergence benchmark: this trainer against diffusers on a real image set, same images seen.

    python -m trainer.convergence --out runs/convergence --seeds 0,1
    python -m trainer.convergence --out runs/convergence-short --seeds 0,1 train.total_images=38400

The real set is scikit-learn's handwritten digits (1,797 grayscale scans, 8x8, shipped inside
the package: no download), upscaled to 16 px, written as class folders of PNGs and made into
shards by `ddpm-prepare --labels`. Both arms train the UNet of `configs/digits_16.yaml`
(1.62M parameters) with the recipe of that preset (key=value overrides apply to both):

* ours: the real loop, `torchrun --nproc_per_node=2 trainer/main.py`, reading the shards;
* diffusers: `UNet2DModel` of the same configuration (`models.interop`), `DDPMScheduler.add_noise`
  and `EMAModel` in a plain PyTorch loop over the same decoded images, same batches per step.

Both are sampled by the same code (`GaussianDiffusion.sample`, DDIM-50, the same seeds; the
diffusers model is wrapped to the trainer's forward signature) and judged offline by
`DigitsJudge`: a classifier trained on the real images plus a "not a digit" class of noise
(its mean confidence in the top digit, and the Inception-score-like class spread
exp E[KL(p(y|x) || p(y))], 10 at best), a Frechet distance in a PCA feature space fitted on the
real images (no downloaded weights), and channel consistency (every training image has
R = G = B). Prints one row per arm and seed, then the medians, and writes results.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "configs" / "digits_16.yaml"


# ----------------------------------------------------------------------------- the real image set


def digits(size: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 digit scans as uint8 (N, size, size) (bilinear from 8x8, 0..16 -> 0..255) and labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] * (255.0 / 16.0)  # (N, 1, 8, 8)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)[:, 0].numpy(), d.target.astype(np.int64)


def prepare_digits(out: str | os.PathLike, size: int, shard_size: int = 200) -> Path:
    """Write the digits as class folders of grayscale PNGs and make shards with ddpm-prepare's code."""
    from PIL import Image

    from data_pipeline.prepare import prepare

    out = Path(out)
    if (out / "shards" / "manifest.json").is_file():
        return out / "shards"
    images, labels = digits(size)
    folder = out / "images"
    for i, (img, y) in enumerate(zip(images, labels)):
        (folder / str(y)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, "L").save(folder / str(y) / f"{i:05d}.png")
    prepare(folder, out / "shards", image_size=size, shard_size=shard_size, labels=True, progress=False)
    return out / "shards"


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


NOT_A_DIGIT = 10  # the judge's reject class


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


# ----------------------------------------------------------------------------- the two arms


class DiffusersEps(nn.Module):
    """A diffusers UNet2DModel behind the trainer's forward signature, so the same sampler runs both."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W), t (B,) -> eps (B, C, H, W)."""
        return self.net(x, t).sample


@dataclass
class ArmResult:
    """One trained arm: the sampling model, its loss curve and timing."""

    model: nn.Module
    losses: list[tuple[int, float]]  # (images seen at the end of a log interval, mean loss over it)
    wall_s: float
    images: int
    cores: int  # processes x threads it ran on


def _lr_at(cfg: Any, nimg: int) -> float:
    from trainer.step import lr_at

    return lr_at(cfg, nimg)


def train_diffusers(cfg: Any, images: torch.Tensor, *, seed: int, threads: int = 1) -> ArmResult:
    """diffusers' UNet2DModel + DDPMScheduler + EMAModel in a plain loop with the recipe of cfg."""
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.training_utils import EMAModel

    from models.interop import diffusers_config_from_unet

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    t_cfg, d_cfg = cfg.train, cfg.diffusion
    if d_cfg.schedule != "linear" or d_cfg.target != "eps":
        raise ValueError("the diffusers arm runs the paper's linear schedule and eps target only")
    torch.manual_seed(seed)
    net = UNet2DModel(**diffusers_config_from_unet(cfg.model)).train()
    sched = DDPMScheduler(num_train_timesteps=d_cfg.timesteps, beta_start=d_cfg.beta_start,
                          beta_end=d_cfg.beta_end, beta_schedule="linear")
    opt = torch.optim.AdamW(net.parameters(), lr=t_cfg.lr, betas=tuple(t_cfg.betas), eps=t_cfg.eps,
                            weight_decay=t_cfg.weight_decay)
    ema = EMAModel(net.parameters(), decay=cfg.ema.decays[0])  # warms up as (1 + n) / (10 + n)
    x_all = images.float().div(127.5).sub(1.0)  # (N, 3, H, W) in [-1, 1]
    gen = torch.Generator().manual_seed(seed)
    B, total, every = t_cfg.batch_size, t_cfg.total_images, cfg.log.every_images
    perm, pos, nimg, window, losses = torch.randperm(len(x_all), generator=gen), 0, 0, [], []
    start = time.perf_counter()
    while nimg < total:
        for group in opt.param_groups:
            group["lr"] = _lr_at(cfg, nimg)
        if pos + B > len(perm):  # a new epoch: a fresh permutation
            perm, pos = torch.randperm(len(x_all), generator=gen), 0
        x0 = x_all[perm[pos : pos + B]]
        pos += B
        if cfg.data.hflip:
            flip = torch.rand(B, generator=gen) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, d_cfg.timesteps, (B,), generator=gen)
        loss = F.mse_loss(net(sched.add_noise(x0, noise, t), t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if t_cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(net.parameters(), t_cfg.grad_clip)
        opt.step()
        ema.step(net.parameters())
        nimg += B
        window.append(loss.item())
        if nimg % every == 0 or nimg >= total:
            losses.append((nimg, statistics.fmean(window)))
            window = []
    wall = time.perf_counter() - start
    torch.set_num_threads(before)
    ema.copy_to(net.parameters())
    return ArmResult(DiffusersEps(net.eval()), losses, wall, nimg, threads)


def train_ours(cfg_path: Path, overrides: list[str], run_dir: Path, shards: Path, *, seed: int,
               nproc: int = 2) -> ArmResult:
    """The real loop under torchrun (nproc ranks, one thread each); the EMA weights of its checkpoint."""
    from trainer.checkpoint import load_for_inference

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / "trainer" / "main.py"), "--config", str(cfg_path), *overrides,
           f"run.dir={run_dir}", f"data.shards={shards}", f"run.seed={seed}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("WORLD_SIZE", None)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"trainer exited {proc.returncode}: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")
    model, _, saved = load_for_inference(run_dir)
    batch = int(saved["train"]["batch_size"])
    losses = [(step * batch, value) for step, value in tb_scalars(run_dir, "train/loss")]
    return ArmResult(model, losses, wall, int(saved["train"]["total_images"]), nproc)


def tb_scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of one TensorBoard tag of a run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def sample(model: nn.Module, cfg: Any, n: int, *, seed: int = 1234, sampler: str = "ddim",
           steps: int | None = 50, eta: float = 0.0, batch: int = 128) -> torch.Tensor:
    """n uint8 samples (n, C, H, W) by the trainer's sampler; image k's noise depends only on (seed, k)."""
    from models.diffusion import GaussianDiffusion
    from trainer.sampling import sample_uint8

    m = cfg.model
    with one_thread():
        return sample_uint8(model.eval(), GaussianDiffusion(cfg.diffusion), range(n),
                            image_shape=(m.in_channels, m.image_size, m.image_size), seed=seed,
                            batch_size=batch, sampler=sampler, steps=steps, eta=eta)


def loss_at(losses: list[tuple[int, float]], fraction: float, total: int) -> float:
    """The logged mean loss of the interval ending at (or first after) fraction * total images."""
    for nimg, value in losses:
        if nimg >= fraction * total:
            return value
    return float("nan")


# ----------------------------------------------------------------------------- the table


_COLUMNS = (
    ("arm", "{}"),
    ("seed", "{}"),
    ("confidence", "{:.3f}"),
    ("class_spread", "{:.2f}"),
    ("fd_pca", "{:.2f}"),
    ("abs_r_minus_b", "{:.2f}"),
    ("channel_bias", "{:.3f}"),
    ("loss_10%", "{:.4f}"),
    ("loss_50%", "{:.4f}"),
    ("loss_100%", "{:.4f}"),
    ("core_ms_per_image", "{:.1f}"),
)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Rows as a Markdown table in the benchmark's column order (missing values blank)."""
    out = ["| " + " | ".join(c for c, _ in _COLUMNS) + " |", "|" + " --- |" * len(_COLUMNS)]
    for r in rows:
        cells = []
        for c, fmt in _COLUMNS:
            v = r.get(c)
            cells.append("" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def medians(rows: list[dict[str, Any]], arm: str) -> dict[str, Any]:
    """The median of every numeric column over the rows of one arm."""
    mine = [r for r in rows if r["arm"] == arm]
    out: dict[str, Any] = {"arm": f"**{arm}**", "seed": "median"}
    for c, _ in _COLUMNS[2:]:
        vals = [r[c] for r in mine if r.get(c) is not None]
        out[c] = statistics.median(vals) if vals else None
    return out


def main(argv: list[str] | None = None) -> int:
    """Train both arms for every seed, sample, judge, and print the side-by-side table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/convergence", help="scratch folder: shards, runs, results.json")
    p.add_argument("--seeds", default="0,1", help="comma-separated training seeds (medians over them)")
    p.add_argument("--config", default=str(PRESET), help="recipe YAML for both arms")
    p.add_argument("--arms", default="ours,diffusers", help="comma-separated: ours, diffusers")
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim")
    p.add_argument("--steps", type=int, default=50, help="sampler steps")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic, 1: stochastic)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, applied to both arms")
    args = p.parse_args(argv)
    seeds = [int(x) for x in args.seeds.split(",")]
    arms = [a for a in args.arms.split(",") if a]
    if not set(arms) <= {"ours", "diffusers"} or not arms:
        print(f"--arms: expected a comma-separated subset of ours,diffusers, got {args.arms!r}", file=sys.stderr)
        return 2

    from trainer.config import ConfigError, load_config

    try:
        cfg = load_config(Path(args.config), args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    shards = prepare_digits(out, cfg.model.image_size)
    images, labels = read_shards(shards)
    judge = DigitsJudge(images[:, 0].numpy(), labels.numpy())
    print(f"digits: {len(images)} images at {cfg.model.image_size}px; classifier held-out accuracy "
          f"{judge.held_accuracy:.3f}; shards |R-B| {(images[:, 0].float() - images[:, 2].float()).abs().mean():.2f}",
          flush=True)
    rows: list[dict[str, Any]] = [{"arm": "real (held-out)", "seed": "", **judge.reference}]
    total = cfg.train.total_images
    for seed in seeds:
        for arm in arms:
            if arm == "ours":
                res = train_ours(Path(args.config), args.overrides, out / f"ours-seed{seed}", shards, seed=seed)
            else:
                res = train_diffusers(cfg, images, seed=seed)
            samples = sample(res.model, cfg, args.num_samples, sampler=args.sampler, steps=args.steps, eta=args.eta)
            row = {"arm": arm, "seed": seed, **judge.score(samples),
                   "loss_10%": loss_at(res.losses, 0.1, total), "loss_50%": loss_at(res.losses, 0.5, total),
                   "loss_100%": loss_at(res.losses, 1.0, total),
                   "core_ms_per_image": 1e3 * res.wall_s * res.cores / res.images,
                   "loss_curve": res.losses}
            rows.append(row)
            print(markdown_table([row]).splitlines()[-1], flush=True)
    table = rows + [medians(rows, arm) for arm in arms]
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    print(f"\n{cfg.train.total_images} training images per run, {args.sampler}-{args.steps} samples "
          f"({args.num_samples} per run); time per image in core-ms: wall x (2 ranks x 1 thread | 1 thread)\n")
    print(markdown_table(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
