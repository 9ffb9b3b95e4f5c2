#!/usr/bin/env bash
# Start a single-node SLURM (munged, slurmctld, slurmd) for the integration tests.
# Idempotent: a SLURM that already answers with an idle node is reused untouched.
# Installs the Debian packages when they are missing (needs root or sudo).
# What this script starts is recorded in $DDPM_SLURM_STATE/started, which stop_slurm.sh reads.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
state="${DDPM_SLURM_STATE:-/var/spool/ddpm-slurm}"
conf=/etc/slurm/slurm.conf
marker="ddpm-scale test cluster"
node="$(hostname -s)"

log() { echo "[setup_slurm] $*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo -n "$@"; fi; }

node_state() { sinfo -h -n "$node" -o '%T' 2>/dev/null | head -1 | tr -d '*~#'; }

if command -v sinfo >/dev/null; then
    case "$(node_state || true)" in
        idle|mixed|allocated) log "SLURM already running (node $node: $(node_state)); reusing it"; exit 0 ;;
    esac
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

# 3. slurm.conf for this machine (only ever overwrite our own).
if [ -e "$conf" ] && ! grep -q "$marker" "$conf"; then
    log "ERROR: $conf exists and was not written by this script; refusing to overwrite it"
    exit 1
fi
cpus="$(nproc)"
# Two tasks must fit even on a 1-core box (slurmd accepts the declared count with config_overrides).
[ "$cpus" -lt 4 ] && cpus=4
mem="$(free -m | awk '/^Mem:/ {print $2}')"
mem=$(( mem > 2048 ? mem - 1024 : mem / 2 ))  # leave a margin for the OS
tmp="$(mktemp)"
sed -e "s|@MARKER@|$marker|" -e "s|@NODE@|$node|g" -e "s|@CPUS@|$cpus|" -e "s|@MEM@|$mem|" \
    -e "s|@STATE@|$state|g" -e "s|@CTLD_PORT@|${DDPM_SLURMCTLD_PORT:-6817}|" \
    -e "s|@SLURMD_PORT@|${DDPM_SLURMD_PORT:-6818}|" "$here/slurm.conf.in" > "$tmp"
as_root mkdir -p /etc/slurm
as_root install -m 0644 "$tmp" "$conf"
rm -f "$tmp"

# 4. Daemons (each daemonizes and writes its pid file into $state).
if ! pgrep -x slurmctld >/dev/null; then
    # -c: a fresh queue; jobs left by an interrupted test run must not start with the next one.
    as_root /usr/sbin/slurmctld -c -i
    echo "slurmctld" | as_root tee -a "$started" >/dev/null
    log "slurmctld started"
fi
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
if ! pgrep -x slurmd >/dev/null; then
    as_root /usr/sbin/slurmd
    echo "slurmd" | as_root tee -a "$started" >/dev/null
    log "slurmd started"
fi

# 5. Wait for the node to be idle (resume it if an earlier run left it down or drained).
for i in $(seq 150); do
    s="$(node_state || true)"
    case "$s" in
        idle|mixed|allocated) log "SLURM ready: node $node is $s"; exit 0 ;;
        down|drained|draining|drain) [ $((i % 10)) = 1 ] && as_root scontrol update nodename="$node" state=resume 2>/dev/null || true ;;
    esac
    sleep 0.2
done
log "ERROR: node $node did not become idle; see $state/slurmctld.log and $state/slurmd.log"
sinfo -N -l >&2 || true
exit 1
