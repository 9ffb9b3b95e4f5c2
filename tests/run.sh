#!/usr/bin/env bash
# Runs every test of ddpm-scale on a fresh Debian machine (the README's test command).
#  1. Debian packages: SLURM + munge (integration tests against a real SLURM), and the
#     system libraries the ffcv extra compiles against. Installed only when missing.
#  2. A virtualenv at .venv (or $VENV) with the package, its test extras, pinned by .ci/constraints.txt.
#  3. A two-node SLURM cluster on this machine (tests/slurm/setup_slurm.sh), stopped again on exit.
#  4. pytest over tests/ (unit + integration). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

need_apt=()
for pkg in slurmctld slurmd slurm-client munge libopencv-dev libturbojpeg0-dev pkg-config; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "== installing Debian packages: ${need_apt[*]}"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "== creating $VENV"
    "$PY" -m venv "$VENV"
fi
echo "== installing ddpm-scale[test,ffcv] into $VENV"
"$VENV/bin/python" -m pip install -q -c .ci/constraints.txt -e ".[test,ffcv]"
export PATH="$PWD/$VENV/bin:$PATH"

echo "== starting SLURM (two nodes on this machine)"
bash tests/slurm/setup_slurm.sh
trap 'bash tests/slurm/stop_slurm.sh || true' EXIT

echo "== ruff"
ruff check .
echo "== pytest"
python -m pytest -q -ra --durations=15 tests "$@"
