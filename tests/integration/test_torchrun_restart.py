"""Single-node fault tolerance: under `torchrun --max-restarts=1`, a rank killed with SIGKILL
restarts the whole group, which resumes from the last checkpoint and finishes (gloo, CPU)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.test_slurm import REPO, SCRIPT, SHORT, TINY, tb_steps


def _children(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc (no psutil)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended while we looked
        if int(fields[1]) == pid:  # field 4 of /proc/PID/stat: the parent pid
            kids.append(int(stat.parent.name))
    return kids


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for kv in env:
        if kv.startswith(b"RANK="):
            return int(kv[5:])
    return None


# 60 steps instead of 20: the run must still be going when the test, polling every 0.25 s on a
# loaded 2-core machine, sees the first checkpoint and kills a rank (the tiny model runs ~12 steps/s).
LONGER = ("train.total_images=480", "log.sample_every_images=480")


def _ckpt_step(name: str) -> int:
    return int(re.search(r"ckpt-(\d+)\.pt", name).group(1)) // 8  # 8 images per step


@pytest.mark.slow
def test_sigkilled_rank_restarts_group_which_resumes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    out_path = tmp_path / "torchrun.out"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        "--max-restarts=1", str(SCRIPT), "--config", str(TINY), f"run.dir={run_dir}",
        f"data.shards={tmp_path / 'data'}", *SHORT, *LONGER,
    ]
    # A fresh worker store per restart: with the agent's shared store (torch >= 2.4 default) the
    # restarted group can read the dead group's gloo addresses and fail or hang in init.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    with open(out_path, "w") as out:
        # Own session, so a failing test can end the whole tree it started, and only that.
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                start_new_session=True)
    try:
        ckpts = run_dir / "checkpoints"
        deadline = time.time() + 240
        while not list(ckpts.glob("ckpt-*.pt")):
            assert proc.poll() is None, out_path.read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint within 240 s"
            time.sleep(0.25)
        first = sorted(ckpts.glob("ckpt-*.pt"))[0].name
        workers = {_rank_of(p): p for p in _children(proc.pid)}
        assert set(workers) == {0, 1}, workers
        os.kill(workers[1], signal.SIGKILL)
        # Checkpoints written by then; rank 0 may still finish one it had started (async write).
        at_kill = max(_ckpt_step(p.name) for p in ckpts.glob("ckpt-*.pt"))
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = out_path.read_text(errors="replace") + "".join(
        p.read_text(errors="replace") for p in sorted((run_dir / "logs").glob("*.log")))
    assert rc == 0, text[-3000:]
    resumed = re.search(r"resumed from \S*(ckpt-\d+\.pt) at step (\d+)", text)
    assert resumed, text[-3000:]
    # From the newest checkpoint: the one there at the kill, or one in flight then; never older.
    step = int(resumed.group(2))
    assert step == _ckpt_step(resumed.group(1)) >= _ckpt_step(first)
    assert at_kill <= step <= at_kill + 5, (first, at_kill, resumed.group(0))
    assert (ckpts / "latest").read_text().strip() == sorted(ckpts.glob("ckpt-*.pt"))[-1].name
    assert "finished" in text
    steps = tb_steps(run_dir)
    # Steps after the checkpoint ran twice; the resumed writer purges them, so none repeat.
    assert len(steps) == len(set(steps)), "duplicated TensorBoard steps after the restart"
    assert len({b - a for a, b in zip(sorted(steps), sorted(steps)[1:])}) == 1
