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


# ----------------------------------------------------------------------------- power-function profiles


def test_gamma_solves_the_cubic_and_gives_the_profile_its_width() -> None:
    from trainer.ema_math import SIGMA_REL_WIDEST, gamma_from_sigma_rel, sigma_rel_from_gamma

    for s in (0.01, 0.05, 0.1, 0.2, 0.29):
        g = gamma_from_sigma_rel(s)
        assert abs(g**3 + 7 * g**2 + (16 - s**-2) * g + (12 - s**-2)) < 1e-6 * s**-2
        assert abs(sigma_rel_from_gamma(g) - s) < 1e-12
        # the density (g+1) tau^g on [0, 1] has standard deviation s (EDM2 eq. 3), by quadrature
        tau = (torch.arange(200_000, dtype=torch.float64) + 0.5) / 200_000
        p = (g + 1) * tau**g / 200_000
        mean = (p * tau).sum()
        assert abs(((p * (tau - mean) ** 2).sum()).sqrt().item() - s) < 1e-6
    assert 0.30 < SIGMA_REL_WIDEST < 0.301
    for bad in (0.0, -0.1, 0.31):
        try:
            gamma_from_sigma_rel(bad)
        except ValueError:
            continue
        raise AssertionError(f"sigma_rel {bad} accepted")


def test_power_profile_is_the_exact_integral_over_images_for_any_batch_schedule() -> None:
    """Updates of 8, then 24, then 8 images (sparse, batch changes): the shadow is sum_k w_k theta_k with
    w_k = (t_k/T)^(g+1) - (t_{k-1}/T)^(g+1), the power profile integrated over each update's images."""
    import numpy as np

    from trainer.ema_math import update_weights

    model = _model(0)
    ema = EMA(model, (0.9,), sigma_rels=(0.05, 0.15))
    times, states = [], []
    nimg = 0
    for k in range(30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        nimg += 8 if k < 10 or k >= 20 else 24
        ema.update(model, nimg)
        times.append(nimg)
        states.append({n: v.double().clone() for n, v in model.state_dict().items()})
    for j, g in enumerate(ema.gammas):
        w = update_weights(g, nimg, np.array(times, dtype=np.float64))
        assert abs(w.sum() - 1) < 1e-12
        got = ema.state_dict_for(1 + j)  # fixed decays first
        for name in got:
            want = sum(float(wk) * s[name] for wk, s in zip(w, states))
            torch.testing.assert_close(got[name].double(), want, rtol=1e-5, atol=1e-5)
    assert ema.nimg == nimg and ema.labels() == ["decay 0.9", "sigma_rel 0.05", "sigma_rel 0.15"]


def test_beta_is_one_minus_batch_over_time_to_the_power_gamma_plus_one() -> None:
    from trainer.ema_math import beta

    g = 6.94
    assert beta(g, 0, 64) == 0.0  # the first update takes the weights as they are
    assert abs(beta(g, 6400, 6464) - (1 - 64 / 6464) ** (g + 1)) < 1e-15
    model = _model(0)
    ema = EMA(model, (), sigma_rels=(0.1,))
    try:
        ema.update(model)
    except ValueError as e:
        assert "nimg" in str(e)
    else:
        raise AssertionError("a power profile updated without the images seen")


def test_update_is_one_foreach_call_per_profile(monkeypatch) -> None:
    calls = []
    real = torch._foreach_lerp_

    def spy(*args, **kwargs):
        calls.append(len(args[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_foreach_lerp_", spy)
    model = _model(0)
    ema = EMA(model, (0.9999,), sigma_rels=(0.05, 0.1))
    ema.update(model, 64)
    assert calls == [sum(1 for _ in model.state_dict())] * 3


def test_state_of_power_profiles_roundtrips_and_an_older_state_loads() -> None:
    model = _model(1)
    ema = EMA(model, (0.99,), sigma_rels=(0.05,))
    for n in (16, 32, 48):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        ema.update(model, n)
    other = EMA(_model(2), (0.99,), sigma_rels=(0.05,))
    other.load_state_dict(ema.state_dict())
    assert (other.nimg, other.num_updates) == (48, 3)
    for a, b in zip(other.shadows, ema.shadows):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    # a checkpoint written before power profiles existed: no sigma_rels, no nimg
    old = {k: v for k, v in EMA(model, (0.99,)).state_dict().items() if k not in ("sigma_rels", "nimg")}
    plain = EMA(_model(2), (0.99,))
    plain.load_state_dict(old)
    assert plain.nimg == 0 and plain.sigma_rels == []
    try:
        EMA(_model(2), (0.99,), sigma_rels=(0.05,)).load_state_dict(old)
    except ValueError as e:
        assert "sigma_rels differ" in str(e)
    else:
        raise AssertionError("an older state loaded into an EMA with power profiles")
