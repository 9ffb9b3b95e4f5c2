"""Bring your own data end to end: torchrun, 2 ranks on gloo, on shards written by webdataset's
ShardWriter (varied sizes, folders in keys, .cls and .json labels, no manifest), and resuming a run
after its data was re-prepared."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.data_helpers import write_wds_shards

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "configs" / "tiny.yaml"
# Short runs of the tiny config; data.image_size carries model.image_size into the loader.
SHORT = [
    "data.synthetic_images=0",
    "data.image_size=16",
    "log.sample_every_images=0",
    "checkpoint.every_images=32",
]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.pop("WORLD_SIZE", None)
    return env


def train(run_dir: Path, shards: Path, *overrides: str) -> subprocess.CompletedProcess:
    """torchrun --nproc_per_node=2 trainer/main.py on the tiny config; fails the test on a non-zero exit."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "trainer" / "main.py"), "--config", str(TINY), f"run.dir={run_dir}",
           f"data.shards={shards}", *SHORT, *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def prepare(src: Path, out: Path, *args: str) -> None:
    """ddpm-prepare as a user runs it."""
    proc = subprocess.run([sys.executable, "-m", "data_pipeline.prepare", str(src), str(out),
                           "--size", "16", "--workers", "0", "--no-progress", *args],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 manifest-less ShardWriter shards of 12 JPEGs, 10 to 40 px, labels 0..2 in .cls and .json."""
    out = tmp_path_factory.mktemp("byod") / "wds"
    write_wds_shards(out, 4, 12, min_size=10, max_size=40)
    return out


@pytest.mark.parametrize("labels", [
    [],
    ["model.num_classes=3", "data.use_labels=true", "data.num_classes=3"],
    ["model.num_classes=3", "data.use_labels=true", "data.num_classes=3", "data.labels_from=json:label"],
], ids=["unconditional", "cls-labels", "json-labels"])
def test_two_ranks_train_on_shardwriter_shards(tmp_path: Path, shards: Path, labels: list[str]) -> None:
    run = tmp_path / "run"
    proc = train(run, shards, "train.total_images=32", *labels)
    assert "finished" in proc.stdout
    assert (run / "checkpoints" / "ckpt-000000000032.pt").is_file()
    log = (run / "logs" / "rank0.log").read_text()
    # The run says once which path the images take: no manifest, so resized online.
    assert log.count("without a manifest: 16x16 images are decoded only") == 1


def test_resume_after_reprepare_starts_a_fresh_epoch(tmp_path: Path, shards: Path) -> None:
    data, run = tmp_path / "data", tmp_path / "run"
    prepare(shards, data, "--shard-size", "6")  # 48 images -> 8 shards
    train(run, data, "train.total_images=32")
    prepare(shards, data, "--shard-size", "4", "--overwrite")  # re-prepared: 12 shards
    proc = train(run, data, "train.total_images=64")
    assert "resumed from" in proc.stdout and "finished" in proc.stdout
    log = (run / "logs" / "rank0.log").read_text()
    assert log.count("the shard list changed since the checkpoint (8 -> 12 shards)") == 1, log
    assert "cannot resume" not in log
    assert (run / "checkpoints" / "ckpt-000000000064.pt").is_file()


def test_folder_without_shards_is_one_line_naming_ddpm_prepare(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    cmd = [sys.executable, str(REPO / "trainer" / "main.py"), "--config", str(TINY),
           f"run.dir={tmp_path / 'run'}", f"data.shards={tmp_path / 'empty'}", *SHORT]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "holds neither manifest.json nor .tar shards" in lines[0]
    assert "ddpm-prepare SOURCE OUT_DIR --size N" in lines[0]
