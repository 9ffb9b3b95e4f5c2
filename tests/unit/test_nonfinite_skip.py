"""A non-finite gradient skips the fused AdamW step on the device (no host sync)."""

from __future__ import annotations

import torch
from torch import nn

from trainer.build import build_optimizer
from trainer.config import load_config
from trainer.step import StepStats


def test_fused_adamw_skips_the_step_when_found_inf() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt, fused = build_optimizer(model, load_config(None, ["train.lr=0.1"]), torch.device("cpu"))
    assert fused, "fused AdamW should be available on CPU in torch >= 2.4"
    model(torch.randn(2, 4)).sum().backward()
    opt.found_inf, opt.grad_scale = torch.zeros(()), None
    opt.step()  # a normal step
    before = [p.detach().clone() for p in model.parameters()]
    steps_before = [opt.state[p]["step"].clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    opt.found_inf = (~torch.isfinite(torch.tensor(float("nan")))).float()
    opt.step()
    for b, p in zip(before, model.parameters()):
        assert torch.equal(b, p.detach())
    for s, p in zip(steps_before, model.parameters()):
        assert torch.equal(s, opt.state[p]["step"])
        assert torch.isfinite(opt.state[p]["exp_avg"]).all()


def test_step_stats_track_the_longest_nonfinite_streak() -> None:
    s = StepStats(torch.device("cpu"), num_timesteps=1000)
    pattern = [0, 1, 1, 0, 1, 1, 1, 0]
    for step, bad in enumerate(pattern):
        s.add_step(torch.tensor(float("nan") if bad else 2.0), torch.tensor(float(bad)), step, max_run=3)
    assert s.max_run.item() == 3
    assert s.first_bad_step.item() == 6  # the step at which 3 in a row was reached
    assert s.skipped.item() == 5
    s.add_losses(torch.tensor([1.0, 3.0, float("nan")]), torch.tensor([0, 999, 500]))
    out = s.reduce()
    assert out["train/loss"] == 2.0 and out["loss_by_t/q0"] == 1.0 and out["loss_by_t/q3"] == 3.0
    assert out["train/grad_norm"] == 2.0
