"""The gpu_tests section: the ``gpu``-marked tests in a child pytest (CPU mode: collected only)."""

from __future__ import annotations

import gc
import re
import subprocess
import sys
from typing import Any

import torch

from benchmarks.gpu_check.common import REPO, Check, env_for_children, tail


def gpu_test_files() -> list[str]:
    """The test files that hold ``gpu``-marked tests, relative to the repository."""
    tests = REPO / "tests"
    if not tests.is_dir():
        return []
    return sorted(str(p.relative_to(REPO)) for p in tests.rglob("test_*.py") if "mark.gpu" in p.read_text())


def section_gpu_tests(check: Check) -> dict[str, Any]:
    """pytest -m gpu on the files that have such tests (CPU mode: collect them only)."""
    import importlib.util

    if importlib.util.find_spec("pytest") is None:
        return {"status": "skipped", "note": "pytest is not installed: carry it as a wheel (README, Validate on a GPU)"}
    files = gpu_test_files()
    if not files:
        return {"status": "skipped", "note": f"no tests/ next to {REPO / 'benchmarks'} (an installed copy?)"}
    gc.collect()
    if check.device.type == "cuda":
        torch.cuda.empty_cache()  # the tests run in a child process on the same GPU
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *files]
    if check.mode == "cpu":
        cmd.insert(-len(files), "--collect-only")
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env_for_children(check), capture_output=True, text=True,
                              timeout=max(20.0, check.left()))
    except subprocess.TimeoutExpired as e:
        return {"status": "failed", "note": f"timed out after {e.timeout:.0f} s", "files": files}
    text = proc.stdout + proc.stderr
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", text)}
    collected = re.search(r"(\d+)(?:/\d+)? tests? collected", text)
    if collected:
        counts["selected"] = int(collected.group(1))
    out: dict[str, Any] = {"files": files, "returncode": proc.returncode, "counts": counts}
    if check.mode == "cpu":
        out["note"] = "CPU mode: the gpu tests were collected, not run"
    if proc.returncode != 0 or not counts.get("selected", counts.get("passed", 0)):
        out.update(status="failed", output_tail=tail(text))
    return out
