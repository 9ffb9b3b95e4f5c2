"""The evaluator end to end on a tiny UNet with an injected 16-d feature extractor (no Inception)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.config import EvalConfig
from trainer.evaluation.command import parse_args, run_standalone
from trainer.evaluation.evaluator import build_evaluator
from trainer.evaluation.metrics import compute_metrics, feature_statistics, frechet_distance
from trainer.evaluation.reference import ReferenceStats, reference_from_images
from trainer.evaluation.validation import pinned_validation_loss
from trainer.sample_set import ProtocolMismatchError
from trainer.sampling import denoising_strip, rank_block, sample_images, to_uint8

repo = Path(__file__).resolve().parents[2]


class TinyExtractor(torch.nn.Module):
    """A fixed random conv + pooling: 16-d features and 10 logits from uint8 images."""

    name = "tiny-test"

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("w", torch.randn(16, 3, 3, 3, generator=g) / 3)
        self.register_buffer("head", torch.randn(16, 10, generator=g))
        self.seen = 0

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.seen += x.shape[0]
        h = torch.nn.functional.conv2d(x.float() / 127.5 - 1, self.w).relu()  # (B, 16, H-2, W-2)
        f = h.mean((2, 3))  # (B, 16)
        return {"features": f, "logits": f @ self.head}


def tiny_extractor(weights: str, device: torch.device) -> TinyExtractor:
    """Factory for ``--feature-extractor tests.integration.test_evaluate:tiny_extractor``."""
    return TinyExtractor().to(device)


def _tiny_model(seed: int = 0):
    from models.diffusion import DiffusionConfig, GaussianDiffusion
    from models.unet import UNet, UNetConfig

    torch.manual_seed(seed)
    cfg = UNetConfig(image_size=16, base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                     attn_resolutions=(8,), dropout=0.0)
    return UNet(cfg).eval(), GaussianDiffusion(DiffusionConfig(timesteps=100))


# --------------------------------------------------------------------------- in-process pieces


def test_image_k_independent_of_how_indices_are_split() -> None:
    """What 1 vs 2 ranks do: the same indices, batched differently, give the same uint8 images."""
    model, diffusion = _tiny_model()
    kw = dict(seed=7, image_size=16, sampler="ddim", steps=3)
    whole = sample_images(model, diffusion, [0, 1, 2, 3, 4], **kw)
    parts = torch.cat([sample_images(model, diffusion, idx, **kw) for idx in ([0, 1, 2], [3, 4])])
    assert whole.dtype == torch.uint8 and whole.shape == (5, 3, 16, 16)
    assert torch.equal(whole, parts)
    assert not torch.equal(whole[0], whole[1])  # different seeds, different images
    # The rank blocks tile 0..n-1 exactly, for any world size.
    for n, world in ((10, 1), (10, 3), (5, 4)):
        blocks = [list(rank_block(n, r, world)) for r in range(world)]
        assert sum(blocks, []) == list(range(n))


def test_denoising_strip_shape_and_endpoints() -> None:
    model, diffusion = _tiny_model()
    strip = denoising_strip(diffusion, model, seeds=[1, 2], image_size=16, num_columns=4,
                              sampler="ddim", steps=6, padding=2)
    assert strip.dtype == torch.uint8
    assert strip.shape == (3, 2 + 2 * (16 + 2), 2 + 4 * (16 + 2))  # 2 rows, 4 columns
    # The last column is the finished sample: the same image sample() returns.
    final = to_uint8(diffusion.sample(model, (3, 16, 16), [2], sampler="ddim", steps=6))[0]
    assert torch.equal(strip[:, 20:36, 56:72], final)


def test_evaluator_with_precomputed_reference(tmp_path) -> None:
    model, diffusion = _tiny_model()
    rng = np.random.default_rng(0)
    ref_images = rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "ref.npz", arr_0=ref_images)  # an ADM-style image batch as reference
    cfg = EvalConfig(every_images=8, num_samples=6, steps=3, batch_per_gpu=4,
                       metrics=("fid", "is", "kid"), reference=str(tmp_path / "ref.npz"))
    ext = TinyExtractor()
    ev = build_evaluator(cfg, image_size=16, feature_extractor=ext)
    assert ext.seen == 40 and ev.reference.num_images == 40
    model.train()
    first = ev.evaluate(model, diffusion, cur_nimg=8)
    assert model.training  # the trainer's mode is restored
    assert set(first) >= {"fid", "is", "is_std", "kid", "kid_std", "seconds"}
    assert all(np.isfinite(v) for v in first.values())
    # Pinned noise: the same weights give the same FID at the next evaluation.
    again = ev.evaluate(model, diffusion, cur_nimg=16)
    assert again["fid"] == pytest.approx(first["fid"], rel=1e-6)
    # And the number is the FID of exactly these samples against the reference.
    imgs = sample_images(model, diffusion, list(range(6)), seed=0, image_size=16, sampler="ddim", steps=3)
    feats = ext(imgs)["features"]
    expected = frechet_distance(*feature_statistics(feats), *feature_statistics(ext(
        torch.from_numpy(ref_images).permute(0, 3, 1, 2))["features"]))
    assert first["fid"] == pytest.approx(expected, rel=1e-5)
    assert build_evaluator(EvalConfig(every_images=0)) is None


def test_pinned_validation_loss_is_split_invariant_and_moves_with_weights() -> None:
    model, diffusion = _tiny_model()
    imgs = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (5, 3, 16, 16), dtype=np.uint8))
    kw = dict(timesteps=(5, 50, 95), seed=3)
    whole = pinned_validation_loss(model, diffusion, imgs, list(range(5)), batch_size=5, **kw)
    assert set(whole) == {"val_loss_t5", "val_loss_t50", "val_loss_t95", "val_loss"}
    # Two "ranks" worth of images, batched differently: the same per-image losses, summed.
    a = pinned_validation_loss(model, diffusion, imgs[:2], [0, 1], batch_size=1, **kw)
    b = pinned_validation_loss(model, diffusion, imgs[2:], [2, 3, 4], batch_size=2, **kw)
    assert whole["val_loss"] == pytest.approx((2 * a["val_loss"] + 3 * b["val_loss"]) / 5, rel=1e-5)
    assert pinned_validation_loss(model, diffusion, imgs, list(range(5)), **kw) == pytest.approx(whole)
    # Different weights give a different number (the metric is not a constant). The UNet's
    # output conv starts at zero (loss = E[eps^2] for any seed), so perturb every weight.
    other, _ = _tiny_model()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert pinned_validation_loss(other, diffusion, imgs, list(range(5)), **kw)["val_loss"] != (
        pytest.approx(whole["val_loss"], rel=1e-3))


# --------------------------------------------------------------------------- standalone CLI


def _write_checkpoint(run_dir: Path, model: torch.nn.Module, manifest: Path) -> Path:
    """A checkpoint in the trainer's layout (config dict, EMA shadows, model) for the CLI."""
    from trainer.checkpoint import CheckpointManager
    from trainer.config import fingerprint, load_config, to_dict

    cfg = load_config(repo / "tests" / "configs" / "tiny.yaml",
                      [f"run.dir={run_dir}", f"data.shards={manifest}", "data.synthetic_images=0"])
    cfg_dict = to_dict(cfg)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    state = {
        "model": sd, "ema": {"decays": [0.999], "shadows": [sd]}, "optimizer": {},
        "train_state": {"nimg": 64}, "config": cfg_dict, "fingerprint": fingerprint(cfg_dict),
    }
    return CheckpointManager(run_dir / "checkpoints", async_write=False).save(state, 64)


def _all_shard_images(manifest: Path) -> torch.Tensor:
    """Every image of the shards, decoded once, independently of the loader's rank logic."""
    from data_pipeline.loader import decode_image
    from data_pipeline.shards import image_part, iter_tar, resolve_shards

    out = []
    for url in resolve_shards(str(manifest)).urls:
        for _key, parts in iter_tar(url, lambda *a: None):
            ext, data = image_part(parts)
            out.append(decode_image(data, ext))
    return torch.stack(out)  # (N, 3, H, W) uint8


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from tests.data_helpers import make_shards

    d = tmp_path_factory.mktemp("run")
    manifest = make_shards(d / "shards", num_images=22, size=16, shard_size=4, fmt="png")
    _write_checkpoint(d, _tiny_model()[0], Path(manifest))
    ref = np.random.default_rng(1).integers(0, 256, (32, 16, 16, 3), dtype=np.uint8)
    np.savez(d / "ref.npz", arr_0=ref)
    return d


def test_reference_from_training_shards_is_one_exact_pass_and_cached(run_dir) -> None:
    from data_pipeline import DataConfig

    manifest = run_dir / "shards" / "manifest.json"
    data_cfg = DataConfig(shards=str(manifest), num_workers=2, hflip=True, shuffle_buffer=4)
    cfg = EvalConfig(every_images=8, num_samples=4, steps=2, batch_per_gpu=3)
    ext = TinyExtractor()
    ev = build_evaluator(cfg, data_cfg=data_cfg, image_size=16, feature_extractor=ext)
    cache = run_dir / "shards" / "fid_ref_tiny-test_16.npz"
    try:
        assert cache.is_file() and ev.reference.num_images == 22 and ext.seen == 22
        # Same statistics as every image decoded once (no flips, no repeats, none missed).
        mu, sigma = feature_statistics(ext(_all_shard_images(manifest))["features"])
        np.testing.assert_allclose(ev.reference.mu, mu, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(ev.reference.sigma, sigma, rtol=1e-4, atol=1e-8)
        # The second start reads the cache instead of the shards.
        ext2 = TinyExtractor()
        ev2 = build_evaluator(cfg, data_cfg=data_cfg, image_size=16, feature_extractor=ext2)
        assert ext2.seen == 0
        np.testing.assert_array_equal(ev2.reference.sigma, ev.reference.sigma)
        # A changed dataset (different manifest) invalidates the cache.
        man = manifest.read_text()
        manifest.write_text(man + " ")
        try:
            ext3 = TinyExtractor()
            build_evaluator(cfg, data_cfg=data_cfg, image_size=16, feature_extractor=ext3)
            assert ext3.seen == 22
        finally:
            manifest.write_text(man)
    finally:
        cache.unlink(missing_ok=True)


def _cli_args(run_dir: Path, out: Path, n: int, batch: int = 2) -> list[str]:
    return [
        "--run-dir", str(run_dir), "--out", str(out), "--num-samples", str(n), "--sampler", "ddim",
        "--steps", "3", "--batch-per-gpu", str(batch), "--reference", str(run_dir / "ref.npz"),
        "--feature-extractor", "tests.integration.test_evaluate:tiny_extractor", "--metrics", "fid,is,kid",
    ]


def _chunks(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted((out / "samples").glob("chunk_*.npz"))}


def test_standalone_writes_adm_npz_and_report(run_dir, tmp_path, capsys) -> None:
    out = tmp_path / "eval"
    report = run_standalone(parse_args(_cli_args(run_dir, out, 5)))
    npz = out / "samples_5x16x16x3.npz"
    with np.load(npz) as z:
        arr = z["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (5, 16, 16, 3)
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["metrics"] == pytest.approx(report["metrics"])
    p = on_disk["protocol"]
    assert (p["sampler"], p["steps"], p["num_samples"], p["seed"]) == ("ddim", 3, 5, 0)
    assert p["feature_extractor"].endswith("tiny_extractor") and p["reference"]["num_images"] == 32
    assert "FID" in capsys.readouterr().out
    # The saved images are the sampler's images 0..4, in order.
    from trainer.checkpoint import load_for_inference

    model, diffusion, _ = load_for_inference(run_dir)
    direct = sample_images(model, diffusion, [3, 4], seed=0, image_size=16, sampler="ddim", steps=3)
    np.testing.assert_array_equal(arr[3:5], direct.permute(0, 2, 3, 1).numpy())


def test_standalone_resumes_and_keeps_written_samples(run_dir, tmp_path) -> None:
    out = tmp_path / "eval"
    run_standalone(parse_args(_cli_args(run_dir, out, 4)))
    before = _chunks(out)
    assert list(before) == ["chunk_00000000_00000002.npz", "chunk_00000002_00000004.npz"]
    # A crash mid-write leaves a temporary file and a truncated chunk: neither counts as done.
    (out / "samples" / "chunk_00000004_00000006.npz.tmp123").write_bytes(b"partial")
    (out / "samples" / "chunk_00000004_00000006.npz").write_bytes(b"PK\x03\x04truncated")
    report = run_standalone(parse_args(_cli_args(run_dir, out, 7)))
    after = _chunks(out)
    assert not (out / "samples" / "chunk_00000004_00000006.npz.tmp123").exists()  # the partial file is removed
    assert {k: after[k] for k in before} == before  # kept, not rewritten
    assert set(after) == set(before) | {"chunk_00000004_00000006.npz", "chunk_00000006_00000007.npz"}
    # The resumed result equals a fresh run of 7.
    fresh = tmp_path / "fresh"
    fresh_report = run_standalone(parse_args(_cli_args(run_dir, fresh, 7)))
    with np.load(out / "samples_7x16x16x3.npz") as a, np.load(fresh / "samples_7x16x16x3.npz") as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
    assert report["metrics"]["fid"] == pytest.approx(fresh_report["metrics"]["fid"], rel=1e-6)
    # Other sampling settings on the same folder would mix protocols: refused.
    with pytest.raises(ProtocolMismatchError, match="other settings"):
        run_standalone(parse_args(_cli_args(run_dir, out, 7) + ["--seed", "1"]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_give_the_same_images_and_metrics(run_dir, tmp_path) -> None:
    """Samples and the training-shard reference are the same with 1 and with 2 ranks."""
    cache = run_dir / "shards" / "fid_ref_tests.integration.test_evaluate-tiny_extractor_16.npz"
    args = lambda out: [a for a in _cli_args(run_dir, out, 6) if a not in ("--reference", str(run_dir / "ref.npz"))]  # noqa: E731
    cache.unlink(missing_ok=True)
    one = tmp_path / "one"
    rep1 = run_standalone(parse_args(args(one)))
    ref1 = ReferenceStats.load(cache)
    cache.unlink()
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "trainer.evaluate", *args(two)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    try:
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        ref2 = ReferenceStats.load(cache)
    finally:
        cache.unlink(missing_ok=True)
    with np.load(one / "samples_6x16x16x3.npz") as a, np.load(two / "samples_6x16x16x3.npz") as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
    assert ref1.num_images == ref2.num_images == 22  # each image once, over 2 ranks too
    np.testing.assert_allclose(ref2.mu, ref1.mu, rtol=1e-6)
    np.testing.assert_allclose(ref2.sigma, ref1.sigma, rtol=1e-5, atol=1e-9)
    rep2 = json.loads((two / "report.json").read_text())
    assert rep2["protocol"]["world_size"] == 2 and rep1["protocol"]["world_size"] == 1
    for k in ("fid", "is", "kid"):
        assert rep2["metrics"][k] == pytest.approx(rep1["metrics"][k], rel=1e-5, abs=1e-7)


@pytest.mark.slow
def test_tiny_run_end_to_end_in_training_and_standalone_agree(tmp_path) -> None:
    """Train 2 ranks with FID every 160 images, then re-measure the last checkpoint offline."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, shards = tmp_path / "run", tmp_path / "shards"
    evalopts = ["eval.num_samples=4", "eval.steps=2", "eval.batch_per_gpu=2", "eval.metrics=[fid,kid]",
                "eval.feature_extractor=tests.integration.test_evaluate:tiny_extractor"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(repo / "trainer" / "main.py"), "--config", str(repo / "tests" / "configs" / "tiny.yaml"),
           f"run.dir={run}", f"data.shards={shards}", "eval.every_images=160", *evalopts]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    fids = {e.step: e.value for e in acc.Scalars("eval/fid")}
    assert sorted(fids) == [20, 40] and all(np.isfinite(v) and v > 0 for v in fids.values())
    assert (run / "checkpoints" / "best-fid.pt").exists()
    assert (shards / "fid_ref_tests.integration.test_evaluate-tiny_extractor_16.npz").is_file()
    # The standalone CLI with the same protocol on the final checkpoint reproduces the number.
    report = run_standalone(parse_args([
        "--checkpoint", str(run / "checkpoints" / "ckpt-000000000320.pt"), "--out", str(tmp_path / "ev"),
        "--num-samples", "4", "--sampler", "ddim", "--steps", "2", "--batch-per-gpu", "2",
        "--feature-extractor", "tests.integration.test_evaluate:tiny_extractor", "--metrics", "fid",
    ]))
    assert report["protocol"]["reference"]["num_images"] == 128
    assert report["metrics"]["fid"] == pytest.approx(fids[40], rel=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_evaluator_on_gpu(tmp_path) -> None:
    """Device paths: sampling, features and moments on CUDA; repeatable, and equal to a CPU recount."""
    dev = torch.device("cuda")
    model, diffusion = _tiny_model()
    model, diffusion = model.to(dev), diffusion.to(dev)
    ref = np.random.default_rng(0).integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "ref.npz", arr_0=ref)
    cfg = EvalConfig(every_images=8, num_samples=6, steps=3, batch_per_gpu=4, metrics=("fid", "kid"),
                       reference=str(tmp_path / "ref.npz"))
    ev = build_evaluator(cfg, image_size=16, device=dev, feature_extractor=TinyExtractor().to(dev))
    first, again = ev.evaluate(model, diffusion, 0), ev.evaluate(model, diffusion, 8)
    assert np.isfinite(first["fid"]) and again["fid"] == pytest.approx(first["fid"], rel=1e-6)
    # CUDA generators draw other noise than CPU ones, so recount these very images on the CPU.
    imgs = sample_images(model, diffusion, list(range(6)), seed=0, image_size=16, sampler="ddim",
                           steps=3, device=dev).cpu()
    ext = TinyExtractor()
    cpu_ref = reference_from_images(ref, ext, "cpu")
    expected = compute_metrics({"features": ext(imgs)["features"]}, cpu_ref, ("fid",))["fid"]
    assert first["fid"] == pytest.approx(expected, rel=1e-3)


def test_validation_takes_each_held_out_image_once(tmp_path, caplog) -> None:
    """3 held-out images and the default eval.val_images=256: 3 images, not 3 repeated 85 times."""
    import logging

    from tests.data_helpers import make_shards
    from trainer.config import load_config
    from trainer.evaluation.validation import load_validation_images

    manifest = make_shards(tmp_path / "val", num_images=3, size=16, shard_size=2, fmt="png")
    cfg = load_config(repo / "tests" / "configs" / "tiny.yaml",
                      [f"eval.val_shards={manifest}", "eval.val_every_images=80"])
    assert cfg.eval.val_images == 256
    with caplog.at_level(logging.INFO, logger="ddpm"):
        images, indices, labels = load_validation_images(cfg, 0, 1)
    assert images.shape == (3, 3, 16, 16) and indices == [0, 1, 2] and labels is None
    assert len({bytes(img.numpy()) for img in images}) == 3  # three different images
    said = [r.getMessage() for r in caplog.records if "held-out" in r.getMessage()]
    assert len(said) == 1 and "3 held-out image(s)" in said[0] and "eval.val_images=256" in said[0], said
    # Split over ranks: each image on exactly one rank.
    shares = [load_validation_images(cfg, r, 2) for r in (0, 1)]
    assert shares[0][1] + shares[1][1] == [0, 1, 2]
    assert torch.equal(torch.cat([shares[0][0], shares[1][0]]), images)
