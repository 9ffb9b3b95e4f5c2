"""Samplers: determinism per seed, oracle recovery, guidance, intermediates, and equality with diffusers."""

import math

import pytest
import torch

from models.diffusion import DiffusionConfig, GaussianDiffusion
from models.unet import UNet, UNetConfig

SHAPE = (3, 8, 8)


def fake_eps(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """A per-sample 'model': a fixed function of (x, t, y) for each image, independent of the batch."""
    out = torch.tanh(x * 0.5 + t.view(-1, 1, 1, 1) / 1000.0)
    if y is not None:
        out = out + 0.1 * y.view(-1, 1, 1, 1).float()
    return out


def table_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Model outputs that depend only on t: the same values can be fed to diffusers' schedulers."""
    g = torch.Generator().manual_seed(int(t[0]))
    return torch.randn(x.shape[1:], generator=g).expand_as(x)


@pytest.mark.parametrize("sampler, steps, eta", [("ddpm", None, 0.0), ("ddpm", 7, 0.0), ("ddim", 10, 1.0)])
def test_image_k_depends_only_on_its_seed(sampler, steps, eta):
    d = GaussianDiffusion(DiffusionConfig(timesteps=40))
    seeds = [5, 6, 7, 8, 9]

    def run(s):
        return d.sample(fake_eps, SHAPE, s, sampler=sampler, steps=steps, eta=eta)

    full = run(seeds)
    split = torch.cat([run(seeds[:2]), run(seeds[2:3]), run(seeds[3:])])
    assert torch.equal(full, split)  # bit-identical however the seeds are batched
    assert torch.equal(full[3:4], run([8]))
    assert torch.equal(run([9, 5])[1], full[0])  # order within the batch does not matter
    assert not torch.equal(full[0], full[1])  # different seeds give different images
    assert full.abs().max() <= 1.0


def test_unet_sampling_is_split_invariant_up_to_kernel_rounding():
    cfg = UNetConfig(image_size=8, base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                     attn_resolutions=(4,), dropout=0.1)
    torch.manual_seed(0)
    model = UNet(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    model.train()
    d = GaussianDiffusion(DiffusionConfig(timesteps=20))
    full = d.sample(model, SHAPE, [1, 2, 3, 4])
    split = torch.cat([d.sample(model, SHAPE, [1, 2]), d.sample(model, SHAPE, [3, 4])])
    # the noise is bit-identical; CPU conv/matmul kernels may round differently per batch size
    assert torch.allclose(full, split, atol=1e-5)
    assert model.training  # the mode is restored; dropout was off while sampling (else no match)


@pytest.mark.parametrize("target", ["eps", "x0", "v"])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_oracle_model_recovers_the_image(target, sampler):
    # a model that always knows x0 must lead every sampler to x0 (clipped), whatever the target
    d = GaussianDiffusion(DiffusionConfig(timesteps=50, target=target))
    x0 = torch.rand(1, *SHAPE) * 1.6 - 0.8

    def oracle(x_t, t):
        abar = d.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        eps = (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()
        return d.target_for(x0.expand_as(x_t), t, eps)

    out = d.sample(oracle, SHAPE, [0, 1], sampler=sampler, steps=10 if sampler == "ddim" else None)
    assert torch.allclose(out, x0.expand(2, *SHAPE), atol=1e-4)


def test_classifier_free_guidance_combines_cond_and_null():
    d = GaussianDiffusion(DiffusionConfig(timesteps=20))
    y = torch.tensor([0, 3])
    w = 3.0

    def combined(x, t, yy):
        null = fake_eps(x, t, torch.zeros_like(yy))  # fake_eps reads -1 as "null" = label 0 offset
        cond = fake_eps(x, t, yy)
        return null + w * (cond - null)

    def model(x, t, yy):
        return fake_eps(x, t, torch.where(yy < 0, 0, yy))

    guided = d.sample(model, SHAPE, [4, 5], y=y, guidance_scale=w)
    manual = d.sample(combined, SHAPE, [4, 5], y=y)
    assert torch.allclose(guided, manual, atol=1e-6)
    plain = d.sample(model, SHAPE, [4, 5], y=y)
    assert not torch.allclose(guided, plain)
    with pytest.raises(ValueError, match="guidance_scale: .* needs labels y"):
        d.sample(model, SHAPE, [4], guidance_scale=2.0)
    with pytest.raises(ValueError, match=r"y: expected shape \(2,\)"):
        d.sample(model, SHAPE, [4, 5], y=torch.tensor([1]))


def test_guidance_with_a_conditional_unet_runs():
    cfg = UNetConfig(image_size=8, base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                     attn_resolutions=(4,), dropout=0.0, num_classes=5)
    d = GaussianDiffusion(DiffusionConfig(timesteps=10))
    out = d.sample(UNet(cfg), SHAPE, [0, 1, 2], y=torch.tensor([0, 4, 2]), guidance_scale=4.0,
                   sampler="ddim", steps=5)
    assert out.shape == (3, *SHAPE) and torch.isfinite(out).all()


def test_intermediates():
    d = GaussianDiffusion(DiffusionConfig(timesteps=100))
    out, xs = d.sample(fake_eps, SHAPE, [3, 4], return_intermediates=True, intermediate_steps=6)
    assert len(xs) == 6
    assert torch.equal(xs[-1], out)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    assert torch.equal(xs[0][0], x_T)  # starts from image 0's own x_T
    # noise decreases towards the end of the chain
    assert xs[0].std() > xs[-1].std()
    plain = d.sample(fake_eps, SHAPE, [3, 4])
    assert torch.equal(plain, out)


def test_bad_sampler_arguments():
    d = GaussianDiffusion(DiffusionConfig(timesteps=10))
    with pytest.raises(ValueError, match=r"sampler: expected one of \['ddpm', 'ddim'\]"):
        d.sample(fake_eps, SHAPE, [0], sampler="euler")
    with pytest.raises(ValueError, match="var_type"):
        d.sample(fake_eps, SHAPE, [0], var_type="learned")
    with pytest.raises(ValueError, match=r"steps: expected 1 <= steps <= 10"):
        d.sample(fake_eps, SHAPE, [0], steps=11)
    with pytest.raises(ValueError, match="seeds"):
        d.sample(fake_eps, SHAPE, [])


# ---- equality with diffusers' schedulers -------------------------------------------------------


@pytest.mark.parametrize("schedule, name", [("linear", "linear"), ("cosine", "squaredcos_cap_v2")])
def test_schedule_matches_diffusers(schedule, name):
    diffusers = pytest.importorskip("diffusers")
    ours = GaussianDiffusion(DiffusionConfig(schedule=schedule))
    theirs = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=name)
    # diffusers keeps float32; ours is float64
    assert torch.allclose(ours.betas.float(), theirs.betas, rtol=1e-6, atol=1e-9)
    assert torch.allclose(ours.alphas_cumprod.float(), theirs.alphas_cumprod, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("var_type", ["fixedlarge", "fixedsmall"])
@pytest.mark.parametrize("steps", [None, 20])
def test_ddpm_matches_diffusers(var_type, steps):
    diffusers = pytest.importorskip("diffusers")
    d = GaussianDiffusion(DiffusionConfig())
    ours = d.sample(table_eps, SHAPE, [5], steps=steps, var_type=var_type)
    sched = diffusers.DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        variance_type="fixed_large" if var_type == "fixedlarge" else "fixed_small",
        clip_sample=True,
    )
    sched.set_timesteps(steps or 1000)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn((1, *SHAPE), generator=gen)  # same x_T and same noise stream as seed 5
    for t in sched.timesteps:
        x = sched.step(table_eps(x, t[None]), t, x, generator=gen).prev_sample
    assert torch.allclose(ours, x, atol=1e-4)


@pytest.mark.parametrize("ddim_eps", ["model", "clipped"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_matches_diffusers(spacing, eta, ddim_eps):
    # model: diffusers' default (use_clipped_model_output=False); clipped: eps from the clipped x0
    diffusers = pytest.importorskip("diffusers")
    d = GaussianDiffusion(DiffusionConfig())
    ours = d.sample(table_eps, SHAPE, [5], sampler="ddim", steps=25, eta=eta, spacing=spacing, ddim_eps=ddim_eps)
    sched = diffusers.DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        clip_sample=True,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing=spacing,
    )
    sched.set_timesteps(25)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn((1, *SHAPE), generator=gen)
    for i, t in enumerate(sched.timesteps):
        noise = torch.randn((1, *SHAPE), generator=gen) if eta > 0 and i < 24 else torch.zeros(1, *SHAPE)
        x = sched.step(table_eps(x, t[None]), t, x, eta=eta, use_clipped_model_output=ddim_eps == "clipped",
                       variance_noise=noise).prev_sample
    assert torch.allclose(ours, x, atol=1e-5)


def test_one_ddpm_step_via_q_posterior_matches_diffusers_step():
    # Algorithm 2 step written with this package's buffers: mu~(clip(x0_hat), x_t) + sqrt(beta_t) z
    diffusers = pytest.importorskip("diffusers")
    d = GaussianDiffusion(DiffusionConfig())
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                    variance_type="fixed_large", clip_sample=True)
    sched.set_timesteps(1000)
    x_t, eps = torch.randn(2, *SHAPE), torch.randn(2, *SHAPE)
    t = 421
    x0, _ = d.predict_x0_eps(eps, x_t, d.alphas_cumprod[t])
    mean, _, _ = d.q_posterior(x0.clamp(-1, 1), x_t, torch.full((2,), t))
    z = torch.randn((2, *SHAPE), generator=torch.Generator().manual_seed(9))
    ours = mean + d.betas[t].sqrt().float() * z
    theirs = sched.step(eps, t, x_t, generator=torch.Generator().manual_seed(9))
    assert torch.allclose(theirs.pred_original_sample, x0.clamp(-1, 1), atol=1e-5)
    assert torch.allclose(theirs.prev_sample, ours, atol=1e-5)


# ---- DDIM's direction term and zero terminal SNR ----------------------------------------------------


def test_ddim_eps_conventions_differ_only_where_x0_is_clipped():
    d = GaussianDiffusion(DiffusionConfig(timesteps=100))

    def small(x, t):  # eps that keeps x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) inside [-1, 1]
        abar = d.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        return (x - abar.sqrt() * 0.5 * torch.tanh(x)) / (1 - abar).sqrt()

    kw = dict(sampler="ddim", steps=10)
    assert torch.allclose(d.sample(small, SHAPE, [1, 2], ddim_eps="model", **kw),
                          d.sample(small, SHAPE, [1, 2], ddim_eps="clipped", **kw), atol=1e-5)
    model = d.sample(fake_eps, SHAPE, [1, 2], ddim_eps="model", **kw)  # x0 leaves [-1, 1]: clipped
    assert not torch.allclose(model, d.sample(fake_eps, SHAPE, [1, 2], ddim_eps="clipped", **kw), atol=1e-3)
    with pytest.raises(ValueError, match="ddim_eps"):
        d.sample(fake_eps, SHAPE, [1], ddim_eps="guided", **kw)


def test_one_ddim_step_of_each_convention():
    # DDIM eq. 12 with eta = 0: x_prev = sqrt(a_prev) clip(x0) + sqrt(1 - a_prev) eps_dir; 2 leading steps: 500, 0
    d = GaussianDiffusion(DiffusionConfig(timesteps=1000))
    x_T = torch.randn((1, *SHAPE), generator=torch.Generator().manual_seed(7))
    out = table_eps(x_T, torch.tensor([500]))
    a_t, a_prev = d.alphas_cumprod[500].item(), d.alphas_cumprod[0].item()
    x0 = ((x_T - math.sqrt(1 - a_t) * out) / math.sqrt(a_t)).clamp(-1, 1)
    assert (x0.abs() == 1).any()  # the step clips
    directions = {"model": out, "clipped": (x_T - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)}
    for conv, eps in directions.items():
        x_prev = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
        _, frames = d.sample(table_eps, SHAPE, [7], sampler="ddim", steps=2, ddim_eps=conv,
                             return_intermediates=True, intermediate_steps=3)
        assert torch.allclose(frames[1], x_prev, atol=1e-5), conv


def test_zero_terminal_snr_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    ours = GaussianDiffusion(DiffusionConfig(target="v", zero_terminal_snr=True))
    theirs = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", rescale_betas_zero_snr=True,
                                     prediction_type="v_prediction", timestep_spacing="trailing", clip_sample=True,
                                     set_alpha_to_one=True, steps_offset=0)
    assert torch.allclose(ours.alphas_cumprod.float(), theirs.alphas_cumprod, rtol=1e-4, atol=1e-7)
    # trailing spacing is the default on this schedule: the first step is t = T - 1 (SNR 0)
    x = ours.sample(table_eps, SHAPE, [5], sampler="ddim", steps=25, ddim_eps="model")
    theirs.set_timesteps(25)
    assert int(theirs.timesteps[0]) == 999
    xd = torch.randn((1, *SHAPE), generator=torch.Generator().manual_seed(5))
    for t in theirs.timesteps:
        xd = theirs.step(table_eps(xd, t[None]), t, xd, eta=0.0).prev_sample
    assert torch.allclose(x, xd, atol=1e-5)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_oracle_recovers_the_image_with_zero_terminal_snr(sampler):
    d = GaussianDiffusion(DiffusionConfig(timesteps=50, target="v", zero_terminal_snr=True))
    x0 = torch.rand(1, *SHAPE) * 1.6 - 0.8

    def oracle(x_t, t):
        abar = d.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        eps = (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()
        return d.target_for(x0.expand_as(x_t), t, eps)

    out = d.sample(oracle, SHAPE, [0, 1], sampler=sampler, steps=10)
    assert torch.allclose(out, x0.expand(2, *SHAPE), atol=1e-4)


def test_exported_scheduler_of_a_zero_terminal_snr_run_has_its_schedule():
    diffusers = pytest.importorskip("diffusers")
    from models.interop import diffusers_scheduler_config

    cfg = DiffusionConfig(target="v", zero_terminal_snr=True)
    sched = diffusers.DDPMScheduler.from_config(diffusers_scheduler_config(cfg))
    ours = GaussianDiffusion(cfg)
    assert torch.allclose(ours.alphas_cumprod.float(), sched.alphas_cumprod, rtol=1e-4, atol=1e-7)
    assert sched.config.timestep_spacing == "trailing" and sched.config.prediction_type == "v_prediction"
