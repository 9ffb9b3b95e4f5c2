"""Start-up checks a newcomer runs into (issue 14): labels for a conditional model, attention by level."""

from __future__ import annotations

from pathlib import Path

import pytest

from configs import preset_path
from models.unet import UNet, UNetConfig
from trainer.config import ConfigError, fingerprint, load_config, to_dict, to_yaml


def test_class_conditional_model_needs_labels() -> None:
    with pytest.raises(ConfigError, match=r"set data.use_labels=true, or model.num_classes=0"):
        load_config(preset_path("quickstart"), ["model.num_classes=4"])
    cfg = load_config(preset_path("quickstart"), ["model.num_classes=4", "data.use_labels=true"])
    assert cfg.model.num_classes == 4


@pytest.mark.parametrize(("image_size", "expected"), [(32, (8,)), (64, (16,)), (128, (32,))])
def test_quickstart_attention_follows_image_size(image_size: int, expected: tuple[int, ...]) -> None:
    """The preset puts attention at its lowest level at any image size (it was [8] at 32px only)."""
    cfg = load_config(preset_path("quickstart"), [f"model.image_size={image_size}"])
    assert cfg.model.attn_levels == (2,) and cfg.model.attn_resolutions == expected
    # The same network as naming the resolution directly.
    by_res = UNetConfig(**{**vars(cfg.model), "attn_levels": (), "attn_resolutions": expected})
    assert UNet(cfg.model).state_dict().keys() == UNet(by_res).state_dict().keys()


def test_levels_resolve_in_unet_config() -> None:
    cfg = UNetConfig(image_size=64, channel_mult=(1, 2, 2, 2), attn_levels=(2, 1))  # levels 64, 32, 16, 8
    cfg.validate()
    assert cfg.attn_resolutions == (32, 16)
    with pytest.raises(ValueError, match=r"model.attn_levels: \[4\] names a level outside 0..3"):
        UNetConfig(channel_mult=(1, 2, 2, 2), attn_levels=(4,)).validate()


@pytest.mark.parametrize("resolutions", ["[16]", "[]", "[32, 8]"])
def test_levels_and_resolutions_are_exclusive(resolutions: str) -> None:
    """quickstart sets attn_levels; naming resolutions too is refused, even the field's default [16]."""
    with pytest.raises(ConfigError, match=r"set one of them \(model.attn_levels=\[\] to use model.attn_resolutions\)"):
        load_config(preset_path("quickstart"), [f"model.attn_resolutions={resolutions}"])
    cfg = load_config(preset_path("quickstart"), ["model.attn_levels=[]", f"model.attn_resolutions={resolutions}"])
    assert list(cfg.model.attn_resolutions) == [int(r) for r in resolutions.strip("[]").split(",") if r]
    with pytest.raises(ValueError, match="both place attention"):
        UNetConfig(attn_levels=(1,), attn_resolutions=(4,)).validate()


def test_resolved_config_reloads_and_resumes_runs_from_before_attn_levels(tmp_path: Path) -> None:
    cfg = load_config(preset_path("quickstart"))
    saved = tmp_path / "config.yaml"
    saved.write_text(to_yaml(cfg))  # what the trainer writes into the run directory: both keys, consistent
    assert to_dict(load_config(saved)) == to_dict(cfg)
    # A run started when the preset said attn_resolutions: [8] has the same model, so it resumes.
    old = to_dict(load_config(preset_path("quickstart"), ["model.attn_levels=[]", "model.attn_resolutions=[8]"]))
    del old["model"]["attn_levels"]  # checkpoints written before the field existed
    assert fingerprint(old) == fingerprint(to_dict(cfg))
    assert fingerprint(to_dict(load_config(preset_path("quickstart"), ["model.attn_levels=[1]"]))) != (
        fingerprint(to_dict(cfg)))
