"""Two torchrun "nodes" on one machine: two agents (--nnodes=2, c10d rendezvous on loopback, one
worker each) train like one agent with the same two ranks, and with --max-restarts a SIGKILL of
one node's worker is recovered from the last checkpoint to the same final weights (gloo, CPU)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from tests.integration.test_slurm import REPO, TINY
from tests.integration.test_torchrun_restart import _children

# 40 steps of 8 images, every step logged, a checkpoint every 10 steps (a lean but real run).
RUN = ("train.total_images=320", "log.every_images=8", "checkpoint.every_images=80",
       "log.sample_every_images=0", "checkpoint.keep_last=5")


def _env() -> dict[str, str]:
    # A fresh worker store per restart (see README: torchrun restarts with the shared store
    # could read the dead group's addresses).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    env.pop("WORLD_SIZE", None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _trainer_args(run_dir: Path, data: Path) -> list[str]:
    return [str(REPO / "trainer" / "main.py"), "--config", str(TINY), f"run.dir={run_dir}",
            f"data.shards={data}", *RUN]


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        # Own session: a failing test ends the whole tree it started, and only that.
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env(), cwd=REPO,
                                start_new_session=True)


def _two_nodes(run_dir: Path, data: Path, logs: Path, max_restarts: int = 0) -> list[subprocess.Popen]:
    """Two agents, as on two nodes: --nnodes=2, one worker each, c10d rendezvous on loopback."""
    port, rdzv_id = _free_port(), uuid.uuid4().hex[:8]
    return [_start([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                    "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={rdzv_id}",
                    f"--max-restarts={max_restarts}", "--monitor-interval=0.5",
                    *_trainer_args(run_dir, data)], logs / f"node{n}.out") for n in "AB"]


def _wait(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    deadline = time.time() + timeout
    try:
        return [p.wait(timeout=max(1.0, deadline - time.time())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def _text(run_dir: Path, logs: Path) -> str:
    files = sorted(logs.glob("*.out")) + sorted((run_dir / "logs").glob("*.log"))
    return "\n".join(p.read_text(errors="replace") for p in files)


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars("train/loss")]


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    s = torch.load(run_dir / "checkpoints" / "ckpt-000000000320.pt", weights_only=True)
    out = {f"model.{k}": v for k, v in s["model"].items()}
    for i, shadow in enumerate(s["ema"]["shadows"]):
        out.update({f"ema{i}.{k}": v for k, v in shadow.items()})
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from data_pipeline.synthetic import ensure_synthetic_shards

    d = tmp_path_factory.mktemp("data") / "shards"
    ensure_synthetic_shards(d, 128, 16, seed=0, progress=False)
    return d


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, data: Path) -> Path:
    """One agent with both ranks: what the two-node runs must reproduce."""
    base = tmp_path_factory.mktemp("one-node")
    run_dir = base / "run"
    proc = _start([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                   *_trainer_args(run_dir, data)], base / "agent.out")
    assert _wait([proc], 300) == [0], _text(run_dir, base)[-3000:]
    return run_dir


@pytest.mark.slow
def test_two_agents_train_like_one_agent_with_the_same_ranks(tmp_path: Path, data: Path, reference: Path) -> None:
    run_dir = tmp_path / "run"
    codes = _wait(_two_nodes(run_dir, data, tmp_path), 300)
    text = _text(run_dir, tmp_path)
    assert codes == [0, 0], text[-3000:]
    assert "finished: step 40" in text
    ref, got = _losses(reference), _losses(run_dir)
    assert [s for s, _ in got] == list(range(1, 41))
    assert got == ref  # the same global batch split the same way over the same two ranks


@pytest.mark.slow
def test_sigkilled_worker_on_one_node_is_recovered_to_the_same_weights(tmp_path: Path, data: Path,
                                                                      reference: Path) -> None:
    run_dir = tmp_path / "run"
    agents = _two_nodes(run_dir, data, tmp_path, max_restarts=2)
    try:
        deadline = time.time() + 240
        while not list((run_dir / "checkpoints").glob("ckpt-*.pt")):
            assert all(a.poll() is None for a in agents), _text(run_dir, tmp_path)[-3000:]
            assert time.time() < deadline, "no checkpoint within 240 s"
            time.sleep(0.25)
        workers = _children(agents[1].pid)  # node B's worker
        assert len(workers) == 1, workers
        t_kill = time.time()
        os.kill(workers[0], signal.SIGKILL)
    finally:
        codes = _wait(agents, 300)
    took = time.time() - t_kill
    text = _text(run_dir, tmp_path)
    assert codes == [0, 0], text[-3000:]
    assert "resumed from" in text and "finished: step 40" in text, text[-3000:]
    a, b = _final_weights(reference), _final_weights(run_dir)
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # Steps after the checkpoint ran twice; the resumed writer purges them: no duplicates.
    steps = [s for s, _ in _losses(run_dir)]
    assert steps == list(range(1, 41))
    print(f"two-node torchrun: SIGKILL to finished run in {took:.1f} s")


@pytest.mark.slow
def test_a_second_job_on_a_live_run_dir_is_refused_and_a_dead_ones_lock_taken_over(tmp_path: Path,
                                                                                   data: Path) -> None:
    run_dir = tmp_path / "run"

    def torchrun(*extra: str) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
                *_trainer_args(run_dir, data), *extra]

    first = _start(torchrun("train.total_images=80000"), tmp_path / "first.out")
    try:
        deadline = time.time() + 240
        while not list((run_dir / "checkpoints").glob("ckpt-*.pt")):
            assert first.poll() is None and time.time() < deadline, (tmp_path / "first.out").read_text()[-3000:]
            time.sleep(0.25)
        holder = _children(first.pid)[0]  # rank 0, the lock holder
        # The same command again, by mistake: refused at start-up with one line naming the holder.
        second = subprocess.run(torchrun("train.total_images=80000"), env=_env(), cwd=REPO,
                                capture_output=True, text=True, timeout=120)
        assert first.poll() is None, "the first job must not be disturbed"
        out = second.stdout + second.stderr
        # (torchrun repeats the worker's last line in its summary: the trainer's own log line counts)
        lines = [line for line in out.splitlines() if "[rank0] config error: run directory" in line]
        assert second.returncode != 0 and len(lines) == 1, out[-3000:]
        assert "is in use by another job (host " in lines[0] and f"pid {holder}," in lines[0]
        assert "since 20" in lines[0] and lines[0].endswith("stop it first, or use another run.dir")
        os.kill(holder, signal.SIGKILL)  # the first job dies without releasing its lock
    finally:
        _wait([first], 60)
    # Its process is gone: the next job takes the lock over (with a warning) and resumes.
    third = subprocess.run(torchrun("train.total_images=80"), env=_env(), cwd=REPO, capture_output=True,
                           text=True, timeout=120)
    out = third.stdout + third.stderr + (run_dir / "logs" / "rank0.log").read_text()
    assert third.returncode == 0, out[-3000:]
    assert "taking over the lock of run directory" in out and "its process is gone" in out
    assert "already finished" in out  # resumed from the first job's checkpoint (past 80 images)
    assert not (run_dir / "run.lock").exists()  # released at the end
