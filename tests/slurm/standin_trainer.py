"""A tiny stand-in for trainer.main honouring the launcher contract (exit codes, signals, resume).

It lets the SLURM tests exercise the launcher's mechanics in seconds: a gloo all-reduce of
the stop flag each step (all ranks stop at one step), checkpoints written atomically by
rank 0 with a `latest` pointer, "resumed from ..." logged, TensorBoard `train/loss` per step.
The launcher runs it with `--entry tests.slurm.standin_trainer:run`. `standin.crash_at_images=N`
makes rank `standin.crash_rank` (default 1) fail with exit code 1 once N images are reached, on
every run: a deterministic crash.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

EXIT_REQUEUE = 75
_last = {"signal": None}


@dataclass(frozen=True)
class Outcome:
    """As trainer.errors.Outcome: the exit code and, for a stop, the signal."""

    code: int
    signal: str | None = None


def run(argv: list[str] | None = None) -> Outcome:
    """The launcher's entry (as trainer.main.run): the exit code and the signal behind a stop."""
    _last["signal"] = None
    code = main(argv)
    return Outcome(code, _last["signal"] if code == EXIT_REQUEUE else None)


_known = {"run.dir", "data.shards", "log.sample_every_images", "train.total_images", "train.batch_size",
          "checkpoint.every_images", "standin.step_s", "standin.crash_at_images", "standin.crash_rank"}


def main(argv: list[str] | None = None) -> int:
    """Train a fake model: one "step" sleeps; returns 0, 2 (bad key) or 75 (stopped by a signal)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" in argv:
        i = argv.index("--config")
        del argv[i : i + 2]
    cfg = {"train.total_images": "320", "train.batch_size": "8", "checkpoint.every_images": "16",
           "standin.step_s": "0.5", "standin.crash_at_images": "0", "standin.crash_rank": "1"}
    for kv in argv:
        key, _, value = kv.partition("=")
        if key not in _known:
            print(f"config error: unknown key {key!r}", file=sys.stderr, flush=True)
            return 2
        cfg[key] = value
    import torch
    import torch.distributed as dist
    from torch.utils.tensorboard import SummaryWriter

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    print(f"standin: host={socket.gethostname()} rank={rank} world={world}", flush=True)
    stop = {"flag": 0}

    def on_signal(signum: int, frame: object) -> None:
        print(f"standin: rank {rank} caught {signal.Signals(signum).name}", flush=True)
        stop["flag"] = 1
        _last["signal"] = signal.Signals(signum).name

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(s, on_signal)
    if world > 1:
        dist.init_process_group("gloo")
    run_dir = Path(cfg["run.dir"])
    ckpts = run_dir / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    batch, total = int(cfg["train.batch_size"]) * world, int(cfg["train.total_images"])
    every = int(cfg["checkpoint.every_images"])
    nimg = 0
    if (ckpts / "latest").exists():
        name = (ckpts / "latest").read_text().strip()
        nimg = torch.load(ckpts / name)["nimg"]
        print(f"standin: resumed from {ckpts / name} at {nimg} images", flush=True)
    if nimg >= total:
        return 0
    # Like the trainer: on resume, drop events logged after the checkpoint (they are re-run).
    purge = nimg + 1 if nimg else None
    writer = SummaryWriter(str(run_dir / "tb"), purge_step=purge) if rank == 0 else None

    def save() -> None:
        if rank == 0:
            name = f"ckpt-{nimg:09d}.pt"
            torch.save({"nimg": nimg}, ckpts / (name + ".tmp"))
            os.replace(ckpts / (name + ".tmp"), ckpts / name)
            (ckpts / "latest.tmp").write_text(name)
            os.replace(ckpts / "latest.tmp", ckpts / "latest")
            print(f"standin: saved {name}", flush=True)

    while nimg < total:
        flag = torch.tensor([stop["flag"]])
        if world > 1:
            dist.all_reduce(flag)  # any rank's signal stops every rank at this step
        if flag.item():
            if nimg % every:
                save()
            if writer:
                writer.close()
            if world > 1:
                dist.barrier()  # nobody exits before the checkpoint is written
                dist.destroy_process_group()
            print(f"standin: stopped at {nimg} images", flush=True)
            return EXIT_REQUEUE
        time.sleep(float(cfg["standin.step_s"]))
        nimg += batch
        if writer:
            writer.add_scalar("train/loss", 1.0 / nimg, nimg)
            writer.flush()
        if nimg % every == 0 or nimg >= total:
            save()
        crash_at = int(cfg["standin.crash_at_images"])
        if crash_at and nimg >= crash_at and rank == int(cfg["standin.crash_rank"]):
            print(f"standin: rank {rank} crashes at {nimg} images (standin.crash_at_images)", flush=True)
            return 1
    if writer:
        writer.close()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    print(f"standin: finished at {nimg} images", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
