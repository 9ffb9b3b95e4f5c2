"""Convergence benchmark: this trainer against diffusers on a real image set, same images seen.

    python -m benchmarks.convergence --out runs/convergence --seeds 0,1
    python -m benchmarks.convergence --out runs/convergence-600 --seeds 0,1 train.total_images=38400
    python -m benchmarks.convergence --out runs/convergence-600 --seeds 0,1 --arms ours --eta 1 train.total_images=38400
    python -m benchmarks.convergence --prepare-only          # only the digits shards, at digits_16's data.shards
    python -m benchmarks.convergence --config tests/configs/digits_8.yaml --arms ours --out runs/fast \
        --fractions 1/6,1/3,1/2,1 --target runs/paper/results.json recipe=fast   # images to reach a target

The real set is scikit-learn's handwritten digits (benchmarks.digits), upscaled to the model's
size and made into shards under --out by ddpm-prepare's code. Both arms train the UNet of
--config (default `configs/digits_16.yaml`, 1.62M parameters) with its recipe (key=value
overrides apply to both; benchmarks.convergence_arms): this trainer's real loop under torchrun,
and diffusers' UNet2DModel + DDPMScheduler + EMAModel in a plain loop over the same images.

Both are sampled by the same code (`GaussianDiffusion.sample`: --sampler, --steps, --eta,
--ddim-eps, --spacing, --no-clip; the same seeds) from the EMA weights (or --weights raw) and judged
offline by `benchmarks.digits.DigitsJudge`. A finished run of the ours arm is reused by a later
command on the same --out with the same recipe, so sampler variants need no new training. --per-t
adds the per-channel error of each model at given timesteps (what a colour cast comes from). Prints
one row per arm, seed and scored point, then the medians, and writes results.json under --out.

The ours arm keeps a checkpoint every twelfth of the run: --fractions scores it at those points
(e.g. 1/6,1/3,1), and --target RESULTS.json (an earlier command's results, e.g. the paper recipe's)
adds the images each seed and the median curve need to reach that run's final median confidence
and PCA FD: "images to target", the measure of the faster-training recipes (README).

--prepare-only makes only the digits shards, at the config's data.shards (or a data.shards=DIR
override), so `trainer/main.py --config digits_16` trains on them.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks import timing
from benchmarks.convergence_arms import milestone_images, train_diffusers, train_ours
from benchmarks.digits import (
    DigitsJudge,
    make_digit_shards,
    one_thread,
    prepare_digits,
    read_shards,
)
from benchmarks.timing import UsageError
from benchmarks.trainer_internals import config_path, image_seed, load_cfg, to_uint8
from trainer.sampling import add_ddim_eps_option

MODULE = "benchmarks.convergence"
SAMPLING = ("arms", "num_samples", "sampler", "steps", "eta", "ddim_eps", "spacing", "no_clip", "weights", "per_t",
            "seeds", "nproc", "json", "fractions", "target")


def sample(model: nn.Module, cfg: Any, n: int, *, seed: int = 1234, sampler: str = "ddim", steps: int | None = 50,
           eta: float = 0.0, spacing: str | None = None, clip: bool = True, batch: int = 128,
           ddim_eps: str | None = None) -> torch.Tensor:
    """n uint8 samples (n, C, H, W) by the trainer's sampler; image k's noise depends only on (seed, k).

    ``spacing`` None: the sampler's default for the schedule; ``ddim_eps`` None: the default convention.
    """
    from models.diffusion import DDIM_EPS_DEFAULT, GaussianDiffusion

    diffusion, m = GaussianDiffusion(cfg.diffusion), cfg.model
    out = []
    with one_thread(), torch.no_grad():
        for start in range(0, n, batch):
            seeds = [image_seed(seed, k) for k in range(start, min(n, start + batch))]
            x = diffusion.sample(model.eval(), (m.in_channels, m.image_size, m.image_size), seeds, sampler=sampler,
                                 steps=steps, eta=eta, spacing=spacing, clip_denoised=clip,
                                 ddim_eps=ddim_eps or DDIM_EPS_DEFAULT)
            out.append(to_uint8(x))
    return torch.cat(out)


@torch.no_grad()
def per_t(model: nn.Module, cfg: Any, images: torch.Tensor, ts: Sequence[int], seed: int = 0) -> list[dict[str, Any]]:
    """Per timestep: the eps error per channel, its gain into x0, and how far x0's channels drift apart.

    ``images`` uint8 (N, 3, H, W); each t gets fresh noise from ``seed``. x0 is clipped to [-1, 1]
    as the sampler clips it; differences are on that scale.
    """
    from models.diffusion import GaussianDiffusion

    diffusion = GaussianDiffusion(cfg.diffusion)
    x0 = images.float().div(127.5).sub(1.0)  # (N, 3, H, W) in [-1, 1]
    gen = torch.Generator().manual_seed(seed)
    rows = []
    with one_thread():
        for t in ts:
            tt = torch.full((len(x0),), int(t), dtype=torch.long)
            noise = torch.randn(x0.shape, generator=gen)
            x_t = diffusion.q_sample(x0, tt, noise)
            abar = float(diffusion.alphas_cumprod[int(t)])
            x0_hat, eps_hat = diffusion.predict_x0_eps(model.eval()(x_t, tt), x_t, abar)
            x0_hat = x0_hat.clamp(-1, 1)
            rows.append({"t": int(t), "eps_mse_rgb": [float(v) for v in (eps_hat - noise).pow(2).mean((0, 2, 3))],
                         "x0_error_gain": math.sqrt((1 - abar) / abar),
                         "mean_abs_x0_r_minus_b": float((x0_hat[:, 0] - x0_hat[:, 2]).abs().mean()),
                         "per_image_abs_mean_r_minus_b": float((x0_hat[:, 0].mean((1, 2))
                                                                - x0_hat[:, 2].mean((1, 2))).abs().mean())})
    return rows


def scoring_key(args: argparse.Namespace, images: int) -> str:
    """What makes a score what it is: the point of the run, the sampler and the number of samples."""
    from models.diffusion import DDIM_EPS_DEFAULT

    ddim = {"eta": args.eta, "ddim_eps": args.ddim_eps or DDIM_EPS_DEFAULT} if args.sampler == "ddim" else {}
    return json.dumps({"images": images, "sampler": args.sampler, "steps": args.steps, **ddim, "spacing": args.spacing,
                       "clip": not args.no_clip, "weights": args.weights, "num_samples": args.num_samples},
                      sort_keys=True)


def cached(run_dir: Path | None, key: str, compute: Any) -> dict[str, float]:
    """``compute()``, or its value from an earlier command on the same run (``scores.json``): the samples
    and the judge are seeded, so a score is a function of the run and the key."""
    path = run_dir / "scores.json" if run_dir is not None else None
    scores = json.loads(path.read_text()) if path is not None and path.is_file() else {}
    if key not in scores:
        scores[key] = compute()
        if path is not None:
            timing.write_json(path, scores)
    return scores[key]


def per_t_table(rows: list[dict[str, Any]]) -> str:
    """The per-t rows as a Markdown table."""
    out = ["| t | eps MSE (R, G, B) | x0 error gain | mean \\|x0_R - x0_B\\| (pixels) | "
           "per-image \\|mean x0_R - mean x0_B\\| |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        out.append(f"| {r['t']} | {', '.join(f'{v:.4f}' for v in r['eps_mse_rgb'])} | {r['x0_error_gain']:.3g} | "
                   f"{r['mean_abs_x0_r_minus_b']:.2f} | {r['per_image_abs_mean_r_minus_b']:.2f} |")
    return "\n".join(out)


def loss_at(losses: list[tuple[int, float]], fraction: float, total: int) -> float:
    """The logged mean loss of the interval ending at (or first after) fraction * total images."""
    for nimg, value in losses:
        if nimg >= fraction * total:
            return value
    return float("nan")


_COLUMNS = (
    ("arm", "{}"), ("seed", "{}"), ("images", "{}"), ("confidence", "{:.3f}"), ("class_spread", "{:.2f}"), ("fd_pca", "{:.2f}"),
    ("abs_r_minus_b", "{:.2f}"), ("channel_bias", "{:.3f}"), ("loss_10%", "{:.4f}"), ("loss_50%", "{:.4f}"),
    ("loss_100%", "{:.4f}"), ("core_ms_per_image", "{:.1f}"),
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


def medians(rows: list[dict[str, Any]], arm: str, images: int | None = None) -> dict[str, Any]:
    """The median of every numeric column over the rows of one arm (at one scored point, if given)."""
    mine = [r for r in rows if r["arm"] == arm and (images is None or r.get("images") == images)]
    out: dict[str, Any] = {"arm": f"**{arm}**", "seed": "median", "images": images}
    for c, _ in _COLUMNS[3:]:
        vals = [r[c] for r in mine if r.get(c) is not None]
        out[c] = statistics.median(vals) if vals else None
    return out


def read_target(path: str) -> dict[str, Any]:
    """The final median confidence and PCA FD of the first arm in an earlier command's results.json (or --json)."""
    try:
        doc = json.loads(Path(path).read_text())
        rows = [r for r in doc.get("results", doc)["rows"] if r.get("seed") != ""]
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"--target: cannot read the results of an earlier command from {path} ({e})") from None
    if not rows:
        raise UsageError(f"--target: {path} holds no scored runs")
    arm = rows[0]["arm"]
    final = max(r.get("images") or 0 for r in rows if r["arm"] == arm)
    last = [r for r in rows if r["arm"] == arm and (r.get("images") or 0) == final]
    return {"path": path, "arm": arm, "images": final,
            "confidence": statistics.median(r["confidence"] for r in last),
            "fd_pca": statistics.median(r["fd_pca"] for r in last)}


def images_to_target(rows: list[dict[str, Any]], target: dict[str, Any]) -> list[dict[str, Any]]:
    """Per arm, per seed and for the median curve: the first scored images with confidence >= and
    PCA FD <= the target's (None: not reached), its ratio to the target's images, and core-seconds."""
    def reached(r: dict[str, Any]) -> bool:
        return r["confidence"] >= target["confidence"] and r["fd_pca"] <= target["fd_pca"]

    out = []
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = sorted((r for r in rows if r["arm"] == arm), key=lambda r: r["images"])
        points = sorted({r["images"] for r in mine})
        curves = [(seed, [r for r in mine if r["seed"] == seed]) for seed in dict.fromkeys(r["seed"] for r in mine)]
        curves.append(("median", [medians(mine, arm, n) for n in points]))
        rate = statistics.median(r["core_ms_per_image"] for r in mine)
        for seed, curve in curves:
            hit = next((r["images"] for r in curve if reached(r)), None)
            out.append({"arm": arm, "seed": seed, "images_to_target": hit,
                        "ratio": None if hit is None else hit / target["images"],
                        "core_s_to_target": None if hit is None else hit * rate / 1e3})
    return out


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, set[str]]:
    """The command line, and which options were given explicitly."""
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/convergence", help="scratch folder: shards, runs, results.json")
    p.add_argument("--config", default="digits_16", help="preset name or YAML path of both arms' recipe")
    p.add_argument("--prepare-only", action="store_true",
                   help="only make the digits shards at the config's data.shards (a data.shards=DIR override moves them)")
    p.add_argument("--seeds", default="0,1", help="comma-separated training seeds (medians over them)")
    p.add_argument("--arms", default="ours,diffusers", help="comma-separated: ours, diffusers")
    p.add_argument("--nproc", type=int, default=2, help="ranks of the ours arm (default 2)")
    p.add_argument("--num-samples", type=int, default=500, help="samples judged per run (default 500)")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim")
    p.add_argument("--steps", type=int, default=50, help="sampler steps (default 50)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic, 1: stochastic)")
    add_ddim_eps_option(p, default=None)
    p.add_argument("--spacing", choices=("leading", "trailing"), default=None,
                   help="sampler timestep spacing (default: leading, trailing on a zero-terminal-SNR schedule)")
    p.add_argument("--no-clip", action="store_true", help="sample without clipping x0 at every step")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema", help="sample the EMA or the trained weights")
    p.add_argument("--per-t", default="", metavar="T,T,...",
                   help="also the per-channel eps and x0 errors at these timesteps, on 256 real images")
    p.add_argument("--fractions", default="1", metavar="F,F,...",
                   help="score the ours arm at these fractions of the run (twelfths, e.g. 1/6,1/3,1; default 1)")
    p.add_argument("--keep-every", type=int, default=0, metavar="IMAGES",
                   help="the ours arm keeps a checkpoint every this many images (default: a twelfth of the run)")
    p.add_argument("--target", default=None, metavar="RESULTS.json",
                   help="report the images needed to reach the final median confidence and PCA FD of these results")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the figures here (results.json is always)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, applied to both arms")
    args = p.parse_args(argv)
    return args, timing.explicit(p, argv)


def check(args: argparse.Namespace, given: set[str], cfg: Any) -> tuple[list[int], list[str], list[int], list[int]]:
    """Refuse what cannot be honoured; (seeds, arms, per-t timesteps, images to score at)."""
    if args.prepare_only:
        timing.refuse_unused(given, [*SAMPLING, "out"], "with --prepare-only (it only makes the shards, at "
                             "data.shards)")
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x]
        ts = [int(x) for x in args.per_t.split(",") if x]
    except ValueError:
        raise UsageError(f"--seeds and --per-t take comma-separated integers, got {args.seeds!r}, "
                         f"{args.per_t!r}") from None
    arms = [a for a in args.arms.split(",") if a]
    if not arms or not set(arms) <= {"ours", "diffusers"} or not seeds:
        raise UsageError(f"--arms: a comma-separated subset of ours,diffusers and --seeds: at least one seed; got "
                         f"{args.arms!r}, {args.seeds!r}")
    if "ours" not in arms:
        timing.refuse_unused(given, ["nproc"], "without the ours arm (--nproc is its number of ranks)")
    if ("eta" in given or "ddim_eps" in given) and args.sampler != "ddim":
        raise UsageError("--eta and --ddim-eps are DDIM's: ancestral DDPM (--sampler ddpm) draws fresh noise at "
                         "every step and has no direction term")
    total, every = cfg.train.total_images, args.keep_every or milestone_images(cfg)
    if every <= 0 or every % cfg.train.batch_size:
        raise UsageError(f"--keep-every: a positive multiple of train.batch_size={cfg.train.batch_size}, got {every}")
    try:
        fractions = sorted({Fraction(x) for x in args.fractions.split(",") if x})
    except (ValueError, ZeroDivisionError):
        raise UsageError(f"--fractions: comma-separated fractions such as 1/6,1/3,1; got {args.fractions!r}") from None
    points = [int(f * total) for f in fractions]
    if not fractions or any(not 0 < f <= 1 or (n != total and (f * total != n or n % every))
                            for f, n in zip(fractions, points)):
        raise UsageError(f"--fractions: fractions in (0, 1] at a kept checkpoint (every {every} of the {total} "
                         f"images; --keep-every sets it), got {args.fractions!r}")
    if points != [total] and arms != ["ours"]:
        raise UsageError("--fractions scores the ours arm's kept checkpoints: use --arms ours")
    if "diffusers" in arms and (cfg.diffusion.schedule != "linear" or cfg.diffusion.target != "eps"):
        raise UsageError("the diffusers arm runs the paper's linear schedule and eps target only: use --arms ours")
    if any(not 0 <= t < cfg.diffusion.timesteps for t in ts):
        raise UsageError(f"--per-t: timesteps lie in [0, {cfg.diffusion.timesteps}), got {args.per_t!r}")
    if args.num_samples < 2 or args.steps < 1 or args.nproc < 1:
        raise UsageError("--num-samples must be >= 2, --steps and --nproc >= 1")
    return seeds, arms, ts, points


def run(args: argparse.Namespace, given: set[str], argv: Sequence[str] | None) -> int:
    """Train both arms for every seed, sample, judge, and print the side-by-side table."""
    cfg_file = config_path(args.config)
    cfg = load_cfg(str(cfg_file), args.overrides)
    seeds, arms, ts, points = check(args, given, cfg)
    target = read_target(args.target) if args.target else None
    if args.prepare_only:
        try:
            shards = make_digit_shards(cfg.data.shards, cfg.model.image_size)
        except ValueError as e:
            raise UsageError(str(e)) from None
        print(f"digits shards at {cfg.model.image_size}px: {shards}; train on them with "
              f"`torchrun --nproc_per_node=2 trainer/main.py --config {args.config}`"
              + (f" data.shards={cfg.data.shards}" if any(o.startswith("data.shards=") for o in args.overrides) else ""))
        return 0
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
                res = train_ours(cfg_file, args.overrides, out / f"ours-seed{seed}", shards, seed=seed,
                                 nproc=args.nproc, milestone_every=args.keep_every or milestone_images(cfg))
            else:
                res = train_diffusers(cfg, images, seed=seed)
            for n in points:
                model = res.model_at(n, args.weights)

                def score(m: nn.Module = model) -> dict[str, float]:
                    return judge.score(sample(m, cfg, args.num_samples, sampler=args.sampler, steps=args.steps,
                                              eta=args.eta, spacing=args.spacing, clip=not args.no_clip,
                                              ddim_eps=args.ddim_eps))

                row = {"arm": arm, "seed": seed, "images": n, **cached(res.run_dir, scoring_key(args, n), score),
                       "loss_10%": loss_at(res.losses, 0.1, n), "loss_50%": loss_at(res.losses, 0.5, n),
                       "loss_100%": loss_at(res.losses, 1.0, n),
                       "core_ms_per_image": 1e3 * res.wall_s * res.cores / res.images, "reused_run": res.reused,
                       "loss_curve": [x for x in res.losses if x[0] <= n]}
                if ts and n == total:
                    row["per_t"] = per_t(model, cfg, images[:256], ts)
                rows.append(row)
                print(markdown_table([row]).splitlines()[-1] + (" (reused run)" if res.reused else ""), flush=True)
                if "per_t" in row:
                    print(f"per-t, {arm} seed {seed} ({args.weights} weights, {min(256, len(images))} real images):\n"
                          + per_t_table(row["per_t"]), flush=True)
    table = rows + [medians(rows, arm, n) for arm in arms for n in points]
    reach = images_to_target(rows[1:], target) if target else None
    timing.write_json(out / "results.json", {"command": timing.command(MODULE, argv), "rows": rows,
                                             "target": target, "images_to_target": reach})
    ddim = f"eta {args.eta:g}, eps {args.ddim_eps or 'default'}, " if args.sampler == "ddim" else ""
    print(f"\n{total} training images per run, {args.sampler}-{args.steps} samples ({ddim}"
          f"{args.spacing or 'default spacing'}{', no clip' if args.no_clip else ''}, {args.weights} weights, "
          f"{args.num_samples} per scored point); loss columns at 10/50/100% of the images scored; time per image "
          f"in core-ms: wall x ({args.nproc} ranks x 1 thread | 1 thread)\n")
    print(markdown_table(table))
    if reach is not None:
        print(f"\nimages to reach {target['arm']}'s final median confidence {target['confidence']:.3f} and PCA FD "
              f"{target['fd_pca']:.2f} at {target['images']} images ({target['path']}):\n")
        print("| arm | seed | images to target | ratio to the target's images | core-s to target |\n"
              "| --- | --- | --- | --- | --- |")
        for r in reach:
            hit = r["images_to_target"]
            print(f"| {r['arm']} | {r['seed']} | {hit if hit is not None else 'not reached'} | "
                  f"{'' if hit is None else format(r['ratio'], '.3f')} | "
                  f"{'' if hit is None else format(r['core_s_to_target'], '.0f')} |")
    timing.finish(MODULE, argv, args, {"rows": rows, "target": target, "images_to_target": reach})
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; 2 with one line on stderr for a mistake found before training."""
    args, given = parse_args(argv)
    return timing.run_cli(MODULE, lambda: run(args, given, argv))


if __name__ == "__main__":
    sys.exit(main())
