"""Process-group teardown: after ``trainer.distributed.destroy()`` no gloo thread is left running.

A gloo worker thread that outlives ``destroy_process_group()`` can drop the last reference to a
collective's tensors while the interpreter shuts down, which aborts the process with SIGABRT
("terminate called without an active exception") after all the work is done. That happened
about once in 30 two-rank evaluations on 2 loaded cores, because importing torch._dynamo after
init (torch-fidelity and torchvision do it lazily) pinned the default group through the default
arguments of ``torch.distributed.nn.functional``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

repo = Path(__file__).resolve().parents[2]

script = """
import os, sys
from trainer import distributed as du
from trainer.startup import init_distributed

def threads() -> int:
    return len(os.listdir("/proc/self/task"))

before = threads()
init_distributed()
import torch, torch._dynamo  # imported after init, as the evaluator's libraries do
assert du.broadcast_object({"k": 1}) == {"k": 1}
assert du.all_gather_tensor(torch.ones(2, 3)).shape == (4, 3)
du.barrier()
du.destroy()
print(f"rank {os.environ['RANK']} threads before {before} after {threads()}", flush=True)
sys.exit(0 if threads() == before else 3)
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through /proc")
def test_destroy_leaves_no_gloo_threads_even_after_a_late_dynamo_import(tmp_path: Path) -> None:
    path = tmp_path / "teardown.py"
    path.write_text(script)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    # Both ranks report (their lines may interleave on the shared stdout), with no thread left.
    counts = re.findall(r"rank (\d) threads before (\d+) after (\d+)", proc.stdout)
    assert sorted(r for r, _, _ in counts) == ["0", "1"], out[-3000:]
    assert all(a == b for _, b, a in counts), counts
