"""Post-hoc EMA: snapshots of power profiles, least-squares reconstruction, the ddpm-ema command.

The weight trajectories are made here: a random walk with drift (what SGD weights look like at the
scale of an EMA), stepped through the trainer's own EMA and snapshot writer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from trainer.ema import EMA
from trainer.ema_snapshots import (
    SnapshotWriter,
    list_snapshots,
    prune_after,
    snapshot_dir,
    snapshot_interval,
)
from trainer.posthoc import plan, read_snapshots, reconstruct
from trainer.posthoc_cli import main as ddpm_ema

FP16_REL = 2.0**-11  # half precision's rounding, relative


@pytest.fixture(autouse=True)
def keep_logging():
    """ddpm-ema's main sets up the 'ddpm' logger on pytest's captured stdout: restore it afterwards."""
    import logging

    logger = logging.getLogger("ddpm")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


class Vector(nn.Module):
    """A bag of parameters (two tensors, so names matter)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros(n))
        self.b = nn.Parameter(torch.zeros(n // 4, 4))


def trajectory(run_dir: Path, model: nn.Module, sigma_rels, steps: int, batch: int, every: int,
               direct=(), seed: int = 0, config=None) -> tuple[EMA, EMA | None]:
    """Step ``model`` along a random walk with drift, the EMA tracking ``sigma_rels`` (snapshotted every
    ``every`` images) and, when ``direct`` is given, a second EMA tracking those widths (not snapshotted)."""
    gen = torch.Generator().manual_seed(seed)
    ema = EMA(model, (), sigma_rels=sigma_rels)
    side = EMA(model, (), sigma_rels=direct) if direct else None
    writer = SnapshotWriter(snapshot_dir(run_dir), every, background=False)
    drift = {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}
    for k in range(1, steps + 1):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.add_(0.01 * drift[n] + 0.1 * torch.randn(p.shape, generator=gen))
        ema.update(model, k * batch)
        if side is not None:
            side.update(model, k * batch)
        if (k * batch) % every == 0 or k == steps:
            writer.save(ema, k * batch, batch, config or {"model": {}})
    assert writer.flush() is None
    return ema, side


def _err(a: dict[str, torch.Tensor], b: list[torch.Tensor], names) -> float:
    return max((a[n] - t).abs().max().item() for n, t in zip(names, b))


def test_reconstruction_at_a_tracked_width_is_that_profile(tmp_path: Path) -> None:
    model = Vector(4000)
    ema, _ = trajectory(tmp_path, model, (0.05, 0.10), steps=600, batch=32, every=32 * 20)
    assert len(list_snapshots(snapshot_dir(tmp_path))) == 30
    p = plan(read_snapshots(tmp_path), [0.05, 0.10])
    assert p.at == 600 * 32 and p.errors.max() < 1e-6
    for i, weights in enumerate(reconstruct(p, [0, 1])):
        shadow = ema.power_shadows[i]
        scale = max(t.abs().max().item() for t in shadow)
        # equal to that profile's weights up to the fp16 rounding of the snapshot
        assert _err(weights, shadow, ema.names) <= FP16_REL * scale * 1.01
        # and the coefficients put (practically) all weight on that snapshot
        assert abs(p.coeffs[i, -1, i] - 1) < 1e-6


def test_reconstruction_between_tracked_widths_matches_a_directly_tracked_ema(tmp_path: Path) -> None:
    """Tracked 0.05 and 0.10, 32 snapshots over 1600 updates; 0.07 reconstructed against 0.07 tracked.

    Stated error: the reconstruction is within 1% of the distance between the two tracked profiles'
    weights (measured: about 0.3%), and its profile (relative L2 of the per-update weights) within 0.2%.
    """
    model = Vector(8000)
    steps, batch = 1600, 64
    ema, direct = trajectory(tmp_path, model, (0.05, 0.10), steps=steps, batch=batch, every=steps * batch // 32,
                             direct=(0.07,))
    p = plan(read_snapshots(tmp_path), [0.07])
    assert p.errors[0] < 2e-3
    (weights,) = reconstruct(p, [0])
    got = torch.cat([weights[n].flatten() for n in ema.names])
    want = torch.cat([t.flatten() for t in direct.power_shadows[0]])
    spread = (torch.cat([t.flatten() for t in ema.power_shadows[0]])
              - torch.cat([t.flatten() for t in ema.power_shadows[1]])).norm()
    rel = ((got - want).norm() / spread).item()
    print(f"0.07 reconstructed vs tracked: |diff| / |profile 0.05 - profile 0.10| = {rel:.2e}, "
          f"profile error {p.errors[0]:.2e}")
    assert rel < 0.01


def test_requests_that_cannot_be_met_are_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    trajectory(run, Vector(64), (0.05, 0.10), steps=64, batch=8, every=64)  # 8 snapshots
    cases = {
        ("--sigma-rel", "0.4"): "out of range",
        ("--sigma-rel", "0.07", "--at-images", "64"): "has 1 snapshot(s) at or before it",
        ("--sigma-rel", "0.07", "--at-images", "100"): "is not a snapshot time; the nearest are [64, 128]",
        ("--sigma-rel", "0.002"): "cannot be reconstructed",
    }
    for extra, message in cases.items():
        assert ddpm_ema(["--run-dir", str(run), "--out", str(tmp_path / "o"), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (extra, err)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert ddpm_ema(["--run-dir", str(empty), "--sigma-rel", "0.05"]) == 2
    assert "has no EMA snapshots" in capsys.readouterr().err


def test_reconstructed_file_opens_for_sampling_evaluation_and_export(tmp_path: Path) -> None:
    from models.unet import UNet
    from trainer.checkpoint import open_for_inference
    from trainer.config import load_config, to_dict
    from trainer.export import export_unet as export_diffusers_unet

    cfg = load_config(Path(__file__).parents[1] / "configs" / "tiny.yaml")
    torch.manual_seed(0)
    model = UNet(cfg.model)
    run = tmp_path / "run"
    ema, _ = trajectory(run, model, (0.05, 0.10), steps=40, batch=8, every=16, config=to_dict(cfg))
    assert ddpm_ema(["--run-dir", str(run), "--sigma-rel", "0.05,0.07", "--out", str(tmp_path / "out")]) == 0
    files = sorted((tmp_path / "out").glob("ema-sigma*.pt"))
    assert [f.name for f in files] == ["ema-sigma0.0500-000000000320.pt", "ema-sigma0.0700-000000000320.pt"]
    got = open_for_inference(files[0])  # EMA index 0: the reconstructed profile
    scale = max(t.abs().max().item() for t in ema.power_shadows[0])
    assert _err(got.model.state_dict(), ema.power_shadows[0], ema.names) <= FP16_REL * scale * 1.01
    assert torch.load(files[1], weights_only=True)["posthoc"]["sigma_rel"] == 0.07
    export_diffusers_unet(open_for_inference(files[1]).model, tmp_path / "diffusers")
    assert (tmp_path / "diffusers" / "diffusion_pytorch_model.safetensors").is_file()


def test_prune_removes_snapshots_after_the_resumed_checkpoint_and_partial_files(tmp_path: Path) -> None:
    trajectory(tmp_path, Vector(64), (0.05,), steps=10, batch=8, every=16)
    d = snapshot_dir(tmp_path)
    (d / ".snapshot-000000000096.pt.ab12cd34.tmp").write_bytes(b"partial")
    prune_after(d, 48)
    assert [n for n, _ in list_snapshots(d)] == [16, 32, 48]
    assert not list(d.glob(".*.tmp"))


def test_default_interval_is_about_32_per_run_and_a_multiple_of_the_batch() -> None:
    assert snapshot_interval(0, 32_000_000, 64) == 1_000_000
    every = snapshot_interval(0, 96_000, 64)
    assert every % 64 == 0 and 30 <= 96_000 / every <= 34
    assert snapshot_interval(0, 320, 8) == 8 and snapshot_interval(640, 32_000, 64) == 640


def test_config_registers_sigma_rels_for_older_runs_and_validates_them() -> None:
    from trainer.config import ADDED_KEYS, FINGERPRINT_FIELDS, ConfigError, load_config

    assert "ema.sigma_rels" in FINGERPRINT_FIELDS and ADDED_KEYS["ema.sigma_rels"] == ()
    assert load_config(None, ["data.shards=x"]).ema.sigma_rels == (0.05, 0.10)
    for bad in (["ema.sigma_rels=[0.5]"], ["ema.sigma_rels=[0.05,0.05]"], ["ema.decays=[]", "ema.sigma_rels=[]"],
                ["ema.snapshot_every_images=-1"]):
        with pytest.raises(ConfigError):
            load_config(None, ["data.shards=x", *bad])
    assert load_config(None, ["data.shards=x", "ema.decays=[]"]).ema.decays == ()


def test_solve_is_exact_for_a_stored_profile_and_reports_an_unreachable_one() -> None:
    from trainer.ema_math import gamma_from_sigma_rel, solve

    times = np.arange(8, 8 * 400 + 1, 8, dtype=np.float64)
    basis = [(gamma_from_sigma_rel(s), t) for t in range(320, 3201, 320) for s in (0.05, 0.1)]
    x, err = solve(basis, [basis[-1], (gamma_from_sigma_rel(0.005), 3200)], times)
    assert err[0] < 1e-6 and abs(x[0, -1] - 1) < 1e-6 and np.abs(x[0, :-1]).max() < 1e-6
    assert err[1] > 0.2


def test_ddpm_ema_is_installed_as_a_console_script() -> None:
    setup = (Path(__file__).parents[2] / "setup.py").read_text()
    assert '"ddpm-ema=trainer.posthoc_cli:main"' in setup


def test_default_density_reconstructs_widths_0_02_to_0_25_within_5_percent() -> None:
    """The README's accuracy figures: 32 snapshots of the default profiles (0.05, 0.10) over a run
    reproduce a width's profile (relative L2 of the per-update weights) within 1.2% from 0.03 to 0.2,
    within 5% from 0.02 to 0.25, and the error grows quickly outside (the ratio of updates to
    snapshots barely matters: celebahq_256's 500,000 updates give the same figures to 3 digits)."""
    from trainer.ema_math import gamma_from_sigma_rel, solve

    steps, batch = 4800, 64
    total = steps * batch
    every = snapshot_interval(0, total, batch)
    times = np.arange(batch, total + 1, batch, dtype=np.float64)
    basis = [(gamma_from_sigma_rel(s), t) for t in range(every, total + 1, every) for s in (0.05, 0.10)]
    widths = (0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.25, 0.28)
    _, err = solve(basis, [(gamma_from_sigma_rel(s), total) for s in widths], times)
    got = dict(zip(widths, err))
    print("profile error at the default density: " + ", ".join(f"{s:g}: {e:.2%}" for s, e in got.items()))
    assert all(got[s] < 0.012 for s in (0.03, 0.05, 0.07, 0.1, 0.15, 0.2))
    assert got[0.02] < 0.05 and got[0.25] < 0.05
    assert got[0.01] > 0.1 and got[0.28] > 0.05


def test_an_unreadable_snapshot_is_left_out_and_the_rest_still_reconstruct(tmp_path: Path) -> None:
    trajectory(tmp_path, Vector(256), (0.05, 0.10), steps=40, batch=8, every=32)  # 10 snapshots
    broken = list_snapshots(snapshot_dir(tmp_path))[4][1]
    broken.write_bytes(broken.read_bytes()[:100])  # a truncated file (a disk fault after the rename)
    snaps = read_snapshots(tmp_path)
    assert len(snaps) == 9 and broken not in [s.path for s in snaps]
    p = plan(snaps, [0.07])
    assert p.errors[0] < 0.05 and len(reconstruct(p, [0])) == 1
