"""Start-up checks of a multi-node job, each failing with one clear line (2 gloo processes, CPU).

Ranks that disagree on the config, a run directory that is not shared between nodes, a
rendezvous endpoint that never answers, and an error on rank 0 that must end every rank.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer.config import ConfigError
from trainer.startup import wait_for_endpoint

REPO = Path(__file__).resolve().parents[2]

# Each rank runs the checks and writes what each one raised to out/<rank>.json.
_SCRIPT = r"""
import json, os, sys
from pathlib import Path
from trainer import distributed as du
from trainer import startup
from trainer.run_lock import RunDirLocked

out, base = Path(sys.argv[1]), Path(sys.argv[2])
info = startup.init_distributed("gloo", init_timeout_s=60)
rank = info.rank
res = {}

def attempt(name, fn):
    try:
        fn()
        res[name] = ""
    except Exception as e:
        res[name] = f"{type(e).__name__}: {e}"

cfg = {"train.lr": 0.0002, "train.total_images": 320, "model.base_channels": 32}
attempt("same_config", lambda: startup.check_same_config(cfg))
odd = dict(cfg, **({"train.lr": 0.001} if rank == 1 else {}))
attempt("config_mismatch", lambda: startup.check_same_config(odd))
attempt("shared", lambda: startup.check_shared_dir(base / "shared"))
# A node-local path of the same name: rank 1 looks at another directory than rank 0 wrote to.
attempt("not_shared", lambda: startup.check_shared_dir(base / f"local{rank}", timeout_s=1))

def locked():
    raise RunDirLocked("run directory x is in use by another job (host h pid 1)")
attempt("run_on_main", lambda: du.run_on_main(locked, RunDirLocked))
out.joinpath(f"{rank}.json").write_text(json.dumps(res))
du.destroy()
"""


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    """Run the checks once on 2 ranks (no torchrun: the SLURM launcher's environment)."""
    base = tmp_path_factory.mktemp("checks")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (1, 0):  # rank 1 first: it must wait for rank 0's store, not fail
        env = {**os.environ, "PYTHONPATH": str(REPO), "RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1"}
        env.pop("TORCHELASTIC_RUN_ID", None)
        procs.append(subprocess.Popen([sys.executable, "-c", _SCRIPT, str(base), str(base)], env=env,
                                      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        if rank == 1:
            time.sleep(2)
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out[-3000:]
    return [json.loads((base / f"{r}.json").read_text()) for r in (0, 1)]


def test_agreeing_ranks_and_a_shared_directory_pass(results: list[dict[str, str]]) -> None:
    for res in results:
        assert res["same_config"] == "" and res["shared"] == ""


def test_config_mismatch_between_ranks_is_one_line_on_every_rank(results: list[dict[str, str]]) -> None:
    for res in results:
        msg = res["config_mismatch"]
        assert msg.startswith("ConfigError: ranks disagree on the config") and "\n" not in msg
        assert "rank(s) 1 on host(s)" in msg and "train.lr: 0.0002 on rank 0 vs 0.001" in msg


def test_run_dir_not_shared_names_the_blind_rank(results: list[dict[str, str]]) -> None:
    for res in results:
        msg = res["not_shared"]
        assert msg.startswith("ConfigError: run directory") and "is not shared" in msg, msg
        assert "to rank(s) 1 on host(s)" in msg and "\n" not in msg


def test_an_error_on_rank_0_reaches_every_rank(results: list[dict[str, str]]) -> None:
    for res in results:
        assert res["run_on_main"] == "RunDirLocked: run directory x is in use by another job (host h pid 1)"


def test_rendezvous_endpoint_that_never_answers_is_one_line() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=rf"rendezvous endpoint 127.0.0.1:{port} did not answer within 1 s"):
        wait_for_endpoint("127.0.0.1", port, 1.0, poll_s=0.2)
    assert time.monotonic() - t0 < 10
    with pytest.raises(ConfigError, match="MASTER_ADDR=no-such-node.invalid does not resolve"):
        wait_for_endpoint("no-such-node.invalid", port, 0.5, poll_s=0.2)
