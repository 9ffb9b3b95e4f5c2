"""``ddpm-sample`` as a user runs it: safe sample folders and one clear line for every mistake."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models.unet import UNet
from trainer.checkpoint import CheckpointManager
from trainer.config import fingerprint, load_config, to_dict

repo = Path(__file__).resolve().parents[2]


def _run_dir(root: Path, num_classes: int) -> Path:
    """A run directory holding one checkpoint of a tiny (un)conditional UNet, as the trainer writes it."""
    run_dir = root / f"run{num_classes}"
    cfg = load_config(repo / "tests" / "configs" / "tiny.yaml",
                      [f"run.dir={run_dir}", f"model.num_classes={num_classes}", f"data.use_labels={num_classes > 0}",
                       "diffusion.timesteps=20"])
    torch.manual_seed(0)
    sd = UNet(cfg.model).state_dict()
    cfg_dict = to_dict(cfg)
    state = {"model": sd, "ema": {"decays": [0.999], "shadows": [sd]}, "optimizer": {},
             "train_state": {"nimg": 8}, "config": cfg_dict, "fingerprint": fingerprint(cfg_dict)}
    CheckpointManager(run_dir / "checkpoints", async_write=False).save(state, 8)
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("sample_cli")
    return {0: _run_dir(root, 0), 4: _run_dir(root, 4)}


def sample(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "trainer.sample", "--sampler", "ddim", "--steps", "2", *args],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=300)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The process failed with exit 2 and exactly one 'ddpm-sample: error:' line, no traceback."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("ddpm-sample: error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


def test_other_settings_never_overwrite_a_sample_folder(runs, tmp_path) -> None:
    out = tmp_path / "set"
    first = sample("--run-dir", str(runs[4]), "--num-samples", "6", "--batch-per-gpu", "3", "--out", str(out))
    assert first.returncode == 0, first.stderr[-2000:]
    before = {p.name: p.read_bytes() for p in out.glob("*.png")}
    npz = np.load(out / "samples.npz")["arr_0"].copy()
    assert len(before) == 7 and npz.shape == (6, 16, 16, 3)  # 6 images + grid.png
    for extra in (["--guidance", "3"], ["--label", "2"], ["--seed", "1"]):
        line = one_error_line(sample("--run-dir", str(runs[4]), "--num-samples", "6", "--out", str(out), *extra))
        assert "other settings" in line and "--out" in line, line
    assert {p.name: p.read_bytes() for p in out.glob("*.png")} == before
    np.testing.assert_array_equal(np.load(out / "samples.npz")["arr_0"], npz)
    # The same settings with more samples extend the set and keep the finished chunks.
    more = sample("--run-dir", str(runs[4]), "--num-samples", "8", "--batch-per-gpu", "3", "--out", str(out))
    assert more.returncode == 0, more.stderr[-2000:]
    grown = np.load(out / "samples.npz")["arr_0"]
    assert grown.shape[0] == 8
    np.testing.assert_array_equal(grown[:6], npz)


def test_default_folders_name_the_settings(runs) -> None:
    for extra in ([], ["--guidance", "2"]):
        proc = sample("--run-dir", str(runs[4]), "--num-samples", "2", *extra)
        assert proc.returncode == 0, proc.stderr[-2000:]
    names = sorted(p.name for p in (runs[4] / "samples").iterdir())
    assert names == ["ckpt-000000000008-ddim-2-seed0", "ckpt-000000000008-ddim-2-seed0-g2"], names


@pytest.mark.parametrize("extra, words", [
    (["--guidance", "3"], "drop --guidance"),
    (["--label", "1"], "drop --label"),
])
def test_conditional_options_on_an_unconditional_model(runs, tmp_path, extra, words) -> None:
    line = one_error_line(sample("--run-dir", str(runs[0]), "--out", str(tmp_path / "x"), *extra))
    assert words in line, line


@pytest.mark.parametrize("label", ["7", "4", "-1"])
def test_label_outside_the_model_classes(runs, tmp_path, label) -> None:
    line = one_error_line(sample("--run-dir", str(runs[4]), "--out", str(tmp_path / "x"), "--label", label))
    assert "0..3" in line, line


def test_no_checkpoint(tmp_path) -> None:
    line = one_error_line(sample("--run-dir", str(tmp_path)))
    assert "no usable checkpoint" in line, line


def test_a_smaller_request_leaves_the_set_whole(runs) -> None:
    """8, then 4, then 8 again in the default folder: nothing shrinks, nothing is sampled twice."""
    folder = runs[0] / "samples" / "ckpt-000000000008-ddim-2-seed5"

    def files() -> dict[str, tuple[bytes, int]]:
        return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
                for p in sorted(folder.rglob("*")) if p.is_file()}

    first = sample("--run-dir", str(runs[0]), "--num-samples", "8", "--batch-per-gpu", "4", "--seed", "5")
    assert first.returncode == 0, first.stderr[-2000:]
    before = files()
    assert sorted(k for k in before if k.endswith(".png")) == [f"{k:06d}.png" for k in range(8)] + ["grid.png"]
    assert np.load(folder / "samples.npz")["arr_0"].shape == (8, 16, 16, 3)
    for n in ("4", "8"):
        again = sample("--run-dir", str(runs[0]), "--num-samples", n, "--batch-per-gpu", "4", "--seed", "5")
        assert again.returncode == 0, again.stderr[-2000:]
        assert files() == before, n  # grid.png, samples.npz, every PNG and chunk: the same bytes, not rewritten
    assert "holds 8 samples; the 4 asked for are its first 4" in sample(
        "--run-dir", str(runs[0]), "--num-samples", "4", "--batch-per-gpu", "4", "--seed", "5").stdout
