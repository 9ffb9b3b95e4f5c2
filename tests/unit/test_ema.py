"""Fused EMA against a plain per-parameter loop."""

from __future__ import annotations

import torch
from torch import nn

from trainer.ema import EMA


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(4, 8), nn.Linear(6, 5))


def _reference(model: nn.Module, decays, steps, warmup) -> list[dict[str, torch.Tensor]]:
    """What every EMA implementation should produce: a loop over parameters."""
    shadows = [{k: v.detach().clone().double() for k, v in model.state_dict().items()} for _ in decays]
    return shadows


def test_matches_a_plain_loop_for_several_decays_and_warmup() -> None:
    for warmup in (False, True):
        model = _model(0)
        decays = (0.9, 0.999)
        ema = EMA(model, decays, warmup=warmup)
        ref = _reference(model, decays, 0, warmup)
        for n in range(7):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p))
            ema.update(model)
            for i, d in enumerate(decays):
                dd = min(d, (1 + n) / (10 + n)) if warmup else d
                for k, v in model.state_dict().items():
                    ref[i][k] = dd * ref[i][k] + (1 - dd) * v.double()
        for i in range(len(decays)):
            got = ema.state_dict_for(i)
            for k, v in ref[i].items():
                torch.testing.assert_close(got[k].double(), v, rtol=1e-6, atol=1e-6)
        assert ema.num_updates == 7


def test_state_roundtrip_and_copy_to() -> None:
    model = _model(1)
    ema = EMA(model, (0.5,))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)
    ema.update(model)
    other = EMA(_model(2), (0.5,))
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 1
    target = _model(3)
    other.copy_to(target)
    for k, v in ema.state_dict_for(0).items():
        assert torch.equal(target.state_dict()[k], v)


def test_update_is_one_foreach_call_per_decay(monkeypatch) -> None:
    calls = []
    real = torch._foreach_lerp_

    def spy(*args, **kwargs):
        calls.append(len(args[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_foreach_lerp_", spy)
    model = _model(0)
    ema = EMA(model, (0.9, 0.99, 0.999))
    ema.update(model)
    n_tensors = sum(1 for _ in model.state_dict())
    assert calls == [n_tensors] * 3
