"""Gaussian diffusion of DDPM (Ho et al. 2020): schedules, q_sample, the simple loss, samplers.

Conventions: timesteps are 0-indexed, t in [0, T) is the paper's t - 1 (as in
the paper's TF code and diffusers). Schedule buffers are float64 and are cast
to the working dtype (at least float32) on use. By default everything is the
paper's: linear betas 1e-4..0.02 over T=1000, eps prediction, the simple loss
(eq. 14), ancestral sampling (Algorithm 2) with clipped x0 and sigma^2 = beta
("fixedlarge"). Opt-in: the cosine schedule (Nichol & Dhariwal 2021), x0 or v
targets, DDIM (Song et al. 2021) with eta, respacing and either eps convention,
classifier-free guidance (Ho & Salimans 2022), and the faster-training options
of the "fast" recipe (configs/recipes/fast.yaml): min-SNR-gamma loss weights
(Hang et al. 2023), log-normal (EDM, Karras et al. 2022) or logit-normal (SD3,
Esser et al. 2024) timestep sampling, zero terminal SNR (Lin et al. 2024).
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
_LOSS_WEIGHTS = ("uniform", "min_snr")
_T_SAMPLING = ("uniform", "lognormal", "logit_normal")
# Published (location, scale) of each timestep distribution: EDM's P_mean, P_std over ln sigma;
# SD3's logit-normal(0, 1) over t / T.
T_SAMPLING_DEFAULTS = {"lognormal": (-1.2, 1.2), "logit_normal": (0.0, 1.0)}
# DDIM's direction term: "model" keeps the model's eps (diffusers' DDIMScheduler default,
# use_clipped_model_output=False); "clipped" recomputes eps from the clipped x0 (guided-diffusion,
# diffusers' use_clipped_model_output=True). README "Convergence check" measures both.
DDIM_EPS = ("model", "clipped")
DDIM_EPS_DEFAULT = "model"


@dataclass
class DiffusionConfig:
    """Forward process and training target; the defaults are the paper's."""

    schedule: str = field(default="linear", metadata={"help": "beta schedule: linear (paper) | cosine"})
    timesteps: int = field(default=1000, metadata={"help": "number of diffusion steps T"})
    beta_start: float = field(default=1e-4, metadata={"help": "beta_1 of the linear schedule"})
    beta_end: float = field(default=0.02, metadata={"help": "beta_T of the linear schedule"})
    target: str = field(default="eps", metadata={"help": "what the model predicts: eps (paper) | x0 | v"})
    cosine_s: float = field(default=0.008, metadata={"help": "offset s of the cosine schedule"})
    loss_weight: str = field(default="uniform", metadata={
        "help": "per-t loss weight: uniform (paper, eq. 14) | min_snr (Hang et al. 2023: min(SNR_t, gamma) on the "
                "x0 error, i.e. min(SNR, gamma)/SNR for eps, /(SNR+1) for v)"})
    min_snr_gamma: float = field(default=5.0, metadata={"help": "gamma of loss_weight=min_snr (Hang et al.: 5)"})
    t_sampling: str = field(default="uniform", metadata={
        "help": "training timesteps: uniform (paper) | lognormal (EDM: ln sigma_t ~ N(t_mean, t_std^2)) | "
                "logit_normal (SD3: logit(t/T) ~ N(t_mean, t_std^2))"})
    t_mean: float | None = field(default=None, metadata={
        "help": "location of t_sampling's normal; null = the published one (lognormal -1.2, logit_normal 0)"})
    t_std: float | None = field(default=None, metadata={
        "help": "scale of t_sampling's normal; null = the published one (lognormal 1.2, logit_normal 1)"})
    zero_terminal_snr: bool = field(default=False, metadata={
        "help": "rescale the schedule to abar_T = 0 (Lin et al. 2024, Alg. 1); needs target v or x0; samplers "
                "then start at t = T-1 (trailing spacing)"})

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
        if self.loss_weight not in _LOSS_WEIGHTS:
            raise ValueError(f"diffusion.loss_weight: expected one of {list(_LOSS_WEIGHTS)}, got {self.loss_weight!r}")
        if not self.min_snr_gamma > 0:
            raise ValueError(f"diffusion.min_snr_gamma: expected > 0, got {self.min_snr_gamma}")
        if self.t_sampling not in _T_SAMPLING:
            raise ValueError(f"diffusion.t_sampling: expected one of {list(_T_SAMPLING)}, got {self.t_sampling!r}")
        if self.t_sampling == "uniform" and (self.t_mean is not None or self.t_std is not None):
            raise ValueError("diffusion.t_mean/t_std shape t_sampling=lognormal or logit_normal; with "
                             "t_sampling=uniform set them to null")
        if self.t_std is not None and not self.t_std > 0:
            raise ValueError(f"diffusion.t_std: expected > 0, got {self.t_std}")
        if self.zero_terminal_snr and self.target == "eps":
            raise ValueError("diffusion.zero_terminal_snr: an eps model cannot give x0 at SNR 0 (x0 = (x_T - eps) / 0; "
                             "Lin et al. 2024): set diffusion.target=v")

    def t_params(self) -> tuple[float, float]:
        """(location, scale) of the timestep distribution's normal: the configured or published ones."""
        loc, scale = T_SAMPLING_DEFAULTS.get(self.t_sampling, (0.0, 1.0))
        return (loc if self.t_mean is None else self.t_mean, scale if self.t_std is None else self.t_std)


def make_betas(cfg: DiffusionConfig) -> Tensor:
    """The (T,) float64 beta schedule."""
    cfg.validate()
    T = cfg.timesteps
    if cfg.schedule == "linear":
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=torch.float64)
    else:
        # cosine: alpha_bar(t) = cos^2((t/T + s) / (1 + s) * pi/2), betas capped at 0.999 (Nichol & Dhariwal eq. 17)
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        abar = torch.cos((steps + cfg.cosine_s) / (1 + cfg.cosine_s) * math.pi / 2) ** 2
        betas = (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
    return rescale_zero_terminal_snr(betas) if cfg.zero_terminal_snr else betas


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Betas whose sqrt(abar) is shifted and scaled to end at 0 and keep sqrt(abar_1) (Lin et al. 2024, Alg. 1)."""
    sqrt_abar = torch.cumprod(1.0 - betas, 0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * first / (first - last)  # sqrt(abar_T) = 0, sqrt(abar_1) unchanged
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas  # beta_T = 1: x_T is pure noise


def timestep_cdf(cfg: DiffusionConfig, alphas_cumprod: Tensor) -> Tensor:
    """CDF (T,) float64 of the training timestep distribution: P(t <= k) for k = 0..T-1.

    uniform: (k + 1) / T. lognormal (EDM, Karras et al. 2022, Table 1): ln sigma ~ N(m, s^2) with
    sigma_t = sqrt((1 - abar_t) / abar_t); t holds the mass of ln sigma between the midpoints to
    its neighbours' ln sigma. logit_normal (SD3, Esser et al. 2024, "logit-normal sampling"): logit(tau) ~ N(m, s^2)
    for tau = t / T in [0, 1); t holds tau in [k / T, (k + 1) / T). Both are closed forms in Phi.
    """
    T = int(alphas_cumprod.shape[0])
    if cfg.t_sampling == "uniform":
        return torch.arange(1, T + 1, dtype=torch.float64) / T
    m, s = cfg.t_params()
    if cfg.t_sampling == "lognormal":
        log_sigma = 0.5 * (torch.log1p(-alphas_cumprod) - torch.log(alphas_cumprod))  # +inf where abar = 0
        edges = (log_sigma[1:] + log_sigma[:-1]) / 2  # (T - 1,) upper edge of t = 0..T-2
    else:
        tau = torch.arange(1, T, dtype=torch.float64) / T
        edges = torch.log(tau) - torch.log1p(-tau)  # logit of the upper edge of t = 0..T-2
    phi = 0.5 * torch.special.erfc(-(edges - m) / (s * math.sqrt(2.0)))  # standard normal CDF
    return torch.cat([phi, torch.ones(1, dtype=torch.float64)])


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
        self.t_cdf = timestep_cdf(cfg, abar)  # (T,) the training timesteps' inverse-CDF table

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
        "t_cdf",
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
        """Training timesteps (B,) in [0, T) of the configured distribution (paper: t ~ U{1..T})."""
        gen_device = generator.device if generator is not None else device
        if self.cfg.t_sampling == "uniform":
            return torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=gen_device).to(device)
        u = torch.rand(batch, generator=generator, device=gen_device, dtype=torch.float64)
        return self.timesteps_from_uniform(u).to(device)

    def timesteps_from_uniform(self, u: Tensor) -> Tensor:
        """Training timesteps (B,) in [0, T) from uniforms u in [0, 1) by the inverse CDF of the
        timestep distribution (timestep_cdf): per-sample draws stay one number each."""
        if self.cfg.t_sampling == "uniform":  # the paper's t ~ U{1..T}, kept bit for bit
            return (u * self.num_timesteps).long().clamp_(0, self.num_timesteps - 1)
        # t = #{k : CDF(k) <= u}, so P(t = k) = CDF(k) - CDF(k - 1)
        cdf = self.t_cdf.to(u.device)
        return torch.searchsorted(cdf, u.to(torch.float64).contiguous(), right=True).clamp_(max=self.num_timesteps - 1)

    def timestep_probs(self) -> Tensor:
        """P(t = k) (T,) float64 of the training timestep distribution."""
        return torch.diff(self.t_cdf, prepend=self.t_cdf.new_zeros(1))

    def snr(self, t: Tensor) -> Tensor:
        """SNR_t = abar_t / (1 - abar_t) (B,) float64 (Kingma et al. 2021); 0 at a zero-terminal-SNR t = T-1."""
        abar = self.alphas_cumprod.to(t.device)[t]
        return abar / (1.0 - abar)

    def loss_weights(self, t: Tensor) -> Tensor:
        """Per-sample weights (B,) float32 of the configured target's loss (all 1 for the paper's uniform).

        min_snr (Hang et al. 2023): weight min(SNR_t, gamma) on ||x0 - x0_hat||^2. The eps error is
        sqrt(SNR) times the x0 error and the v error sqrt(SNR + 1) times it, so the same weighting
        is min(SNR, gamma) / SNR = min(1, gamma / SNR) on the eps loss (finite at SNR 0),
        min(SNR, gamma) on the x0 loss and min(SNR, gamma) / (SNR + 1) on the v loss.
        """
        if self.cfg.loss_weight == "uniform":
            return torch.ones(t.shape, dtype=torch.float32, device=t.device)
        snr, gamma = self.snr(t), self.cfg.min_snr_gamma
        if self.cfg.target == "eps":
            w = (gamma / snr).clamp(max=1.0)
        elif self.cfg.target == "x0":
            w = snr.clamp(max=gamma)
        else:
            w = snr.clamp(max=gamma) / (snr + 1.0)
        return w.float()

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
        spacing: str | None = None,
        clip_denoised: bool = True,
        ddim_eps: str = DDIM_EPS_DEFAULT,
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Draw len(seeds) images (N, C, H, W) in [-1, 1]; image k depends only on seeds[k] and y[k].

        ddpm: ancestral sampling (Algorithm 2) with clipped x0, sigma^2 = beta (fixedlarge) or
        beta~ (fixedsmall); respaced if steps < T. ddim: eta-DDIM (eq. 12) whose direction term uses
        the model's eps (ddim_eps="model", diffusers' default) or eps recomputed from the clipped x0
        ("clipped", guided-diffusion). steps=None means all T steps; spacing=None is leading, or
        trailing on a zero-terminal-SNR schedule (Lin et al. 2024: start at t = T-1, SNR 0). With return_intermediates, also returns about
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
        if ddim_eps not in DDIM_EPS:
            raise ValueError(f"ddim_eps: expected one of {list(DDIM_EPS)}, got {ddim_eps!r}")
        spacing = spacing or ("trailing" if self.cfg.zero_terminal_snr else "leading")
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
                x0, eps = self.predict_x0_eps(out, x, a_t)
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
                    if ddim_eps == "clipped":  # the eps that the clipped x0 implies
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
