"""Import and export the diffusers UNet2DModel format (config.json + safetensors), and the
DDPMScheduler config of a run's schedule (``diffusers_scheduler_config``).

The official DDPM checkpoints (google/ddpm-cifar10-32, google/ddpm-ema-church-256,
...) are published in this format. Only the paper's family of UNet2DModel
configurations maps onto UNet: positional embedding with flip_sin_to_cos=False
and freq_shift=1, DownBlock2D/AttnDownBlock2D mirrored by UpBlock2D/AttnUpBlock2D,
conv resampling with downsample_padding=0 (TF "SAME"). Anything else raises a
ValueError naming the config field. diffusers itself is never imported here;
safetensors is imported lazily.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import Tensor

from models.diffusion import DiffusionConfig, make_betas
from models.unet import UNet, UNetConfig, check_state_dict

_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def _expect(config: dict, key: str, allowed: tuple, default: object) -> None:
    value = config.get(key, default)
    if value not in allowed:
        raise ValueError(
            f"diffusers config {key}: expected one of {list(allowed)} (the DDPM paper's UNet), got {value!r}"
        )


def unet_config_from_diffusers(config: dict) -> UNetConfig:
    """Map a UNet2DModel config.json dict onto UNetConfig (ValueError naming unsupported fields)."""
    _expect(config, "_class_name", ("UNet2DModel",), "UNet2DModel")
    _expect(config, "time_embedding_type", ("positional",), "positional")
    _expect(config, "flip_sin_to_cos", (False,), True)
    _expect(config, "freq_shift", (1,), 0)
    _expect(config, "act_fn", ("silu", "swish"), "silu")
    _expect(config, "center_input_sample", (False,), False)
    _expect(config, "mid_block_scale_factor", (1, 1.0), 1)
    _expect(config, "mid_block_type", ("UNetMidBlock2D",), "UNetMidBlock2D")
    _expect(config, "add_attention", (True,), True)
    _expect(config, "downsample_padding", (0,), 1)
    _expect(config, "downsample_type", ("conv",), "conv")
    _expect(config, "upsample_type", ("conv",), "conv")
    _expect(config, "resnet_time_scale_shift", ("default", "scale_shift"), "default")
    _expect(config, "class_embed_type", (None,), None)
    _expect(config, "attn_norm_num_groups", (None, config.get("norm_num_groups", 32)), None)
    if config.get("resnet_time_scale_shift") == "scale_shift" and config.get("attn_norm_num_groups") is None:
        # diffusers then builds the mid-block attention without its GroupNorm
        raise ValueError(
            "diffusers config attn_norm_num_groups: expected norm_num_groups with scale_shift "
            "(a mid-block attention without GroupNorm is not this UNet), got None"
        )

    boc = [int(c) for c in config["block_out_channels"]]
    base = boc[0]
    if any(c % base for c in boc):
        raise ValueError(f"diffusers config block_out_channels: expected multiples of the first, got {boc}")
    if config.get("time_embedding_dim") not in (None, 4 * base):
        raise ValueError(
            f"diffusers config time_embedding_dim: expected None or {4 * base}, got {config['time_embedding_dim']}"
        )
    sample_size = config.get("sample_size")
    if isinstance(sample_size, list | tuple):
        if len(set(sample_size)) != 1:
            raise ValueError(f"diffusers config sample_size: expected a square size, got {sample_size}")
        sample_size = sample_size[0]
    if sample_size is None:
        raise ValueError("diffusers config sample_size: expected an int, got None")
    down = list(config.get("down_block_types", ()))
    up = list(config.get("up_block_types", ()))
    if len(down) != len(boc) or len(up) != len(boc):
        raise ValueError(
            f"diffusers config down_block_types/up_block_types: expected {len(boc)} each, got {down} / {up}"
        )
    attn_levels = []
    for level, (d, u) in enumerate(zip(down, reversed(up))):
        if d not in ("DownBlock2D", "AttnDownBlock2D") or u not in ("UpBlock2D", "AttnUpBlock2D"):
            raise ValueError(
                f"diffusers config down_block_types[{level}]/up_block_types: unsupported block types {d}/{u}"
            )
        if d.startswith("Attn") != u.startswith("Attn"):
            raise ValueError(
                f"diffusers config up_block_types: level {level} has attention on one path only ({d} vs {u})"
            )
        if d.startswith("Attn"):
            attn_levels.append(level)
    # a missing key means diffusers' default of 8 channels per head; null means one head
    head_dim = config.get("attention_head_dim", 8)
    num_classes = config.get("num_class_embeds")
    cfg = UNetConfig(
        image_size=int(sample_size),
        in_channels=int(config.get("in_channels", 3)),
        out_channels=int(config.get("out_channels", 3)),
        base_channels=base,
        channel_mult=tuple(c // base for c in boc),
        num_res_blocks=int(config.get("layers_per_block", 2)),
        attn_resolutions=tuple(int(sample_size) // 2**level for level in attn_levels),
        dropout=float(config.get("dropout", 0.0)),
        num_heads=1,
        num_head_channels=int(head_dim) if head_dim is not None else -1,
        # the last embedding row is taken to be the null label (classifier-free guidance)
        num_classes=int(num_classes) - 1 if num_classes else 0,
        scale_shift_norm=config.get("resnet_time_scale_shift", "default") == "scale_shift",
        resample_with_conv=True,
        norm_groups=int(config.get("norm_num_groups", 32)),
        norm_eps=float(config.get("norm_eps", 1e-5)),
    )
    cfg.validate()
    return cfg


def diffusers_config_from_unet(cfg: UNetConfig) -> dict:
    """The UNet2DModel config.json dict equivalent to cfg (ValueError if not representable)."""
    if not cfg.resample_with_conv:
        raise ValueError("model.resample_with_conv: diffusers' DownBlock2D always resamples with a conv")
    if cfg.num_head_channels <= 0 and cfg.num_heads != 1:
        raise ValueError(
            "model.num_heads: UNet2DModel sets heads via attention_head_dim; use num_head_channels instead"
        )
    down, up = [], []
    for res in cfg.resolutions:
        attn = res in cfg.attn_resolutions
        down.append("AttnDownBlock2D" if attn else "DownBlock2D")
        up.insert(0, "AttnUpBlock2D" if attn else "UpBlock2D")
    return {
        "_class_name": "UNet2DModel",
        "sample_size": cfg.image_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "down_block_types": down,
        "up_block_types": up,
        "mid_block_type": "UNetMidBlock2D",
        "block_out_channels": [cfg.base_channels * m for m in cfg.channel_mult],
        "layers_per_block": cfg.num_res_blocks,
        "mid_block_scale_factor": 1,
        "downsample_padding": 0,
        "downsample_type": "conv",
        "upsample_type": "conv",
        "dropout": cfg.dropout,
        "act_fn": "silu",
        "attention_head_dim": cfg.num_head_channels if cfg.num_head_channels > 0 else None,
        "norm_num_groups": cfg.norm_groups,
        "attn_norm_num_groups": cfg.norm_groups,  # GroupNorm in every attention, mid block included
        "norm_eps": cfg.norm_eps,
        "resnet_time_scale_shift": "scale_shift" if cfg.scale_shift_norm else "default",
        "add_attention": True,
        "class_embed_type": None,
        "num_class_embeds": cfg.num_classes + 1 if cfg.num_classes > 0 else None,
    }


# diffusion.target -> DDPMScheduler prediction_type
_PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
# diffusers' squaredcos_cap_v2 is the cosine schedule with s = 0.008 and betas capped at 0.999
_DIFFUSERS_COSINE_S = 0.008


def diffusers_scheduler_config(cfg: DiffusionConfig) -> dict:
    """The DDPMScheduler scheduler_config.json dict of this forward process and the paper's sampler.

    Betas: linear (beta_start, beta_end) or cosine as ``squaredcos_cap_v2``; a cosine schedule with
    another offset s travels as ``trained_betas``. The sampler's defaults: the ancestral step with
    sigma^2 = beta (``fixed_large``) and the predicted x0 clipped to [-1, 1].
    """
    cfg.validate()
    config = {
        "_class_name": "DDPMScheduler",
        "num_train_timesteps": cfg.timesteps,
        "beta_start": cfg.beta_start,
        "beta_end": cfg.beta_end,
        "beta_schedule": "linear",
        "trained_betas": None,
        "variance_type": "fixed_large",
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "prediction_type": _PREDICTION_TYPES[cfg.target],
        "thresholding": False,
        "timestep_spacing": "leading",
        "steps_offset": 0,
    }
    if cfg.zero_terminal_snr:  # Lin et al. 2024: diffusers rescales the same way and samples from t = T-1
        config.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    if cfg.schedule == "cosine":
        if cfg.cosine_s == _DIFFUSERS_COSINE_S:
            config["beta_schedule"] = "squaredcos_cap_v2"
        else:
            config["trained_betas"] = make_betas(cfg).tolist()
    return config


# (our name, diffusers name) for parameters that are a plain rename; regexes, applied in order
_RENAMES = [
    (r"^time_embed\.", "time_embedding."),
    (r"^class_embed\.", "class_embedding."),
    (r"^norm_out\.", "conv_norm_out."),
    (r"\.resnets\.(\d+)\.skip\.", r".resnets.\1.conv_shortcut."),
    (r"\.downsample\.conv\.", ".downsamplers.0.conv."),
    (r"\.upsample\.conv\.", ".upsamplers.0.conv."),
    (r"^mid_block\.attention\.", "mid_block.attentions.0."),
    (r"\.norm\.(weight|bias)$", r".group_norm.\1"),
    (r"\.proj_out\.", ".to_out.0."),
]
# old diffusers attention names (the google/ddpm-* uploads) -> current names
_LEGACY_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _to_diffusers_name(name: str) -> str:
    for pattern, repl in _RENAMES:
        name = re.sub(pattern, repl, name)
    return name


def convert_state_dict_from_diffusers(sd: dict[str, Tensor], cfg: UNetConfig) -> dict[str, Tensor]:
    """UNet2DModel state dict -> UNet state dict (q/k/v fused); ValueError naming differing keys."""
    src = {}
    for k, v in sd.items():
        m = re.match(r"^(.*attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$", k)
        if m:
            k = f"{m.group(1)}.{_LEGACY_ATTN[m.group(2)]}.{m.group(3)}"
        src[k] = v
    with torch.device("meta"):
        template = UNet(cfg).state_dict()
    out, used = {}, set()
    for name in template:
        if ".qkv." in name:
            base, kind = name.rsplit(".qkv.", 1)
            keys = [f"{_to_diffusers_name(base + '.x')[:-2]}.{p}.{kind}" for p in ("to_q", "to_k", "to_v")]
            if all(k in src for k in keys):
                w = [src[k] for k in keys]
                # Linear (C, C) or legacy 1x1 conv (C, C, 1, 1) weights -> one (3C, C) Linear
                out[name] = torch.cat([t.reshape(t.shape[0], -1) if t.ndim > 1 else t for t in w], 0)
                used.update(keys)
            continue
        key = _to_diffusers_name(name)
        if key in src:
            t = src[key]
            if t.ndim == 4 and template[name].ndim == 2:  # legacy 1x1-conv attention weights
                t = t.reshape(t.shape[0], -1)
            out[name] = t
            used.add(key)
    leftover = sorted(set(src) - used)
    if leftover:
        raise ValueError(
            "diffusers state dict has keys this UNet config does not use (another architecture?): "
            + ", ".join(leftover[:12])
            + (f", ... ({len(leftover)} in all)" if len(leftover) > 12 else "")
        )
    with torch.device("meta"):
        check_state_dict(UNet(cfg), out)
    return out


def convert_state_dict_to_diffusers(sd: dict[str, Tensor], cfg: UNetConfig) -> dict[str, Tensor]:
    """UNet state dict -> UNet2DModel state dict (current attention names, q/k/v split)."""
    with torch.device("meta"):
        check_state_dict(UNet(cfg), sd)
    out = {}
    for name, t in sd.items():
        if ".qkv." in name:
            base, kind = name.rsplit(".qkv.", 1)
            prefix = _to_diffusers_name(base + ".x")[:-2]
            for p, part in zip(("to_q", "to_k", "to_v"), t.chunk(3, dim=0)):
                out[f"{prefix}.{p}.{kind}"] = part.contiguous()
        else:
            out[_to_diffusers_name(name)] = t.contiguous()
    return out


def _model_dir(path: Path) -> Path:
    if (path / "config.json").is_file():
        return path
    if (path / "unet" / "config.json").is_file():
        return path / "unet"  # a DDPMPipeline folder
    raise FileNotFoundError(f"{path}: expected config.json (or unet/config.json) in this folder")


def load_diffusers_unet(path: str | os.PathLike) -> UNet:
    """Build a UNet from a diffusers UNet2DModel folder (config.json + safetensors or .bin)."""
    folder = _model_dir(Path(path))
    config = json.loads((folder / "config.json").read_text())
    cfg = unet_config_from_diffusers(config)
    for fname in _WEIGHT_FILES:
        wpath = folder / fname
        if wpath.is_file():
            break
    else:
        raise FileNotFoundError(f"{folder}: expected one of {list(_WEIGHT_FILES)}")
    if wpath.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(wpath))
    else:
        sd = torch.load(wpath, map_location="cpu", weights_only=True)
    model = UNet(cfg)
    model.load_state_dict(convert_state_dict_from_diffusers(sd, cfg))
    return model
