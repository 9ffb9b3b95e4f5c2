"""Config tree: precedence, errors that name the key, divisibility, fingerprints, presets."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from configs import preset_names, preset_path
from trainer.config import (
    Config,
    ConfigError,
    fingerprint,
    fingerprint_diff,
    from_dict,
    load_config,
    plan_batches,
    reference_markdown,
    to_dict,
)

REPO = Path(__file__).resolve().parents[2]


def test_precedence_cli_over_file_over_defaults(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"train": {"batch_size": 64, "lr": 1e-3}}))
    cfg = load_config(f, ["train.lr=3e-4", "model.channel_mult=[1,2]"])
    assert cfg.train.batch_size == 64  # file over default (128)
    assert cfg.train.lr == pytest.approx(3e-4)  # CLI over file
    assert cfg.model.channel_mult == (1, 2)  # list coerced to the tuple type
    assert cfg.train.eps == Config().train.eps  # default kept


def test_unknown_key_names_the_nearest_valid_one() -> None:
    with pytest.raises(ConfigError, match=r"train\.batch_sise.*did you mean 'train\.batch_size'"):
        load_config(None, ["train.batch_sise=32"])
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'.*'train'"):
        load_config(None, ["trian.lr=1"])


def test_wrong_type_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"train\.batch_size: expected an integer"):
        load_config(None, ["train.batch_size=abc"])
    with pytest.raises(ConfigError, match=r"log\.tensorboard: expected true or false"):
        load_config(None, ["log.tensorboard=maybe"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(None, ["train.batch_size"])


def test_yaml_scientific_strings_are_numbers(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 1e-4\n")  # YAML 1.1 reads this as a string
    assert load_config(f).train.lr == pytest.approx(1e-4)


def test_value_checks() -> None:
    with pytest.raises(ConfigError, match="train.precision"):
        load_config(None, ["train.precision=fp8"])
    with pytest.raises(ConfigError, match="ema.decays"):
        load_config(None, ["ema.decays=[1.5]"])


def test_plan_batches_and_divisibility() -> None:
    cfg = load_config(None, ["train.batch_size=64", "train.batch_per_gpu=8"])
    plan = plan_batches(cfg, world_size=4)
    assert (plan.batch_per_gpu, plan.accum_steps, plan.global_batch) == (8, 2, 64)
    auto = plan_batches(load_config(None, ["train.batch_size=64"]), world_size=8)
    assert (auto.batch_per_gpu, auto.accum_steps) == (8, 1)
    with pytest.raises(ConfigError, match="not divisible by the world size 3"):
        plan_batches(load_config(None, ["train.batch_size=64"]), world_size=3)
    with pytest.raises(ConfigError, match=r"log\.every_images=100 must be a multiple of train\.batch_size=64"):
        plan_batches(load_config(None, ["train.batch_size=64", "log.every_images=100"]), world_size=1)


def test_per_gpu_batch_does_not_change_the_hyperparameters() -> None:
    a = to_dict(load_config(None, ["train.batch_per_gpu=4"]))
    b = to_dict(load_config(None, ["train.batch_per_gpu=16", "train.total_images=1280"]))
    assert fingerprint(a) == fingerprint(b)  # memory knob and duration may change on resume
    c = to_dict(load_config(None, ["train.lr=1e-3"]))
    assert fingerprint(a) != fingerprint(c)
    assert fingerprint_diff(a, c) == ["train.lr: 0.0002 -> 0.001"]
    d = to_dict(load_config(None, ["model.base_channels=64"]))
    assert any(line.startswith("model.base_channels") for line in fingerprint_diff(a, d))


def test_roundtrip_through_dict() -> None:
    cfg = load_config(None, ["model.channel_mult=[1,2,4]", "ema.decays=[0.999,0.9999]"])
    assert to_dict(from_dict(to_dict(cfg))) == to_dict(cfg)


@pytest.mark.parametrize("name", ["cifar10_32", "celebahq_256", "lsun_bedroom_256", "lsun_church_256",
                                  "lsun_cat_256", "quickstart", "digits_16", "digits_16_fast"])
def test_presets_load(name: str) -> None:
    cfg = load_config(preset_path(name))
    plan_batches(cfg, world_size=1)  # intervals divisible by the batch


def test_presets_hold_the_paper_hyperparameters() -> None:
    c = load_config(preset_path("cifar10_32"))
    assert (c.train.lr, c.train.batch_size, c.model.dropout, c.data.hflip) == (2e-4, 128, 0.1, True)
    assert c.train.total_images // c.train.batch_size == 800_000
    expected_steps = {"celebahq_256": 500_000, "lsun_bedroom_256": 2_400_000, "lsun_church_256": 1_200_000,
                      "lsun_cat_256": 1_800_000}
    for name, steps in expected_steps.items():
        c = load_config(preset_path(name))
        assert (c.train.lr, c.train.batch_size, c.model.dropout) == (2e-5, 64, 0.0)
        assert c.train.total_images // c.train.batch_size == steps
        assert c.data.hflip == (name != "lsun_bedroom_256")
    for name in expected_steps | {"cifar10_32": 0}:
        c = load_config(preset_path(name))
        assert c.train.warmup_images // c.train.batch_size == 5000
        assert (c.train.grad_clip, c.ema.decays, c.diffusion.timesteps, c.diffusion.schedule) == (
            1.0, (0.9999,), 1000, "linear")
    assert {"quickstart", "cifar10_32"} <= set(preset_names())


def test_readme_configuration_reference_is_current() -> None:
    readme = (REPO / "README.md").read_text()
    assert reference_markdown() in readme, "regenerate: python trainer/main.py --help-config"
