"""python -m benchmarks.gpu_check in its CPU mode: every section runs on the tiny model, one JSON report.

The GPU mode runs the same section functions on a GPU; this keeps them from rotting where
no GPU is lent (CI). About a minute of CPU, most of it starting torch in child processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(tmp_path: Path, *args: str, env_extra: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "report.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join([*(env_extra or {}).get("PYTHONPATH", "").split(os.pathsep), str(REPO)])
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--cpu", "--out", str(out), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


@pytest.mark.slow
def test_cpu_mode_runs_every_section_and_writes_one_report(tmp_path: Path) -> None:
    proc, report = _run(tmp_path)
    s = report["sections"]
    assert list(s) == ["environment", "step", "diffusers", "ddp_nccl", "resume", "decode", "ema_checkpoint",
                       "gpu_tests"]
    failed = {k: v for k, v in s.items() if v["status"] != "ok"}
    assert not failed and proc.returncode == 0 and report["ok"], json.dumps(failed, indent=1)[:4000]
    assert report["mode"] == "cpu" and s["environment"]["device"] == "cpu"
    # the step at two per-GPU batches, with its split; the trainer's own model and functions
    runs = s["step"]["runs"]
    assert [r["batch_per_gpu"] for r in runs] == [2, 4]
    for r in runs:
        assert r["images_per_s"] > 0 and abs(sum(r["split_pct"].values()) - 100) < 5
        assert r["graph_breaks"] == 0 and r["training_gflop_per_image"] > 0 and r["mfu_pct"] is None
    d = s["diffusers"]
    assert d["batch_per_gpu"] == 4 and d["ratio_ours_over_diffusers_images_per_s"] > 0
    assert d["ours"]["parameters"] == d["diffusers"]["parameters"]  # the same architecture
    ddp = s["ddp_nccl"]
    assert ddp["ddp"] == "DistributedDataParallel" and ddp["backend"] == "gloo" and not ddp["grad_stride_warning"]
    assert s["resume"]["bit_exact"]
    assert s["decode"]["cpu_images_per_s_one_core"] > 0 and "skipped" in s["decode"]["nvjpeg"]
    e = s["ema_checkpoint"]
    assert e["ema_update_ms_fused"] > 0 and e["checkpoint_stall_ms"] > 0 and e["checkpoint_bytes_on_device"] > 0
    assert s["gpu_tests"]["counts"]["selected"] >= 8  # collected, not run, on CPU


def test_missing_diffusers_is_a_skip_with_the_fix_in_the_report(tmp_path: Path) -> None:
    blocked = tmp_path / "blocked"
    (blocked / "diffusers").mkdir(parents=True)
    (blocked / "diffusers" / "__init__.py").write_text("raise ImportError('not installed on this machine')\n")
    proc, report = _run(tmp_path, "--sections", "environment,diffusers", env_extra={"PYTHONPATH": str(blocked)})
    d = report["sections"]["diffusers"]
    assert proc.returncode == 0 and report["ok"]
    assert d["status"] == "skipped" and "pip download diffusers --no-deps -d wheels/" in d["note"]
    assert "missing" in report["sections"]["environment"]["diffusers"]
