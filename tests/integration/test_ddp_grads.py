"""DDP on 2 gloo ranks: gradient layouts agree with DDP's buckets, and accumulation all-reduces.

Two regressions this catches: torch's "Grad strides do not match bucket view strides" warning
(1x1 conv weight gradients whose strides differ from the weight's in size-1 dims: an extra
copy per gradient per step on a channels_last GPU run), and DDP(static_graph=True) with no_sync()
accumulation, which fails on the first backward on torch 2.1 to 2.14 (pytorch#143580).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.test_train import TINY, _env, data_dir, train  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[2]
WARNING = "Grad strides do not match"


def test_two_rank_run_with_accumulation_has_no_grad_stride_warning(tmp_path: Path, data_dir: Path) -> None:  # noqa: F811
    # batch 8 over 2 ranks with 2 per GPU: 2 micro-batches per step, the first under no_sync()
    proc = train(tmp_path / "run", data_dir, "train.batch_per_gpu=2", "train.total_images=32",
                 "log.every_images=16", "log.sample_every_images=0", nproc=2)
    out = proc.stdout + proc.stderr
    assert "finished" in out and "2 accumulation" in out
    assert WARNING not in out


@pytest.mark.parametrize("input_format", ["contiguous", "channels_last"])
def test_ddp_step_keeps_ranks_in_sync_without_layout_warnings(input_format: str) -> None:
    # channels_last input into the contiguous CPU model gives 1x1 conv gradients channels_last
    # strides (I, 1, I, I) against the weights' (I, 1, 1, 1): the mismatch of a GPU run
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(REPO / "tests" / "integration" / "ddp_worker.py"), "--config", str(TINY),
         "--input-format", input_format],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert out.count("weights identical on all ranks: True") == 2, out[-4000:]
    odd = 0 if input_format == "contiguous" else 5  # the tiny UNet's five 1x1 skip convs
    assert out.count(f"gradients with other strides than their weight: {odd}") == 2, out[-4000:]
    assert WARNING not in out  # trainer.build.align_grad_strides made the layouts agree
