"""Gaussian diffusion: schedule values, q_sample (eq. 4), the posterior (eqs. 6-7), the loss (eq. 14)."""

import math

import pytest
import torch

from models.diffusion import (
    DiffusionConfig,
    GaussianDiffusion,
    drop_labels,
    make_betas,
    sampling_timesteps,
)
from models.unet import UNet, UNetConfig


def test_linear_schedule_is_the_papers():
    d = GaussianDiffusion(DiffusionConfig())
    assert d.num_timesteps == 1000
    assert d.betas.dtype == torch.float64
    assert d.betas[0].item() == pytest.approx(1e-4, rel=1e-12)
    assert d.betas[-1].item() == pytest.approx(0.02, rel=1e-12)
    # evenly spaced
    steps = d.betas[1:] - d.betas[:-1]
    assert torch.allclose(steps, torch.full_like(steps, (0.02 - 1e-4) / 999), rtol=1e-9)
    # abar_t = prod_{s <= t} (1 - beta_s), computed here with a Python loop
    prod, abar = 1.0, []
    for b in d.betas.tolist():
        prod *= 1.0 - b
        abar.append(prod)
    assert torch.allclose(d.alphas_cumprod, torch.tensor(abar, dtype=torch.float64), rtol=1e-12)
    # the paper chose T and betas so that x_T is almost pure noise: abar_T ~ 4e-5
    assert 1e-5 < d.alphas_cumprod[-1].item() < 1e-4
    assert d.alphas_cumprod_prev[0].item() == 1.0


def test_cosine_schedule_follows_nichol_dhariwal():
    cfg = DiffusionConfig(schedule="cosine")
    d = GaussianDiffusion(cfg)
    s, T = 0.008, 1000

    def f(t: float) -> float:
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    for t in (0, 1, 10, 500, 900):
        assert d.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert d.betas.max().item() == pytest.approx(0.999)  # the cap bites at the end
    assert (d.betas > 0).all()


def test_unknown_names_are_rejected_with_the_field():
    with pytest.raises(ValueError, match=r"diffusion\.schedule: expected one of \['linear', 'cosine'\]"):
        GaussianDiffusion(DiffusionConfig(schedule="quadratic"))
    with pytest.raises(ValueError, match=r"diffusion\.target"):
        GaussianDiffusion(DiffusionConfig(target="score"))
    with pytest.raises(ValueError, match=r"diffusion\.beta_start/beta_end"):
        make_betas(DiffusionConfig(beta_start=0.1, beta_end=0.01))
    with pytest.raises(ValueError, match=r"diffusion\.timesteps"):
        GaussianDiffusion(DiffusionConfig(timesteps=1))


def test_q_sample_is_eq4():
    d = GaussianDiffusion(DiffusionConfig())
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 3, 4, 4, generator=g), torch.randn(3, 3, 4, 4, generator=g)
    t = torch.tensor([0, 499, 999])
    # The reference in float64: in float32, 1 - abar at t=0 (about 1e-4) keeps only ~3 digits.
    abar = d.alphas_cumprod[t].double().view(3, 1, 1, 1)
    ref = (abar.sqrt() * x0.double() + (1 - abar).sqrt() * eps.double()).float()
    assert torch.allclose(d.q_sample(x0, t, eps), ref, atol=1e-6)


def test_q_sample_statistics():
    # q(x_t | x0) = N(sqrt(abar) x0, (1 - abar) I), checked by Monte Carlo
    d = GaussianDiffusion(DiffusionConfig())
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((20000, 1, 1, 1), 0.7)
    t = torch.full((20000,), 300)
    x_t = d.q_sample(x0, t, torch.randn(x0.shape, generator=g))
    abar = d.alphas_cumprod[300].item()
    assert x_t.mean().item() == pytest.approx(math.sqrt(abar) * 0.7, abs=0.02)
    assert x_t.var().item() == pytest.approx(1 - abar, rel=0.03)


def test_posterior_matches_bayes_rule():
    # q(x_{t-1} | x_t, x0) ∝ N(x_t; sqrt(a_t) x_{t-1}, b_t) N(x_{t-1}; sqrt(abar_{t-1}) x0, 1 - abar_{t-1}):
    # a product of Gaussians, computed here in float64 from betas only
    d = GaussianDiffusion(DiffusionConfig())
    betas = d.betas.tolist()
    x0 = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    x_t = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    t = torch.tensor([1, 10, 500, 999])
    mean, var, log_var = d.q_posterior(x0, x_t, t)
    for i, ti in enumerate(t.tolist()):
        b = betas[ti]
        abar_prev = math.prod(1 - bb for bb in betas[:ti])
        precision = (1 - b) / b + 1 / (1 - abar_prev)
        exp_mean = (math.sqrt(1 - b) / b * x_t[i] + math.sqrt(abar_prev) / (1 - abar_prev) * x0[i]) / precision
        assert torch.allclose(mean[i], exp_mean, rtol=1e-8, atol=1e-10)
        assert var[i].item() == pytest.approx(1 / precision, rel=1e-8)
        assert log_var[i].item() == pytest.approx(math.log(1 / precision), rel=1e-8)
    # at t = 0 the posterior is a point mass on x0 and the log variance is clipped (paper's code)
    mean0, var0, log_var0 = d.q_posterior(x0[:1], x_t[:1], torch.tensor([0]))
    assert torch.allclose(mean0, x0[:1])
    assert var0.item() == 0.0
    assert log_var0.item() == pytest.approx(math.log(d.posterior_variance[1].item()))


@pytest.mark.parametrize("target", ["eps", "x0", "v"])
def test_oracle_model_has_zero_loss_and_targets_invert(target):
    d = GaussianDiffusion(DiffusionConfig(target=target))
    x0, eps = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 5, 600, 999])

    def oracle(x_t, tt):
        assert torch.equal(tt, t)
        return d.target_for(x0, tt, eps)

    loss = d.training_losses(oracle, x0, t, eps)
    assert loss.shape == (4,)
    assert loss.max().item() < 1e-10
    zero = d.training_losses(lambda x_t, tt: torch.zeros_like(x_t), x0, t, eps)
    expected = d.target_for(x0, t, eps).pow(2).mean(dim=(1, 2, 3))
    assert torch.allclose(zero, expected)
    # from the oracle output at x_t, predict_x0_eps recovers (x0, eps)
    x_t = d.q_sample(x0, t, eps)
    rx0, reps = d.predict_x0_eps(d.target_for(x0, t, eps), x_t, d.alphas_cumprod[t])
    assert torch.allclose(rx0[1:], x0[1:], atol=1e-3)
    assert torch.allclose(reps[:-1], eps[:-1], atol=1e-3)


def test_v_target_definition():
    d = GaussianDiffusion(DiffusionConfig(target="v"))
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t = torch.tensor([100, 800])
    abar = d.alphas_cumprod[t].float().view(2, 1, 1, 1)
    assert torch.allclose(d.target_for(x0, t, eps), abar.sqrt() * eps - (1 - abar).sqrt() * x0, atol=1e-6)


def test_training_loss_with_the_unet_and_labels():
    cfg = UNetConfig(image_size=8, base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                     attn_resolutions=(4,), dropout=0.0, num_classes=3)
    model = UNet(cfg)
    d = GaussianDiffusion(DiffusionConfig(timesteps=100))
    x0 = torch.rand(2, 3, 8, 8) * 2 - 1
    loss = d.training_losses(model, x0, torch.tensor([0, 99]), torch.randn_like(x0), torch.tensor([1, 2]))
    assert loss.shape == (2,)
    loss.mean().backward()
    assert model.conv_out.weight.grad is not None


def test_bad_timesteps_and_shapes():
    d = GaussianDiffusion(DiffusionConfig(timesteps=100))
    x0 = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"t: expected timesteps in \[0, 100\).*max 100"):
        d.q_sample(x0, torch.tensor([0, 100]), x0)
    with pytest.raises(ValueError, match=r"t: expected timesteps in \[0, 100\).*min -1"):
        d.q_posterior(x0, x0, torch.tensor([-1, 3]))
    with pytest.raises(ValueError, match="t: expected integer"):
        d.q_sample(x0, torch.tensor([0.5, 1.0]), x0)
    with pytest.raises(ValueError, match=r"t: expected shape \(2,\)"):
        d.q_sample(x0, torch.tensor([1]), x0)
    with pytest.raises(ValueError, match="model output: expected shape"):
        d.training_losses(lambda x, t: x[:, :1], x0, torch.tensor([1, 2]), x0)


def test_to_returns_self_and_keeps_float64():
    d = GaussianDiffusion(DiffusionConfig())
    assert d.to("cpu") is d
    assert d.posterior_mean_coef1.dtype == torch.float64
    x0 = torch.randn(1, 3, 2, 2, dtype=torch.bfloat16)
    assert d.q_sample(x0, torch.tensor([3]), x0).dtype == torch.float32  # cast on use, at least fp32


def test_sample_t_range_and_determinism():
    d = GaussianDiffusion(DiffusionConfig(timesteps=50))
    t = d.sample_t(4000, torch.Generator().manual_seed(1))
    assert t.min().item() == 0 and t.max().item() == 49
    assert torch.equal(t, d.sample_t(4000, torch.Generator().manual_seed(1)))


def test_sampling_timesteps():
    assert sampling_timesteps(1000, 1000) == list(range(999, -1, -1))
    assert sampling_timesteps(1000, 4) == [750, 500, 250, 0]
    assert sampling_timesteps(1000, 4, "trailing") == [999, 749, 499, 249]
    with pytest.raises(ValueError, match=r"steps: expected 1 <= steps <= 1000"):
        sampling_timesteps(1000, 1001)
    with pytest.raises(ValueError, match="spacing"):
        sampling_timesteps(1000, 10, "middle")


def test_drop_labels():
    y = torch.arange(10000) % 7
    same = drop_labels(y, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(same, y)
    assert (drop_labels(y, 1.0, torch.Generator().manual_seed(0)) == -1).all()
    a = drop_labels(y, 0.1, torch.Generator().manual_seed(3))
    assert torch.equal(a, drop_labels(y, 0.1, torch.Generator().manual_seed(3)))
    assert 0.08 < (a == -1).float().mean().item() < 0.12
    assert torch.equal(a[a != -1], y[a != -1])  # kept labels are unchanged
    assert (drop_labels(y, 1.0, torch.Generator(), null_label=7) == 7).all()
    with pytest.raises(ValueError, match="p: expected a probability"):
        drop_labels(y, 1.5, torch.Generator())


# ---- the faster-training options: loss weights, timestep distributions, zero terminal SNR -------------


def _normal_cdf(z: torch.Tensor) -> torch.Tensor:
    return torch.tensor([0.5 * math.erfc(-v / math.sqrt(2)) for v in z.tolist()], dtype=torch.float64)


def test_paper_defaults_are_unchanged():
    d = GaussianDiffusion(DiffusionConfig())
    assert (d.cfg.loss_weight, d.cfg.t_sampling, d.cfg.zero_terminal_snr) == ("uniform", "uniform", False)
    t = torch.arange(1000)
    assert torch.equal(d.loss_weights(t), torch.ones(1000))
    u = torch.rand(10_000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(d.timesteps_from_uniform(u), (u * 1000).long())  # floor(u T), bit for bit as before
    assert torch.allclose(d.timestep_probs(), torch.full((1000,), 1e-3, dtype=torch.float64))


@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weights_are_one_weighting_in_every_target(gamma):
    # Hang et al. 2023: min(SNR_t, gamma) ||x0 - x0_hat||^2, whatever the network predicts
    torch.manual_seed(0)
    t = torch.tensor([0, 10, 100, 300, 600, 999])
    x0, eps, out = torch.randn(6, 3, 4, 4), torch.randn(6, 3, 4, 4), torch.randn(6, 3, 4, 4)
    losses = {}
    for target in ("eps", "x0", "v"):
        d = GaussianDiffusion(DiffusionConfig(target=target, loss_weight="min_snr", min_snr_gamma=gamma))
        abar = d.alphas_cumprod[t].view(-1, 1, 1, 1)
        snr = (abar / (1 - abar)).flatten()
        x_t = d.q_sample(x0, t, eps)
        pred = d.target_for(x0, t, eps) + 0.1 * out  # a model output with some error
        x0_hat, _ = d.predict_x0_eps(pred, x_t, d.alphas_cumprod[t])
        weighted = d.loss_weights(t).double() * (pred - d.target_for(x0, t, eps)).double().pow(2).mean((1, 2, 3))
        expected = snr.clamp(max=gamma) * (x0_hat - x0).double().pow(2).mean((1, 2, 3))
        assert torch.allclose(weighted, expected, rtol=1e-3), target
        losses[target] = weighted
        closed = {"eps": snr.clamp(max=gamma) / snr, "x0": snr.clamp(max=gamma),
                  "v": snr.clamp(max=gamma) / (snr + 1)}[target]
        assert torch.allclose(d.loss_weights(t).double(), closed, rtol=1e-6)
    eps_w = GaussianDiffusion(DiffusionConfig(loss_weight="min_snr", min_snr_gamma=gamma)).loss_weights(t)
    assert eps_w[-1] == 1.0 and eps_w[0] == pytest.approx(gamma / 9999.0, rel=1e-3)  # 1 at high t, gamma/SNR low


def test_min_snr_eps_weight_is_finite_at_zero_snr():
    d = GaussianDiffusion(DiffusionConfig(target="v", zero_terminal_snr=True, loss_weight="min_snr"))
    assert d.snr(torch.tensor([999])).item() == 0.0
    assert d.loss_weights(torch.tensor([999])).item() == 0.0  # v: min(0, gamma) / (0 + 1)
    eps_weights = GaussianDiffusion(DiffusionConfig(loss_weight="min_snr"))
    assert torch.isfinite(eps_weights.loss_weights(torch.arange(1000))).all()


def _check_inverse_cdf(d: GaussianDiffusion, probs: torch.Tensor) -> None:
    """timesteps_from_uniform on a fine grid of u has the frequencies of the closed-form probs."""
    n = 2_000_000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    counts = torch.bincount(d.timesteps_from_uniform(u), minlength=d.num_timesteps).double() / n
    assert (counts - probs).abs().max() < 2.0 / n
    assert torch.allclose(d.timestep_probs(), probs, rtol=1e-9, atol=1e-15)


def test_lognormal_timesteps_follow_edm():
    # EDM (Karras et al. 2022, Table 1): ln sigma ~ N(-1.2, 1.2^2), sigma_t = sqrt((1 - abar_t) / abar_t);
    # t takes the mass between the midpoints of neighbouring ln sigma
    d = GaussianDiffusion(DiffusionConfig(t_sampling="lognormal"))
    abar = d.alphas_cumprod
    ln_sigma = [0.5 * math.log((1 - a) / a) for a in abar.tolist()]
    edges = torch.tensor([-math.inf] + [(a + b) / 2 for a, b in zip(ln_sigma, ln_sigma[1:])] + [math.inf],
                         dtype=torch.float64)
    cdf = _normal_cdf((edges + 1.2) / 1.2)
    _check_inverse_cdf(d, cdf[1:] - cdf[:-1])
    # the median noise level is exp(P_mean): half the draws have sigma_t below it (to one timestep)
    t_med = int(d.timesteps_from_uniform(torch.tensor([0.5], dtype=torch.float64)))
    assert abs(ln_sigma[t_med] - (-1.2)) < (ln_sigma[t_med + 1] - ln_sigma[t_med - 1])
    custom = GaussianDiffusion(DiffusionConfig(t_sampling="lognormal", t_mean=0.5, t_std=0.3))
    t_med = int(custom.timesteps_from_uniform(torch.tensor([0.5], dtype=torch.float64)))
    assert abs(ln_sigma[t_med] - 0.5) < (ln_sigma[t_med + 1] - ln_sigma[t_med - 1])


def test_logit_normal_timesteps_follow_sd3():
    # SD3 (Esser et al. 2024): logit(tau) ~ N(0, 1), tau = t / T; t holds tau in [t/T, (t+1)/T)
    T = 1000
    d = GaussianDiffusion(DiffusionConfig(t_sampling="logit_normal"))
    tau = torch.arange(T + 1, dtype=torch.float64) / T
    logit = torch.log(tau) - torch.log1p(-tau)  # -inf .. inf
    cdf = _normal_cdf(logit)
    probs = cdf[1:] - cdf[:-1]
    _check_inverse_cdf(d, probs)
    assert probs.argmax().item() in (499, 500) and probs[0] < 1e-6  # mid-range t, little at the ends
    # the density of the continuous law at tau: phi(logit tau) / (tau (1 - tau))
    mid = 250.5 / T
    density = math.exp(-0.5 * math.log(mid / (1 - mid)) ** 2) / math.sqrt(2 * math.pi) / (mid * (1 - mid))
    assert probs[250].item() * T == pytest.approx(density, rel=1e-3)


def test_sample_t_follows_the_configured_distribution():
    d = GaussianDiffusion(DiffusionConfig(t_sampling="lognormal"))
    t = d.sample_t(20_000, torch.Generator().manual_seed(0))
    assert abs(t.float().mean().item() - (d.timestep_probs() * torch.arange(1000)).sum().item()) < 5


def test_zero_terminal_snr_rescale_is_lin_et_al_algorithm_1():
    plain = GaussianDiffusion(DiffusionConfig(target="v"))
    d = GaussianDiffusion(DiffusionConfig(target="v", zero_terminal_snr=True))
    s0, s = plain.sqrt_alphas_cumprod, d.alphas_cumprod.sqrt()
    assert d.alphas_cumprod[-1].item() == 0.0 and d.betas[-1].item() == pytest.approx(1.0)
    assert d.alphas_cumprod[0].item() == pytest.approx(plain.alphas_cumprod[0].item(), rel=1e-12)
    # sqrt(abar) is shifted by its last value and scaled to keep the first
    expected = (s0 - s0[-1]) * s0[0] / (s0[0] - s0[-1])
    assert torch.allclose(s, expected, rtol=1e-9, atol=1e-12)
    assert ((d.betas > 0) & (d.betas <= 1)).all()
    assert torch.isfinite(d.posterior_variance).all() and torch.isfinite(d.posterior_mean_coef1).all()


def test_new_options_are_validated():
    bad = [dict(loss_weight="p2"), dict(loss_weight="min_snr", min_snr_gamma=0.0), dict(t_sampling="beta"),
           dict(t_mean=1.0), dict(t_sampling="lognormal", t_std=0.0), dict(zero_terminal_snr=True)]
    for kw in bad:
        with pytest.raises(ValueError, match="diffusion\\."):
            DiffusionConfig(**kw).validate()
    with pytest.raises(ValueError, match="target=v"):
        GaussianDiffusion(DiffusionConfig(zero_terminal_snr=True))


def test_diffusion_loss_logs_eq14_and_backpropagates_the_weighted_loss():
    from trainer.loss import DiffusionLoss

    torch.manual_seed(0)
    cfg = UNetConfig(image_size=8, base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                     attn_resolutions=(4,), dropout=0.0)
    model = UNet(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    batch = {"image": torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)}
    grads, values = {}, {}
    for weight in ("uniform", "min_snr"):
        d = GaussianDiffusion(DiffusionConfig(target="v", loss_weight=weight, t_sampling="logit_normal"))
        loss = DiffusionLoss(d, seed=3, num_classes=0, label_dropout=0.0, device=torch.device("cpu"))
        model.zero_grad()
        losses, t = loss(model, batch, range(6))
        losses.mean().backward()
        grads[weight] = [p.grad.clone() for p in model.parameters()]
        values[weight] = (losses.detach(), t, d.loss_weights(t))
    (lu, tu, _), (lw, tw, w) = values["uniform"], values["min_snr"]
    assert torch.equal(tu, tw) and torch.equal(lu, lw)  # same draws; the logged values stay eq. 14's
    assert not torch.allclose(w, torch.ones_like(w))
    # the gradient is that of mean(w_t * L_t): recompute it directly
    model.zero_grad()
    d = GaussianDiffusion(DiffusionConfig(target="v", loss_weight="min_snr", t_sampling="logit_normal"))
    x0 = batch["image"].float() / 127.5 - 1
    _, noise, _ = DiffusionLoss(d, seed=3, num_classes=0, label_dropout=0.0, device=torch.device("cpu")).draws(
        range(6), (3, 8, 8))
    (w * d.training_losses(model, x0, tw, noise)).mean().backward()
    for g, p in zip(grads["min_snr"], model.parameters()):
        assert torch.allclose(g, p.grad, rtol=1e-4, atol=1e-9)
