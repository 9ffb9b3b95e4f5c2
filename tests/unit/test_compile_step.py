"""The real training step under torch.compile: no graph break, no recompile after warm-up, no host sync.

Dynamo decides graph breaks and recompiles before any backend runs, so the CPU answers for the
GPU too; what changes every step (lr, seeds, loss scale, micro-step, DDP sync flag) must stay
outside the compiled region or be a tensor. The CUDA test checks the same step has no host
sync (``torch.cuda.set_sync_debug_mode("error")`` raises on one).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from models.diffusion import GaussianDiffusion
from trainer.build import (
    build_model,
    build_optimizer,
    memory_format,
    parallelize,
    resolve_precision,
)
from trainer.config import load_config
from trainer.distributed import DistInfo
from trainer.ema import EMA
from trainer.loss import DiffusionLoss
from trainer.step import StepStats, micro_step, optimizer_step

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def _batch(cfg, n: int, seed: int) -> dict[str, torch.Tensor]:
    """A uint8 batch as the loader yields it: (n, 3, H, W) in channels_last strides."""
    g = torch.Generator().manual_seed(seed)
    s = cfg.model.image_size
    x = torch.randint(0, 256, (n, 3, s, s), generator=g, dtype=torch.uint8)
    return {"image": x.contiguous(memory_format=torch.channels_last)}


class _Capture(logging.Handler):
    """Keeps the messages of torch's recompiles and graph_breaks log artifacts."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _run_steps(cfg, device: torch.device, steps: range, accum: int, parts: tuple) -> None:
    train_model, model, opt, fused, ema, stats, diffusion, gen, amp = parts
    for step in steps:
        for g in opt.param_groups:
            g["lr"] = 1e-4 * (step + 1)  # changes every step, like the warm-up
        for micro in range(accum):
            batch = {k: v.pin_memory() if device.type == "cuda" else v
                     for k, v in _batch(cfg, 4, 100 * step + micro).items()}
            losses, t = micro_step(train_model, gen, batch, range(8 * step + 4 * micro, 8 * step + 4 * micro + 4),
                                   dropout_seed=1000 * step + micro, scale=1.0 / accum,
                                   sync_grads=micro == accum - 1)
            stats.add_losses(losses, t)
        gn, found_inf = optimizer_step(model, opt, fused, cfg.train.grad_clip)
        stats.add_step(gn, found_inf, step, max_run=5)
        ema.update(model)


def _parts(cfg, device: torch.device) -> tuple:
    info = DistInfo(0, 1, 0, device)
    torch.manual_seed(0)
    model = build_model(cfg, device)
    train_model = parallelize(model, cfg, info)
    opt, fused = build_optimizer(model, cfg, device)
    ema = EMA(model, cfg.ema.decays)
    stats = StepStats(device, cfg.diffusion.timesteps)
    diffusion = GaussianDiffusion(cfg.diffusion).to(device)
    amp = resolve_precision(cfg, device)
    # "gen" is the loss object: it draws t and eps per sample (trainer.loss)
    gen = DiffusionLoss(diffusion, seed=0, num_classes=0, label_dropout=0.0, device=device,
                        memory_format=memory_format(cfg, device), amp_dtype=amp)
    return train_model, model, opt, fused, ema, stats, diffusion, gen, amp


@pytest.mark.slow
def test_compiled_step_has_no_graph_break_and_no_recompile_after_warmup() -> None:
    import torch._dynamo
    from torch._dynamo.utils import counters

    # dropout > 0 puts the RNG inside the compiled region; the tiny config has 2 levels + attention.
    cfg = load_config(TINY, ["train.compile=true", "model.dropout=0.1"])
    device = torch.device("cpu")
    torch._dynamo.reset()
    counters.clear()
    capture = _Capture()
    loggers = [logging.getLogger(n) for n in ("torch._dynamo", "torch")]
    torch._logging.set_logs(recompiles=True, graph_breaks=True)  # = TORCH_LOGS=recompiles,graph_breaks
    for lg in loggers:
        lg.addHandler(capture)
    try:
        parts = _parts(cfg, device)
        assert isinstance(parts[0], torch._dynamo.eval_frame.OptimizedModule)
        _run_steps(cfg, device, range(2), accum=1, parts=parts)  # warm-up: the one compile
        warm = dict(counters["stats"])
        with torch._dynamo.config.patch(error_on_recompile=True):
            # new lr, seeds, loss scale 1/2, micro-steps: nothing of it may reach the graph's guards
            _run_steps(cfg, device, range(2, 5), accum=2, parts=parts)
    finally:
        torch._logging.set_logs()
        for lg in loggers:
            lg.removeHandler(capture)
    breaks = dict(counters["graph_break"])
    assert not breaks, f"graph breaks in the training step: {breaks}"
    assert not [m for m in capture.messages if "Graph break" in m or "graph break" in m], capture.messages
    assert not [m for m in capture.messages if "Recompiling" in m], capture.messages
    assert counters["stats"]["unique_graphs"] == warm.get("unique_graphs") == 1
    # the step trained: finite losses, and the optimizer moved the weights
    out = parts[5].reduce()
    assert 0 < out["train/loss"] < 10 and out["train/skipped_steps_interval"] == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_compiled_bf16_step_has_no_host_sync() -> None:
    cfg = load_config(TINY, ["train.compile=true", "model.dropout=0.1"])
    device = torch.device("cuda")
    torch._dynamo.reset()
    parts = _parts(cfg, device)
    _run_steps(cfg, device, range(2), accum=1, parts=parts)  # compile and lazy state first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
    try:
        _run_steps(cfg, device, range(2, 4), accum=2, parts=parts)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    out = parts[5].reduce()  # the log step's one sync
    assert 0 < out["train/loss"] < 10
    # With the hooks DDP gets (trainer.build.align_grad_strides), every gradient of the compiled
    # channels_last step has exactly its weight's strides, 1x1 convs included: DDP's buckets agree.
    from trainer.build import align_grad_strides

    train_model, model, opt, fused, ema, stats, diffusion, gen, amp = parts
    assert align_grad_strides(model) > 0
    batch = {k: v.pin_memory() for k, v in _batch(cfg, 4, 7).items()}
    micro_step(train_model, gen, batch, range(4), dropout_seed=7)
    odd = [(n, p.stride(), p.grad.stride()) for n, p in model.named_parameters() if p.grad.stride() != p.stride()]
    assert not odd, odd
