"""The fused AdamW skips a step when found_inf is set outside GradScaler, and leaves no trace.

trainer.step.optimizer_step sets ``optimizer.found_inf`` itself (no GradScaler, bf16 needs
none). torch's ``_fused_adam`` (torch/optim/adam.py, the same code in 2.11 and 2.14) passes it to
the fused kernel, which returns before touching params, exp_avg or exp_avg_sq when it is 1, and
then subtracts it from the step counters it had incremented. If any of that changed in a torch
release, a skipped step would leak into the weights, the moments or the bias correction, and
these tests would fail. The CUDA case runs where a GPU is (``python -m benchmarks.gpu_check``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainer.build import build_optimizer
from trainer.config import load_config
from trainer.ema import EMA
from trainer.step import StepStats, optimizer_step

devices = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                  reason="needs CUDA")]),
]


def _model(device: str) -> nn.Module:
    torch.manual_seed(0)
    # a 1x1 conv (4-D weight with size-1 dims) and a linear layer, like the UNet's parameter kinds
    return nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten(), nn.Linear(4 * 2 * 2, 2)).to(device)


def _grads(model: nn.Module, k: int, bad: bool = False) -> None:
    g = torch.Generator().manual_seed(k)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g).to(p.device)
        if bad:
            p.grad.view(-1)[0] = float("nan")  # one non-finite value anywhere is enough


def _state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {f"p{i}": p.detach().clone() for i, p in enumerate(model.parameters())}
    for i, p in enumerate(model.parameters()):
        for k, v in opt.state[p].items():
            out[f"p{i}.{k}"] = v.detach().clone()
    return out


@pytest.mark.parametrize("device", devices)
def test_a_skipped_step_leaves_weights_moments_and_step_count_as_if_it_never_happened(device: str) -> None:
    # weight decay > 0: AdamW's decoupled decay must be skipped too; clipping on
    cfg = load_config(None, ["train.lr=0.01", "train.weight_decay=0.1", "train.grad_clip=1.0"])
    runs = {}
    for name, bad_at in (("clean", None), ("with_skip", 1)):
        model = _model(device)
        opt, fused = build_optimizer(model, cfg, torch.device(device))
        assert fused, "fused AdamW is available on CPU and CUDA for float32 parameters (torch >= 2.4)"
        found = []
        k = 0
        for step in range(4 if bad_at is None else 5):
            bad = step == bad_at
            _grads(model, 100 if bad else k, bad=bad)
            k += 0 if bad else 1
            grad_norm, found_inf = optimizer_step(model, opt, fused, cfg.train.grad_clip)
            found.append(float(found_inf))
            if bad:
                assert not torch.isfinite(grad_norm)
        runs[name] = (_state(model, opt), found)
    clean, skipped = runs["clean"], runs["with_skip"]
    assert skipped[1] == [0.0, 1.0, 0.0, 0.0, 0.0] and clean[1] == [0.0] * 4
    assert clean[0].keys() == skipped[0].keys()
    for key in clean[0]:  # bit-exact: the skip left nothing behind, not even in the step counter
        assert torch.equal(clean[0][key], skipped[0][key]), key
    assert all(v.item() == 4 for k, v in skipped[0].items() if k.endswith(".step"))


@pytest.mark.parametrize("device", devices)
def test_a_skipped_first_step_creates_no_moment(device: str) -> None:
    """A non-finite very first step: the lazily created state stays at zero, step 0."""
    cfg = load_config(None, ["train.lr=0.01"])
    model = _model(device)
    before = [p.detach().clone() for p in model.parameters()]
    opt, fused = build_optimizer(model, cfg, torch.device(device))
    _grads(model, 0, bad=True)
    _, found_inf = optimizer_step(model, opt, fused, cfg.train.grad_clip)
    assert found_inf.item() == 1.0
    for b, p in zip(before, model.parameters()):
        assert torch.equal(b, p.detach())
        st = opt.state[p]
        assert st["step"].item() == 0 and not st["exp_avg"].any() and not st["exp_avg_sq"].any()


def test_the_step_reads_no_device_value(monkeypatch: pytest.MonkeyPatch) -> None:
    """Optimizer, statistics and EMA never turn a tensor into a host value (a sync on a GPU).

    The CPU stand-in for ``torch.cuda.set_sync_debug_mode("error")``: every tensor-to-host
    conversion raises while the step runs (the GPU test in test_compile_step.py does the real one).
    """
    cfg = load_config(None, ["train.grad_clip=1.0"])
    model = _model("cpu")
    opt, fused = build_optimizer(model, cfg, torch.device("cpu"))
    ema = EMA(model, [0.999, 0.9])
    stats = StepStats(torch.device("cpu"), num_timesteps=1000)
    _grads(model, 0)
    optimizer_step(model, opt, fused, cfg.train.grad_clip)  # lazy state creation first

    def forbidden(self, *a, **k):
        raise AssertionError("host read of a tensor value inside the training step")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    for step, bad in enumerate((False, True, False)):
        _grads(model, step, bad=bad)
        grad_norm, found_inf = optimizer_step(model, opt, fused, cfg.train.grad_clip)
        stats.add_losses(torch.tensor([0.5, float("nan")]), torch.tensor([10, 900]))
        stats.add_step(grad_norm, found_inf, step, max_run=3)
        ema.update(model)
    monkeypatch.undo()
    assert stats.skipped.item() == 1 and stats.steps.item() == 2
