"""Two-node SLURM jobs (`ddpm-submit --nodes 2`, one task per node) and what goes wrong on them.

tests/slurm/setup_slurm.sh runs two slurmd on this machine (ddpmnode1, ddpmnode2). A rank lost
to SIGKILL ends the step at once and the job is requeued (it made progress) and finishes; a
crash that repeats at the same checkpoint fails the job with one line instead of requeueing it
forever; a rank stopped with SIGSTOP ends the job within dist.timeout_s, naming the silent rank.
The kill-to-requeue and requeue-to-first-step times are measured and printed (pytest -s).
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from launch.submit import submit
from tests.integration.test_slurm import (
    FINAL,
    TINY,
    _checkpoints,
    _run,
    _submitted,
    all_logs,
    job_info,
    release_requeue_hold,
    slurm,  # noqa: F401  (fixture)
    wait_for,
)

REAL = "trainer.main:run"
STANDIN = "tests.slurm.standin_trainer:run"
# 60 steps of 8 images: long enough to be killed mid-run after the first checkpoint (step 10).
LONG = ("train.total_images=480", "checkpoint.every_images=80", "log.every_images=16",
        "log.sample_every_images=0")


@pytest.fixture(autouse=True)
def _cancel_leftover_jobs() -> Iterator[None]:
    """A failing test must not leave its job running (scancel of a finished job is a no-op)."""
    yield
    while _submitted:
        _run("scancel", _submitted.pop(), check=False)


def _submit_two_nodes(run_dir: Path, *extra: str, entry: str = REAL, max_requeues: int = 3, nodes: int = 2) -> str:
    job_id = submit(
        ["--config", str(TINY), "--nodes", str(nodes), "--gpus-per-node", "0", "--tasks-per-node", "1",
         "--cpus-per-task", "1", "--time", "15", "--run-dir", str(run_dir), "--max-requeues",
         str(max_requeues), "--job-name", f"mn-{run_dir.parent.name[:12]}", "--entry", entry,
         f"data.shards={run_dir.parent / 'data'}", *extra]
    )
    _submitted.append(job_id)
    return job_id


def _task_pid(job_id: str, rank: int) -> int:
    """The pid of a job's task (the submitit process running the trainer), not its loader workers."""
    found = {}
    for env_file in Path("/proc").glob("[0-9]*/environ"):
        try:
            env = dict(kv.split(b"=", 1) for kv in env_file.read_bytes().split(b"\0") if b"=" in kv)
            stat = (env_file.parent / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, ValueError):
            continue
        if env.get(b"SLURM_JOB_ID") == job_id.encode() and env.get(b"SLURM_PROCID") == str(rank).encode() \
                and b"submitit" in (env_file.parent / "cmdline").read_bytes():
            found[int(env_file.parent.name)] = int(stat[1])  # pid -> parent pid
    tops = [pid for pid, parent in found.items() if parent not in found]  # not a forked loader worker
    assert len(tops) == 1, f"rank {rank} of job {job_id}: {found}"
    return tops[0]


def _follow(job_id: str, timeout_s: float) -> tuple[dict[str, str], float | None, float | None]:
    """Wait for the job's end: (final info, when it left RUNNING, when its requeue hold was released)."""
    deadline = time.time() + timeout_s
    left_running = released = held = None
    while time.time() < deadline:
        info = job_info(job_id)
        if info["JobState"] != "RUNNING" and left_running is None:
            left_running = time.time()
        if info["JobState"] in FINAL:
            return info, left_running, released
        was_held = held
        held = release_requeue_hold(job_id, info, held)
        if was_held and held is None:
            released = time.time()
        time.sleep(0.25)
    _run("scancel", job_id, check=False)
    pytest.fail(f"job {job_id} still {job_info(job_id)['JobState']} after {timeout_s}s")


def _first_step_after_resume(run_dir: Path) -> float:
    """Wall time of the first console step line logged by rank 0 after the (last) resume."""
    lines = (run_dir / "logs" / "rank0.log").read_text().splitlines()
    resumed = max(i for i, line in enumerate(lines) if "resumed from" in line)
    for line in lines[resumed:]:
        if re.search(r"\] step \d+/\d+ \|", line):
            return time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S"))
    pytest.fail("no training step logged after the resume")


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm")
@pytest.mark.slow
def test_lost_rank_is_requeued_and_the_run_finishes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    job_id = _submit_two_nodes(run_dir, *LONG)
    wait_for(lambda: len(_checkpoints(run_dir)) >= 1, 300, "the first checkpoint")
    t_kill = time.time()
    os.kill(_task_pid(job_id, 1), signal.SIGKILL)  # a lost rank: OOM kill, GPU off the bus, ...
    info, t_left, t_released = _follow(job_id, 400)
    logs = all_logs(run_dir)
    assert info["JobState"] == "COMPLETED", logs[-4000:]
    assert int(info["Restarts"]) == 1, logs[-4000:]
    # Both nodes ran a rank, in both runs.
    assert logs.count("node=ddpmnode1") == 2 and logs.count("node=ddpmnode2") == 2
    assert f"requeued job {job_id} (1/3) after a crash: rank(s) 1 ended without an exit code" in logs
    assert re.search(r"\[launch\] rank 1 \(host \S+, pid \d+\) was last seen at step \d+", logs), logs[-4000:]
    assert "resumed from" in logs and "finished: step 60" in logs
    t_step = _first_step_after_resume(run_dir)
    detect, restart = t_left - t_kill, t_step - (t_released or t_left)
    print(f"\nlost rank (SIGKILL) on 2 SLURM nodes: job requeued {detect:.1f} s after the kill; first "
          f"training step {restart:.0f} s after the requeue hold was released ({t_step - t_kill:.0f} s "
          f"after the kill in all, including the test's {((t_released or t_left) - t_left):.0f} s hold)")
    assert detect < 30, "a lost rank must end the step at once (srun --kill-on-bad-exit)"
    assert restart < 60


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm")
@pytest.mark.slow
def test_crash_at_the_same_checkpoint_fails_instead_of_requeueing(tmp_path: Path) -> None:
    # The stand-in (0.5 s per step of 16 images) writes checkpoints at 40, 80, 120... images; rank 1
    # crashes (exit 1) once 96 images are reached, on every run.
    run_dir = tmp_path / "run"
    job_id = _submit_two_nodes(run_dir, "train.total_images=160", "checkpoint.every_images=40",
                               "standin.crash_at_images=96", entry=STANDIN)
    info, _, _ = _follow(job_id, 240)
    logs = all_logs(run_dir)
    assert info["JobState"] == "FAILED", logs[-4000:]
    # The first crash came after progress (checkpoints 40 and 80): requeued once...
    assert int(info["Restarts"]) == 1, logs[-4000:]
    assert logs.count(f"requeued job {job_id} (1/3) after a crash") == 1
    # ...the second at the same checkpoint: failed, with one line that says why.
    fail = [line for line in logs.splitlines() if f"job {job_id} failed:" in line]
    assert len(fail) == 1, logs[-4000:]
    assert "rank 1 exited with 1 first" in fail[0] or "rank 1 exited with 1." in fail[0]
    assert "crashed at the same checkpoint ckpt-000000080.pt (no progress since this (re)start)" in fail[0]
    time.sleep(2)
    assert job_info(job_id)["JobState"] == "FAILED"  # and stays failed


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm")
@pytest.mark.slow
def test_stopped_rank_ends_the_job_within_the_timeout_and_is_named(tmp_path: Path) -> None:
    timeout_s = 20
    run_dir = tmp_path / "run"
    job_id = _submit_two_nodes(run_dir, *LONG, f"dist.timeout_s={timeout_s}", "dist.warmup_steps=2")
    wait_for(lambda: len(_checkpoints(run_dir)) >= 1, 300, "the first checkpoint")
    t_stop = time.time()
    os.kill(_task_pid(job_id, 1), signal.SIGSTOP)  # hung: alive, holding its node, silent
    info, t_left, _ = _follow(job_id, 400)
    logs = all_logs(run_dir)
    assert t_left is not None and t_left - t_stop < timeout_s + 30, logs[-4000:]
    # The collective timeout on rank 0 ends the step; the line names the rank that went silent.
    assert re.search(r"\[launch\] rank 0 reported: rank 1 \(host \S+, pid \d+\) stopped answering first: "
                     r"last heartbeat \S+ UTC, \d+ s before the others'", logs), logs[-4000:]
    # Same decision as a lost rank: the run made progress, so it is requeued and finishes.
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) == 1, logs[-4000:]
    assert f"requeued job {job_id} (1/3) after a crash" in logs
    print(f"\nstopped rank (SIGSTOP) on 2 SLURM nodes, dist.timeout_s={timeout_s}: job requeued "
          f"{t_left - t_stop:.1f} s after the stop")


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm")
@pytest.mark.slow
def test_a_run_stopped_on_two_nodes_continues_on_one(tmp_path: Path) -> None:
    """The cluster shrinks under a run: submitted on 2 nodes, stopped (scancel: a checkpoint, not
    requeued), submitted again on 1 node with the same run directory; the audit shows every position
    of the run exactly once and each sample once per epoch (the global order)."""
    from collections import Counter

    from trainer.audit import read_audit

    run_dir = tmp_path / "run"
    job_id = _submit_two_nodes(run_dir, *LONG, "data.audit=true")
    wait_for(lambda: len(_checkpoints(run_dir)) >= 1, 300, "the first checkpoint")
    _run("scancel", job_id)  # SIGTERM on both nodes: one agreed step, one checkpoint, exit 75
    info, _, _ = _follow(job_id, 300)
    assert info["JobState"] in FINAL and int(info["Restarts"]) == 0
    stopped = _checkpoints(run_dir)[-1]
    assert "stopped by SIGTERM" in all_logs(run_dir)
    job_id = _submit_two_nodes(run_dir, *LONG, "data.audit=true", nodes=1)
    info, _, _ = _follow(job_id, 600)
    logs = all_logs(run_dir)
    assert info["JobState"] == "COMPLETED", logs[-4000:]
    assert f"resumed from {stopped}" in logs
    rows = read_audit(run_dir)
    assert [r["index"] for r in rows] == list(range(480)), "positions lost or repeated across the resize"
    per_epoch = Counter((r["epoch"], r["key"]) for r in rows)
    assert set(per_epoch.values()) == {1} and sum(1 for e, _ in per_epoch if e == 0) == 128
