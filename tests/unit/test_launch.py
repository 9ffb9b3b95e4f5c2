"""The SLURM launcher's decision after a job step: finish, requeue (stop or crash with progress), fail."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launch import slurm_env, submit
from launch.submit import Outcome, after_step, decide_after_step

STOP = slurm_env.EXIT_REQUEUE


def _o(codes: dict[int, int], sig: str | None = None) -> dict[int, Outcome]:
    return {r: Outcome(rank=r, host=f"node{r}", code=c, signal=sig if c == STOP else None)
            for r, c in codes.items()}


def decide(codes: dict[int, int], *, world: int = 2, restarts: int = 0, max_requeues: int = 3,
           start: str = "", end: str = "", sig: str | None = "SIGUSR2") -> tuple[str, int, str]:
    return decide_after_step(_o(codes, sig), world, "17", restarts, max_requeues, start, end)


def test_clean_ends() -> None:
    assert decide({0: 0, 1: 0})[:2] == ("done", 0)
    action, code, line = decide({0: STOP, 1: STOP}, restarts=2)
    assert (action, code) == ("requeue", 0) and line.startswith("requeued job 17 (3/3)")
    # The requeue cap still holds for stops at the time limit.
    action, code, line = decide({0: STOP, 1: STOP}, restarts=3)
    assert (action, code) == ("fail", 1) and "already requeued 3 times (--max-requeues 3)" in line
    # scancel / preemption: stopped at a checkpoint, the launcher does not requeue.
    assert decide({0: STOP, 1: STOP}, sig="SIGTERM")[0] == "leave"


def test_a_config_error_fails_without_requeue() -> None:
    action, code, line = decide({0: 2, 1: 2}, start="a", end="b")
    assert (action, code) == ("fail", 2) and "not requeued" in line


def test_a_lost_rank_after_progress_is_requeued() -> None:
    # Rank 1 was SIGKILLed (it recorded nothing); rank 0 failed in the next collective.
    action, code, line = decide({0: 1}, start="ckpt-000000080.pt", end="ckpt-000000160.pt")
    assert (action, code) == ("requeue", 0)
    assert "rank(s) 1 ended without an exit code" in line and "rank 0 exited with 1" in line
    assert "ckpt-000000080.pt -> ckpt-000000160.pt" in line
    # The first run counts its first checkpoint as progress.
    assert decide({0: 1}, start="", end="ckpt-000000080.pt")[0] == "requeue"
    # ...up to the requeue cap.
    action, _, line = decide({0: 1}, restarts=3, start="a", end="b")
    assert action == "fail" and "--max-requeues 3" in line


def test_a_crash_at_the_same_checkpoint_is_not_requeued() -> None:
    outcomes = {0: Outcome(0, "n0", 1, time=2.0), 1: Outcome(1, "n1", 1, time=1.0)}
    action, code, line = decide_after_step(outcomes, 2, "17", 0, 3, "ckpt-000000080.pt", "ckpt-000000080.pt")
    assert (action, code) == ("fail", 1)
    assert "rank 1 exited with 1 first, then rank 0 with 1" in line
    assert "crashed at the same checkpoint ckpt-000000080.pt (no progress since this (re)start)" in line
    assert "\n" not in line
    assert "before its first checkpoint" in decide({0: 1}, start="", end="")[2]
    # Every rank killed (nothing recorded), no progress: fails too.
    assert decide({}, start="a", end="a")[0] == "fail"


def test_a_storage_fault_fails_the_job_and_is_never_requeued(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    storage = slurm_env.EXIT_STORAGE
    # Progress since this start and requeues left: a crash would be requeued, a full disk is not.
    for codes in ({0: storage, 1: storage}, {0: storage}, {0: storage, 1: 1}):
        action, code, line = decide(codes, start="ckpt-000000080.pt", end="ckpt-000000160.pt")
        assert (action, code) == ("fail", storage), codes
        assert "not requeued" in line and "storage fault" in line and "\n" not in line
    # Through after_step (what the batch script runs): no scontrol requeue, the job exits 74.
    out = submit.outcome_dir(tmp_path, "17", 0)
    out.mkdir(parents=True)
    for r in (0, 1):
        (out / f"rank{r}.json").write_text(json.dumps({"rank": r, "host": "n0", "code": storage, "signal": None}))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("ckpt-000000160.pt\n")
    calls: list[list[str]] = []
    monkeypatch.setattr(submit.subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    monkeypatch.setattr(slurm_env, "job_state", lambda job: "RUNNING")
    assert after_step(tmp_path, 3, 1, "ckpt-000000080.pt", environ={"SLURM_JOB_ID": "17", "SLURM_NTASKS": "2"}) \
        == storage
    assert calls == []
    assert "storage fault" in capsys.readouterr().out


def test_after_step_requeues_through_scontrol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = submit.outcome_dir(tmp_path, "17", 0)
    out.mkdir(parents=True)
    (out / "rank0.json").write_text(json.dumps({"rank": 0, "host": "n0", "code": 1, "signal": None}))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("ckpt-000000160.pt\n")
    calls: list[list[str]] = []

    class Done:
        returncode, stderr = 0, ""

    monkeypatch.setattr(submit.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or Done())
    monkeypatch.setattr(slurm_env, "job_state", lambda job: "RUNNING")
    env = {"SLURM_JOB_ID": "17", "SLURM_NTASKS": "2"}
    assert after_step(tmp_path, 3, 137, "ckpt-000000080.pt", environ=env) == 0
    assert calls == [["scontrol", "requeue", "17"]]
    assert "requeued job 17 (1/3) after a crash" in capsys.readouterr().out
    # The same crash again at the same checkpoint (restart 1): the job fails with one line.
    out1 = submit.outcome_dir(tmp_path, "17", 1)
    out1.mkdir(parents=True)
    (out1 / "rank0.json").write_text(json.dumps({"rank": 0, "host": "n0", "code": 1, "signal": None}))
    calls.clear()
    env["SLURM_RESTART_COUNT"] = "1"
    assert after_step(tmp_path, 3, 137, "ckpt-000000160.pt", environ=env) == 1
    assert calls == []
    assert "crashed at the same checkpoint ckpt-000000160.pt" in capsys.readouterr().out


def test_more_nodes_than_the_partition_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    monkeypatch.setattr(slurm_env, "partition_nodes", lambda p: ("debug", 2))
    code = submit.main(["--nodes", "3", "--gpus-per-node", "0", "--tasks-per-node", "1",
                        "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == ("error: --nodes 3 but partition debug has 2 node(s) (scontrol show partition debug): "
                   "ask for at most 2, or pick another --partition")
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- the trainer config, before submitting


@pytest.mark.parametrize("argv, words", [
    (["--config", "lsun_chruch_256"], "config 'lsun_chruch_256' not found; presets:"),
    (["--config", "lsun_church_256", "train.batch_sise=4"], "did you mean 'train.batch_size'"),
    # 64 images per step cannot split over 3 nodes x 8 GPUs = 24 ranks
    (["--config", "lsun_church_256", "--nodes", "3"], "train.batch_size=64 is not divisible by the world size 24"),
])
def test_dry_run_refuses_a_config_the_trainer_would_refuse(argv: list[str], words: str, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(slurm_env, "partition_nodes", lambda p: None)  # no SLURM asked (scontrol may hang)
    code = submit.main(["--dry-run", "--gpus-per-node", "8", "--run-dir", str(tmp_path / "run"), *argv])
    out, err = capsys.readouterr()
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: config error: ") and words in lines[0], err
    assert "#SBATCH" not in out  # no job script for a job that would fail
    # A real submission is refused the same way, before SLURM or the run directory is touched.
    assert submit.main(["--gpus-per-node", "8", "--run-dir", str(tmp_path / "run"), *argv]) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_dry_run_passes_a_config_the_trainer_accepts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert submit.main(["--dry-run", "--config", "lsun_church_256", "--nodes", "2", "--gpus-per-node", "8",
                        "--run-dir", str(tmp_path / "run"), "train.batch_per_gpu=2"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --nodes=2" in out and "train.batch_per_gpu=2" in out


# --------------------------------------------------------------------------- the sbatch template's signal rule


_STUBS = {
    # srun: the trainers; a stop request makes them checkpoint and exit 75
    "srun": 'echo $$ > "$STUB_DIR/srun.pid"\ntrap \'exit 75\' USR2 TERM\nwhile true; do sleep 0.1; done\n',
    "scancel": 'echo "scancel $*" >> "$STUB_DIR/calls"\nkill -USR2 "$(cat "$STUB_DIR/srun.pid")"\n',
    "scontrol": ('case "$1 $2" in\n  "show hostnames") echo node1 ;;\n'
                 '  "show job") echo "JobId=$SLURM_JOB_ID JobState=RUNNING" ;;\n'
                 '  *) echo "scontrol $*" >> "$STUB_DIR/calls" ;;\nesac\n'),
}


def test_sbatch_template_requeues_a_time_limit_stop_but_not_a_sigterm_stop(tmp_path: Path) -> None:
    """USR2 (the time-limit warning) is requeued by the script; TERM (scancel, preemption) is not:
    SLURM requeues a job it preempts itself, a cancelled job stays cancelled (as launch.submit)."""
    import os
    import signal
    import subprocess
    import time

    script = Path(__file__).resolve().parents[2] / "launch" / "ddpm.sbatch"
    procs = {}
    for sig in ("USR2", "TERM"):
        stubs = tmp_path / sig
        (stubs / "bin").mkdir(parents=True)
        for name, body in _STUBS.items():
            (stubs / "bin" / name).write_text("#!/bin/bash\n" + body)
            (stubs / "bin" / name).chmod(0o755)
        env = {**os.environ, "PATH": f"{stubs / 'bin'}:{os.environ['PATH']}", "STUB_DIR": str(stubs),
               "SLURM_JOB_ID": "123", "SLURM_JOB_NODELIST": "node1", "SLURM_NNODES": "1",
               "SLURM_GPUS_ON_NODE": "1", "SLURM_RESTART_COUNT": "0"}
        procs[sig] = subprocess.Popen(["bash", str(script), f"run.dir={stubs / 'run'}"], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 30
    while not all((tmp_path / sig / "srun.pid").is_file() for sig in procs) and time.time() < deadline:
        time.sleep(0.1)
    for sig, proc in procs.items():
        proc.send_signal(getattr(signal, f"SIG{sig}"))  # to the batch shell, as SLURM does
    for sig, proc in procs.items():
        out, _ = proc.communicate(timeout=60)
        calls = (tmp_path / sig / "calls").read_text()
        assert proc.returncode == 0, out
        assert f"stop requested by SIG{sig}" in out and "scancel --signal=USR2 123" in calls, out
        if sig == "USR2":
            assert "scontrol requeue 123" in calls and "requeueing job 123 (1/50)" in out, out
        else:
            assert "requeue" not in calls, calls
            assert "stopped at a checkpoint by SIGTERM (scancel or preemption): not requeued" in out, out
