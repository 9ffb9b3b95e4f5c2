"""``ddpm-sample`` and ``ddpm-evaluate`` under storage faults, on real filesystems (a small tmpfs).

A truncated newest checkpoint is named in one line and the previous one used; a corrupt checkpoint
named explicitly is one line and exit code 2; a full disk keeps the finished chunks, removes partial
files, says one line, exits 74, and the same command continues the set once space is free.
Needs root for the tmpfs (CI runs tests/run.sh as root); never skipped.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.fault_helpers import fill, free_space, tmpfs
from trainer.checkpoint import CheckpointManager
from trainer.config import fingerprint, load_config, to_dict

repo = Path(__file__).resolve().parents[2]
EXTRACTOR = "tests.integration.test_evaluate:tiny_extractor"


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return env


def _checkpoint(run_dir: Path, nimg: int, seed: int) -> Path:
    """A checkpoint of a tiny UNet (T=20) in the trainer's layout, with non-trivial weights."""
    cfg = load_config(repo / "tests" / "configs" / "tiny.yaml", [f"run.dir={run_dir}", "diffusion.timesteps=20"])
    from models.unet import UNet

    torch.manual_seed(seed)
    model = UNet(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))  # the output conv starts at zero: make the images differ
    sd = model.state_dict()
    cfg_dict = to_dict(cfg)
    state = {"model": sd, "ema": {"decays": [0.999], "shadows": [sd]}, "optimizer": {},
             "train_state": {"nimg": nimg}, "config": cfg_dict, "fingerprint": fingerprint(cfg_dict)}
    return CheckpointManager(run_dir / "checkpoints", async_write=False, keep_last=5).save(state, nimg)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run directory with two complete checkpoints (8 and 16 images) and a reference image batch."""
    d = tmp_path_factory.mktemp("faults_sampling") / "run"
    _checkpoint(d, 8, seed=0)
    _checkpoint(d, 16, seed=1)
    np.savez(d / "ref.npz", arr_0=np.random.default_rng(1).integers(0, 256, (24, 16, 16, 3), dtype=np.uint8))
    return d


def sample(*args: str, launcher: list[str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = (launcher or [sys.executable]) + ["-m", "trainer.sample", "--sampler", "ddim", "--steps", "2", *args]
    return subprocess.run(cmd, cwd=repo, env=_env(), capture_output=True, text=True, timeout=timeout)


def evaluate(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "trainer.evaluate", "--sampler", "ddim", "--steps", "2", "--metrics", "fid",
           "--feature-extractor", EXTRACTOR, *args]
    return subprocess.run(cmd, cwd=repo, env=_env(), capture_output=True, text=True, timeout=300)


def one_line(proc: subprocess.CompletedProcess, prefix: str, code: int) -> str:
    """Exit ``code`` with exactly one line starting with ``prefix`` on stderr and no traceback."""
    assert proc.returncode == code, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith(prefix)]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def chunks(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (out / "samples").glob("chunk_*.npz")}


def partial_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp") or ".tmp" in p.name]


# --------------------------------------------------------------------------- unreadable checkpoints


@pytest.fixture
def truncated(run: Path):
    """The newest checkpoint cut to half its size for the test, restored afterwards."""
    newest = run / "checkpoints" / "ckpt-000000000016.pt"
    whole = newest.read_bytes()
    newest.write_bytes(whole[: len(whole) // 2])
    yield newest
    newest.write_bytes(whole)


def test_a_truncated_newest_checkpoint_is_named_and_the_previous_one_used(run: Path, truncated: Path,
                                                                         tmp_path: Path) -> None:
    proc = sample("--run-dir", str(run), "--num-samples", "2", "--out", str(tmp_path / "s"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = [x for x in (proc.stdout + proc.stderr).splitlines() if str(truncated) in x]
    assert len(said) == 1 and "unreadable" in said[0] and "previous" in said[0], said
    protocol = (tmp_path / "s" / "protocol.json").read_text()
    assert "ckpt-000000000008.pt" in protocol and "ckpt-000000000016.pt" not in protocol
    # The default folder names the checkpoint actually used.
    proc = sample("--run-dir", str(run), "--num-samples", "2")
    assert proc.returncode == 0 and (run / "samples" / "ckpt-000000000008-ddim-2-seed0" / "grid.png").is_file()

    proc = evaluate("--run-dir", str(run), "--num-samples", "4", "--out", str(tmp_path / "e"),
                    "--reference", str(run / "ref.npz"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = [x for x in (proc.stdout + proc.stderr).splitlines() if str(truncated) in x]
    assert len(said) == 1 and "unreadable" in said[0], said
    assert "ckpt-000000000008.pt (ema[0])" in proc.stdout


def test_a_corrupt_checkpoint_named_explicitly_is_one_line_and_exit_2(run: Path, truncated: Path,
                                                                     tmp_path: Path) -> None:
    line = one_line(sample("--run-dir", str(truncated), "--out", str(tmp_path / "s")), "ddpm-sample:", 2)
    assert line.startswith("ddpm-sample: error: ") and f"{truncated} is not a usable checkpoint" in line, line
    line = one_line(evaluate("--checkpoint", str(truncated), "--num-samples", "4", "--out", str(tmp_path / "e"),
                             "--reference", str(run / "ref.npz")), "ddpm-evaluate:", 2)
    assert f"{truncated} is not a usable checkpoint" in line, line
    assert not (tmp_path / "s").exists() and not (tmp_path / "e").exists()


# --------------------------------------------------------------------------- a full disk


def test_a_full_disk_while_sampling_keeps_the_chunks_and_the_rerun_continues(run: Path, tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    assert sample("--run-dir", str(run), "--num-samples", "16", "--batch-per-gpu", "2", "--out",
                  str(fresh)).returncode == 0
    with tmpfs(tmp_path / "disk", "2m") as disk:
        out = disk / "set"
        assert sample("--run-dir", str(run), "--num-samples", "4", "--batch-per-gpu", "2", "--out",
                      str(out)).returncode == 0
        before = chunks(out)
        assert len(before) == 2
        filler = fill(disk, leave=64 * 1024)  # room for a few chunks of 2 images (PNGs + .npz), not 16
        line = one_line(sample("--run-dir", str(run), "--num-samples", "16", "--batch-per-gpu", "2", "--out",
                               str(out)), "ddpm-sample:", 74)
        assert line.startswith("ddpm-sample: storage error: no space left writing ") and str(out) in line, line
        assert "free space" in line and "run the same command again" in line, line
        after = chunks(out)
        assert {k: after[k] for k in before} == before  # finished chunks kept as they were
        assert len(after) > len(before)  # and the ones this run finished before the disk filled
        assert partial_files(out) == []  # no temporary files left behind
        assert np.load(out / "samples.npz")["arr_0"].shape[0] == 4  # the earlier set's archive is untouched
        free_space(filler)
        proc = sample("--run-dir", str(run), "--num-samples", "16", "--batch-per-gpu", "2", "--out", str(out))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"{2 * len(after)} of 16 samples already there" in proc.stdout + proc.stderr
        final = chunks(out)
        assert {k: final[k] for k in after} == after  # continued, not redone
        np.testing.assert_array_equal(np.load(out / "samples.npz")["arr_0"], np.load(fresh / "samples.npz")["arr_0"])
        assert sorted(p.name for p in out.glob("0*.png")) == [f"{k:06d}.png" for k in range(16)]


def test_a_full_disk_while_evaluating_keeps_the_chunks_and_the_rerun_continues(run: Path, tmp_path: Path) -> None:
    args = ["--run-dir", str(run), "--num-samples", "16", "--batch-per-gpu", "2",
            "--reference", str(run / "ref.npz")]
    fresh = evaluate(*args, "--out", str(tmp_path / "fresh"))
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    with tmpfs(tmp_path / "disk", "2m") as disk:
        out = disk / "eval"
        (out / "samples").mkdir(parents=True)
        filler = fill(disk, leave=24 * 1024)  # a few 2-image chunks, then the disk is full
        line = one_line(evaluate(*args, "--out", str(out)), "ddpm-evaluate:", 74)
        assert line.startswith("ddpm-evaluate: storage error: no space left writing ") and str(out) in line, line
        kept = chunks(out)
        assert 0 < len(kept) < 8, kept
        assert partial_files(out) == [] and not (out / "report.json").exists()
        free_space(filler)
        proc = evaluate(*args, "--out", str(out))
        assert proc.returncode == 0, proc.stderr[-3000:]
        final = chunks(out)
        assert {k: final[k] for k in kept} == kept
        with np.load(out / "samples_16x16x16x3.npz") as a, np.load(tmp_path / "fresh" / "samples_16x16x16x3.npz") as b:
            np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        assert (out / "report.json").is_file() and partial_files(out) == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_full_disk_stops_every_rank_of_a_two_rank_sampling_job(run: Path, tmp_path: Path) -> None:
    """The ranks agree after every round of chunks: none waits forever for one that hit the full disk."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(_free_port())]
    with tmpfs(tmp_path / "disk", "2m") as disk:
        out = disk / "set"
        (out / "samples").mkdir(parents=True)
        filler = fill(disk, leave=48 * 1024)
        proc = sample("--run-dir", str(run), "--num-samples", "32", "--batch-per-gpu", "2", "--out", str(out),
                      launcher=launcher, timeout=240)
        assert proc.returncode != 0
        lines = [x for x in proc.stderr.splitlines() if x.startswith("ddpm-sample: storage error: no space left")]
        assert len(lines) == 1, proc.stderr[-4000:]  # rank 0 says it, whichever rank hit it
        assert "exitcode  : 74" in proc.stderr, proc.stderr[-4000:]  # both workers, in torchrun's summary
        assert partial_files(out) == []
        free_space(filler)
        proc = sample("--run-dir", str(run), "--num-samples", "32", "--batch-per-gpu", "2", "--out", str(out),
                      launcher=launcher[:-2] + ["--master_port", str(_free_port())], timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert np.load(out / "samples.npz")["arr_0"].shape == (32, 16, 16, 3)
