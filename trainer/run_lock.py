"""One live job per run directory, and a per-rank "last step reached" record.

``RunLock`` is held by rank 0 for the whole run: ``<run dir>/run.lock`` names the holder (host,
pid, SLURM job, torchrun run, since when) and carries a heartbeat refreshed by a thread. A
second job on the same run directory refuses at start-up with one line naming the holder. A
lock whose holder is dead is taken over with a warning; dead means its process is gone (same
host), its SLURM job has ended, or its heartbeat is older than ``stale_after_s`` (shared file
systems across nodes, where a pid means nothing). A requeue of the same SLURM job, or a
restart of the same torchrun run, takes the lock over at once.

``StepRecord`` is one small JSON file per rank, ``<run dir>/ranks/rank<k>.json``: host, pid,
the last step reached (and when), refreshed by a heartbeat thread. A rank that died or stopped
answering has the oldest heartbeat; ``diagnose()`` turns the files into one line naming it.

Standard library only: the SLURM launcher reads these files after a job step without importing
torch.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from data_pipeline.storage import atomic_write, is_fault, tmp_path, vanished, watch_dir

log = logging.getLogger("ddpm")

LOCK_NAME = "run.lock"
RANKS_DIR = "ranks"
# SLURM job states in which a job runs nothing (scontrol's JobState). Not SUSPENDED: a suspended
# job's processes are stopped, not gone, and continue when it resumes.
_NOT_RUNNING = ("BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
                "OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT", "PENDING", "REQUEUED")


class RunDirLocked(RuntimeError):
    """Another live job holds the run directory (the message is one line naming it)."""


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _proc_start(pid: int) -> str:
    """The kernel's start time of ``pid`` (field 22 of /proc/PID/stat), '' when unknown.

    Stored with the pid so a recycled pid is not mistaken for the holder."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _pid_namespace() -> str:
    """This process's pid namespace ('pid:[4026531836]'): pids compare only within one (containers)."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def pid_alive(pid: int, start: str = "") -> bool:
    """Whether process ``pid`` (started at ``start``, when known) still exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    now = _proc_start(pid)
    return not (start and now and now != start)


def _job_identity(environ: Mapping[str, str]) -> dict[str, Any]:
    """The SLURM job and torchrun run this process belongs to, with their restart counts."""
    return {
        "slurm_job": environ.get("SLURM_JOB_ID", ""),
        "slurm_restart": int(environ.get("SLURM_RESTART_COUNT", "0") or 0),
        "torchrun_run": environ.get("TORCHELASTIC_RUN_ID", ""),
        "torchrun_restart": int(environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0),
    }


def slurm_job_state(job_id: str) -> str:
    """SLURM's JobState of ``job_id`` ('' when scontrol is missing or does not know it)."""
    if not job_id or shutil.which("scontrol") is None:
        return ""
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True,
                             text=True, timeout=20).stdout
    except (subprocess.SubprocessError, OSError):
        return ""
    m = re.search(r"\bJobState=(\S+)", out)
    return m.group(1) if m else ""


@dataclass
class Holder:
    """What ``run.lock`` says about the job holding the run directory."""

    host: str
    pid: int
    pid_start: str
    since: float
    heartbeat: float
    token: str
    slurm_job: str = ""
    slurm_restart: int = 0
    torchrun_run: str = ""
    torchrun_restart: int = 0
    pid_ns: str = ""

    @classmethod
    def me(cls, environ: Mapping[str, str], now: float) -> Holder:
        """This process as a holder."""
        return cls(host=socket.gethostname(), pid=os.getpid(), pid_start=_proc_start(os.getpid()),
                   since=now, heartbeat=now, token=secrets.token_hex(8), pid_ns=_pid_namespace(),
                   **_job_identity(environ))

    def describe(self, now: float) -> str:
        """host, pid, SLURM job, since when, last heartbeat: for one-line messages."""
        job = f", SLURM job {self.slurm_job}" if self.slurm_job else ""
        if self.slurm_job and self.slurm_restart:
            job += f" (restart {self.slurm_restart})"
        if self.torchrun_run and not self.slurm_job:
            job += f", torchrun run {self.torchrun_run}"
        return (f"host {self.host} pid {self.pid}{job}, since {_utc(self.since)}, "
                f"heartbeat {max(0.0, now - self.heartbeat):.0f} s ago")


def _read_holder(path: Path) -> Holder | None:
    """The holder recorded in ``path``; None when the file is gone. Unreadable = a dead holder."""
    try:
        data = json.loads(path.read_text())
        return Holder(**{k: data[k] for k in Holder.__dataclass_fields__ if k in data})
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):
        # Truncated or foreign content: treat as a holder that can be taken over at once.
        return Holder(host="?", pid=0, pid_start="", since=0.0, heartbeat=0.0, token="corrupt")


def _write_synced(path: Path, text: str) -> Path:
    """Write ``text`` to ``path``, flushed and fsynced; returns ``path``."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return path


def _create_exclusive(path: Path, text: str) -> bool:
    """Create ``path`` with ``text`` only if it does not exist (atomic, NFS safe: a hard link)."""
    tmp = _write_synced(tmp_path(path), text)
    try:
        try:
            os.link(tmp, path)  # fails with EEXIST atomically, also over NFS (open(O_EXCL) did not, pre-v3)
            return True
        except FileExistsError:
            return False
        except OSError:
            # A file system without hard links: O_EXCL (atomic on local file systems and NFSv3+).
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            os.close(fd)
            _write_synced(path, text)  # ours alone: we just created it
            return True
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def takeover_reason(holder: Holder, me: Holder, now: float, stale_after_s: float,
                    job_state: Callable[[str], str] = slurm_job_state) -> str | None:
    """Why ``holder``'s lock may be taken over by ``me`` (None: it is live, refuse)."""
    if holder.token == "corrupt":
        return "the lock file is unreadable"
    if holder.host == me.host and holder.pid_ns == me.pid_ns:
        # Same host and pid namespace (not another container): the pid is authoritative. A live
        # but silent holder is stopped or hung, not dead; taking its run directory would race
        # its checkpoint writes.
        if holder.pid == me.pid and holder.pid_start == me.pid_start:
            return "it is this process (an earlier run in it did not release it)"
        return None if pid_alive(holder.pid, holder.pid_start) else "its process is gone"
    if holder.slurm_job and holder.slurm_job == me.slurm_job and me.slurm_restart > holder.slurm_restart:
        return f"this is requeue {me.slurm_restart} of the same SLURM job"
    if holder.slurm_job == me.slurm_job and holder.torchrun_run not in ("", "none") \
            and holder.torchrun_run == me.torchrun_run:
        # One torchrun run has one rank 0 at a time, and its agents stop every worker before a
        # restart; rank 0 may come back on another node, whose agent may count restarts
        # differently (a membership change does not use up a restart). torchrun's default
        # --rdzv-id, "none", says nothing about the run and is not trusted here.
        return "this is a restart of the same torchrun run"
    if now - holder.heartbeat > stale_after_s:
        return f"no heartbeat for {now - holder.heartbeat:.0f} s (> {stale_after_s:.0f} s)"
    if holder.slurm_job and holder.slurm_job != me.slurm_job:
        state = job_state(holder.slurm_job)
        if state in _NOT_RUNNING:
            return f"SLURM job {holder.slurm_job} is {state}"
    return None


class RunLock:
    """The run directory's lock, held by rank 0 while the job runs (see the module doc)."""

    def __init__(self, path: Path, holder: Holder, heartbeat_s: float) -> None:
        self.path = path
        self.holder = holder
        self.heartbeat_s = heartbeat_s
        self.lost: str | None = None  # set when another job took the lock over (we stalled too long)
        self.on_fault: Callable[[BaseException], None] | None = None  # a storage fault of the heartbeat
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def acquire(cls, run_dir: str | Path, *, stale_after_s: float = 120.0, heartbeat_s: float = 15.0,
                environ: Mapping[str, str] | None = None,
                job_state: Callable[[str], str] = slurm_job_state) -> RunLock:
        """Take ``<run_dir>/run.lock`` (taking over a dead holder's) and start its heartbeat.

        Raises RunDirLocked, with one line naming the live holder, when another job holds it.
        """
        env = os.environ if environ is None else environ
        path = Path(run_dir) / LOCK_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):  # a few rounds against another job starting at the same moment
            now = time.time()
            me = Holder.me(env, now)
            if _create_exclusive(path, json.dumps(asdict(me))):
                lock = cls(path, me, heartbeat_s)
                lock._start()
                atexit.register(lock.release)  # also when start-up fails before the loop releases it
                return lock
            holder = _read_holder(path)
            if holder is None:
                continue  # released between our attempt and the read
            reason = takeover_reason(holder, me, now, stale_after_s, job_state)
            if reason is None:
                silent = now - holder.heartbeat > stale_after_s  # only refused when its pid is alive here
                hint = ("it is alive but silent (stopped or hung?): kill it, or use another run.dir" if silent
                        else "stop it first, or use another run.dir")
                raise RunDirLocked(f"run directory {Path(run_dir)} is in use by another job "
                                   f"({holder.describe(now)}); {hint}")
            # Move the dead holder's file aside; of several jobs doing this, one wins the rename.
            aside = path.with_name(f".{LOCK_NAME}.stale-{me.token}")
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                continue
            moved = _read_holder(aside)
            if moved is not None and moved.token != holder.token:
                # Another job took it over between our read and our rename: put theirs back.
                with contextlib.suppress(OSError):
                    os.link(aside, path)
                aside.unlink(missing_ok=True)
                continue
            aside.unlink(missing_ok=True)
            log.warning("taking over the lock of run directory %s from a dead job (%s): %s",
                        run_dir, holder.describe(now), reason)
        raise RunDirLocked(f"run directory {Path(run_dir)}: could not take {path} (other jobs keep "
                           f"starting on it?); use another run.dir")

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._beat_loop, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self.beat()

    def beat(self) -> None:
        """Refresh the heartbeat (the thread does this every ``heartbeat_s``)."""
        if self.lost:
            return
        if (gone := vanished(self.path)) is not None:  # a storage fault, not a lock taken over
            if self.on_fault is not None:
                self.on_fault(gone)
            return
        try:
            current = _read_holder(self.path)
            if current is None or current.token != self.holder.token:
                who = current.describe(time.time()) if current else "nobody (deleted)"
                self.lost = f"run.lock of {self.path.parent} is now held by {who}"
                log.error("%s: this job lost the run directory; stop it", self.lost)
                return
            self.holder.heartbeat = time.time()
            atomic_write(self.path, json.dumps(asdict(self.holder)), what="run lock")
        except OSError as e:
            if is_fault(e) and self.on_fault is not None:
                self.on_fault(e)  # a full or read-only disk: every rank stops at the next step
            else:  # a file system hiccup: try again at the next beat
                log.warning("run lock heartbeat failed: %s", e)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock (only if this job still holds it)."""
        atexit.unregister(self.release)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        current = _read_holder(self.path)
        if current is not None and current.token == self.holder.token:
            with contextlib.suppress(OSError):  # a read-only remount: the next job takes a dead lock over
                self.path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- per-rank records


@dataclass
class RankStatus:
    """One rank's record: where it is and when it last answered."""

    rank: int
    host: str
    pid: int
    run: str  # shared by every rank of one attempt (rank 0 draws it at start-up)
    started: float
    slurm: str = ""  # SLURM job.restart of the attempt ('' outside SLURM)
    step: int = -1  # last step reached (-1: none yet)
    nimg: int = 0
    step_time: float = 0.0  # when that step was reached
    heartbeat: float = 0.0  # when the rank last answered (its heartbeat thread)
    state: str = "running"  # running | finished | stopped | failed
    extra: dict[str, Any] = field(default_factory=dict)


def slurm_attempt(environ: Mapping[str, str] | None = None) -> str:
    """SLURM's "job.restart" of this process ('' outside SLURM)."""
    ident = _job_identity(os.environ if environ is None else environ)
    return f"{ident['slurm_job']}.{ident['slurm_restart']}" if ident["slurm_job"] else ""


class StepRecord:
    """``<run dir>/ranks/rank<k>.json``: the last step this rank reached, refreshed by a heartbeat.

    ``reached(step, nimg)`` each step costs two assignments; ``write(step, nimg)`` (log steps)
    writes at once. The heartbeat thread keeps answering while the main thread waits in a
    collective, and stops when the process is stopped or dead: the rank with the oldest heartbeat
    is the one that stopped answering.
    """

    def __init__(self, run_dir: str | Path, rank: int, *, run: str = "", interval_s: float = 10.0,
                 environ: Mapping[str, str] | None = None) -> None:
        """``run``: an id every rank of this attempt shares (e.g. drawn by rank 0 and broadcast)."""
        self.path = Path(run_dir) / RANKS_DIR / f"rank{rank:05d}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.watch = watch_dir(run_dir)  # from now on no write lands where it was once it went away
        now = time.time()
        self.status = RankStatus(rank=rank, host=socket.gethostname(), pid=os.getpid(), run=run,
                                 started=now, slurm=slurm_attempt(environ), heartbeat=now,
                                 extra={"interval_s": interval_s})
        self.interval_s = interval_s
        self.on_fault: Callable[[BaseException], None] | None = None  # a storage fault of the heartbeat
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._flush()
        self._thread = threading.Thread(target=self._beat_loop, name=f"rank{rank}-heartbeat", daemon=True)
        self._thread.start()
        atexit.register(self.close, "exited")  # a start-up error before the loop closes it

    def reached(self, step: int, nimg: int) -> None:
        """Note that this rank reached ``step`` (in memory; the heartbeat writes it)."""
        first = self.status.step < 0
        self.status.step, self.status.nimg, self.status.step_time = step, nimg, time.time()
        if first:
            self._flush()  # training started: on record at once, not at the next heartbeat

    def diagnose_failure(self, world_size: int | None = None) -> str:
        """On a failure (e.g. a collective timed out): the rank(s) that went silent, also kept in
        this record for the launcher (the other ranks' heartbeats may resume once it is over)."""
        why = diagnose(self.path.parent.parent, run=self.status.run, world_size=world_size)
        if why:
            self.status.extra["diagnosis"] = why
        return why

    def write(self, step: int, nimg: int) -> None:
        """Note ``step`` and write the record now."""
        self.reached(step, nimg)
        self._flush()

    def close(self, state: str = "finished") -> None:
        """Stop the heartbeat and write the final state (finished, stopped, failed)."""
        atexit.unregister(self.close)
        self._stop.set()
        self._thread.join(timeout=5)
        self.status.state = state
        self._flush()
        self.watch.close()

    def _beat_loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._flush()

    def _flush(self) -> None:
        with self._lock:
            self.status.heartbeat = time.time()
            try:
                atomic_write(self.path, json.dumps(asdict(self.status)), what="run record")
            except OSError as e:
                if is_fault(e) and self.on_fault is not None:
                    self.on_fault(e)  # every rank stops at the next step, with this line
                else:
                    log.warning("could not write %s: %s", self.path, e)


def read_records(run_dir: str | Path, run: str | None = None, slurm: str | None = None) -> list[RankStatus]:
    """The rank records of one attempt: ``run``, else the most recently started one (of SLURM
    attempt ``slurm``, when given). Records left by earlier attempts are not mixed in."""
    out: list[RankStatus] = []
    for p in sorted((Path(run_dir) / RANKS_DIR).glob("rank*.json")):
        try:
            data = json.loads(p.read_text())
            out.append(RankStatus(**{k: data[k] for k in RankStatus.__dataclass_fields__ if k in data}))
        except (OSError, ValueError, TypeError):
            continue
    if slurm is not None:
        out = [r for r in out if r.slurm == slurm]
    if not out:
        return out
    if run is None:
        run = max(out, key=lambda r: r.started).run
    return sorted((r for r in out if r.run == run), key=lambda r: r.rank)


def diagnose(run_dir: str | Path, *, run: str | None = None, slurm: str | None = None,
             world_size: int | None = None) -> str:
    """One line naming the rank(s) that stopped answering first, or '' when nothing stands out.

    A rank whose heartbeat stopped well before the newest one (more than two heartbeat
    intervals) while it had not finished died or was stopped (SIGKILL, OOM kill, node loss,
    SIGSTOP) while the others waited for it in a collective. When every rank kept answering,
    ranks that keep answering but stay behind the others' step are named (a rank stuck in a GPU
    kernel or a collective).
    """
    recs = read_records(run_dir, run, slurm)
    if not recs:
        return ""
    missing = sorted(set(range(world_size)) - {r.rank for r in recs}) if world_size else []
    if missing:
        return (f"rank(s) {', '.join(map(str, missing))} never wrote {RANKS_DIR}/rank<k>.json: "
                f"they did not start training (see their logs)")
    newest = max(r.heartbeat for r in recs)
    gap = 2.0 * max(float(r.extra.get("interval_s", 10.0)) for r in recs) + 1.0
    silent = sorted((r for r in recs if r.state == "running" and newest - r.heartbeat > gap),
                    key=lambda r: r.heartbeat)
    clock = lambda t: time.strftime("%H:%M:%S", time.gmtime(t)) + " UTC"  # noqa: E731
    if silent:
        first = silent[0]
        others = [r for r in recs if r not in silent]
        line = (f"rank {first.rank} (host {first.host}, pid {first.pid}) stopped answering first: "
                f"last heartbeat {clock(first.heartbeat)}, {newest - first.heartbeat:.0f} s before "
                f"the others' (it was at step {first.step} then"
                + (f"; the others reached step {max(r.step for r in others)})" if others else ")"))
        if len(silent) > 1:
            line += f"; also silent: rank(s) {', '.join(str(r.rank) for r in silent[1:])}"
        return line
    if any(r.state != "running" for r in recs):
        return ""  # after the end, a step count left behind says nothing
    top = max(r.step for r in recs)
    reached_top = min(r.step_time for r in recs if r.step == top)
    # Behind only if it answered after the others got there: alive, but not advancing.
    behind = [r for r in recs if r.step < top and r.heartbeat > reached_top]
    if behind and len(behind) < len(recs):
        names = ", ".join(f"{r.rank} (host {r.host}, step {r.step})" for r in behind)
        return f"every rank kept answering, but rank(s) {names} did not reach step {top} like the others"
    return ""


def explain_failure(run_dir: str | Path, *, slurm: str | None = None, world_size: int | None = None,
                    lost: list[int] | None = None) -> list[str]:
    """After an attempt failed: the first rank's own diagnosis (made when its collective failed),
    else one from the records now, and where each ``lost`` rank (no exit code) was last seen."""
    recs = read_records(run_dir, slurm=slurm)
    lines = []
    noted = sorted((r for r in recs if r.extra.get("diagnosis")), key=lambda r: r.heartbeat)
    if noted:
        lines.append(f"rank {noted[0].rank} reported: {noted[0].extra['diagnosis']}")
    elif why := diagnose(run_dir, run=recs[0].run if recs else None, world_size=world_size):
        lines.append(why)
    for r in recs:
        if lost and r.rank in lost:
            lines.append(f"rank {r.rank} (host {r.host}, pid {r.pid}) was last seen at step {r.step}, "
                         f"heartbeat {time.strftime('%H:%M:%S', time.gmtime(r.heartbeat))} UTC")
    return lines
