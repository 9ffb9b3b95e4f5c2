"""Gaussian diffusion of DDPM (Ho et al. 2020): schedules, q_sample, the simple loss, samplers.

Conventions: timesteps are 0-indexed, t in [0, T) is the paper's t - 1 (as in
the paper's TF code and diffusers). Schedule buffers are float64 and are cast
to the working dtype (at least float32) on use. By default everything is the
paper's: linear betas 1e-4..0.02 over T=1000, eps prediction, the simple loss
(eq. 14), ancestral sampling (Algorithm 2) with clipped x0 and sigma^2 = beta
("fixedlarge"). Opt-in: the cosine schedule (Nichol & Dhariwal 2021), x0 or v
targets, DDIM (Song et al. 2021) with eta and respacing, classifier-free
guidance (Ho & Salimans 2022).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

_SCHEDULES = ("linear", "cosine")
_TARGETS = ("eps", "x0", "v")
_SAMPLERS = ("ddpm", "ddim")
_VAR_TYPES = ("fixedlarge", "fixedsmall")
_SPACINGS = ("leading", "trailing")


@dataclass
class DiffusionConfig:
    """Forward process and training target; the defaults are the paper's."""

    schedule: str = field(default="linear", metadata={"help": "beta schedule: linear (paper) | cosine"})
    timesteps: int = field(default=1000, metadata={"help": "number of diffusion steps T"})
    beta_start: float = field(default=1e-4, metadata={"help": "beta_1 of the linear schedule"})
    beta_end: float = field(default=0.02, metadata={"help": "beta_T of the linear schedule"})
    target: str = field(default="eps", metadata={"help": "what the model predicts: eps (paper) | x0 | v"})
    cosine_s: float = field(default=0.008, metadata={"help": "offset s of the cosine schedule"})

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if self.schedule not in _SCHEDULES:
            raise ValueError(f"diffusion.schedule: expected one of {list(_SCHEDULES)}, got {self.schedule!r}")
        if self.target not in _TARGETS:
            raise ValueError(f"diffusion.target: expected one of {list(_TARGETS)}, got {self.target!r}")
        if self.timesteps < 2:
            raise ValueError(f"diffusion.timesteps: expected >= 2, got {self.timesteps}")
        if not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise ValueError(
                f"diffusion.beta_start/beta_end: expected 0 < beta_start <= beta_end < 1, "
                f"got {self.beta_start}, {self.beta_end}"
            )
        if self.cosine_s < 0:
            raise ValueError(f"diffusion.cosine_s: expected >= 0, got {self.cosine_s}")


def make_betas(cfg: DiffusionConfig) -> Tensor:
    """The (T,) float64 beta schedule."""
    cfg.validate()
    T = cfg.timesteps
    if cfg.schedule == "linear":
        return torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=torch.float64)
    # cosine: alpha_bar(t) = cos^2((t/T + s) / (1 + s) * pi/2), betas capped at 0.999 (Nichol & Dhariwal eq. 17)
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    abar = torch.cos((steps + cfg.cosine_s) / (1 + cfg.cosine_s) * math.pi / 2) ** 2
    return (1 - abar[1:] / abar[:-1]).clamp(max=0.999)


def sampling_timesteps(num_timesteps: int, steps: int, spacing: str = "leading") -> list[int]:
    """Descending timesteps visited by a respaced sampler.

    leading (default; DDIM paper's "uniform", diffusers "leading" with steps_offset=0):
    t = k * (T // steps); trailing (diffusers "trailing"): round(T - k * T/steps) - 1, which
    always starts at T-1.
    """
    if spacing not in _SPACINGS:
        raise ValueError(f"spacing: expected one of {list(_SPACINGS)}, got {spacing!r}")
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps: expected 1 <= steps <= {num_timesteps} (T), got {steps}")
    if spacing == "leading":
        ts = [k * (num_timesteps // steps) for k in range(steps)]
    else:
        ts = [round(num_timesteps - k * num_timesteps / steps) - 1 for k in range(steps)]
    return sorted(set(ts), reverse=True)


def drop_labels(
    y: Tensor, p: float, generator: torch.Generator, null_label: int | None = None
) -> Tensor:
    """Replace each label by the null label with probability p (classifier-free guidance training).

    null_label defaults to -1, which UNet reads as its learned null label (index num_classes).
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p: expected a probability in [0, 1], got {p}")
    drop = torch.rand(y.shape, generator=generator, device=generator.device).to(y.device) < p
    return torch.where(drop, torch.full_like(y, -1 if null_label is None else null_label), y)


def _bcast(c: Tensor, ndim: int) -> Tensor:
    return c.reshape(-1, *([1] * (ndim - 1)))  # (B,) -> (B, 1, 1, 1)


class GaussianDiffusion:
    """Forward process, training loss and samplers; a plain object holding float64 buffers."""

    def __init__(self, cfg: DiffusionConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        self.device = torch.device("cpu")
        betas = make_betas(cfg)
        self.num_timesteps = int(betas.shape[0])
        alphas = 1.0 - betas
        abar = torch.cumprod(alphas, 0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        self.betas = betas
        self.alphas_cumprod = abar
        self.alphas_cumprod_prev = abar_prev
        self.sqrt_alphas_cumprod = abar.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - abar).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / abar).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / abar - 1.0).sqrt()
        # eq. 7: beta~_t = (1 - abar_{t-1}) / (1 - abar_t) * beta_t
        self.posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
        # log clipped because beta~ = 0 at t = 0 (paper's TF code)
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        )
        # eq. 7: mu~ = coef1 * x0 + coef2 * x_t
        self.posterior_mean_coef1 = betas * abar_prev.sqrt() / (1.0 - abar)
        self.posterior_mean_coef2 = (1.0 - abar_prev) * alphas.sqrt() / (1.0 - abar)

    _BUFFERS = (
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
    )

    def to(self, device: torch.device | str) -> GaussianDiffusion:
        """Move the float64 buffers to device (in place); returns self."""
        self.device = torch.device(device)
        for name in self._BUFFERS:
            setattr(self, name, getattr(self, name).to(self.device))
        return self

    # ---- helpers ------------------------------------------------------------------------------

    def _check_t(self, t: Tensor, batch: int) -> None:
        if t.shape != (batch,):
            raise ValueError(f"t: expected shape ({batch},), got {tuple(t.shape)}")
        if t.is_floating_point():
            raise ValueError(f"t: expected integer timesteps, got dtype {t.dtype}")
        msg = f"t: expected timesteps in [0, {self.num_timesteps}) (0-indexed, the paper's t-1)"
        ok = ((t >= 0) & (t < self.num_timesteps)).all()
        if t.device.type == "cpu":
            if not bool(ok):
                raise ValueError(f"{msg}, got min {int(t.min())} max {int(t.max())}")
        else:
            torch._assert_async(ok, msg)  # no host sync in the training step

    def _extract(self, buf: Tensor, t: Tensor, x: Tensor) -> Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        return _bcast(buf.to(t.device)[t].to(dtype), x.ndim)

    def sample_t(self, batch: int, generator: torch.Generator | None = None, device: str | torch.device = "cpu") -> Tensor:
        """Uniform training timesteps (B,) in [0, T) (the paper's t ~ U{1..T})."""
        gen_device = generator.device if generator is not None else device
        return torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=gen_device).to(device)

    def timesteps_from_uniform(self, u: Tensor) -> Tensor:
        """Training timesteps (B,) in [0, T) from uniforms u in [0, 1) by the inverse CDF of the
        timestep distribution (the paper's t ~ U{1..T}): per-sample draws stay one number each."""
        return (u * self.num_timesteps).long().clamp_(0, self.num_timesteps - 1)

    # ---- forward process and loss ----------------------------------------------------------------

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (eq. 4)."""
        if noise.shape != x0.shape:
            raise ValueError(f"noise: expected the shape of x0 {tuple(x0.shape)}, got {tuple(noise.shape)}")
        self._check_t(t, x0.shape[0])
        return (
            self._extract(self.sqrt_alphas_cumprod, t, x0) * x0
            + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def target_for(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Regression target of the configured parameterization (eps, x0 or v)."""
        if self.cfg.target == "eps":
            return noise
        if self.cfg.target == "x0":
            return x0
        # v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022)
        return (
            self._extract(self.sqrt_alphas_cumprod, t, x0) * noise
            - self._extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0
        )

    def training_losses(
        self, model: Callable, x0: Tensor, t: Tensor, noise: Tensor, y: Tensor | None = None
    ) -> Tensor:
        """Per-sample simple loss ||target - model(x_t, t)||^2 averaged over C, H, W (eq. 14): (B,)."""
        x_t = self.q_sample(x0, t, noise)
        out = model(x_t, t) if y is None else model(x_t, t, y)
        target = self.target_for(x0, t, noise)
        if out.shape != target.shape:
            raise ValueError(
                f"model output: expected shape {tuple(target.shape)} (model.out_channels = image channels), "
                f"got {tuple(out.shape)}"
            )
        return (out.float() - target.float()).pow(2).mean(dim=tuple(range(1, out.ndim)))

    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x0) (eqs. 6-7)."""
        if x_t.shape != x0.shape:
            raise ValueError(f"x_t: expected the shape of x0 {tuple(x0.shape)}, got {tuple(x_t.shape)}")
        self._check_t(t, x0.shape[0])
        mean = (
            self._extract(self.posterior_mean_coef1, t, x_t) * x0
            + self._extract(self.posterior_mean_coef2, t, x_t) * x_t
        )
        return (
            mean,
            self._extract(self.posterior_variance, t, x_t),
            self._extract(self.posterior_log_variance_clipped, t, x_t),
        )

    def predict_x0_eps(self, out: Tensor, x_t: Tensor, abar_t: Tensor | float) -> tuple[Tensor, Tensor]:
        """(x0, eps) implied by a model output of the configured target, at cumulative alpha abar_t."""
        a = torch.as_tensor(abar_t, dtype=torch.float64, device=x_t.device)
        if a.ndim:
            a = _bcast(a, x_t.ndim)
        sa, s1 = a.sqrt().to(x_t.dtype), (1 - a).sqrt().to(x_t.dtype)
        if self.cfg.target == "eps":
            return (x_t - s1 * out) / sa, out
        if self.cfg.target == "x0":
            return out, (x_t - sa * out) / s1
        return sa * x_t - s1 * out, sa * out + s1 * x_t  # v

    # ---- sampling ----------------------------------------------------------------------------

    @torch.no_grad()
    def sample(
        self,
        model: Callable,
        shape: tuple[int, int, int],
        seeds: Sequence[int],
        *,
        sampler: str = "ddpm",
        steps: int | None = None,
        eta: float = 0.0,
        var_type: str = "fixedlarge",
        guidance_scale: float = 1.0,
        y: Tensor | None = None,
        return_intermediates: bool = False,
        intermediate_steps: int = 10,
        device: torch.device | str = "cpu",
        progress: bool = False,
        spacing: str = "leading",
        clip_denoised: bool = True,
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Draw len(seeds) images (N, C, H, W) in [-1, 1]; image k depends only on seeds[k] and y[k].

        ddpm: ancestral sampling (Algorithm 2) with clipped x0, sigma^2 = beta (fixedlarge) or
        beta~ (fixedsmall); respaced if steps < T. ddim: eta-DDIM with eps recomputed from the
        clipped x0. steps=None means all T steps. With return_intermediates, also returns about
        intermediate_steps snapshots of x_t (x_T first, the result last) on the CPU.
        Image k's x_T and noise are bit-identical however seeds are batched; the model's own
        arithmetic may still round differently per batch size (backend conv/GEMM kernels, ~1e-7).
        clip_denoised=False (opt-in) uses the predicted x0 unclipped at every step (the pure
        DDIM ODE / ancestral step); only the final image is clipped to [-1, 1].
        """
        if sampler not in _SAMPLERS:
            raise ValueError(f"sampler: expected one of {list(_SAMPLERS)}, got {sampler!r}")
        if var_type not in _VAR_TYPES:
            raise ValueError(f"var_type: expected one of {list(_VAR_TYPES)}, got {var_type!r}")
        if len(shape) != 3:
            raise ValueError(f"shape: expected (C, H, W), got {tuple(shape)}")
        if len(seeds) == 0:
            raise ValueError("seeds: expected at least one seed")
        if eta < 0:
            raise ValueError(f"eta: expected >= 0, got {eta}")
        n = len(seeds)
        device = torch.device(device)
        if y is not None:
            if y.shape != (n,):
                raise ValueError(f"y: expected shape ({n},) (one label per seed), got {tuple(y.shape)}")
            y = y.to(device)
        if guidance_scale != 1.0 and y is None:
            raise ValueError("guidance_scale: classifier-free guidance != 1 needs labels y")
        ts = sampling_timesteps(self.num_timesteps, steps or self.num_timesteps, spacing)
        abar = self.alphas_cumprod.cpu().tolist()
        # image k's own generator draws its x_T and then its noise at every step, in order
        gens = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]

        def noise_like() -> Tensor:
            return torch.stack([torch.randn(shape, generator=g, device=device) for g in gens])

        was_training = isinstance(model, nn.Module) and model.training
        if was_training:
            model.eval()  # dropout off while sampling
        try:
            x = noise_like()  # x_T ~ N(0, I), (N, C, H, W)
            keep = {round(i * len(ts) / max(intermediate_steps - 1, 1)) for i in range(intermediate_steps)}
            inter = [x.cpu()] if return_intermediates else []
            it = enumerate(ts)
            if progress:
                from tqdm import tqdm

                it = tqdm(it, total=len(ts), desc=f"{sampler} sampling")
            for i, t in it:
                a_t = abar[t]
                a_prev = abar[ts[i + 1]] if i + 1 < len(ts) else 1.0
                out = self._guided_output(model, x, t, y, guidance_scale)
                x0, _ = self.predict_x0_eps(out, x, a_t)
                if clip_denoised:
                    x0 = x0.clamp(-1.0, 1.0)  # the paper's sampler clips the predicted x0
                last = i + 1 == len(ts)
                if sampler == "ddpm":
                    # eqs. 6-7 for the (possibly respaced) pair abar_t -> abar_prev
                    beta = 1.0 - a_t / a_prev
                    c1 = beta * math.sqrt(a_prev) / (1.0 - a_t)
                    c2 = (1.0 - a_prev) * math.sqrt(1.0 - beta) / (1.0 - a_t)
                    var = beta if var_type == "fixedlarge" else beta * (1.0 - a_prev) / (1.0 - a_t)
                    x = c1 * x0 + c2 * x
                    if not last:  # Algorithm 2: z = 0 at the final step
                        x = x + math.sqrt(var) * noise_like()
                else:
                    eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1.0 - a_t)
                    # DDIM eq. 16: sigma = eta sqrt((1 - a_prev)/(1 - a_t)) sqrt(1 - a_t/a_prev)
                    sigma = eta * math.sqrt((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev))
                    x = math.sqrt(a_prev) * x0 + math.sqrt(max(1.0 - a_prev - sigma**2, 0.0)) * eps
                    if sigma > 0 and not last:
                        x = x + sigma * noise_like()
                if return_intermediates and (i + 1) in keep and not last:
                    inter.append(x.cpu())
        finally:
            if was_training:
                model.train()
        x = x.clamp(-1.0, 1.0)
        if return_intermediates:
            return x, inter + [x.cpu()]
        return x

    def _guided_output(
        self, model: Callable, x: Tensor, t: int, y: Tensor | None, guidance_scale: float
    ) -> Tensor:
        """Model output at integer timestep t; with guidance, cond and null in one batch."""
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        if y is None:
            return model(x, tt).float()
        if guidance_scale == 1.0:
            return model(x, tt, y).float()
        # classifier-free guidance: out = out_null + w (out_cond - out_null); -1 = null label
        out = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, torch.full_like(y, -1)])).float()
        cond, null = out.chunk(2)
        return null + guidance_scale * (cond - null)
