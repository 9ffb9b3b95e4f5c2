"""The SLURM launcher against a real single-node SLURM (tests/slurm/setup_slurm.sh starts it).

A 2-task CPU job on the tiny config, submitted through launch.submit: preempted mid-run it is
requeued, resumes from its checkpoint and finishes with a continuous TensorBoard step count; a
broken config fails once and is not requeued; the plain sbatch template requeues alike.
The pure helpers (SLURM env -> torchrun env, time parsing, the exit-code decision) are tested
first, without SLURM.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from launch import slurm_env
from launch.submit import config_path, parse_time_min, resolve_run_dir, submit

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "configs" / "tiny.yaml"
# The trainer the launcher runs. DDPM_TEST_STANDIN=1 swaps in tests/slurm/standin_trainer.py
# (same contract, seconds per job) to tell launcher bugs from trainer bugs.
_standin = os.environ.get("DDPM_TEST_STANDIN") == "1"
ENTRY = "tests.slurm.standin_trainer:run" if _standin else "trainer.main:run"
SCRIPT = REPO / ("tests/slurm/standin_trainer.py" if _standin else "trainer/main.py")
# The tiny config, shortened: 20 steps of 8 images, a checkpoint every 5 steps.
SHORT = ("train.total_images=160", "checkpoint.every_images=40", "log.sample_every_images=160")
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")


# --------------------------------------------------------------------------- pure helpers


def test_expand_nodelist_matches_slurm_syntax() -> None:
    assert slurm_env.expand_nodelist("gpu[01-03,7],cpu5") == ["gpu01", "gpu02", "gpu03", "gpu7", "cpu5"]
    assert slurm_env.expand_nodelist("a[8-10]b") == ["a8b", "a9b", "a10b"]
    assert slurm_env.expand_nodelist("node1") == ["node1"]


def test_tasks_per_node_expands_repeats() -> None:
    assert slurm_env.tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert slurm_env.tasks_per_node("8") == [8]
    with pytest.raises(ValueError):
        slurm_env.tasks_per_node("two")


def test_torchrun_env_from_slurm() -> None:
    env = {
        "SLURM_PROCID": "9",
        "SLURM_NTASKS": "12",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "3",
        "SLURM_TASKS_PER_NODE": "4(x2),2(x2)",
        "SLURM_JOB_NODELIST": "zz-no-such-host[07-10]",
        "SLURM_JOB_ID": "4242",
    }
    out = slurm_env.torchrun_env(env)
    assert out["RANK"] == "9" and out["WORLD_SIZE"] == "12" and out["LOCAL_RANK"] == "1"
    assert out["LOCAL_WORLD_SIZE"] == "2"  # node 3 holds 2 tasks
    assert out["MASTER_ADDR"] == "zz-no-such-host07"
    port = int(out["MASTER_PORT"])
    # Every task of a run agrees; a requeue (SLURM_RESTART_COUNT) moves the port.
    assert port == int(slurm_env.torchrun_env({**env, "SLURM_PROCID": "0"})["MASTER_PORT"])
    requeued = int(slurm_env.torchrun_env({**env, "SLURM_RESTART_COUNT": "1"})["MASTER_PORT"])
    assert requeued != port and 1024 < min(port, requeued) and max(port, requeued) < 32768
    with pytest.raises(RuntimeError, match="SLURM_PROCID"):
        slurm_env.torchrun_env({})


def test_time_parsing_and_run_dir(tmp_path: Path) -> None:
    assert parse_time_min("90") == 90
    assert parse_time_min("1:30:00") == 90
    assert parse_time_min("2-00:00:00") == 2880
    assert parse_time_min("0:30") == 1  # 30 s rounds up to one minute
    assert resolve_run_dir(str(TINY), [], None) == Path("runs/tiny").absolute()
    assert resolve_run_dir(str(TINY), [f"run.dir={tmp_path}"], None) == tmp_path
    # A preset name resolves like the trainer's --config (configs/<name>.yaml).
    assert resolve_run_dir("celebahq_256", ["run.name=x"], None) == Path("runs/x").absolute()
    assert config_path("celebahq_256") == str(REPO / "configs" / "celebahq_256.yaml")


def test_dry_run_shows_job_script(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job_id = submit(
        # 4 nodes x 2 GPUs: a world of 8 that tiny.yaml's batch of 8 divides (the config is validated first)
        ["--dry-run", "--config", str(TINY), "--nodes", "4", "--gpus-per-node", "2",
         "--partition", "gpu", "--account", "proj", "--qos", "high", "--time", "2-00:00:00",
         "--constraint", "h100", "--mem", "480G", "--cpus-per-task", "12", "--exclude", "bad[1-2]",
         "--job-name", "church", "--run-dir", str(tmp_path / "run"), "--signal-lead-s", "240",
         "--compile-cache", "/shared/inductor", "train.lr=2e-4"]
    )
    out = capsys.readouterr().out
    assert job_id == ""
    for line in ["--nodes=4", "--ntasks-per-node=2", "--gpus-per-node=2", "--partition=gpu",
                 "--account=proj", "--qos=high", "--time=2880", "--constraint=h100", "--mem=480G",
                 "--cpus-per-task=12", "--exclude='bad[1-2]'", "--job-name=church",
                 "--signal=USR2@240", "--requeue"]:
        assert f"#SBATCH {line}" in out, line
    # One dead task ends the step; the batch script decides after it (requeue, fail, done).
    assert "--kill-on-bad-exit=1" in out and "-m launch.submit --after-step --srun-exit $?" in out
    assert f"{tmp_path}/run/slurm/%j_%t_log.out" in out  # per-rank logs in the run directory
    assert f"train.lr=2e-4 run.dir={tmp_path}/run" in out
    assert "TORCHINDUCTOR_CACHE_DIR=/shared/inductor" in out
    assert not (tmp_path / "run").exists()  # nothing submitted, nothing created


# --------------------------------------------------------------------------- real SLURM


def _run(*cmd: str, check: bool = True, env: dict[str, str] | None = None) -> str:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=60, env=env).stdout


@pytest.fixture(scope="module")
def slurm() -> None:
    """Fail (not skip) when no SLURM answers: CI must run these tests."""
    state = ""
    if shutil.which("sinfo"):
        state = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True).stdout
    # Any state of a live node will do; jobs queue behind a busy or completing one.
    if not any(s in state for s in ("idle", "mixed", "allocated", "completing")):
        pytest.fail("no SLURM with an idle node: run tests/slurm/setup_slurm.sh first "
                    "(tests/run.sh does; tests/slurm/stop_slurm.sh stops it)")


def job_info(job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, Restarts, Reason, ...)."""
    out = _run("scontrol", "show", "job", "-o", job_id)
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


_submitted: list[str] = []


@pytest.fixture(autouse=True)
def _cancel_leftover_jobs() -> Iterator[None]:
    """A failing test must not leave its job running (scancel of a finished job is a no-op)."""
    yield
    while _submitted:
        _run("scancel", _submitted.pop(), check=False)


def release_requeue_hold(job_id: str, info: dict[str, str], held_since: float | None) -> float | None:
    """Start a requeued job a few seconds into SLURM's post-requeue BeginTime hold.

    slurmctld holds a requeued job ~2 min before restarting it; not worth waiting in tests. It
    is released a few seconds on: slurmd refuses a credential issued within the same second as
    the requeue revoked the old one ("Job credential revoked"). Returns the new hold start.
    """
    if info["JobState"] != "PENDING" or info.get("Reason") != "BeginTime":
        return None
    held_since = held_since or time.time()
    if time.time() - held_since > 3:
        _run("scontrol", "update", f"jobid={job_id}", "StartTime=now", check=False)
        return None
    return held_since


def wait_job(job_id: str, timeout_s: float, until: tuple[str, ...] = FINAL) -> dict[str, str]:
    """Poll until the job reaches a state in `until`; skips SLURM's post-requeue BeginTime hold."""
    deadline = time.time() + timeout_s
    held_since = None
    while time.time() < deadline:
        info = job_info(job_id)
        if info["JobState"] in until:
            return info
        held_since = release_requeue_hold(job_id, info, held_since)
        time.sleep(0.5)
    _run("scancel", job_id, check=False)
    pytest.fail(f"job {job_id} still {job_info(job_id)['JobState']} after {timeout_s}s")


def wait_for(pred: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.time() + timeout_s
    while not pred():
        if time.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.25)


def tb_steps(run_dir: Path, tag: str = "train/loss") -> list[int]:
    """The steps TensorBoard shows under `tag` (duplicates kept).

    Each event directory is read as TensorBoard reads it: all its files in order, so a resumed
    writer's purge marker drops the steps it re-runs.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps: list[int] = []
    for d in sorted({f.parent for f in run_dir.rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(d), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            steps += [e.step for e in acc.Scalars(tag)]
    return steps


def all_logs(run_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(run_dir.rglob("*"))
                     if p.is_file() and (p.suffix in (".out", ".err", ".log")))


def _submit_tiny(run_dir: Path, *extra: str, max_requeues: int = 3) -> str:
    job_id = submit(
        ["--config", str(TINY), "--gpus-per-node", "0", "--tasks-per-node", "2", "--cpus-per-task", "1",
         "--time", "15", "--run-dir", str(run_dir), "--max-requeues", str(max_requeues),
         "--job-name", f"t-{run_dir.name}", "--entry", ENTRY,
         f"data.shards={run_dir.parent / 'data'}", *SHORT, *extra]
    )
    _submitted.append(job_id)
    return job_id


def assert_resumed_where_stopped(logs: str) -> None:
    """The run resumed at the very step it stopped at: nothing lost when the signal came in time."""
    stopped = re.findall(r"stopped (?:by \S+ )?at (?:step )?(\d+)", logs)
    resumed = re.findall(r"resumed from \S+ at (?:step )?(\d+)", logs)
    assert stopped and resumed, "no stop/resume lines in the logs"
    assert resumed[0] == stopped[0], f"stopped at {stopped[0]} but resumed at {resumed[0]}"


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("ckpt-*.pt"))


@pytest.mark.slurm
@pytest.mark.slow
def test_preempted_job_is_requeued_and_resumes(slurm: None, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    job_id = _submit_tiny(run_dir)
    # Preempt once the first checkpoint exists: USR2 to the job's tasks, which is what SLURM
    # sends at --signal=USR2@lead before the time limit (submitit's Job._interrupt does the same).
    wait_for(lambda: len(_checkpoints(run_dir)) >= 1, 240, "the first checkpoint")
    assert job_info(job_id)["JobState"] == "RUNNING"
    _run("scancel", "--signal=USR2", job_id)
    info = wait_job(job_id, 300)
    logs = all_logs(run_dir)
    assert info["JobState"] == "COMPLETED", logs[-3000:]
    assert int(info["Restarts"]) == 1  # requeued exactly once
    assert "requeued job" in logs and "restart=1" in logs
    # Both runs compile into the same cache in the run directory (a requeue reuses its kernels).
    assert logs.count(f"inductor_cache={run_dir}/inductor_cache") == 4  # 2 ranks x 2 runs
    assert "resumed from" in logs
    assert_resumed_where_stopped(logs)
    steps = tb_steps(run_dir)
    assert steps, "no train/loss in TensorBoard"
    assert len(steps) == len(set(steps)), "duplicated TensorBoard steps after resume"
    gaps = {b - a for a, b in zip(sorted(steps), sorted(steps)[1:])}
    assert len(gaps) == 1, f"step count not continuous: gaps {sorted(gaps)}"
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == _checkpoints(run_dir)[-1].name  # the final checkpoint is the newest


@pytest.mark.slurm
def test_broken_config_fails_once_without_requeue(slurm: None, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    if not _standin:  # ddpm-submit validates the trainer config before anything is queued
        with pytest.raises(ValueError, match="no_such_key"):
            _submit_tiny(run_dir, "train.no_such_key=1")
    # A set-up mistake only the cluster finds (the shards are missing there): exit 2, failed once.
    missing = tmp_path / "no-such-shards"
    job_id = (_submit_tiny(run_dir, "train.no_such_key=1") if _standin else
              _submit_tiny(run_dir, "data.synthetic_images=0", f"data.shards={missing}/shard-{{000..003}}.tar"))
    info = wait_job(job_id, 180)
    assert info["JobState"] == "FAILED"
    assert int(info["Restarts"]) == 0
    logs = all_logs(run_dir)
    assert ("no_such_key" if _standin else "no-such-shards") in logs and "not requeued" in logs
    time.sleep(2)  # a requeue would show up as PENDING again
    assert job_info(job_id)["JobState"] == "FAILED"
    assert not _checkpoints(run_dir)


@pytest.mark.slurm
@pytest.mark.slow
def test_sbatch_template_requeues_and_resumes(slurm: None, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHON": sys.executable, "DDPM_REPO": str(REPO), "NPROC_PER_NODE": "2",
           "DDPM_TRAIN_SCRIPT": str(SCRIPT)}
    # Command-line options override the template's GPU request (the test node has none).
    job_id = _run(
        "sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=2", "--time=15",
        f"--output={tmp_path}/slurm-%j.out", str(REPO / "launch" / "ddpm.sbatch"),
        "--config", str(TINY), f"run.dir={run_dir}", f"data.shards={tmp_path / 'data'}", *SHORT,
        env=env,
    ).strip()
    _submitted.append(job_id)
    wait_for(lambda: len(_checkpoints(run_dir)) >= 1, 240, "the first checkpoint")
    # The time-limit warning: SLURM sends B:USR2 to the batch shell, whose trap stops the trainers.
    _run("scancel", "--signal=USR2", "--batch", job_id)
    info = wait_job(job_id, 300)
    out = (tmp_path / f"slurm-{job_id}.out").read_text(errors="replace")
    assert info["JobState"] == "COMPLETED", out[-3000:]
    assert int(info["Restarts"]) == 1
    assert "stop requested" in out and "requeueing job" in out
    assert_resumed_where_stopped(all_logs(run_dir))  # the trainer's own logs/rank0.log
    steps = tb_steps(run_dir)
    assert steps and len(steps) == len(set(steps))


@pytest.mark.slurm
@pytest.mark.slow
def test_requeue_cap_fails_the_job(slurm: None, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    job_id = _submit_tiny(run_dir, max_requeues=0)
    wait_for(lambda: len(_checkpoints(run_dir)) >= 1, 240, "the first checkpoint")
    _run("scancel", "--signal=USR2", job_id)
    info = wait_job(job_id, 240)
    assert info["JobState"] == "FAILED"  # stopped cleanly, but no requeue left: not COMPLETED
    assert int(info["Restarts"]) == 0
    logs = all_logs(run_dir)
    assert "already requeued 0 times" in logs
    assert "exited with 75" in logs  # the trainer did stop at a checkpoint


@pytest.mark.slurm
@pytest.mark.slow
def test_time_limit_warning_stops_and_requeues(slurm: None, tmp_path: Path) -> None:
    # No manual signal here: SLURM itself sends USR2 --signal-lead-s before the 3-minute limit.
    # slurmctld checks every 30 s and may send it up to 30 s early, so it comes 30-60 s in:
    # after the trainer's start-up (a signal before it is submitit's to handle) and long
    # before the (too long to finish) run could end.
    run_dir = tmp_path / "run"
    job_id = _submit_tiny(run_dir, "train.total_images=16000", "--time", "3", "--signal-lead-s", "120")
    t0 = time.time()
    wait_for(lambda: "exited with 75" in all_logs(run_dir), 150, "the time-limit warning")
    took = time.time() - t0
    hold: list[float | None] = [None]

    def resumed() -> bool:
        hold[0] = release_requeue_hold(job_id, job_info(job_id), hold[0])
        return "resumed from" in all_logs(run_dir)

    wait_for(resumed, 120, "the requeued run to resume")
    info = job_info(job_id)
    _run("scancel", job_id)
    logs = all_logs(run_dir)
    assert int(info["Restarts"]) == 1, logs[-3000:]
    assert "received SIGUSR2" in logs or "caught SIGUSR2" in logs  # trainer / stand-in wording
    assert "exited with 75 (SIGUSR2)" in logs and "requeued job" in logs
    assert_resumed_where_stopped(logs)
    assert took < 150  # stopped by the warning, well before the 3-minute limit


@pytest.mark.slurm
def test_scancel_stops_with_a_checkpoint_and_stays_cancelled(slurm: None, tmp_path: Path) -> None:
    # scancel sends SIGTERM like a preemption; the launcher must not turn it into a requeue.
    run_dir = tmp_path / "run"
    job_id = _submit_tiny(run_dir, "train.total_images=16000")
    wait_for(lambda: len(_checkpoints(run_dir)) >= 1, 240, "the first checkpoint")
    _run("scancel", job_id)
    # Until the tasks are gone (a clean stop, a failure, or SIGKILL after KillWait).
    wait_for(lambda: _run("squeue", "-h", "-j", job_id, check=False).strip() == "", 90,
             "the cancelled job to end")
    time.sleep(3)  # a requeue would show up as PENDING with Restarts=1
    info = job_info(job_id)
    assert info["JobState"] == "CANCELLED" and int(info["Restarts"]) == 0
    logs = all_logs(run_dir)
    # SIGTERM reaches every rank (and the data-loader workers, which ignore it): a clean stop
    # with a checkpoint at one step, and the launcher leaves the job cancelled.
    assert "rank=0 trainer exited with 75" in logs
    assert "was cancelled: stopped at a checkpoint, not requeued (signal SIGTERM" in logs
