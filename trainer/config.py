"""One typed config tree: nested dataclasses, YAML presets, dotted CLI overrides.

Precedence is CLI > file > defaults. Every field carries a one-line doc in its
``metadata["help"]``; unknown keys and wrong types are errors that name the key
and the nearest valid one. The model, diffusion and data sections are the
dataclasses of the layers that own them (models/, data_pipeline/), so nothing is
declared twice; the trainer's own sections, evaluation included, live here. This
module imports nothing of the trainer: every other trainer module may import it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from data_pipeline.config import DataConfig
from models.diffusion import DDIM_EPS, DiffusionConfig
from models.unet import UNetConfig
from trainer.config_parse import ConfigError, merge_into, parse_override, set_dotted
from trainer.config_sections import (
    CheckpointConfig,
    DistConfig,
    EMAConfig,
    EvalConfig,
    LogConfig,
    RunConfig,
    TrainConfig,
)
from trainer.ema_math import SIGMA_REL_WIDEST
from trainer.recipes import read_recipe, read_yaml, recipe_name, recipe_notes


@dataclass
class Config:
    """The whole run."""

    run: RunConfig = field(default_factory=RunConfig, metadata={"help": "run directory and seed"})
    model: UNetConfig = field(default_factory=UNetConfig, metadata={"help": "the UNet"})
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig, metadata={"help": "noise schedule and target"})
    data: DataConfig = field(default_factory=lambda: DataConfig(shards="data/shards"),
                             metadata={"help": "shards and loader"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "optimisation"})
    ema: EMAConfig = field(default_factory=EMAConfig, metadata={"help": "EMA weights"})
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig, metadata={"help": "checkpoints"})
    log: LogConfig = field(default_factory=LogConfig, metadata={"help": "logging and samples"})
    dist: DistConfig = field(default_factory=DistConfig, metadata={"help": "distributed settings"})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "FID during training"})

    @property
    def run_dir(self) -> Path:
        """The run directory (run.dir, or runs/<run.name>)."""
        return Path(self.run.dir) if self.run.dir else Path("runs") / self.run.name


# Fields whose change alters the model or the math: resuming with a different
# value is refused. Everything else (durations, intervals, workers, ...) may change.
FINGERPRINT_SECTIONS = ("model", "diffusion")
FINGERPRINT_FIELDS = (
    "run.seed",
    "data.image_size",
    "data.hflip",
    "data.use_labels",
    "data.order",
    "data.shuffle_shards",
    "train.batch_size",
    "train.lr",
    "train.warmup_images",
    "train.weight_decay",
    "train.betas",
    "train.eps",
    "train.grad_clip",
    "train.label_dropout",
    "ema.decays",
    "ema.warmup",
    "ema.sigma_rels",
)
# How attention was asked for, not what the model is: the resolved model.attn_resolutions is
# fingerprinted, so runs started before model.attn_levels existed still resume.
FINGERPRINT_IGNORED = ("model.attn_levels",)
# Fingerprinted keys added after runs already existed, with the value that means "as before the key
# existed". A checkpoint whose config lacks one resumes with that value (one log line), so running
# the same command on an older run directory continues it instead of refusing it.
ADDED_KEYS: dict[str, Any] = {
    "data.order": "streaming",  # runs before the global order read per-worker shard streams
    "data.shuffle_shards": 8,
    "ema.sigma_rels": (),  # runs before power-function EMA profiles tracked fixed decays only
    # runs before the faster-training options trained the paper's way
    "diffusion.loss_weight": "uniform", "diffusion.min_snr_gamma": 5.0, "diffusion.t_sampling": "uniform",
    "diffusion.t_mean": None, "diffusion.t_std": None, "diffusion.zero_terminal_snr": False,
}


def adopt_added_keys(cfg: Config, saved: dict[str, Any]) -> list[str]:
    """Set every ADDED_KEYS key that the saved config lacks to its earlier behaviour; returns notes."""
    flat = flatten(saved)
    notes = []
    for key, before in ADDED_KEYS.items():
        if key not in flat and key in fingerprint_fields(to_dict(cfg)):
            set_dotted(cfg, key, list(before) if isinstance(before, tuple) else before)
            notes.append(f"{key}={before!r}: this run started before the key existed, so it continues as it began")
    return notes


# Pairs of keys that describe one thing. A key given on the command line wins over the other key
# of its pair from the file (which returns to its default, logged); both in one source is an error.
KEY_PAIRS = (
    ("model.attn_resolutions", "model.attn_levels"),
    ("model.num_heads", "model.num_head_channels"),
)


def _get(cfg: Any, key: str) -> Any:
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _resolve_pairs(cfg: Config, file_keys: set[str], cli_keys: set[str], notes: list[str]) -> set[str]:
    """Apply the one rule for KEY_PAIRS: the command line wins over the file, one note per key it
    replaced; returns the replaced keys."""
    defaults = Config()
    replaced = set()
    for a, b in KEY_PAIRS:
        for mine, other in ((a, b), (b, a)):
            if mine in cli_keys and other in file_keys and other not in cli_keys:
                unset = _get(defaults, other)
                replaced.add(other)
                set_dotted(cfg, other, list(unset) if isinstance(unset, tuple) else unset)
                notes.append(f"{mine} from the command line replaces {other} from the config file")
    return replaced


def _check_pairs(cfg: Config, given: dict[str, Any], where: str) -> None:
    """Both keys of a pair set to conflicting values in one source: one line naming both."""
    if {"model.attn_resolutions", "model.attn_levels"} <= set(given) and cfg.model.attn_levels:
        by_level = dataclasses.replace(cfg.model, attn_resolutions=UNetConfig().attn_resolutions)
        try:
            by_level.validate()  # resolves attn_levels to resolutions
        except ValueError:
            return  # reported by validate_fields with its own line
        asked = tuple(given["model.attn_resolutions"] or ())
        if set(asked) != set(by_level.attn_resolutions):
            raise ConfigError(f"model.attn_levels={list(cfg.model.attn_levels)} and model.attn_resolutions="
                              f"{list(asked)} both place attention ({where}): set one of them")
    if {"model.num_heads", "model.num_head_channels"} <= set(given) and cfg.model.num_head_channels > 0 \
            and cfg.model.num_heads != 1:
        raise ConfigError(f"model.num_heads={cfg.model.num_heads} and model.num_head_channels="
                          f"{cfg.model.num_head_channels} both set the attention heads ({where}): set one of them")


def _config_yaml(read: Any, arg: Any) -> Any:
    """``read(arg)`` with its ValueError (bad YAML, unknown recipe) as a ConfigError."""
    try:
        return read(arg)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                notes: list[str] | None = None) -> Config:
    """Build the config: defaults < a recipe (trainer.recipes) < the YAML file < the dotted CLI overrides.

    ``notes`` (if given) receives the recipe's keys and one line per file key that a later source replaced.
    """
    notes = notes if notes is not None else []
    cfg = Config()
    file_keys: dict[str, Any] = {}
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        data = _config_yaml(read_yaml, p)
    pairs = [parse_override(text) for text in overrides]
    recipe = recipe_name(data, pairs)
    data = {k: v for k, v in data.items() if k != "recipe"}
    if recipe:  # defaults < recipe < file < command line
        rpath, rdata = _config_yaml(read_recipe, recipe)
        merge_into(cfg, rdata)
        notes.extend(recipe_notes(recipe, rpath, flatten(rdata), flatten(data)))
    if path is not None:
        merge_into(cfg, data)
        file_keys = flatten(data)
        _check_pairs(cfg, file_keys, f"both in {Path(path).name}")
    cli: dict[str, Any] = {}
    for key, value in pairs:
        if key == "recipe":
            continue
        set_dotted(cfg, key, value)
        cli[key] = _get(cfg, key)
    _check_pairs(cfg, cli, "both on the command line")
    replaced = _resolve_pairs(cfg, set(file_keys), set(cli), notes)
    # UNetConfig cannot tell an attn_resolutions equal to its default from an unset one; the sources can.
    asked = None if "model.attn_resolutions" in replaced else {**file_keys, **cli}.get("model.attn_resolutions")
    validate_fields(cfg)
    if asked is not None and cfg.model.attn_levels and set(asked) != set(cfg.model.attn_resolutions):
        raise ConfigError(f"model.attn_levels={list(cfg.model.attn_levels)} and model.attn_resolutions="
                          f"{list(asked)} both place attention: set one of them "
                          "(model.attn_levels=[] to use model.attn_resolutions)")
    return cfg


def validate_fields(cfg: Config) -> None:
    """Field-level checks, independent of the world size (each module validates its own)."""
    for section in (cfg.model, cfg.diffusion, cfg.data, cfg.eval):
        validate = getattr(section, "validate", None)
        if validate is not None:
            try:
                validate()
            except ValueError as e:
                raise ConfigError(str(e)) from None
    if cfg.model.num_classes > 0 and not cfg.data.use_labels:
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} needs class labels but data.use_labels is "
                          "false (it would train on no labels): set data.use_labels=true, or model.num_classes=0")
    t = cfg.train
    if t.precision not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"train.precision: expected auto, bf16 or fp32, got {t.precision!r}")
    if t.compile not in ("auto", "true", "false"):
        raise ConfigError(f"train.compile: expected auto, true or false, got {t.compile!r}")
    if cfg.dist.backend not in ("auto", "nccl", "gloo"):
        raise ConfigError(f"dist.backend: expected auto, nccl or gloo, got {cfg.dist.backend!r}")
    if cfg.log.sample_sampler not in ("ddim", "ddpm"):
        raise ConfigError(f"log.sample_sampler: expected ddim or ddpm, got {cfg.log.sample_sampler!r}")
    if cfg.log.sample_ddim_eps not in DDIM_EPS:
        raise ConfigError(f"log.sample_ddim_eps: expected one of {list(DDIM_EPS)}, got {cfg.log.sample_ddim_eps!r}")
    for key in ("train.batch_size", "train.total_images", "checkpoint.every_images", "log.every_images",
                "checkpoint.keep_last", "train.max_nonfinite_steps"):
        sec, name = key.split(".")
        v = getattr(getattr(cfg, sec), name)
        vals = v if isinstance(v, tuple) else (v,)
        if not vals or any(x <= 0 for x in vals):
            raise ConfigError(f"{key}: must be positive, got {v!r}")
    validate_ema(cfg.ema)
    if t.lr <= 0:
        raise ConfigError(f"train.lr: must be positive, got {t.lr}")
    if t.batch_per_gpu < 0 or t.warmup_images < 0 or t.grad_clip < 0:
        raise ConfigError("train.batch_per_gpu, train.warmup_images and train.grad_clip must be >= 0")


def validate_ema(e: EMAConfig) -> None:
    """At least one profile; decays in (0, 1); sigma_rels of real power-function profiles (EDM2 eq. 3)."""
    if not e.decays and not e.sigma_rels:
        raise ConfigError("ema.decays and ema.sigma_rels are both empty: give at least one EMA profile")
    if any(not 0.0 < d < 1.0 for d in e.decays):
        raise ConfigError(f"ema.decays: each decay must be in (0, 1), got {e.decays!r}")
    if any(not 0.0 < s < SIGMA_REL_WIDEST for s in e.sigma_rels) or len(set(e.sigma_rels)) < len(e.sigma_rels):
        raise ConfigError(f"ema.sigma_rels: distinct widths in (0, {SIGMA_REL_WIDEST:.4f}) (the widest power "
                          f"profile), e.g. [0.05, 0.1]; got {list(e.sigma_rels)!r}")
    if e.snapshot_every_images < 0:
        raise ConfigError(f"ema.snapshot_every_images: must be >= 0 (0 = about 32 per run), got "
                          f"{e.snapshot_every_images}")


@dataclass
class BatchPlan:
    """How the global batch splits over ranks and accumulation steps."""

    world_size: int
    batch_per_gpu: int
    accum_steps: int
    global_batch: int
    total_steps: int


def plan_batches(cfg: Config, world_size: int) -> BatchPlan:
    """Check divisibility of batch and intervals for this world size (EDM2 style), once at start-up."""
    t = cfg.train
    per_gpu = t.batch_per_gpu or t.batch_size // max(world_size, 1)
    if per_gpu <= 0 or t.batch_size % (per_gpu * world_size):
        raise ConfigError(
            f"train.batch_size={t.batch_size} must be a multiple of train.batch_per_gpu x world size "
            f"= {per_gpu} x {world_size}; set train.batch_per_gpu to a divisor of {t.batch_size // world_size}"
            if t.batch_size % world_size == 0
            else f"train.batch_size={t.batch_size} is not divisible by the world size {world_size}"
        )
    accum = t.batch_size // (per_gpu * world_size)
    for key in ("train.total_images", "checkpoint.every_images", "log.every_images",
                "log.sample_every_images", "checkpoint.milestone_every_images", "eval.every_images",
                "eval.val_every_images", "ema.snapshot_every_images"):
        sec, name = key.split(".")
        v = getattr(getattr(cfg, sec), name, 0)
        if v and v % t.batch_size:
            raise ConfigError(
                f"{key}={v} must be a multiple of train.batch_size={t.batch_size} "
                f"(nearest: {max(t.batch_size, round(v / t.batch_size) * t.batch_size)})"
            )
    return BatchPlan(world_size, per_gpu, accum, t.batch_size, t.total_images // t.batch_size)


# ----------------------------------------------------------------------------- output


def to_dict(obj: Any) -> Any:
    """A plain nested dict (tuples become lists) suitable for YAML, JSON and torch.save."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_dict(v) for v in obj]
    return obj


def from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from ``to_dict`` output (e.g. from a checkpoint)."""
    cfg = Config()
    merge_into(cfg, data)
    return cfg


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{'a': {'b': 1}}`` -> ``{'a.b': 1}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def fingerprint_fields(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """The flat subset of the config that must not change across a resume."""
    flat = flatten(cfg_dict)
    keep = {}
    for k, v in flat.items():
        if (k.split(".")[0] in FINGERPRINT_SECTIONS or k in FINGERPRINT_FIELDS) and k not in FINGERPRINT_IGNORED:
            keep[k] = v
    return keep


def fingerprint(cfg_dict: dict[str, Any]) -> str:
    """A short hash of the fields that change the model or the math."""
    blob = json.dumps(fingerprint_fields(cfg_dict), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def fingerprint_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Readable lines ``key: old -> new`` for fingerprinted fields that differ (an ADDED_KEYS key that
    ``old`` lacks does not count: the run continues with its earlier behaviour, see adopt_added_keys)."""
    a, b = fingerprint_fields(old), fingerprint_fields(new)
    keys = sorted(k for k in set(a) | set(b) if not (k in ADDED_KEYS and k not in a))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def reference_markdown() -> str:
    """The configuration reference for README.md, generated from the field docs."""
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    root = Config()
    for sec in dataclasses.fields(root):
        obj = getattr(root, sec.name)
        for f in dataclasses.fields(obj):
            default = to_dict(getattr(obj, f.name))
            doc = f.metadata.get("help", "").replace("|", "\\|")  # a bare | would split the table's cell
            lines.append(f"| `{sec.name}.{f.name}` | `{json.dumps(default)}` | {doc} |")
    return "\n".join(lines)
