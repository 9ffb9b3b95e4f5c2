"""The main job end to end: torchrun on gloo, resume, signals, kill -9, TensorBoard."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "configs" / "tiny.yaml"


def _cmd(nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, str(REPO / "trainer" / "main.py")]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            str(REPO / "trainer" / "main.py")]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.pop("WORLD_SIZE", None)
    return env


def train(run_dir: Path, data_dir: Path, *overrides: str, nproc: int = 1, timeout: int = 300,
          check: bool = True) -> subprocess.CompletedProcess:
    """Run the trainer on the tiny config and return the finished process."""
    args = _cmd(nproc) + ["--config", str(TINY), f"run.dir={run_dir}", f"data.shards={data_dir}", *overrides]
    proc = subprocess.run(args, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-4000:]}")
    return proc


def start(run_dir: Path, data_dir: Path, *overrides: str, nproc: int = 1) -> subprocess.Popen:
    """Start the trainer in its own process group (so the whole job can be killed)."""
    args = _cmd(nproc) + ["--config", str(TINY), f"run.dir={run_dir}", f"data.shards={data_dir}", *overrides]
    return subprocess.Popen(args, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) pairs of a tag, read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def ckpt_files(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("ckpt-*.pt"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Synthetic 16px shards made once through the real prepare path."""
    from data_pipeline.synthetic import ensure_synthetic_shards

    d = tmp_path_factory.mktemp("data") / "shards"
    ensure_synthetic_shards(d, 128, 16, seed=0, progress=False)
    return d


def test_two_process_run_leaves_checkpoints_tensorboard_and_samples(tmp_path: Path, data_dir: Path) -> None:
    run = tmp_path / "run"
    proc = train(run, data_dir, nproc=2)
    assert "finished" in proc.stdout
    assert (run / "config.yaml").is_file()
    names = [p.name for p in ckpt_files(run)]
    assert names[-1] == "ckpt-000000000320.pt" and len(names) == 2  # keep_last=2
    assert (run / "checkpoints" / "latest").read_text().strip() == names[-1]
    assert sorted(p.name for p in (run / "samples").glob("grid-*.png")) == [
        "grid-000000000160.png", "grid-000000000320.png"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "loss_by_t/q0", "loss_by_t/q3", "train/grad_norm", "train/lr", "perf/images_per_s",
                "perf/images_per_s_per_gpu", "perf/step_time_s", "perf/data_wait_frac", "perf/memory_gb",
                "train/skipped_steps", "train/bad_samples"):
        assert tag in tags, tag
    assert "samples/ema_grid" in acc.Tags()["images"]
    steps = [s for s, _ in scalars(run, "train/loss")]
    assert steps == list(range(2, 41, 2))  # every 16 images = 2 steps of 8, up to 40 steps
    # both ranks logged their host and rank
    assert all("rank" in (run / "logs" / f"rank{r}.log").read_text() for r in (0, 1))
    # running it again after it finished says so and exits 0
    again = train(run, data_dir, nproc=2)
    assert "already finished" in again.stdout
    # the sampling CLI: same images with 1 and 2 ranks (up to kernel rounding at other batch sizes)
    import numpy as np

    outs = []
    for nproc in (1, 2):
        out = tmp_path / f"samples{nproc}"
        launch = _cmd(nproc)[:-1]  # python, or python -m torch.distributed.run ...
        proc = subprocess.run(launch + ["-m", "trainer.sample", "--run-dir", str(run), "--num-samples", "5", "--sampler", "ddim", "--steps", "4",
                                      "--out", str(out)], cwd=REPO, env=_env(), capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert len(list(out.glob("0*.png"))) == 5 and (out / "grid.png").is_file()
        outs.append(np.load(out / "samples.npz")["arr_0"])
    assert outs[0].shape == (5, 16, 16, 3) and outs[0].dtype == np.uint8
    assert np.abs(outs[0].astype(int) - outs[1].astype(int)).max() <= 2


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    s = torch.load(path, weights_only=True)
    out = {f"model.{k}": v for k, v in s["model"].items()}
    for i, sh in enumerate(s["ema"]["shadows"]):
        out.update({f"ema{i}.{k}": v for k, v in sh.items()})
    for pid, st in s["optimizer"]["state"].items():
        out.update({f"opt.{pid}.{k}": v for k, v in st.items()})
    return out


def test_resume_is_bit_exact(tmp_path: Path, data_dir: Path) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    per_step = ["log.every_images=8", "train.total_images=320"]
    train(straight, data_dir, *per_step, nproc=2)
    train(split, data_dir, "log.every_images=8", "train.total_images=160", nproc=2)
    second = train(split, data_dir, *per_step, nproc=2)
    assert "resumed from" in second.stdout
    a, b = _tensors(straight / "checkpoints" / "ckpt-000000000320.pt"), _tensors(
        split / "checkpoints" / "ckpt-000000000320.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la, lb = scalars(straight, "train/loss"), scalars(split, "train/loss")
    assert len(la) == 40 and la == lb  # same steps, same losses, no duplicates after the resume


def test_stop_signal_on_one_rank_stops_both_at_the_same_step(tmp_path: Path, data_dir: Path) -> None:
    run = tmp_path / "run"
    proc = start(run, data_dir, "train.total_images=80000", nproc=2)
    try:
        deadline = time.time() + 180
        while not ckpt_files(run) and time.time() < deadline:
            time.sleep(0.2)
        assert ckpt_files(run), "no checkpoint appeared"
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(children) == 2, children
        os.kill(int(children[1]), signal.SIGUSR1)  # one rank only
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    logs = [(run / "logs" / f"rank{r}.log").read_text() for r in (0, 1)]
    assert "received SIGUSR1" in logs[1]
    stopped = [line for line in logs[0].splitlines() if "stopped by SIGUSR1 at step" in line]
    assert stopped, out[-3000:]
    step = int(stopped[-1].split("at step ")[1].split(";")[0])
    assert ckpt_files(run)[-1].name == f"ckpt-{step * 8:012d}.pt"
    resumed = train(run, data_dir, "train.total_images=" + str(step * 8 + 16), nproc=2)
    assert f"at step {step}" in resumed.stdout and "finished" in resumed.stdout


def test_kill9_while_writing_a_checkpoint_resumes_from_the_last_complete_one(tmp_path: Path,
                                                                               data_dir: Path) -> None:
    run = tmp_path / "run"
    big = ["model.base_channels=128", "model.channel_mult=[1,2,2]", "model.num_res_blocks=2",
           "model.attn_resolutions=[]", "checkpoint.every_images=16", "checkpoint.keep_last=3",
           "train.total_images=8000", "log.sample_every_images=0", "checkpoint.async_write=false"]
    caught = None
    for _attempt in range(3):
        proc = start(run, data_dir, *big)
        try:
            deadline = time.time() + 180
            while time.time() < deadline and proc.poll() is None:
                # A write in progress: the hidden temporary file of data_pipeline.storage.atomic_open
                tmps = list((run / "checkpoints").glob(".ckpt-*.pt.*.tmp")) if (run / "checkpoints").is_dir() else []
                if tmps and ckpt_files(run):
                    os.killpg(proc.pid, signal.SIGKILL)  # the whole job, mid-write
                    caught = tmps[0]
                    break
                time.sleep(0.002)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if caught is not None:
            break
    assert caught is not None, "never caught a checkpoint being written"
    complete = ckpt_files(run)[-1]
    assert complete.name < caught.name.lstrip(".")  # the partial one is newer than the last complete one
    proc = train(run, data_dir, *big[:-3], "train.total_images=" + str(int(complete.name[5:17]) + 16),
                 "log.sample_every_images=0")
    assert f"resumed from {complete}" in proc.stdout
    assert "removed incomplete checkpoint file" in proc.stdout
    assert not list((run / "checkpoints").glob(".*.tmp"))


def test_changed_model_is_refused_with_a_diff(tmp_path: Path, data_dir: Path) -> None:
    run = tmp_path / "run"
    train(run, data_dir, "train.total_images=16", "log.sample_every_images=0")
    proc = train(run, data_dir, "train.total_images=32", "model.base_channels=64", check=False)
    assert proc.returncode == 2
    assert "model.base_channels: 32 -> 64" in proc.stdout + proc.stderr


def test_nonfinite_losses_stop_training_with_a_clear_message(tmp_path: Path, data_dir: Path) -> None:
    run = tmp_path / "run"
    proc = train(run, data_dir, "train.lr=1e30", "train.warmup_images=0", "train.max_nonfinite_steps=3",
                 "log.sample_every_images=0", check=False)
    assert proc.returncode == 1
    assert "3 non-finite losses in a row" in proc.stdout + proc.stderr
    assert "at step" in proc.stdout + proc.stderr


def test_dry_run_prints_the_summary_without_touching_data(tmp_path: Path) -> None:
    data = tmp_path / "never-made"
    proc = subprocess.run(_cmd(1) + ["--config", "celebahq_256", "--dry-run", f"data.shards={data}"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "parameters         113.6" in proc.stdout or "parameters         11" in proc.stdout
    assert "GFLOP per image" in proc.stdout and "64 global" in proc.stdout
    assert not data.exists()


def test_bad_override_is_a_config_error(tmp_path: Path) -> None:
    proc = subprocess.run(_cmd(1) + ["--config", str(TINY), "train.batchsize=3"], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "did you mean 'train.batch_size'" in proc.stderr


def test_resume_on_another_world_size_and_worker_count(tmp_path: Path, data_dir: Path) -> None:
    run = tmp_path / "run"
    train(run, data_dir, "train.total_images=160", "log.sample_every_images=0")
    proc = train(run, data_dir, "train.total_images=240", "log.sample_every_images=0", "data.num_workers=2",
                 nproc=2)
    out = proc.stdout + proc.stderr
    assert "resumed from" in out and "finished" in out
    assert "weaker guarantee" not in out and "resharded" not in out  # the global order resumes exactly
    assert ckpt_files(run)[-1].name == "ckpt-000000000240.pt"
    # The streaming order (data.order=streaming, pipe: sources) keeps its weaker guarantee, saying so.
    run2 = tmp_path / "run2"
    train(run2, data_dir, "train.total_images=160", "log.sample_every_images=0", "data.order=streaming")
    proc = train(run2, data_dir, "train.total_images=240", "log.sample_every_images=0", "data.num_workers=2",
                 "data.order=streaming", nproc=2)
    out = proc.stdout + proc.stderr
    assert "resumed from" in out and "streaming order's guarantee" in out and "finished" in out


def test_pinned_validation_loss_is_logged(tmp_path: Path, data_dir: Path) -> None:
    run = tmp_path / "run"
    proc = train(run, data_dir, "train.total_images=160", "log.sample_every_images=0", f"eval.val_shards={data_dir}",
                 "eval.val_images=12", "eval.val_every_images=80", nproc=2)
    assert "validation loss (EMA, pinned noise)" in proc.stdout
    vals = scalars(run, "val/loss")
    assert [s for s, _ in vals] == [10, 20] and all(0 < v < 10 for _, v in vals)
    assert [s for s, _ in scalars(run, "val/loss_t50")] == [10, 20]  # t at fixed fractions of T (here 100)
