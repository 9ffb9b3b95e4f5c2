"""The UNet of DDPM (Ho et al. 2020, appendix B), a pure nn.Module.

By default the architecture is exactly the paper's (the TF reference code
`diffusion_tf/models/unet.py`, as published in the diffusers format):
GroupNorm(32, eps 1e-6) + SiLU, sinusoidal timestep embedding through a
2-layer MLP added in every res block, one-head self-attention at the listed
resolutions, stride-2 convolution downsampling with TF "SAME" (asymmetric)
padding, nearest upsampling + 3x3 conv, and num_res_blocks + 1 res blocks per
level on the way up, each eating one skip connection. Opt-in extras: class
conditioning with a learned null label (classifier-free guidance), multi-head
attention, scale-shift norm (Nichol & Dhariwal 2021), pooling resampling.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


@dataclass
class UNetConfig:
    """Architecture of the UNet; the defaults are the paper's CIFAR-10 model (35.7M parameters)."""

    image_size: int = field(
        default=32,
        metadata={"help": "input resolution; must be divisible by 2**(len(channel_mult)-1)"},
    )
    in_channels: int = field(default=3, metadata={"help": "channels of the input image"})
    out_channels: int = field(default=3, metadata={"help": "channels of the prediction"})
    base_channels: int = field(default=128, metadata={"help": "channels of the first level"})
    channel_mult: tuple[int, ...] = field(
        default=(1, 2, 2, 2),
        metadata={"help": "channel multiplier per level; one level per entry"},
    )
    num_res_blocks: int = field(default=2, metadata={"help": "res blocks per level (down path)"})
    attn_resolutions: tuple[int, ...] = field(
        default=(16,), metadata={"help": "resolutions at which self-attention follows each res block"}
    )
    attn_levels: tuple[int, ...] = field(
        default=(),
        metadata={"help": "levels (0 = full resolution) with self-attention, instead of attn_resolutions; "
                          "follows image_size"},
    )
    dropout: float = field(default=0.1, metadata={"help": "dropout inside res blocks"})
    num_heads: int = field(default=1, metadata={"help": "attention heads (paper: 1)"})
    num_head_channels: int = field(
        default=-1,
        metadata={"help": "if > 0, heads = channels // num_head_channels (overrides num_heads)"},
    )
    num_classes: int = field(
        default=0,
        metadata={"help": "0 = unconditional; > 0 adds a label embedding with a null label at index num_classes"},
    )
    scale_shift_norm: bool = field(
        default=False, metadata={"help": "opt-in FiLM conditioning (Nichol & Dhariwal); paper: additive"}
    )
    resample_with_conv: bool = field(
        default=True, metadata={"help": "conv resampling (paper); False = avg pool / nearest only"}
    )
    norm_groups: int = field(default=32, metadata={"help": "GroupNorm groups (paper: 32)"})
    norm_eps: float = field(default=1e-6, metadata={"help": "GroupNorm epsilon (paper's TF code: 1e-6)"})

    def __post_init__(self) -> None:
        # YAML/CLI give lists; keep the dataclass hashable and comparable.
        self.channel_mult = tuple(self.channel_mult)
        self.attn_resolutions = tuple(self.attn_resolutions)
        self.attn_levels = tuple(self.attn_levels)

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Feature-map resolution of each level."""
        return tuple(self.image_size // 2**i for i in range(len(self.channel_mult)))

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if not self.channel_mult or any(int(m) != m or m < 1 for m in self.channel_mult):
            raise ValueError(f"model.channel_mult: expected positive integers, got {self.channel_mult}")
        factor = 2 ** (len(self.channel_mult) - 1)
        if self.image_size < 1 or self.image_size % factor:
            raise ValueError(
                f"model.image_size: expected a positive multiple of {factor} "
                f"(2**(len(channel_mult)-1) for {len(self.channel_mult)} levels), got {self.image_size}"
            )
        for name in ("in_channels", "out_channels", "base_channels", "num_res_blocks", "norm_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name}: expected >= 1, got {getattr(self, name)}")
        for m in self.channel_mult:
            ch = self.base_channels * m
            if ch % self.norm_groups:
                raise ValueError(
                    f"model.base_channels: channels {ch} (base_channels * {m}) must be divisible by "
                    f"norm_groups={self.norm_groups}"
                )
        if self.attn_levels:  # resolved here, so a preset by level survives a change of image_size
            n = len(self.resolutions)
            if any(not 0 <= lv < n for lv in self.attn_levels):
                raise ValueError(f"model.attn_levels: {list(self.attn_levels)} names a level outside 0..{n - 1} "
                                 f"(the levels are {list(self.resolutions)} pixels)")
            resolved = tuple(sorted({self.resolutions[lv] for lv in self.attn_levels}, reverse=True))
            # attn_resolutions at its default counts as not set; a resolved config (config.yaml) holds both.
            if set(self.attn_resolutions) not in (set(UNetConfig.attn_resolutions), set(resolved)):
                raise ValueError(
                    f"model.attn_levels={list(self.attn_levels)} and model.attn_resolutions="
                    f"{list(self.attn_resolutions)} both place attention: set one of them "
                    "(model.attn_levels=[] to use model.attn_resolutions)")
            self.attn_resolutions = resolved
        bad = [r for r in self.attn_resolutions if r not in self.resolutions]
        if bad:
            raise ValueError(
                f"model.attn_resolutions: {bad} is not a level resolution; "
                f"the levels are {list(self.resolutions)}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout: expected 0 <= dropout < 1, got {self.dropout}")
        if self.num_classes < 0:
            raise ValueError(f"model.num_classes: expected >= 0, got {self.num_classes}")
        if self.norm_eps <= 0:
            raise ValueError(f"model.norm_eps: expected > 0, got {self.norm_eps}")
        for level, res in enumerate(self.resolutions):
            if res in self.attn_resolutions or level == len(self.resolutions) - 1:
                self.heads_for(self.base_channels * self.channel_mult[level])

    def heads_for(self, channels: int) -> int:
        """Number of attention heads for a block with this many channels."""
        if self.num_head_channels > 0:
            if channels % self.num_head_channels:
                raise ValueError(
                    f"model.num_head_channels: {self.num_head_channels} does not divide "
                    f"attention channels {channels}"
                )
            return channels // self.num_head_channels
        if self.num_heads < 1 or channels % self.num_heads:
            raise ValueError(
                f"model.num_heads: expected a positive divisor of attention channels {channels}, "
                f"got {self.num_heads}"
            )
        return self.num_heads


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of the paper's TF code: [sin, cos], frequencies 10000**(-i/(dim/2-1))."""
    half = dim // 2
    # get_timestep_embedding in diffusion_tf/nn.py (= diffusers flip_sin_to_cos=False, freq_shift=1)
    freqs = torch.exp(
        torch.arange(half, dtype=torch.float32, device=t.device) * (-math.log(10000.0) / (half - 1))
    )
    args = t.float()[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb  # (B, dim)


def _init(module: nn.Conv2d | nn.Linear, scale: float = 1.0) -> None:
    # TF default_init: variance_scaling(scale, "fan_avg", "uniform") = xavier_uniform with
    # gain sqrt(scale); the paper uses scale 1e-10 where the code says init_scale=0.
    nn.init.xavier_uniform_(module.weight, gain=math.sqrt(max(scale, 1e-10)))
    nn.init.zeros_(module.bias)


class TimestepMLP(nn.Module):
    """Dense -> SiLU -> Dense on the sinusoidal embedding (paper: temb.dense0/1)."""

    def __init__(self, ch: int, emb_ch: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(ch, emb_ch)
        self.linear_2 = nn.Linear(emb_ch, emb_ch)
        _init(self.linear_1)
        _init(self.linear_2)

    def forward(self, x: Tensor) -> Tensor:
        """(B, ch) -> (B, emb_ch)."""
        return self.linear_2(F.silu(self.linear_1(x)))


class ResBlock(nn.Module):
    """Pre-activation res block with the timestep embedding added after the first conv."""

    def __init__(self, cfg: UNetConfig, in_ch: int, out_ch: int, emb_ch: int) -> None:
        super().__init__()
        self.scale_shift = cfg.scale_shift_norm
        self.norm1 = nn.GroupNorm(cfg.norm_groups, in_ch, eps=cfg.norm_eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(emb_ch, out_ch * (2 if cfg.scale_shift_norm else 1))
        self.norm2 = nn.GroupNorm(cfg.norm_groups, out_ch, eps=cfg.norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        # paper: a 1x1 "nin" shortcut when the channel count changes
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        _init(self.conv1)
        _init(self.time_emb_proj)
        _init(self.conv2, scale=0.0)
        if isinstance(self.skip, nn.Conv2d):
            _init(self.skip)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """x (B, in_ch, H, W), emb (B, emb_ch) -> (B, out_ch, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))
        e = self.time_emb_proj(F.silu(emb))[:, :, None, None]  # (B, out_ch[*2], 1, 1)
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """GroupNorm -> self-attention over the H*W positions -> 1x1 projection, residual."""

    def __init__(self, cfg: UNetConfig, ch: int) -> None:
        super().__init__()
        self.heads = cfg.heads_for(ch)
        self.norm = nn.GroupNorm(cfg.norm_groups, ch, eps=cfg.norm_eps)
        self.qkv = nn.Linear(ch, 3 * ch)  # q, k, v "nin" projections fused into one matmul
        self.proj_out = nn.Linear(ch, ch)
        _init(self.qkv)
        _init(self.proj_out, scale=0.0)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        _, _, height, width = x.shape
        h = rearrange(self.norm(x), "b c h w -> b (h w) c")
        q, k, v = (
            rearrange(z, "b n (h d) -> b h n d", h=self.heads) for z in self.qkv(h).chunk(3, dim=-1)
        )
        # softmax(q k^T / sqrt(d)) v; with one head d = C as in the paper
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, H*W, d)
        h = self.proj_out(rearrange(h, "b h n d -> b n (h d)"))
        return x + rearrange(h, "b (h w) c -> b c h w", h=height, w=width)


class Downsample(nn.Module):
    """Stride-2 3x3 conv with TF "SAME" padding (pad right/bottom only), or 2x2 average pool."""

    def __init__(self, ch: int, with_conv: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2) if with_conv else None
        if self.conv is not None:
            _init(self.conv)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H/2, W/2)."""
        if self.conv is None:
            return F.avg_pool2d(x, 2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 conv (paper)."""

    def __init__(self, ch: int, with_conv: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1) if with_conv else None
        if self.conv is not None:
            _init(self.conv)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, 2H, 2W)."""
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x if self.conv is None else self.conv(x)


class DownLevel(nn.Module):
    """One resolution of the down path: res blocks (+ attention), then downsampling."""

    def __init__(
        self, cfg: UNetConfig, in_ch: int, out_ch: int, emb_ch: int, attn: bool, down: bool
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResBlock(cfg, in_ch if i == 0 else out_ch, out_ch, emb_ch) for i in range(cfg.num_res_blocks)
        )
        self.attentions = nn.ModuleList(
            AttnBlock(cfg, out_ch) if attn else nn.Identity() for _ in range(cfg.num_res_blocks)
        )
        self.downsample = Downsample(out_ch, cfg.resample_with_conv) if down else None

    def forward(self, h: Tensor, emb: Tensor, skips: list[Tensor]) -> Tensor:
        """Run the level, appending every output to skips."""
        for res, attn in zip(self.resnets, self.attentions):
            h = attn(res(h, emb))
            skips.append(h)
        if self.downsample is not None:
            h = self.downsample(h)
            skips.append(h)
        return h


class UpLevel(nn.Module):
    """One resolution of the up path: num_res_blocks + 1 res blocks on concatenated skips."""

    def __init__(
        self,
        cfg: UNetConfig,
        in_ch: int,
        skip_chs: list[int],
        out_ch: int,
        emb_ch: int,
        attn: bool,
        up: bool,
    ) -> None:
        super().__init__()
        chans = [in_ch] + [out_ch] * (len(skip_chs) - 1)
        self.resnets = nn.ModuleList(
            ResBlock(cfg, c + s, out_ch, emb_ch) for c, s in zip(chans, skip_chs)
        )
        self.attentions = nn.ModuleList(
            AttnBlock(cfg, out_ch) if attn else nn.Identity() for _ in skip_chs
        )
        self.upsample = Upsample(out_ch, cfg.resample_with_conv) if up else None

    def forward(self, h: Tensor, emb: Tensor, skips: list[Tensor]) -> Tensor:
        """Run the level, popping one skip per res block."""
        for res, attn in zip(self.resnets, self.attentions):
            h = attn(res(torch.cat([h, skips.pop()], dim=1), emb))
        if self.upsample is not None:
            h = self.upsample(h)
        return h


class MidBlock(nn.Module):
    """Res block -> attention -> res block at the lowest resolution (always has attention)."""

    def __init__(self, cfg: UNetConfig, ch: int, emb_ch: int) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResBlock(cfg, ch, ch, emb_ch), ResBlock(cfg, ch, ch, emb_ch)])
        self.attention = AttnBlock(cfg, ch)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        """(B, C, h, w) -> (B, C, h, w)."""
        return self.resnets[1](self.attention(self.resnets[0](h, emb)), emb)


class UNet(nn.Module):
    """The DDPM UNet: predicts eps (or x0 or v) from x_t and t (and an optional class label)."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        ch = cfg.base_channels
        emb_ch = 4 * ch  # paper: temb_ch = 4 * ch
        self.time_embed = TimestepMLP(ch, emb_ch)
        # one extra row: the learned null label used for classifier-free guidance
        self.class_embed = nn.Embedding(cfg.num_classes + 1, emb_ch) if cfg.num_classes > 0 else None
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        _init(self.conv_in)

        levels = len(cfg.channel_mult)
        skip_chs = [ch]
        self.down_blocks = nn.ModuleList()
        in_ch = ch
        for level, mult in enumerate(cfg.channel_mult):
            out_ch = ch * mult
            last = level == levels - 1
            attn = cfg.resolutions[level] in cfg.attn_resolutions
            self.down_blocks.append(DownLevel(cfg, in_ch, out_ch, emb_ch, attn, down=not last))
            skip_chs += [out_ch] * (cfg.num_res_blocks + (0 if last else 1))
            in_ch = out_ch
        self.mid_block = MidBlock(cfg, in_ch, emb_ch)
        self.up_blocks = nn.ModuleList()
        for level in reversed(range(levels)):
            out_ch = ch * cfg.channel_mult[level]
            n = cfg.num_res_blocks + 1
            level_skips = [skip_chs.pop() for _ in range(n)]
            attn = cfg.resolutions[level] in cfg.attn_resolutions
            self.up_blocks.append(
                UpLevel(cfg, in_ch, level_skips, out_ch, emb_ch, attn, up=level > 0)
            )
            in_ch = out_ch
        assert not skip_chs, "every skip connection is consumed"
        self.norm_out = nn.GroupNorm(cfg.norm_groups, in_ch, eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(in_ch, cfg.out_channels, 3, padding=1)
        _init(self.conv_out, scale=0.0)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """x (B, C, H, W), t (B,) timesteps in [0, T), y (B,) labels (num_classes or < 0 = null)."""
        cfg = self.cfg
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(
                f"x: expected (B, in_channels={cfg.in_channels}, H, W), got {tuple(x.shape)}"
            )
        factor = 2 ** (len(cfg.channel_mult) - 1)
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(
                f"x: height and width must be divisible by {factor} (the total downsampling), "
                f"got {tuple(x.shape[2:])}"
            )
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"t: expected shape ({x.shape[0]},), got {tuple(t.shape)}")

        emb = self.time_embed(timestep_embedding(t, cfg.base_channels))  # (B, 4ch)
        if self.class_embed is not None:
            if y is None:
                y = torch.full_like(t, cfg.num_classes, dtype=torch.long)
            if y.shape != (x.shape[0],):
                raise ValueError(f"y: expected shape ({x.shape[0]},), got {tuple(y.shape)}")
            y = torch.where(y < 0, cfg.num_classes, y)  # negative labels mean "null"
            emb = emb + self.class_embed(y)
        elif y is not None:
            raise ValueError("y: this model is unconditional (model.num_classes=0) but labels were given")

        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h = block(h, emb, skips)
        h = self.mid_block(h, emb)
        for block in self.up_blocks:
            h = block(h, emb, skips)
        return self.conv_out(F.silu(self.norm_out(h)))

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """nn.Module.load_state_dict, with a ValueError naming the differing keys when strict."""
        if strict:
            check_state_dict(self, state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (works on the meta device)."""
    return sum(p.numel() for p in model.parameters())


def check_state_dict(model: nn.Module, sd: Mapping[str, Tensor]) -> None:
    """Raise ValueError naming missing, unexpected and mis-shaped keys of sd against model."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(sd)
        if tuple(sd[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or shapes:

        def fmt(items: list[str]) -> str:
            return ", ".join(items[:12]) + (f", ... ({len(items)} in all)" if len(items) > 12 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {fmt(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {fmt(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches: {fmt(shapes)}")
        raise ValueError(
            "state dict does not match this UNet architecture (check the model config); "
            + "; ".join(parts)
        )


def load_unet_state_dict(model: UNet, sd: dict[str, Tensor]) -> None:
    """Load sd into model after check_state_dict (strips `module.`/`_orig_mod.` prefixes)."""
    clean = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix) :]
        clean[k] = v
    model.load_state_dict(clean)
