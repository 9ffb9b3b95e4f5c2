"""What a newcomer hit (issue 14), run as they ran it: the CLI, torchrun, an offline machine, Ctrl-C.

Each test asserts the exit code the shell sees and the one line that names the fix. Under
torchrun the shell sees torchrun's code (1 for any worker failure or signal) and torchrun
prints its own report; the trainer's line comes first and is repeated in that report.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "configs" / "tiny.yaml"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    return {**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def _offline_env(tmp_path: Path) -> dict[str, str]:
    """An offline machine: an empty torch hub cache and a proxy on a closed port, so downloads fail fast."""
    proxy = "http://127.0.0.1:9"
    env = _env(TORCH_HOME=str(tmp_path / "torch_home"), HTTPS_PROXY=proxy, HTTP_PROXY=proxy,
               https_proxy=proxy, http_proxy=proxy)
    for k in ("NO_PROXY", "no_proxy"):
        env.pop(k, None)
    return env


def _run(cmd: list[str], env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _lines_with(text: str, needle: str) -> list[str]:
    return [line for line in text.splitlines() if needle in line]


def _only_torchruns_traceback(out: str) -> None:
    """The one Python traceback is torchrun's own report (ChildFailedError), none from the trainer."""
    assert out.count("Traceback (most recent call last)") == 1, out[-4000:]
    assert "torch.distributed.elastic.multiprocessing.errors.ChildFailedError" in out
    tb = out[out.index("Traceback (most recent call last)"):]
    assert "trainer/" not in tb.split("ChildFailedError")[0]  # no frame of ours in it


# --------------------------------------------------------------------------- item 2: offline FID


def _tiny_run_dir(run_dir: Path) -> Path:
    """A run directory with one checkpoint of the tiny UNet, as the trainer writes it."""
    from models.unet import UNet
    from trainer.checkpoint import CheckpointManager
    from trainer.config import fingerprint, load_config, to_dict

    cfg = load_config(TINY, [f"run.dir={run_dir}", f"data.shards={run_dir / 'data'}"])
    sd = UNet(cfg.model).state_dict()
    cfg_dict = to_dict(cfg)
    state = {"model": sd, "ema": {"decays": [0.999], "shadows": [sd]}, "optimizer": {},
             "train_state": {"nimg": 8}, "config": cfg_dict, "fingerprint": fingerprint(cfg_dict)}
    CheckpointManager(run_dir / "checkpoints", async_write=False).save(state, 8)
    return run_dir


def test_offline_evaluate_names_the_weights_option(tmp_path: Path) -> None:
    run_dir = _tiny_run_dir(tmp_path / "run")
    proc = _run([sys.executable, "-m", "trainer.evaluate", "--run-dir", str(run_dir), "--num-samples", "4",
                 "--sampler", "ddim", "--steps", "2"], _offline_env(tmp_path), timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out and "URLError" not in out
    [line] = _lines_with(proc.stderr, "--weights")
    assert line.startswith("ddpm-evaluate: error: cannot download the Inception weights")
    assert "weights-inception-2015-12-05-6726825d.pth" in line  # the file to fetch elsewhere
    assert not list(run_dir.glob("eval/*/samples/chunk_*"))  # failed before sampling anything


@pytest.mark.slow
def test_offline_training_with_fid_names_eval_weights(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    proc = _run(TORCHRUN + [str(REPO / "trainer" / "main.py"), "--config", str(TINY), f"run.dir={run_dir}",
                            f"data.shards={tmp_path / 'data'}", "eval.every_images=160"],
                _offline_env(tmp_path))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-4000:]  # torchrun's code for a failed worker
    assert time.monotonic() - t0 < 240  # no rank waits out a collective timeout
    # Each rank's own line, on stderr, names the fix; no download traceback, no lost gloo peer.
    ours = [ln for ln in _lines_with(proc.stderr, "eval.weights=PATH") if "traceback :" not in ln]
    assert ours and all(re.search(r"\[rank[01]\] config error: cannot download the Inception weights", ln)
                        for ln in ours), proc.stderr[-3000:]
    assert "URLError" not in out and "Connection closed by peer" not in out
    _only_torchruns_traceback(out)
    # torchrun's summary shows the trainer's exit code and its line instead of a link to its docs.
    assert "exitcode  : 2" in out
    assert re.search(r"traceback : config error: cannot download .*eval\.weights=PATH", out)
    assert not list((run_dir / "checkpoints").glob("ckpt-*.pt"))


# --------------------------------------------------------------------------- item 3: labels


@pytest.mark.slow
def test_conditional_model_without_labels_is_refused_at_start(tmp_path: Path) -> None:
    """The README's main command with model.num_classes=4: refused before any work, naming both fixes."""
    run_dir = tmp_path / "run"
    proc = _run(TORCHRUN + [str(REPO / "trainer" / "main.py"), f"run.dir={run_dir}", "model.num_classes=4"],
                _env(), timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    lines = [ln for ln in _lines_with(proc.stderr, "config error: model.num_classes=4") if "traceback :" not in ln]
    assert lines and all(ln.endswith("set data.use_labels=true, or model.num_classes=0") for ln in lines)
    assert "exitcode  : 2" in out and re.search(r"traceback : config error: model.num_classes=4", out)
    _only_torchruns_traceback(out)
    assert not run_dir.exists()  # nothing was made
    # Without torchrun the shell sees the trainer's own code.
    one = _run([sys.executable, str(REPO / "trainer" / "main.py"), f"run.dir={run_dir}", "model.num_classes=4"],
               _env(), timeout=120)
    assert one.returncode == 2 and "Traceback" not in one.stdout + one.stderr
    [line] = one.stderr.splitlines()
    assert line.startswith("config error: model.num_classes=4") and "data.use_labels=true" in line


# --------------------------------------------------------------------------- item 7: attention by level


def test_quickstart_changes_image_size_and_a_command_line_key_wins(tmp_path: Path) -> None:
    main = [sys.executable, str(REPO / "trainer" / "main.py")]
    ok = _run(main + ["--dry-run", "model.image_size=64"], _env(), timeout=120)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "attn_resolutions:\n  - 16\n  attn_levels:\n  - 2\n" in ok.stdout  # the lowest level at 64px
    # The preset places attention by level; the command line's resolutions replace it, with one note.
    wins = _run(main + ["--dry-run", "model.attn_resolutions=[16]"], _env(), timeout=120)
    assert wins.returncode == 0, wins.stderr[-2000:]
    assert "# model.attn_resolutions from the command line replaces model.attn_levels from the config file" in wins.stdout
    assert "attn_resolutions:\n  - 16\n  attn_levels: []\n" in wins.stdout
    # Both keys on the command line is still a mistake: one line, exit 2.
    both = _run(main + [f"run.dir={tmp_path / 'run'}", "model.attn_resolutions=[8]", "model.attn_levels=[1]"],
                _env(), timeout=120)
    assert both.returncode == 2 and "Traceback" not in both.stdout + both.stderr
    [line] = both.stderr.splitlines()
    assert line == ("config error: model.attn_levels=[1] and model.attn_resolutions=[8] both place attention "
                    "(both on the command line): set one of them")


# --------------------------------------------------------------------------- item 4: Ctrl-C under torchrun


@pytest.mark.slow
def test_ctrl_c_under_torchrun_stops_at_a_checkpoint_and_the_same_command_resumes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # 80 steps: still running when the first checkpoint (step 10) appears, even on a loaded machine.
    cmd = TORCHRUN + [str(REPO / "trainer" / "main.py"), "--config", str(TINY), f"run.dir={run_dir}",
                      f"data.shards={tmp_path / 'data'}", "train.total_images=640", "log.sample_every_images=0"]
    log = tmp_path / "first.out"
    with open(log, "w") as out:
        # Its own process group, as a terminal's foreground job: Ctrl-C sends SIGINT to that group.
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not list((run_dir / "checkpoints").glob("ckpt-*.pt")):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text()
    assert code == 1, text[-3000:]  # torchrun re-raises the Ctrl-C it got (SignalException)
    stopped = re.search(r"\[rank0\] stopped by SIGINT at step (\d+); checkpoint written", text)
    assert stopped, text[-3000:]
    assert "[rank0] torchrun now prints a SignalException traceback and exits with 1: that is its report" in text
    assert text.index(stopped.group(0)) < text.index("SignalException: Process")  # ours comes first
    assert text.count("Traceback") == 1  # torchrun's; none from the trainer
    step = int(stopped.group(1))
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert int(re.search(r"ckpt-(\d+)\.pt", latest).group(1)) == 8 * step  # the checkpoint of the stop step
    # The same command continues from there and finishes.
    again = _run(cmd, _env(), timeout=300)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / latest} at step {step}" in again.stdout
    assert "finished: step 80" in again.stdout


@pytest.mark.slow
def test_ctrl_c_without_torchrun_exits_75_with_a_checkpoint(tmp_path: Path) -> None:
    """One process (python trainer/main.py): the shell sees the trainer's own requeue code."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "trainer" / "main.py"), "--config", str(TINY), f"run.dir={run_dir}",
           f"data.shards={tmp_path / 'data'}", "train.total_images=640", "log.sample_every_images=0"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not list((run_dir / "checkpoints").glob("ckpt-*.pt")):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 75, stderr[-3000:]
    assert "Traceback" not in stdout + stderr and "SignalException" not in stdout  # no torchrun, no note
    assert re.search(r"stopped by SIGINT at step \d+; checkpoint written, exit code 75", stdout)
