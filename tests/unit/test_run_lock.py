"""The run-directory lock (one live job per run directory) and the per-rank step records."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer.run_lock import (
    Holder,
    RunDirLocked,
    RunLock,
    StepRecord,
    diagnose,
    explain_failure,
    read_records,
    slurm_attempt,
)

REPO = Path(__file__).resolve().parents[2]


def _write_holder(run_dir: Path, **fields: object) -> Holder:
    """A run.lock as another job would have left it (defaults: a live job on another host)."""
    now = time.time()
    h = Holder(host="othernode", pid=4242, pid_start="", since=now - 3600, heartbeat=now,
               token="theirs")
    for k, v in fields.items():
        setattr(h, k, v)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.lock").write_text(json.dumps(h.__dict__))
    return h


def _holder_token(run_dir: Path) -> str:
    return json.loads((run_dir / "run.lock").read_text())["token"]


def test_second_job_is_refused_until_the_holder_dies(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run_dir = tmp_path / "run"
    # The first job: a live process on this host holding the lock.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from trainer.run_lock import RunLock; "
         f"RunLock.acquire({str(run_dir)!r}); print('held', flush=True); time.sleep(600)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "SLURM_JOB_ID": "777"},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirLocked) as e:
            RunLock.acquire(run_dir, environ={})
        msg = str(e.value)
        # One line naming the holder: host, pid, SLURM job, since when.
        assert "\n" not in msg
        assert f"pid {holder.pid}" in msg and "SLURM job 777" in msg and "since 20" in msg
        assert f"host {socket.gethostname()} " in msg
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        # Its process is gone: the lock is taken over with a warning.
        with caplog.at_level(logging.WARNING, logger="ddpm"):
            lock = RunLock.acquire(run_dir, environ={})
        assert "its process is gone" in caplog.text
        assert _holder_token(run_dir) == lock.holder.token
        lock.release()
        assert not (run_dir / "run.lock").exists()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_a_silent_holder_on_another_host_is_taken_over_after_the_stale_interval(tmp_path: Path) -> None:
    _write_holder(tmp_path, heartbeat=time.time() - 30)
    with pytest.raises(RunDirLocked, match=r"othernode pid 4242.*heartbeat 30 s ago"):
        RunLock.acquire(tmp_path, environ={}, stale_after_s=120, job_state=lambda j: "")
    _write_holder(tmp_path, heartbeat=time.time() - 121)
    lock = RunLock.acquire(tmp_path, environ={}, stale_after_s=120, job_state=lambda j: "")
    assert _holder_token(tmp_path) == lock.holder.token
    lock.release()


def test_a_requeue_of_the_same_slurm_job_takes_over_at_once(tmp_path: Path) -> None:
    _write_holder(tmp_path, slurm_job="42", slurm_restart=0)
    # Another job (or the same job's same run, e.g. a second srun in one allocation) is refused...
    for env in ({"SLURM_JOB_ID": "43"}, {"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "0"}):
        with pytest.raises(RunDirLocked, match="SLURM job 42"):
            RunLock.acquire(tmp_path, environ=env, job_state=lambda j: "RUNNING")
    # ...the requeued job (same id, next restart) takes over although the heartbeat is fresh.
    lock = RunLock.acquire(tmp_path, environ={"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "1"})
    assert lock.holder.slurm_restart == 1
    lock.release()


def test_an_ended_slurm_job_or_a_torchrun_restart_takes_over(tmp_path: Path) -> None:
    _write_holder(tmp_path, slurm_job="42")
    lock = RunLock.acquire(tmp_path, environ={"SLURM_JOB_ID": "50"}, job_state=lambda j: "FAILED")
    lock.release()
    # torchrun --max-restarts: every worker restarts, rank 0 possibly on another node whose agent
    # counts restarts differently.
    for held, mine in (("r1", "r2"), ("none", "none")):  # another run; the default --rdzv-id says nothing
        _write_holder(tmp_path, torchrun_run=held)
        with pytest.raises(RunDirLocked):
            RunLock.acquire(tmp_path, environ={"TORCHELASTIC_RUN_ID": mine, "TORCHELASTIC_RESTART_COUNT": "1"})
    _write_holder(tmp_path, torchrun_run="r1", torchrun_restart=1)
    lock = RunLock.acquire(tmp_path, environ={"TORCHELASTIC_RUN_ID": "r1", "TORCHELASTIC_RESTART_COUNT": "0"})
    lock.release()


def test_a_corrupt_lock_is_taken_over(tmp_path: Path) -> None:
    (tmp_path / "run.lock").write_text("{trunc")
    RunLock.acquire(tmp_path, environ={}).release()


def test_heartbeat_refreshes_and_a_lost_lock_is_noticed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lock = RunLock.acquire(tmp_path, environ={}, heartbeat_s=0.05)
    first = json.loads((tmp_path / "run.lock").read_text())["heartbeat"]
    deadline = time.time() + 5
    while json.loads((tmp_path / "run.lock").read_text())["heartbeat"] == first:
        assert time.time() < deadline, "heartbeat never refreshed"
        time.sleep(0.02)
    # Another job took it over (we looked dead to it): the holder notices and says so.
    with caplog.at_level(logging.ERROR, logger="ddpm"):
        _write_holder(tmp_path)
        deadline = time.time() + 5
        while not lock.lost:
            assert time.time() < deadline
            time.sleep(0.02)
    assert "othernode" in lock.lost and "lost the run directory" in caplog.text
    lock.release()
    assert _holder_token(tmp_path) == "theirs"  # release never removes another job's lock


def test_step_records_name_the_rank_that_stopped_answering(tmp_path: Path) -> None:
    env = {"SLURM_JOB_ID": "9", "SLURM_RESTART_COUNT": "2"}
    assert slurm_attempt(env) == "9.2"
    recs = [StepRecord(tmp_path, r, run="a", interval_s=0.05, environ=env) for r in range(3)]
    for r in recs:
        r.write(step=40, nimg=320)
    recs[1]._stop.set()  # rank 1 stops answering (SIGSTOP: its heartbeat thread stops too)
    recs[1]._thread.join()
    recs[0].reached(41, 328)
    recs[2].reached(41, 328)
    time.sleep(1.5)  # > 2 heartbeat intervals + 1 s
    line = diagnose(tmp_path)
    assert line.startswith("rank 1 (host ") and "stopped answering first" in line, line
    assert "it was at step 40 then; the others reached step 41" in line
    assert diagnose(tmp_path, world_size=4).startswith("rank(s) 3 never wrote")
    # Rank 0's collective times out: it keeps its diagnosis for the launcher, which reads it after
    # the step ended (when rank 1, continued and ended by srun, looks alive again).
    assert recs[0].diagnose_failure(3) == line
    for r in recs:
        r.close("failed")
    assert diagnose(tmp_path) == ""
    assert explain_failure(tmp_path, slurm="9.2", lost=[1]) == [
        f"rank 0 reported: {line}",
        f"rank 1 (host {socket.gethostname()}, pid {os.getpid()}) was last seen at step 40, heartbeat "
        + time.strftime("%H:%M:%S", time.gmtime(read_records(tmp_path, run="a")[1].heartbeat)) + " UTC",
    ]
    # Records of an older attempt (before a requeue) are not mixed in.
    StepRecord(tmp_path, 0, run="b", environ={"SLURM_JOB_ID": "9", "SLURM_RESTART_COUNT": "3"}).close()
    assert [r.run for r in read_records(tmp_path)] == ["b"]
    assert [r.rank for r in read_records(tmp_path, slurm="9.2")] == [1, 2]
    assert [r.rank for r in read_records(tmp_path, run="a")] == [1, 2]


def test_pids_are_not_compared_across_containers(tmp_path: Path) -> None:
    # A holder on this host but in another pid namespace (a container per job): its pid means
    # nothing here, so only its heartbeat (or SLURM job) can show that it is dead.
    _write_holder(tmp_path, host=socket.gethostname(), pid=2**22 + 1, pid_ns="pid:[1]")
    with pytest.raises(RunDirLocked, match="stop it first"):
        RunLock.acquire(tmp_path, environ={}, job_state=lambda j: "")
    _write_holder(tmp_path, host=socket.gethostname(), pid=2**22 + 1, pid_ns="pid:[1]",
                  heartbeat=time.time() - 500)
    RunLock.acquire(tmp_path, environ={}, job_state=lambda j: "").release()


def test_a_rank_that_answers_but_does_not_advance_is_named(tmp_path: Path) -> None:
    recs = [StepRecord(tmp_path, r, run="a", interval_s=0.05) for r in range(3)]
    for r in recs:
        r.reached(5, 40)
    time.sleep(0.1)
    recs[0].reached(6, 48)
    recs[1].reached(6, 48)  # rank 2 keeps its heartbeat but stays at step 5 (stuck in a kernel)
    time.sleep(0.3)
    assert diagnose(tmp_path) == (f"every rank kept answering, but rank(s) 2 (host {socket.gethostname()}, "
                                  f"step 5) did not reach step 6 like the others")
    for r in recs:
        r.close("failed")
