"""Submit a multi-node DDPM training job to SLURM through submitit, requeued until it finishes.

One SLURM task per GPU. Each task maps SLURM's environment onto torchrun's (launch.slurm_env),
runs the trainer in-process and records its exit code in the run directory. ``srun
--kill-on-bad-exit`` ends every task as soon as one fails or dies (a lost rank never leaves the
others hanging), and the batch script decides once, after the step (``after_step``):

- every rank exited 0: finished; the job completes.
- every rank exited 75 (EXIT_REQUEUE): the trainer caught the time-limit/preemption signal
  (SLURM sends ``--signal=USR2@<lead>``), every rank stopped at the same step and one
  checkpoint was written: ``scontrol requeue``, until ``--max-requeues`` requeues were made.
- 2 (bad config, or a run directory held by another job): the job fails, not requeued.
- a crash or a lost rank (1, killed, hung past ``dist.timeout_s``): requeued when the run made
  progress since this (re)start (``checkpoints/latest`` moved); failed with one line when it
  crashed again at the same checkpoint, so a crash that repeats is not retried forever.

Usage:
    python -m launch.submit --config configs/lsun_church_256.yaml --nodes 8 --gpus-per-node 8 \
        --partition gpu --time 3-00:00:00 --run-dir /shared/runs/church run.name=church
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from data_pipeline.storage import atomic_write
from launch import slurm_env

_REPO_ROOT = Path(__file__).resolve().parent.parent


def parse_time_min(text: str) -> int:
    """SLURM time ("MM", "HH:MM:SS", "D-HH[:MM[:SS]]", "MM:SS") to whole minutes (rounded up)."""
    days, _, rest = text.partition("-") if "-" in text else ("0", "", text)
    parts = [int(p) for p in rest.split(":")]
    if "-" in text:
        # After a day count the fields are hours[:minutes[:seconds]] (sbatch(1)).
        parts += [0] * (3 - len(parts))
        h, m, s = parts
    elif len(parts) == 1:
        h, m, s = 0, parts[0], 0
    elif len(parts) == 2:
        h, m, s = 0, parts[0], parts[1]
    elif len(parts) == 3:
        h, m, s = parts
    else:
        raise ValueError(f"bad SLURM time {text!r}")
    total_s = ((int(days) * 24 + h) * 60 + m) * 60 + s
    if total_s <= 0:
        raise ValueError(f"time limit must be positive: {text!r}")
    return -(-total_s // 60)


def config_path(config: str) -> str:
    """A config file as an absolute path (jobs may start elsewhere); preset names map to configs/."""
    for candidate in (Path(config), _REPO_ROOT / "configs" / f"{config}.yaml"):
        if candidate.is_file():
            return str(candidate.absolute())
    return config  # left to the trainer, which fails the job once with a config error


def resolve_run_dir(config: str | None, overrides: Sequence[str], run_dir: str | None) -> Path:
    """The run directory the trainer will use: --run-dir > run.dir= > config file > runs/<run.name>."""
    values = dict(o.split("=", 1) for o in overrides if "=" in o)
    if run_dir:
        return Path(run_dir).absolute()
    if values.get("run.dir"):
        return Path(values["run.dir"]).absolute()
    cfg: dict[str, Any] = {}
    path = Path(config_path(config)) if config else None
    if path is not None and path.is_file():
        with open(path) as f:
            cfg = yaml.safe_load(f) or {}
    run = cfg.get("run") or {}
    if run.get("dir"):
        return Path(run["dir"]).absolute()
    name = values.get("run.name") or run.get("name") or "ddpm"
    return Path("runs", str(name)).absolute()


@dataclass
class Outcome:
    """What one task's trainer returned (``<run dir>/slurm/outcomes/<job>.<restart>/rank<k>.json``)."""

    rank: int
    host: str
    code: int
    signal: str | None = None  # the signal behind an exit 75 (SIGUSR2: time limit; SIGTERM: scancel)
    time: float = 0.0  # when the trainer returned: the first failure is the cause, the rest follow


def outcome_dir(run_dir: str | Path, job_id: str, restarts: int) -> Path:
    """Where the tasks of one run of a job record their trainer's exit code."""
    return Path(run_dir) / "slurm" / "outcomes" / f"{job_id}.{restarts}"


def read_outcomes(run_dir: str | Path, job_id: str, restarts: int) -> dict[int, Outcome]:
    """The recorded outcomes of one run of a job, by rank (killed tasks recorded nothing)."""
    out: dict[int, Outcome] = {}
    for p in outcome_dir(run_dir, job_id, restarts).glob("rank*.json"):
        try:
            o = Outcome(**json.loads(p.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        out[o.rank] = o
    return out


def latest_checkpoint(run_dir: str | Path) -> str:
    """The name ``<run dir>/checkpoints/latest`` points at ('' before the first checkpoint)."""
    try:
        return (Path(run_dir) / "checkpoints" / "latest").read_text().strip()
    except OSError:
        return ""


def _ranks(ranks: Sequence[int]) -> str:
    return ", ".join(str(r) for r in sorted(ranks))


def decide_after_step(outcomes: dict[int, Outcome], world: int, job_id: str, restarts: int,
                      max_requeues: int, start_ckpt: str, end_ckpt: str) -> tuple[str, int, str]:
    """What the job does once its step ended: (action, exit code, one line).

    action is "done", "requeue", "fail" or "leave" (stopped by scancel or a preemption: SLURM
    decides). A crash is requeued only when the run made progress since this (re)start.
    """
    codes = {r: o.code for r, o in outcomes.items()}
    lost = [r for r in range(world) if r not in codes]
    cap = f"job {job_id} was already requeued {restarts} times (--max-requeues {max_requeues})"
    if not lost and set(codes.values()) == {0}:
        return "done", 0, f"job {job_id} finished"
    if 2 in codes.values():
        bad = [r for r, c in codes.items() if c == 2]
        return "fail", 2, (f"job {job_id} failed: configuration error on rank(s) {_ranks(bad)} (trainer exit "
                           f"code 2); not requeued. The error is in the rank logs")
    if slurm_env.EXIT_STORAGE in codes.values():
        bad = [r for r, c in codes.items() if c == slurm_env.EXIT_STORAGE]
        return "fail", slurm_env.EXIT_STORAGE, (
            f"job {job_id} failed: a storage fault (full disk, quota, read-only or vanished filesystem) stopped "
            f"rank(s) {_ranks(bad)} (trainer exit code {slurm_env.EXIT_STORAGE}); not requeued: a requeue would "
            f"meet the same disk. The rank logs name the path; free space and submit the same command again")
    if not lost and set(codes.values()) <= {0, slurm_env.EXIT_REQUEUE}:
        sigs = {o.signal for o in outcomes.values() if o.signal}
        if sigs & {"SIGTERM", "SIGINT"}:
            return "leave", 0, (f"job {job_id} stopped at a checkpoint by {'/'.join(sorted(sigs))} (scancel or "
                                f"preemption): not requeued by the launcher; resume by submitting the same command")
        if restarts >= max_requeues:
            return "fail", 1, (f"trainer stopped at a checkpoint but {cap}; resubmit the same command to "
                               f"continue")
        return "requeue", 0, (f"requeued job {job_id} ({restarts + 1}/{max_requeues}): every rank stopped at "
                              f"a checkpoint ({'/'.join(sorted(sigs)) or 'signal'})")
    what = []
    if lost:
        what.append(f"rank(s) {_ranks(lost)} ended without an exit code (killed: SIGKILL, the OOM killer, "
                    f"a lost node, or ended by srun after another rank failed)")
    failed = sorted((o.time, r, o.code) for r, o in outcomes.items() if o.code not in (0, slurm_env.EXIT_REQUEUE))
    if failed:
        _, r, c = failed[0]
        what.append(f"rank {r} exited with {c}" + (" first" if len(failed) > 1 else "")
                    + "".join(f", then rank {r2} with {c2}" for _, r2, c2 in failed[1:4])
                    + (" ..." if len(failed) > 4 else ""))
    cause = "; ".join(what) or "the step failed"
    if not end_ckpt or end_ckpt == start_ckpt:
        where = f"at the same checkpoint {end_ckpt}" if end_ckpt else "before its first checkpoint"
        return "fail", 1, (f"job {job_id} failed: {cause}. It crashed {where} (no progress since this "
                           f"(re)start), so it is not requeued: a crash that repeats is not retried forever")
    progress = f"checkpoint {start_ckpt or '(none)'} -> {end_ckpt}"
    if restarts >= max_requeues:
        return "fail", 1, f"job {job_id} failed: {cause}; it made progress ({progress}) but {cap}"
    return "requeue", 0, (f"requeued job {job_id} ({restarts + 1}/{max_requeues}) after a crash: {cause}; "
                          f"the run made progress since this (re)start ({progress})")


def _load_entry(spec: str) -> Callable[[list[str]], Any]:
    """Import "package.module:function"."""
    module, _, fn = spec.partition(":")
    return getattr(importlib.import_module(module), fn or "run")


def _outcome(result: Any) -> tuple[int, str | None]:
    """(exit code, agreed stop signal) from an entry's result: an int, or an object with .code/.signal."""
    if hasattr(result, "code"):
        return int(result.code), getattr(result, "signal", None)
    return int(result), None


def _log(msg: str) -> None:
    print(f"[launch] {msg}", flush=True)


@dataclass
class TrainTask:
    """The callable submitit runs once per SLURM task (one per GPU)."""

    argv: list[str]
    run_dir: str
    max_requeues: int
    compile_cache: str | None = None
    entry: str = "trainer.main:run"  # returns trainer.errors.Outcome (exit code, agreed stop signal)
    extra_env: dict[str, str] = field(default_factory=dict)

    def __call__(self) -> int:
        """Set up torchrun's environment from SLURM's, train, then finish, requeue or fail."""
        os.environ.update(self.extra_env)
        # Like torchrun: one OpenMP thread per allotted CPU, not one per core of the node,
        # or every rank's intra-op pool oversubscribes the node (set before torch loads).
        os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("SLURM_CPUS_PER_TASK", "1"))
        env = slurm_env.torchrun_env(os.environ)
        os.environ.update(env)
        # Every rank and every requeue share one inductor cache, so a requeued job reuses the
        # compiled kernels instead of paying the whole torch.compile again.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = self.compile_cache or str(
            Path(self.run_dir) / "inductor_cache"
        )
        rank = int(env["RANK"])
        restarts = slurm_env.restart_count(os.environ)
        job_id = os.environ["SLURM_JOB_ID"]
        _log(
            f"host={socket.gethostname()} node={os.environ.get('SLURMD_NODENAME', '?')} "
            f"rank={rank}/{env['WORLD_SIZE']} "
            f"local_rank={env['LOCAL_RANK']}/{env['LOCAL_WORLD_SIZE']} "
            f"master={env['MASTER_ADDR']}:{env['MASTER_PORT']} job={job_id} restart={restarts} "
            f"inductor_cache={os.environ['TORCHINDUCTOR_CACHE_DIR']}"
        )
        try:
            code, sig = _outcome(_load_entry(self.entry)(list(self.argv)))
        except Exception:  # the trainer returns exit codes; anything escaping it is a crash (1)
            traceback.print_exc()
            code, sig = 1, None
        sig = sig if code == slurm_env.EXIT_REQUEUE else None
        # Recorded for the batch script, which decides once every task has ended (after_step).
        rec = outcome_dir(self.run_dir, job_id, restarts) / f"rank{rank}.json"
        try:
            atomic_write(rec, json.dumps(asdict(Outcome(rank=rank, host=socket.gethostname(), code=code,
                                                        signal=sig, time=time.time()))), what="task outcome")
        except OSError as e:  # the run directory's disk failed: the lost record reads as a crash of this rank
            _log(f"rank={rank}: {e}")
        _log(f"rank={rank} trainer exited with {code}" + (f" ({sig})" if sig else ""))
        if code == 0:
            return code
        if code == slurm_env.EXIT_REQUEUE:
            state = slurm_env.job_state(job_id) if rank == 0 else ""
            if state.startswith("CANCELLED") or sig in ("SIGTERM", "SIGINT"):
                _log(f"job {job_id} was cancelled: stopped at a checkpoint, not requeued "
                     f"(signal {sig or '?'}, state {state or '?'}); resume by submitting the same command")
            # A clean stop ends the task with 0 so srun --kill-on-bad-exit leaves the other ranks
            # alone; SystemExit, not a return: submitit must not write a result, the job is not over.
            raise SystemExit(0)
        # srun --kill-on-bad-exit now ends the other ranks; the batch script decides what follows.
        raise SystemExit(code)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Used by submitit's own USR2 handler, which is active only before the trainer starts."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The submit CLI's arguments."""
    p = argparse.ArgumentParser(
        prog="ddpm-submit",
        description="Submit DDPM training to SLURM (one task per GPU, requeued at time limits).",
    )
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.lr=1e-4")
    p.add_argument("--config", help="YAML preset, as for trainer/main.py")
    p.add_argument("--run-dir", help="run directory (default: the config's run.dir or runs/<run.name>)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node; 0 for a CPU job")
    p.add_argument("--tasks-per-node", type=int, help="default: --gpus-per-node (one task per GPU)")
    p.add_argument("--cpus-per-task", type=int, default=None)
    p.add_argument("--mem", help="memory per node, e.g. 480G (sbatch --mem)")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--time", default="1-00:00:00", help="time limit per run of the job, SLURM syntax")
    p.add_argument("--constraint")
    p.add_argument("--exclude", help="nodes to avoid, SLURM hostlist")
    p.add_argument("--job-name", default=None, help="default: ddpm-<run dir name>")
    p.add_argument(
        "--signal-lead-s",
        type=int,
        default=180,
        help="seconds before the time limit at which SLURM sends USR2 (time to stop and checkpoint)",
    )
    p.add_argument("--max-requeues", type=int, default=50)
    p.add_argument("--compile-cache", help="TORCHINDUCTOR_CACHE_DIR (default <run dir>/inductor_cache)")
    p.add_argument(
        "--setup",
        action="append",
        default=[],
        help="shell line to run in the job before srun (repeatable), e.g. 'module load cuda'",
    )
    p.add_argument("--sbatch", action="append", default=[], help="extra sbatch option KEY=VALUE")
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE set in every task")
    p.add_argument("--entry", default="trainer.main:run", help=argparse.SUPPRESS)
    # Used by the job's own batch script after its step (see after_step), not by people.
    p.add_argument("--after-step", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--srun-exit", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--start-checkpoint", default="", help=argparse.SUPPRESS)
    p.add_argument("--dry-run", action="store_true", help="print the job script and resources only")
    return p


def job_parameters(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    """submitit SlurmExecutor parameters (sbatch options) for the parsed CLI."""
    tasks = args.tasks_per_node if args.tasks_per_node is not None else max(args.gpus_per_node, 1)
    if args.gpus_per_node and tasks != args.gpus_per_node:
        raise ValueError("one task per GPU: --tasks-per-node must equal --gpus-per-node")
    extra: dict[str, Any] = {"requeue": True}  # SLURM may also requeue us itself (node failure)
    if args.mem:
        extra["mem"] = args.mem  # passed verbatim; submitit's `mem` wants GB numbers
    for kv in args.sbatch:
        k, _, v = kv.partition("=")
        extra[k.lstrip("-").replace("-", "_")] = v if v else True
    latest = shlex.quote(str(run_dir / "checkpoints" / "latest"))
    params: dict[str, Any] = {
        "job_name": args.job_name or f"ddpm-{run_dir.name}",
        "nodes": args.nodes,
        "ntasks_per_node": tasks,
        "time": parse_time_min(args.time),
        "signal_delay_s": args.signal_lead_s,
        "setup": [f"export PYTHONPATH={shlex.quote(str(_REPO_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}"]
        + list(args.setup)
        # The checkpoint this (re)start resumes from: a crash after which `latest` moved on made
        # progress and is requeued; one at the same checkpoint is not (after_step).
        + [f"ddpm_start_checkpoint=$(cat {latest} 2>/dev/null || true)"],
        # One task that fails or dies ends every task of the step at once (SIGTERM, then SIGKILL
        # after KillWait), instead of leaving them waiting in a collective.
        "srun_args": ["--kill-on-bad-exit=1"],
        # After the step, in the batch shell (alive whichever task died): finish, requeue or fail.
        "teardown": [
            f"{shlex.quote(sys.executable)} -m launch.submit --after-step --srun-exit $? "
            f"--run-dir {shlex.quote(str(run_dir))} --max-requeues {args.max_requeues} "
            f'--start-checkpoint "$ddpm_start_checkpoint"'
        ],
        "additional_parameters": extra,
    }
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    for key in ("cpus_per_task", "partition", "account", "qos", "constraint", "exclude"):
        if getattr(args, key) is not None:
            params[key] = getattr(args, key)
    return params


def make_task(args: argparse.Namespace, run_dir: Path) -> TrainTask:
    """The per-task callable: trainer argv with the run directory pinned."""
    argv = (["--config", config_path(args.config)] if args.config else []) + [
        o for o in args.overrides if not o.startswith("run.dir=")
    ]
    argv.append(f"run.dir={run_dir}")
    return TrainTask(
        argv=argv,
        run_dir=str(run_dir),
        max_requeues=args.max_requeues,
        compile_cache=args.compile_cache,
        entry=args.entry,
        extra_env=dict(kv.split("=", 1) for kv in args.env),
    )


def check_trainer_config(task: TrainTask, world_size: int) -> None:
    """Resolve and check the trainer's config exactly as every task's trainer will; ValueError (one line).

    The same parsing (trainer.main), preset lookup, file, overrides and field checks, and the batch
    plan for the job's world size: a mistake is named here instead of by a job that queued for hours.
    """
    if task.entry != TrainTask.entry:  # another entry point (the tests' stand-in) has its own contract
        return
    # Imported here: launch/ stays free of torch until a submission is checked.
    from trainer.config import ConfigError, load_config, plan_batches
    from trainer.main import find_config, parse_args

    try:
        targs = parse_args(list(task.argv))
        plan_batches(load_config(find_config(targs.config), targs.overrides), world_size)
    except (ConfigError, FileNotFoundError) as e:
        raise ValueError(f"config error: {e} (every rank of the job would stop on it; nothing submitted)") from None


def submit(argv: Sequence[str]) -> str:
    """Submit the job described by CLI-style argv; returns the SLURM job id ("" on --dry-run)."""
    args = build_parser().parse_args(argv)
    run_dir = resolve_run_dir(args.config, args.overrides, args.run_dir)
    params = job_parameters(args, run_dir)
    task = make_task(args, run_dir)
    folder = run_dir / "slurm"
    world_size = args.nodes * params["ntasks_per_node"]
    from submitit.slurm import slurm as submitit_slurm  # the only place submitit is used

    if args.dry_run:
        check_trainer_config(task, world_size)
        command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
        print(submitit_slurm._make_sbatch_string(command=command, folder=folder, **params))
        n = args.nodes * params["ntasks_per_node"]
        print(f"# resources: {args.nodes} node(s) x {params['ntasks_per_node']} task(s) = {n} rank(s), "
              f"{args.gpus_per_node} GPU(s)/node, time {params['time']} min per run, "
              f"USR2 {args.signal_lead_s}s before the limit, up to {args.max_requeues} requeues")
        print(f"# run dir: {run_dir}  (per-rank logs: {folder}/<jobid>_<rank>_log.{{out,err}})")
        print(f"# each task runs: {task.entry} {shlex.join(task.argv)}")
        print(f"# TORCHINDUCTOR_CACHE_DIR={task.compile_cache or run_dir / 'inductor_cache'}")
        return ""
    part = slurm_env.partition_nodes(args.partition)
    if part is not None and args.nodes > part[1]:
        # sbatch would refuse with "Node count specification invalid" and a traceback.
        raise ValueError(f"--nodes {args.nodes} but partition {part[0]} has {part[1]} node(s) (scontrol show "
                         f"partition {part[0]}): ask for at most {part[1]}, or pick another --partition")
    check_trainer_config(task, world_size)
    run_dir.mkdir(parents=True, exist_ok=True)
    executor = submitit_slurm.SlurmExecutor(folder=folder, max_num_timeout=args.max_requeues)
    executor.update_parameters(**params)
    job = executor.submit(task)
    print(f"submitted job {job.job_id}: {args.nodes} node(s) x {params['ntasks_per_node']} task(s)")
    print(f"run dir:  {run_dir}")
    print(f"logs:     {folder}/{job.job_id}_<rank>_log.out / .err")
    print(f"watch:    tensorboard --logdir {run_dir}/tb    squeue -j {job.job_id}")
    return str(job.job_id)


def after_step(run_dir: Path, max_requeues: int, srun_exit: int, start_ckpt: str,
               environ: dict[str, str] | None = None) -> int:
    """In the batch script once the step ended: finish, requeue or fail the job; the job's exit code."""
    env = dict(os.environ if environ is None else environ)
    job_id = env["SLURM_JOB_ID"]
    restarts = slurm_env.restart_count(env)
    world = int(env.get("SLURM_NTASKS") or 0) or max(read_outcomes(run_dir, job_id, restarts), default=0) + 1
    outcomes = read_outcomes(run_dir, job_id, restarts)
    end_ckpt = latest_checkpoint(run_dir)
    action, code, line = decide_after_step(outcomes, world, job_id, restarts, max_requeues, start_ckpt,
                                           end_ckpt)
    if action in ("requeue", "fail") and code not in (2, slurm_env.EXIT_STORAGE):
        from trainer.run_lock import explain_failure  # standard library only: no torch here

        lost = [r for r in range(world) if r not in outcomes]
        for why in explain_failure(run_dir, slurm=f"{job_id}.{restarts}", world_size=world, lost=lost):
            _log(why)
    if action == "requeue" and slurm_env.job_state(job_id).startswith("CANCELLED"):
        action, code, line = "leave", 0, f"job {job_id} was cancelled: not requeued"
    _log(f"{line} (srun exit {srun_exit})" if action == "fail" else line)
    if action == "requeue":
        r = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            # E.g. SLURM is already requeueing a preempted job itself.
            _log(f"scontrol requeue {job_id} failed: {r.stderr.strip()}; resume by submitting the same command")
            return 1
    sys.stdout.flush()
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry (console script `ddpm-submit`): 0 when submitted (or dry-run), 2 on bad arguments."""
    args_list = sys.argv[1:] if argv is None else list(argv)
    if "--after-step" in args_list:
        a = build_parser().parse_args(args_list)
        return after_step(Path(a.run_dir), a.max_requeues, a.srun_exit, a.start_checkpoint)
    try:
        submit(args_list)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
