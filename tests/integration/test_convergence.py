"""The trainer learns a real image set: scikit-learn's digits through prepare, the 2-rank loop, DDIM.

Samples are drawn with stochastic DDIM-50 (eta = 1): deterministic DDIM (eta = 0) keeps the
per-channel errors a short run still makes at large t, a colour cast (README, "Convergence
check"), which would blur the line between a good and a broken run. Thresholds calibrated from
runs of this test's recipe (tests/configs/digits_8.yaml), scored as below:

    run                                   confidence   class spread   PCA Frechet   mean |R - B|
    trained, seeds 0 / 1 / 2              0.85 / 0.84 / 0.82   6.58 / 6.73 / 6.65   0.29 / 0.30 / 0.31   3.7 / 4.2 / 4.2
    loss weighted by abar_t (broken)      0.42         4.10           1.44          28.8
    q_sample with abar_t for sqrt(abar_t) 0.66         5.39           0.77           5.1
    untrained model                       0.00         1.00           3.89         112.4
    real held-out digits                  0.98         9.28           0.09           0.0

The thresholds sit between trained and broken runs, with a margin on both sides.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.convergence import sample
from benchmarks.digits import DigitsJudge, prepare_digits, read_shards

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "tests" / "configs" / "digits_8.yaml"


@pytest.mark.slow
def test_two_rank_training_on_real_digits_gives_recognisable_gray_digits(tmp_path: Path) -> None:
    from trainer.checkpoint import load_for_inference
    from trainer.config import load_config

    shards = prepare_digits(tmp_path / "digits", 8)
    images, labels = read_shards(shards)
    judge = DigitsJudge(images[:, 0].numpy(), labels.numpy())
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("WORLD_SIZE", None)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(REPO / "trainer" / "main.py"), "--config", str(CONFIG), f"run.dir={run}", f"data.shards={shards}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    train_s = time.perf_counter() - start

    model, _, _ = load_for_inference(run)
    cfg = load_config(CONFIG, [])
    score = judge.score(sample(model, cfg, 300, steps=50, eta=1.0))
    summary = f"{score} (training {train_s:.0f} s); real held-out digits: {judge.reference}"
    print(summary)
    # samples are digits of every class, not blobs or noise, and gray like every training image
    assert score["confidence"] > 0.75, summary
    assert score["class_spread"] > 6.0, summary
    assert score["fd_pca"] < 0.55, summary
    assert score["abs_r_minus_b"] < 12.0, summary
