"""The ``ddpm-export`` command: a run's weights and schedule as a diffusers DDPMPipeline folder.

    ddpm-export --run-dir runs/celebahq_256 --out exported/celebahq_256 [--weights ema|model]

Writes ``model_index.json``, ``unet/config.json`` + ``unet/diffusion_pytorch_model.safetensors``
(models.interop's UNet2DModel mapping) and ``scheduler/scheduler_config.json`` (this run's T,
betas, prediction type and clipping), so ``DDPMPipeline.from_pretrained(out)`` samples with the
schedule the run was trained on. The checkpoint is found as every reader finds it
(trainer.checkpoint.open_for_inference: a truncated newest one is named and the previous one
used); every file is written through data_pipeline.storage (temporary name, fsync, rename).
Exit codes: 0 written; 2 a set-up mistake (no usable checkpoint, a model diffusers cannot
represent), one line; 74 a storage fault, one line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from data_pipeline.config import SetupError
from data_pipeline.storage import atomic_write
from trainer.errors import EXIT_OK, classify

log = logging.getLogger("ddpm")

# Written into the configs' _diffusers_version when diffusers is not installed: the oldest
# version setup.py's "diffusers" extra accepts.
_MIN_DIFFUSERS = "0.30.0"


class ExportError(SetupError):
    """The run's model or schedule has no diffusers equivalent (one line naming the field)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of ``ddpm-export``."""
    p = argparse.ArgumentParser(
        prog="ddpm-export", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Export a run (its newest usable checkpoint, or a checkpoint file) as a diffusers "
                    "DDPMPipeline folder: UNet2DModel weights and the run's DDPMScheduler config.",
    )
    p.add_argument("--run-dir", required=True, help="run directory (newest usable checkpoint) or checkpoint file")
    p.add_argument("--out", required=True, help="output folder (DDPMPipeline.from_pretrained(out) loads it)")
    p.add_argument("--weights", choices=("ema", "model"), default="ema", help="EMA or raw weights")
    p.add_argument("--ema-index", type=int, default=0, help="which EMA decay's weights (index into ema.decays)")
    return p.parse_args(argv)


def _diffusers_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("diffusers")
    except PackageNotFoundError:
        return _MIN_DIFFUSERS


def _json(obj: dict[str, Any]) -> str:
    return json.dumps(obj, indent=2) + "\n"


def export_unet(model: Any, out_dir: str | Path, version: str | None = None) -> Path:
    """Write a UNet as a diffusers UNet2DModel folder (config.json + diffusion_pytorch_model.safetensors),
    each file atomically: ``UNet2DModel.from_pretrained(out_dir)`` loads it."""
    from safetensors.torch import save as safetensors_bytes

    from models.interop import convert_state_dict_to_diffusers, diffusers_config_from_unet

    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper
    cfg = model.cfg
    try:
        config = diffusers_config_from_unet(cfg)
    except ValueError as e:
        raise ExportError(f"this model cannot be exported to diffusers: {e}") from None
    state = convert_state_dict_to_diffusers({k: v.detach().cpu() for k, v in model.state_dict().items()}, cfg)
    out = Path(out_dir)
    atomic_write(out / "diffusion_pytorch_model.safetensors", safetensors_bytes(state, metadata={"format": "pt"}),
                 what="exported weights")
    atomic_write(out / "config.json", _json({**config, "_diffusers_version": version or _diffusers_version()}),
                 what="exported UNet config")
    return out


def export_run(run_dir_or_ckpt: str | Path, out: str | Path, weights: str = "ema", ema_index: int = 0) -> Path:
    """Write the DDPMPipeline folder of a run's checkpoint into ``out``; returns the checkpoint used."""
    from models.interop import diffusers_config_from_unet, diffusers_scheduler_config
    from trainer.checkpoint import open_for_inference

    got = open_for_inference(run_dir_or_ckpt, which=weights, ema_index=ema_index)
    model, cfg = got.model, got.model.cfg
    try:
        diffusers_config_from_unet(cfg)  # refuse before writing anything
        scheduler_config = diffusers_scheduler_config(got.diffusion.cfg)
    except ValueError as e:
        raise ExportError(f"{got.path} cannot be exported to diffusers: {e}") from None
    version = _diffusers_version()
    out = Path(out)
    # Weights and configs first, model_index.json last: a folder that has it is complete.
    export_unet(model, out / "unet", version)
    atomic_write(out / "scheduler" / "scheduler_config.json",
                 _json({**scheduler_config, "_diffusers_version": version}), what="exported scheduler config")
    atomic_write(out / "model_index.json", _json({
        "_class_name": "DDPMPipeline", "_diffusers_version": version,
        "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"],
    }), what="exported pipeline index")
    d = got.diffusion.cfg
    log.info("exported %s weights of %s to %s (T=%d, %s betas, prediction %s%s)", weights, got.path, out,
             d.timesteps, d.schedule, scheduler_config["prediction_type"],
             "; class-conditional: pass class_labels to the UNet, DDPMPipeline does not" if cfg.num_classes else "")
    return got.path


def main(argv: list[str] | None = None) -> int:
    """The ``ddpm-export`` command; returns the exit code (one line on stderr for 2 and 74)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    args = parse_args(argv)
    try:
        export_run(args.run_dir, args.out, args.weights, args.ema_index)
    except Exception as e:
        code, line = classify(e)  # a set-up mistake (2) or a storage fault (74): one line; else a crash
        if line is None:
            raise
        print(f"ddpm-export: {line.replace('config error: ', 'error: ', 1)}", file=sys.stderr)
        return code
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
