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

from trainer.loop import EXIT_CONFIG, EXIT_ERROR, EXIT_OK, EXIT_REQUEUE  # noqa: E402

__all__ = ["main", "stop_signal", "EXIT_OK", "EXIT_ERROR", "EXIT_CONFIG", "EXIT_REQUEUE"]

log = logging.getLogger("ddpm")

DEFAULT_CONFIG = "quickstart"


def stop_signal() -> str | None:
    """Name of the signal behind the last exit with EXIT_REQUEUE in this process (for launchers)."""
    from trainer import loop

    return loop.last_stop_signal


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
        Path(path).write_text(json.dumps({"message": {"message": message, "extraInfo": info}}))
    except OSError:
        pass  # only a nicer summary is lost


def explain_stop(code: int, rank: int) -> None:
    """After a signal stop under torchrun: say what torchrun's own report of it means."""
    if code != EXIT_REQUEUE or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    sig = stop_signal() or "a signal"
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


def main(argv: list[str] | None = None) -> int:
    """Parse, validate, then train; returns the exit code."""
    args = parse_args(argv)
    from trainer.config import ConfigError, load_config, reference_markdown, to_yaml

    if args.help_config:
        print(reference_markdown())
        return EXIT_OK
    try:
        cfg = load_config(find_config(args.config), args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        tell_torchrun(f"config error: {e}")
        return EXIT_CONFIG
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.dry_run:
        from trainer.loop import dry_run_summary

        try:
            summary = dry_run_summary(cfg, world)
        except ConfigError as e:
            print(f"config error: {e}", file=sys.stderr)
            return EXIT_CONFIG
        print(to_yaml(cfg))
        print(summary)
        return EXIT_OK

    from trainer import distributed as du
    from trainer.loop import train
    from trainer.monitor import setup_logging

    rank = int(os.environ.get("RANK", "0"))
    setup_logging(rank, cfg.run_dir / "logs" / f"rank{rank}.log")
    try:
        info = du.init_distributed(cfg.dist.backend, cfg.dist.init_timeout_s)
        code = train(cfg, info)
        explain_stop(code, rank)
        return code
    except ConfigError as e:
        log.error("config error: %s", e)
        tell_torchrun(f"config error: {e}")
        return EXIT_CONFIG
    except (FileNotFoundError, ValueError) as e:
        log.error("%s: %s", type(e).__name__, e)
        tell_torchrun(f"{type(e).__name__}: {e}")
        return EXIT_ERROR
    except KeyboardInterrupt:
        # A Ctrl-C during start-up (before the stop handler is installed) or a second one.
        log.error("interrupted: exiting without writing a checkpoint; the last complete one is kept")
        tell_torchrun("interrupted without a checkpoint; the last complete one is kept")
        return 130
    except Exception as e:
        log.error("training failed:\n%s", traceback.format_exc())
        tell_torchrun(f"training failed: {type(e).__name__}: {e} (traceback in {cfg.run_dir}/logs/rank{rank}.log)")
        return EXIT_ERROR
    finally:
        from trainer import distributed as du

        du.destroy()


if __name__ == "__main__":
    sys.exit(main())
