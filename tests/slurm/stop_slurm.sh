#!/usr/bin/env bash
# Stop the daemons that setup_slurm.sh started (and only those), in reverse order.
set -uo pipefail

state="${DDPM_SLURM_STATE:-/var/spool/ddpm-slurm}"
started="$state/started"
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo -n "$@"; fi; }
log() { echo "[stop_slurm] $*" >&2; }

[ -f "$started" ] || { log "nothing was started by setup_slurm.sh"; exit 0; }

stop_pidfile() {  # name pidfile
    local pid
    pid="$(cat "$2" 2>/dev/null || true)"
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        as_root kill -TERM "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && as_root kill -KILL "$pid"
        log "$1 (pid $pid) stopped"
    fi
}

# One slurmd per node ("slurmd <node>"; plain "slurmd" from the former single-node setup).
while read -r name node; do
    [ "$name" = slurmd ] || continue
    if [ -n "$node" ]; then stop_pidfile "slurmd -N $node" "$state/slurmd-$node.pid"
    else stop_pidfile slurmd "$state/slurmd.pid"; fi
done < "$started"
grep -qx slurmctld "$started" && stop_pidfile slurmctld "$state/slurmctld.pid"
if grep -qx munged "$started"; then
    for f in /run/munge/munged.pid /var/run/munge/munged.pid; do
        [ -f "$f" ] && { stop_pidfile munged "$f"; break; }
    done
fi
as_root rm -f "$started"
exit 0
