"""The training entry point (torchrun or plain python).

    torchrun --nproc_per_node=2 trainer/main.py                     # built-in default (quickstart, CPU ok)
    torchrun --nproc_per_node=8 trainer/main.py --config configs/celebahq_256.yaml train.batch_per_gpu=8
    python trainer/main.py --config cifar10_32 --dry-run

Exit codes: 0 finished (or already finished), 75 stopped by a signal after a
checkpoint (requeue and run the same command again), 2 configuration error,
1 any other failure, 130 interrupted before a checkpoint could be written. Under
torchrun the shell sees torchrun's code instead (1 for anything but 0), so the
reason also goes into torchrun's failure summary (its error file).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script (torchrun trainer/main.py): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_pipeline.storage import atomic_write  # noqa: E402
from trainer.errors import (  # noqa: E402
    EXIT_CONFIG,
    EXIT_ERROR,
    EXIT_OK,
    EXIT_REQUEUE,
    EXIT_STORAGE,
    Outcome,
    classify,
)

__all__ = ["main", "run", "EXIT_OK", "EXIT_ERROR", "EXIT_CONFIG", "EXIT_REQUEUE", "EXIT_STORAGE"]

log = logging.getLogger("ddpm")

DEFAULT_CONFIG = "quickstart"


def find_config(name_or_path: str) -> Path:
    """A config path, or a preset name looked up in the shipped configs/ folder."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    from configs import preset_path

    found = preset_path(name_or_path)
    if found is None:
        from configs import preset_names

        raise FileNotFoundError(f"config '{name_or_path}' not found; presets: {', '.join(preset_names())}")
    return found


def tell_torchrun(message: str) -> None:
    """Put the one-line reason into this worker's torchrun error file, if torchrun gave one.

    torchrun's ChildFailedError summary shows it as the root cause's "traceback" instead of a
    link to its docs (the error-file format of torch.distributed.elastic's ErrorHandler).
    """
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    info = {"py_callstack": message, "timestamp": str(int(time.time()))}
    try:
        atomic_write(path, json.dumps({"message": {"message": message, "extraInfo": info}}), what="error file")
    except OSError:
        pass  # only a nicer summary is lost


def explain_stop(outcome: Outcome, rank: int) -> None:
    """After a signal stop under torchrun: say what torchrun's own report of it means."""
    if outcome.code != EXIT_REQUEUE or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    sig = outcome.signal or "a signal"
    code = outcome.code
    tell_torchrun(f"stopped by {sig} with a checkpoint (exit code {code}); run the same command again to resume")
    if rank == 0 and sig == "SIGINT":
        # A terminal's Ctrl-C reaches only torchrun (its workers have their own sessions); it
        # forwards it to us and re-raises it as SignalException once we exit, whatever our code.
        log.info("torchrun now prints a SignalException traceback and exits with 1: that is its report of "
                 "the %s it forwarded, not a crash. The checkpoint is complete.", sig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """--config, --dry-run, --help-config, then key=value overrides."""
    p = argparse.ArgumentParser(
        prog="ddpm-train",
        description="Train a DDPM (Ho et al. 2020). Overrides are dotted key=value pairs, e.g. train.batch_size=64.",
    )
    p.add_argument("--config", default=DEFAULT_CONFIG, help="YAML file or preset name (default: quickstart)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and a summary, then exit")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and meaning")
    p.add_argument("overrides", nargs="*", help="key=value overrides (CLI > file > defaults)")
    return p.parse_args(argv)


def run(argv: list[str] | None = None) -> Outcome:
    """Parse, validate, then train: the exit code, and for a stop the signal every rank agreed on.

    The launcher (launch.submit) calls this in-process and requeues on SIGUSR2/SIGUSR1 stops only.
    """
    args = parse_args(argv)
    from trainer.config import ConfigError, load_config, reference_markdown, to_yaml

    if args.help_config:
        print(reference_markdown())
        return Outcome(EXIT_OK)
    notes: list[str] = []
    try:
        cfg = load_config(find_config(args.config), args.overrides, notes)
    except (ConfigError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        tell_torchrun(f"config error: {e}")
        return Outcome(EXIT_CONFIG)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.dry_run:
        from trainer.loop import dry_run_summary

        try:
            summary = dry_run_summary(cfg, world)
        except ConfigError as e:
            print(f"config error: {e}", file=sys.stderr)
            return Outcome(EXIT_CONFIG)
        for note in notes:
            print(f"# {note}")
        print(to_yaml(cfg))
        print(summary)
        return Outcome(EXIT_OK)

    from trainer import distributed as du
    from trainer.loop import train
    from trainer.monitor import setup_logging
    from trainer.startup import init_distributed

    rank = int(os.environ.get("RANK", "0"))
    setup_logging(rank, cfg.run_dir / "logs" / f"rank{rank}.log")
    for note in notes:
        log.info("config: %s", note)
    try:
        info = init_distributed(cfg.dist.backend, cfg.dist.init_timeout_s)
        outcome = train(cfg, info)
        explain_stop(outcome, rank)
        return outcome
    except BaseException as e:
        if isinstance(e, SystemExit):
            raise
        code, line = classify(e)
        if code == EXIT_STORAGE and os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
            from trainer.startup import remove_compile_partials

            remove_compile_partials(os.environ["TORCHINDUCTOR_CACHE_DIR"], pid=os.getpid())
        if line is None:
            log.error("training failed:\n%s", traceback.format_exc())
            line = f"training failed: {type(e).__name__}: {e} (traceback in {cfg.run_dir}/logs/rank{rank}.log)"
        elif code == EXIT_STORAGE and rank != 0:
            log.info("%s", line)  # every rank agreed on it; rank 0 says it once on the console
        else:
            log.error("%s", line)
        tell_torchrun(line)
        return Outcome(code)
    finally:
        from trainer import distributed as du

        du.destroy()


def main(argv: list[str] | None = None) -> int:
    """The console script and ``python trainer/main.py``: ``run`` as an exit code."""
    return run(argv).code


if __name__ == "__main__":
    sys.exit(main())
