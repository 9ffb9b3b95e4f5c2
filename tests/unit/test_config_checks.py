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
def test_a_command_line_key_wins_over_its_pair_from_the_file(resolutions: str) -> None:
    """quickstart sets attn_levels; model.attn_resolutions on the command line replaces it, with one note."""
    notes: list[str] = []
    cfg = load_config(preset_path("quickstart"), [f"model.attn_resolutions={resolutions}"], notes)
    assert list(cfg.model.attn_resolutions) == [int(r) for r in resolutions.strip("[]").split(",") if r]
    assert cfg.model.attn_levels == ()
    assert notes == ["model.attn_resolutions from the command line replaces model.attn_levels from the config file"]
    # The same rule the other way round, and for the heads pair.
    notes = []
    cfg = load_config(preset_path("cifar10_32"), ["model.attn_levels=[2]"], notes)
    assert cfg.model.attn_resolutions == (8,) and len(notes) == 1
    with pytest.raises(ValueError, match="both place attention"):
        UNetConfig(attn_levels=(1,), attn_resolutions=(4,)).validate()


def test_both_keys_of_a_pair_in_one_source_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"both place attention \(both on the command line\): set one of them"):
        load_config(preset_path("quickstart"), ["model.attn_levels=[1]", "model.attn_resolutions=[8]"])
    both = tmp_path / "both.yaml"
    both.write_text("model:\n  attn_levels: [1]\n  attn_resolutions: [8]\n  num_heads: 4\n")
    with pytest.raises(ConfigError, match=r"both place attention \(both in both.yaml\)"):
        load_config(both)
    heads = tmp_path / "heads.yaml"
    heads.write_text("model:\n  num_heads: 4\n  num_head_channels: 32\n")
    with pytest.raises(ConfigError, match="both set the attention heads"):
        load_config(heads)
    heads.write_text("model:\n  num_head_channels: 32\n")
    notes: list[str] = []
    cfg = load_config(heads, ["model.num_heads=2"], notes)  # the command line wins: num_head_channels back to -1
    assert (cfg.model.num_heads, cfg.model.num_head_channels) == (2, -1) and len(notes) == 1


def test_a_list_written_without_brackets_names_the_syntax() -> None:
    with pytest.raises(ConfigError, match=r"model.channel_mult: expected a list, got '1,2': write lists in brackets, "
                                          r"e.g. model.channel_mult=\[1,2\]"):
        load_config(None, ["model.channel_mult=1,2"])


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
