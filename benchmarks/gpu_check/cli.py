"""The GPU check's driver: the sections in order within the time budget, one JSON report."""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

import benchmarks.gpu_check as package
from benchmarks import timing
from benchmarks.gpu_check.common import MODULE, Check, tail, tiny_overrides
from benchmarks.gpu_check.gpu_tests import section_gpu_tests
from benchmarks.gpu_check.kernels import section_decode, section_ema_checkpoint
from benchmarks.gpu_check.runs import ddp_worker, section_ddp_nccl, section_resume
from benchmarks.gpu_check.step import section_diffusers, section_environment, section_step
from benchmarks.timing import UsageError
from benchmarks.trainer_internals import load_cfg, with_section

# (name, function, minimum seconds it needs in GPU mode, in CPU mode)
sections: list[tuple[str, Callable[[Check], dict[str, Any]], float, float]] = [
    ("environment", section_environment, 0, 0),
    ("step", section_step, 60, 2),
    ("diffusers", section_diffusers, 60, 2),
    ("ddp_nccl", section_ddp_nccl, 30, 5),
    ("resume", section_resume, 45, 10),
    ("decode", section_decode, 5, 1),
    ("ema_checkpoint", section_ema_checkpoint, 15, 1),
    ("gpu_tests", section_gpu_tests, 60, 5),
]


def run_all(check: Check, out: Path, only: set[str] | None = None, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the sections in order within the budget; write the report after each one."""
    report: dict[str, Any] = {"version": 1, "command": timing.command(MODULE, argv),
                              "mode": check.mode, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                              "budget_s": round(check.deadline - time.monotonic()), "sections": {}}
    t_start = time.monotonic()
    chosen = [s for s in sections if only is None or s[0] in only]
    for i, (name, fn, gpu_min, cpu_min) in enumerate(chosen):
        need = gpu_min if check.mode == "gpu" else cpu_min
        later = sum((g if check.mode == "gpu" else c) for _, _, g, c in chosen[i + 1:])
        check.section_deadline = check.deadline - later
        left = check.deadline - time.monotonic()
        if left < need:
            res: dict[str, Any] = {"status": "skipped", "note": f"time budget: {left:.0f} s left, needs ~{need:.0f} s"}
        else:
            t0 = time.perf_counter()
            print(f"[gpu_check] {name} ...", flush=True)
            gc.collect()
            if check.device.type == "cuda":
                torch.cuda.empty_cache()  # child processes share the GPU with this one
            try:
                res = fn(check) or {}
            except Exception as e:  # noqa: BLE001 - one broken section must not hide the others
                res = {"status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": tail(traceback.format_exc())}
            res = {"status": res.pop("status", "ok"), "seconds": round(time.perf_counter() - t0, 1), **res}
        report["sections"][name] = res
        print(f"[gpu_check] {name}: {res['status']} ({res.get('seconds', 0)} s)"
              + (f" - {res.get('note') or res.get('error')}" if res["status"] != "ok" else ""), flush=True)
        report["wall_s"] = round(time.monotonic() - t_start, 1)
        report["ok"] = not any(s["status"] == "failed" for s in report["sections"].values())
        timing.write_json(out, report)
    return report


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=package.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check.json", help="the JSON report (default: ./gpu_check.json)")
    p.add_argument("--cpu", action="store_true", help="the reduced CPU mode even where CUDA is available")
    p.add_argument("--config", default=None,
                   help="model of the step/diffusers/EMA sections (default: celebahq_256 on a GPU, a tiny UNet on CPU)")
    p.add_argument("--batches", default=None, help="per-GPU batches for the step, e.g. 8,16,32 (default: 8,16,32; CPU 2,4)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per batch (default 10; CPU 2)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps incl. the compile (default 3; CPU 1)")
    p.add_argument("--budget-s", type=float, default=None, help="time budget in seconds (default 450; CPU 120)")
    p.add_argument("--sections", default=None, help=f"comma-separated subset of: {', '.join(s[0] for s in sections)}")
    p.add_argument("--ddp-worker", default=None, help=argparse.SUPPRESS)  # internal: the ddp_nccl child
    p.add_argument("overrides", nargs="*", help="config overrides for the timed model, e.g. model.dropout=0.1")
    return p.parse_args(argv)


def make_check(args: argparse.Namespace, work: Path) -> tuple[Check, set[str] | None]:
    """The Check of these options, and the chosen sections; UsageError for what cannot be honoured."""
    gpu = torch.cuda.is_available() and not args.cpu
    mode, device = ("gpu", torch.device("cuda", torch.cuda.current_device())) if gpu else ("cpu", torch.device("cpu"))
    if args.config:
        cfg = load_cfg(args.config, args.overrides)
    elif gpu:
        cfg = load_cfg("celebahq_256", args.overrides)
    else:
        cfg = load_cfg(None, [*tiny_overrides, *args.overrides])
    try:
        batches = [int(b) for b in (args.batches or ("8,16,32" if gpu else "2,4")).split(",") if b.strip()]
    except ValueError:
        raise UsageError(f"--batches: comma-separated integers, got {args.batches!r}") from None
    steps = args.steps if args.steps is not None else (10 if gpu else 2)
    warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    budget = args.budget_s if args.budget_s is not None else (450.0 if gpu else 120.0)
    if not batches or min(batches) < 1 or steps < 1 or warmup < 0 or budget <= 0:
        raise UsageError("--batches and --steps must be >= 1, --warmup >= 0, --budget-s > 0")
    if not gpu:  # the CPU mode times the same step functions eagerly (compile has its own CI test)
        with_section(cfg, "train", compile="false")
    only = set(args.sections.split(",")) if args.sections else None
    unknown = (only or set()) - {s[0] for s in sections}
    if unknown:
        raise UsageError(f"unknown sections {sorted(unknown)}; choose from {[s[0] for s in sections]}")
    return Check(mode=mode, device=device, cfg=cfg, batches=batches, steps=steps, warmup=warmup, work=work,
                 deadline=time.monotonic() + budget), only


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; 0 when no section failed, 1 when one did, 2 for a usage mistake."""
    args = parse_args(argv)
    if args.ddp_worker:
        return ddp_worker(Path(args.ddp_worker), args.overrides)

    def run() -> int:
        out = Path(args.out)
        report: dict[str, Any] = {}
        with tempfile.TemporaryDirectory(prefix="ddpm-gpu-check-") as tmp:
            check, only = make_check(args, Path(tmp))
            with contextlib.suppress(KeyboardInterrupt):
                report = run_all(check, out, only, argv)
        print(f"[gpu_check] report: {out.resolve()} ({'ok' if report.get('ok') else 'FAILED'}, "
              f"{report.get('wall_s')} s)")
        return 0 if report.get("ok") else 1

    return timing.run_cli(MODULE, run)


if __name__ == "__main__":
    sys.exit(main())
