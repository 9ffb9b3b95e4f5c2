"""Derive the torchrun-style distributed environment from SLURM's (no submitit needed)."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
from collections.abc import Mapping

# Exit code with which the trainer says "stopped cleanly at a checkpoint, resume me"
# (trainer.errors.EXIT_REQUEUE and EXIT_STORAGE; repeated here so the launcher never imports
# training code just to read a constant; tests/unit/test_launch.py checks they agree).
EXIT_REQUEUE = 75
EXIT_STORAGE = 74

# MASTER_PORT range: above the well-known and registered ports most clusters use, below the
# Linux ephemeral range (32768+) so the kernel never hands it to an outgoing connection.
_PORT_BASE = 15000
_PORT_SPAN = 15000


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM hostlist like "gpu[01-03,7],cpu5" into host names, without scontrol."""
    hosts: list[str] = []
    # Split on commas that are outside brackets.
    for group in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", nodelist):
        prefixes = [""]
        for literal, ranges in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", group):
            prefixes = [p + literal for p in prefixes]
            if ranges:
                suffixes: list[str] = []
                for part in ranges.split(","):
                    lo, _, hi = part.partition("-")
                    if hi:
                        # Zero padding follows the lower bound ("01-10" -> 01, 02, ..., 10).
                        suffixes += [f"{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1)]
                    else:
                        suffixes.append(lo)
                prefixes = [p + s for p in prefixes for s in suffixes]
        hosts += [p for p in prefixes if p]
    return hosts


def first_host(nodelist: str) -> str:
    """First host of a SLURM hostlist: `scontrol show hostnames` when present, else parsed here."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist],
                check=True,
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError):
            pass  # fall back to our own parser below
    hosts = expand_nodelist(nodelist)
    if not hosts:
        raise ValueError(f"empty SLURM node list: {nodelist!r}")
    return hosts[0]


def tasks_per_node(spec: str) -> list[int]:
    """Expand SLURM_TASKS_PER_NODE ("2(x3),1") into one task count per node ([2, 2, 2, 1])."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None:
            raise ValueError(f"cannot parse SLURM_TASKS_PER_NODE={spec!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def master_port(job_id: str, restart_count: int = 0) -> int:
    """A port every task of a job computes alike; it moves on each requeue so a socket
    of the previous run still in TIME_WAIT cannot block the new rendezvous."""
    digits = re.sub(r"\D", "", job_id) or "0"
    return _PORT_BASE + (int(digits) * 7 + restart_count) % _PORT_SPAN


def restart_count(environ: Mapping[str, str]) -> int:
    """How many times SLURM has requeued this job (0 on the first run)."""
    return int(environ.get("SLURM_RESTART_COUNT", "0") or 0)


def torchrun_env(environ: Mapping[str, str]) -> dict[str, str]:
    """RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT for one SLURM task."""
    try:
        rank = int(environ["SLURM_PROCID"])
        world = int(environ["SLURM_NTASKS"])
        job_id = environ["SLURM_JOB_ID"]
    except KeyError as e:
        raise RuntimeError(f"not inside a SLURM task ({e.args[0]} is unset)") from None
    local_rank = int(environ.get("SLURM_LOCALID", "0"))
    node_id = int(environ.get("SLURM_NODEID", "0"))
    if "SLURM_TASKS_PER_NODE" in environ:
        # Exact even when nodes hold different task counts ("2(x3),1").
        local_world = tasks_per_node(environ["SLURM_TASKS_PER_NODE"])[node_id]
    elif "SLURM_NTASKS_PER_NODE" in environ:
        local_world = int(environ["SLURM_NTASKS_PER_NODE"])
    else:
        local_world = world
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    addr = first_host(nodelist) if nodelist else socket.gethostname()
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(local_rank),
        "LOCAL_WORLD_SIZE": str(local_world),
        "MASTER_ADDR": addr,
        "MASTER_PORT": str(master_port(job_id, restart_count(environ))),
    }


def job_state(job_id: str) -> str:
    """SLURM's JobState of a job ("RUNNING", "CANCELLED", ...), or "" when scontrol cannot tell."""
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True,
                             text=True, timeout=60).stdout
    except (subprocess.SubprocessError, OSError):
        return ""
    m = re.search(r"\bJobState=(\S+)", out)
    return m.group(1) if m else ""


def partition_nodes(partition: str | None) -> tuple[str, int] | None:
    """(name, node count) of ``partition`` (None: the default one), or None when SLURM cannot tell."""
    cmd = ["scontrol", "show", "partition", "-o"] + ([partition] if partition else [])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    except (subprocess.SubprocessError, OSError):
        return None
    for line in out.splitlines():
        fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        if partition is None and fields.get("Default") != "YES":
            continue
        if "PartitionName" in fields and fields.get("TotalNodes", "").isdigit():
            return fields["PartitionName"], int(fields["TotalNodes"])
    return None
