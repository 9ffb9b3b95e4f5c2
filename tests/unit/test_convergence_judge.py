"""The convergence benchmark's real image set and its offline judge (benchmarks.digits)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.digits import DigitsJudge, digits, frechet_distance, prepare_digits, read_shards


@pytest.fixture(scope="module")
def judge() -> DigitsJudge:
    images, labels = digits(8)
    return DigitsJudge(images, labels)


def test_frechet_distance_is_the_closed_form_for_diagonal_gaussians() -> None:
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 0.25]), np.array([4.0, 1.0, 1.0])
    expected = ((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * np.sqrt(v1 * v2)).sum()
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(mu1, np.diag(v1), mu1, np.diag(v1)) == pytest.approx(0.0, abs=1e-6)


def test_judge_rates_real_digits_far_above_noise_and_blank_images(judge: DigitsJudge) -> None:
    real = judge.reference
    assert judge.held_accuracy > 0.9
    assert real["confidence"] > 0.9 and real["class_spread"] > 8.0
    gen = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (300, 1, 8, 8), generator=gen, dtype=torch.uint8).repeat(1, 3, 1, 1)
    blank = torch.zeros(300, 3, 8, 8, dtype=torch.uint8)
    for bad in (judge.score(noise), judge.score(blank)):
        assert bad["class_spread"] < real["class_spread"] / 2
        assert bad["fd_pca"] > 10 * real["fd_pca"]
    assert judge.score(noise)["confidence"] < 0.2  # the reject class takes noise, however confident


def test_channel_measures_are_zero_for_gray_and_read_a_blue_cast(judge: DigitsJudge) -> None:
    images, _ = digits(8)
    gray = torch.from_numpy(images[:200, None]).repeat(1, 3, 1, 1)
    s = judge.score(gray)
    assert s["abs_r_minus_b"] == 0.0 and s["channel_bias"] == 0.0
    cast = gray.clone()
    cast[:, 2] = (cast[:, 2].int() + 30).clamp(max=255).to(torch.uint8)  # a blue cast
    lifted = (cast[:, 2].double() - gray[:, 2].double()).mean().item()  # < 30 where 255 clipped it
    s = judge.score(cast)
    assert s["abs_r_minus_b"] == pytest.approx(lifted)
    assert s["channel_bias"] == pytest.approx(2 / 3 * lifted / 127.5)  # blue vs the mean of the 3 channels
    with pytest.raises(ValueError, match="expected uint8"):
        judge.score(gray[:, :1])


def test_digits_reach_the_loader_gray_and_unchanged(tmp_path: Path) -> None:
    """prepare -> shards -> decode keeps R = G = B and the pixels (JPEG q95: within a few levels)."""
    shards = prepare_digits(tmp_path, 8)
    images, labels = read_shards(shards)
    assert images.shape == (1797, 3, 8, 8) and images.dtype == torch.uint8
    assert sorted(set(labels.tolist())) == list(range(10))
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])
    src, src_labels = digits(8)
    # prepare shuffles the order; match every decoded image to its source by label and pixels
    flat = torch.from_numpy(src.reshape(len(src), -1)).float()
    dist = torch.cdist(images[:, 0].reshape(len(images), -1).float(), flat)
    nearest = dist.argmin(1)
    assert torch.equal(torch.from_numpy(src_labels)[nearest], labels)
    assert (dist.min(1).values / 8).max() < 4.0  # RMS over the 64 pixels, 0-255 scale


def test_loader_batches_of_gray_digits_stay_gray_with_flips(tmp_path: Path) -> None:
    """The loader's channels_last uint8 batches (flips, worker ring buffers) never mix channels."""
    from data_pipeline.config import DataConfig
    from data_pipeline.loader import build_loader

    shards = prepare_digits(tmp_path, 8)
    images, _ = read_shards(shards)
    plain = {img[0].numpy().tobytes() for img in images}
    mirrored = {img[0].flip(-1).numpy().tobytes() for img in images} - plain
    cfg = DataConfig(shards=str(shards), num_workers=1, hflip=True, shuffle_buffer=64)
    loader = build_loader(cfg, batch_size=32, rank=0, world_size=1, seed=0)
    try:
        it = iter(loader)
        batches = [next(it)["image"] for _ in range(20)]
    finally:
        loader.close()
    x = torch.cat(batches)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    seen = [img[0].contiguous().numpy().tobytes() for img in x]
    assert all(s in plain or s in mirrored for s in seen)  # whole images, pixels in place
    assert 0 < sum(s in mirrored for s in seen) < len(seen)  # and some of them flipped


def test_sampler_without_clipping_is_the_plain_ddim_ode() -> None:
    """clip_denoised=False (opt-in, the sampler ablation of the README) leaves x0 unclipped."""
    import math

    from models.diffusion import DiffusionConfig, GaussianDiffusion, sampling_timesteps

    diffusion = GaussianDiffusion(DiffusionConfig(timesteps=20))

    def model(x: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        # an eps whose x0 leaves [-1, 1] at large t only, so clipping there changes the end
        return 0.5 * x - (2.0 if int(torch.as_tensor(t).reshape(-1)[0]) > 10 else 0.0)

    x = torch.randn((1, 3, 2, 2), generator=torch.Generator().manual_seed(7))  # the sampler's x_T of seed 7
    abar = diffusion.alphas_cumprod.tolist()
    ts = sampling_timesteps(20, 5)
    for i, t in enumerate(ts):
        a, a_prev = abar[t], abar[ts[i + 1]] if i + 1 < len(ts) else 1.0
        eps = model(x, t)
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    got = diffusion.sample(model, (3, 2, 2), [7], sampler="ddim", steps=5, clip_denoised=False)
    torch.testing.assert_close(got, x.clamp(-1, 1), rtol=1e-5, atol=1e-5)
    clipped = diffusion.sample(model, (3, 2, 2), [7], sampler="ddim", steps=5)
    assert not torch.allclose(clipped, got)  # the default (the paper's) clips x0 at every step


def _row(seed: int, images: int, confidence: float, fd: float) -> dict:
    return {"arm": "ours", "seed": seed, "images": images, "confidence": confidence, "fd_pca": fd,
            "class_spread": 5.0, "abs_r_minus_b": 1.0, "channel_bias": 0.0, "core_ms_per_image": 2.0}


def test_images_to_target_is_the_first_scored_point_that_reaches_both_scores(tmp_path: Path) -> None:
    import json

    from benchmarks.convergence import images_to_target, read_target

    paper = {"rows": [{"arm": "real (held-out)", "seed": ""}, _row(0, 300, 0.8, 0.5), _row(1, 300, 0.9, 0.3),
                      _row(0, 100, 0.1, 9.0)]}
    (tmp_path / "paper.json").write_text(json.dumps({"results": paper}))  # a --json report
    target = read_target(str(tmp_path / "paper.json"))
    assert (target["images"], target["confidence"], target["fd_pca"]) == (300, pytest.approx(0.85), pytest.approx(0.4))
    rows = [_row(0, 100, 0.86, 0.5), _row(0, 150, 0.86, 0.39), _row(1, 100, 0.7, 0.3), _row(1, 150, 0.8, 0.3), _row(1, 200, 0.9, 0.2)]
    got = {r["seed"]: r for r in images_to_target(rows, target)}
    assert got[0]["images_to_target"] == 150 and got[0]["ratio"] == pytest.approx(0.5)
    assert got[1]["images_to_target"] == 200  # confidence 0.8 < 0.85 at 150
    # the median curve: confidence 0.78 at 100, 0.83 at 150, 0.9 (seed 1's point alone) at 200
    assert got["median"]["images_to_target"] == 200 and got["median"]["core_s_to_target"] == pytest.approx(0.4)


@pytest.mark.parametrize("argv, message", [
    (["--fractions", "1/5,1"], "--fractions: fractions in"),
    (["--fractions", "1/3,1", "--arms", "ours,diffusers"], "use --arms ours"),
    (["--sampler", "ddpm", "--ddim-eps", "model"], "DDIM's"),
    (["--keep-every", "100"], "--keep-every: a positive multiple"),
])
def test_convergence_refuses_what_it_cannot_score(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    from benchmarks import convergence

    assert convergence.main(["--config", "tests/configs/digits_8.yaml", "--arms", "ours", *argv]) == 2
    assert message in capsys.readouterr().err
