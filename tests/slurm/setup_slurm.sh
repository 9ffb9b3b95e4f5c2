#!/usr/bin/env bash
# Start a two-node SLURM on this one machine (munged, slurmctld, and one `slurmd -N <node>` per
# node, each on its own port) for the integration tests; the node names resolve to 127.0.0.1
# through /etc/hosts, as MASTER_ADDR is taken from the job's node list.
# Idempotent: a SLURM that already answers with both nodes up is reused untouched; one running
# another configuration written by this script (e.g. the former single-node one) is restarted.
# Installs the Debian packages when they are missing (needs root or sudo).
# What this script starts is recorded in $DDPM_SLURM_STATE/started, which stop_slurm.sh reads.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
state="${DDPM_SLURM_STATE:-/var/spool/ddpm-slurm}"
conf=/etc/slurm/slurm.conf
marker="ddpm-scale test cluster"
host="$(hostname -s)"
nodes=(ddpmnode1 ddpmnode2)
ctld_port="${DDPM_SLURMCTLD_PORT:-6817}"
slurmd_port="${DDPM_SLURMD_PORT:-6818}"  # node k listens on slurmd_port + k - 1

log() { echo "[setup_slurm] $*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo -n "$@"; fi; }

node_state() { sinfo -h -n "$1" -o '%T' 2>/dev/null | head -1 | tr -d '*~#'; }
all_up() {
    local n
    for n in "${nodes[@]}"; do
        case "$(node_state "$n" || true)" in idle|mixed|allocated) ;; *) return 1 ;; esac
    done
}

if command -v sinfo >/dev/null && all_up; then
    log "SLURM already running (nodes ${nodes[*]} up); reusing it"
    exit 0
fi

# 1. Packages.
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
    || ! command -v munged >/dev/null; then
    log "installing slurmctld slurmd slurm-client munge"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
fi

as_root mkdir -p "$state/ctld" "$state/d"
started="$state/started"
as_root touch "$started"

# 2. munge: key, socket dir, daemon.
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    as_root mkdir -p /run/munge /etc/munge /var/lib/munge /var/log/munge
    if [ ! -s /etc/munge/munge.key ]; then
        log "creating /etc/munge/munge.key"
        as_root dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    if id munge >/dev/null 2>&1; then
        as_root chown -R munge:munge /run/munge /etc/munge /var/lib/munge /var/log/munge
        as_root chmod 0700 /etc/munge && as_root chmod 0400 /etc/munge/munge.key
        as_root chmod 0755 /run/munge
        as_root runuser -u munge -- /usr/sbin/munged
    else
        as_root /usr/sbin/munged --force
    fi
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    echo "munged" | as_root tee -a "$started" >/dev/null
    log "munged started"
fi

# 3. Node names: both resolve to this machine (tasks read MASTER_ADDR from the node list).
for n in "${nodes[@]}"; do
    if ! getent hosts "$n" >/dev/null; then
        echo "127.0.0.1 $n  # $marker" | as_root tee -a /etc/hosts >/dev/null
        log "added $n to /etc/hosts"
    fi
done

# 4. slurm.conf for this machine (only ever overwrite our own).
if [ -e "$conf" ] && ! grep -q "$marker" "$conf"; then
    log "ERROR: $conf exists and was not written by this script; refusing to overwrite it"
    exit 1
fi
cpus="$(nproc)"
# Two tasks per node must fit even on a 1-core box (slurmd accepts the declared count with
# config_overrides).
[ "$cpus" -lt 4 ] && cpus=4
mem="$(free -m | awk '/^Mem:/ {print $2}')"
mem=$(( (mem > 2048 ? mem - 1024 : mem / 2) / ${#nodes[@]} ))  # leave a margin for the OS
tmp="$(mktemp)"
sed -e "s|@MARKER@|$marker|" -e "s|@HOST@|$host|g" -e "s|@CPUS@|$cpus|" -e "s|@MEM@|$mem|" \
    -e "s|@STATE@|$state|g" -e "s|@CTLD_PORT@|$ctld_port|" \
    -e "s|@NODE1@|${nodes[0]}|g" -e "s|@NODE2@|${nodes[1]}|g" \
    -e "s|@SLURMD_PORT1@|$slurmd_port|" -e "s|@SLURMD_PORT2@|$((slurmd_port + 1))|" \
    "$here/slurm.conf.in" > "$tmp"
changed=1
if [ -e "$conf" ] && cmp -s "$tmp" "$conf"; then changed=0; fi
as_root mkdir -p /etc/slurm
as_root install -m 0644 "$tmp" "$conf"
rm -f "$tmp"

stop_pid() {  # pidfile: stop a daemon of ours that runs with an outdated configuration
    local pid
    pid="$(cat "$1" 2>/dev/null || true)"
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
    as_root kill -TERM "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    as_root kill -KILL "$pid" 2>/dev/null || true
}
if [ "$changed" = 1 ]; then
    # Our daemons from an older configuration (e.g. single-node) would not know the new nodes.
    for f in "$state"/slurmd*.pid "$state/slurmctld.pid"; do [ -e "$f" ] && stop_pid "$f"; done
fi

# 5. Daemons (each daemonizes and writes its pid file into $state).
ctld_pid="$(cat "$state/slurmctld.pid" 2>/dev/null || true)"
if [ -z "$ctld_pid" ] || ! kill -0 "$ctld_pid" 2>/dev/null; then
    # -c: a fresh queue; jobs left by an interrupted test run must not start with the next one.
    as_root /usr/sbin/slurmctld -c -i
    grep -qx slurmctld "$started" || echo "slurmctld" | as_root tee -a "$started" >/dev/null
    log "slurmctld started"
fi
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
for n in "${nodes[@]}"; do
    pid="$(cat "$state/slurmd-$n.pid" 2>/dev/null || true)"
    if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then
        as_root mkdir -p "$state/d/$n"
        as_root /usr/sbin/slurmd -N "$n"
        grep -qx "slurmd $n" "$started" || echo "slurmd $n" | as_root tee -a "$started" >/dev/null
        log "slurmd -N $n started"
    fi
done

# 6. Wait for both nodes to be idle (resume one an earlier run left down or drained).
for i in $(seq 150); do
    all_up && { log "SLURM ready: nodes ${nodes[*]} are up"; exit 0; }
    for n in "${nodes[@]}"; do
        case "$(node_state "$n" || true)" in
            down|drained|draining|drain)
                [ $((i % 10)) = 1 ] && as_root scontrol update nodename="$n" state=resume 2>/dev/null || true ;;
        esac
    done
    sleep 0.2
done
log "ERROR: nodes ${nodes[*]} did not become idle; see $state/slurmctld.log and $state/slurmd-*.log"
sinfo -N -l >&2 || true
exit 1
