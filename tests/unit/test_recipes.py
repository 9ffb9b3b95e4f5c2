"""Recipes: one key switches on a set of config keys, with defaults < recipe < file < command line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from configs import preset_path
from trainer.config import ConfigError, fingerprint, load_config, plan_batches, to_dict
from trainer.recipes import read_recipe, recipe_names


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_precedence_defaults_recipe_file_command_line(tmp_path: Path) -> None:
    recipe = _write(tmp_path / "mine.yaml", {"diffusion": {"target": "v", "loss_weight": "min_snr",
                                                           "min_snr_gamma": 3.0}})
    config = _write(tmp_path / "c.yaml", {"recipe": str(recipe), "diffusion": {"min_snr_gamma": 4.0}})
    notes: list[str] = []
    cfg = load_config(config, ["diffusion.loss_weight=uniform"], notes)
    assert cfg.diffusion.target == "v"  # recipe over the defaults
    assert cfg.diffusion.min_snr_gamma == 4.0  # the file over the recipe
    assert cfg.diffusion.loss_weight == "uniform"  # the command line over both
    assert any(n.startswith(f"recipe {recipe}") for n in notes)
    assert any("diffusion.min_snr_gamma=4.0 from the config file replaces the recipe's 3.0" in n for n in notes)


def test_command_line_recipe_on_top_of_a_preset_and_off_again(tmp_path: Path) -> None:
    recipe = _write(tmp_path / "mine.yaml", {"diffusion": {"target": "v"}})
    paper = load_config(preset_path("digits_16"))
    fast = load_config(preset_path("digits_16"), [f"recipe={recipe}"])
    assert (paper.diffusion.target, fast.diffusion.target) == ("eps", "v")
    assert fast.train == paper.train  # a preset's own keys are untouched
    config = _write(tmp_path / "c.yaml", {"recipe": str(recipe)})
    assert load_config(config).diffusion.target == "v"
    assert load_config(config, ["recipe=none"]).diffusion.target == "eps"  # the command line turns it off
    assert fingerprint(to_dict(fast)) != fingerprint(to_dict(paper))  # a resume cannot switch recipes


def test_unknown_or_bad_recipes_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="recipe 'fastest' not found: give one of .*fast"):
        load_config(None, ["recipe=fastest"])
    bad = _write(tmp_path / "bad.yaml", {"diffusion": {"targett": "v"}})
    with pytest.raises(ConfigError, match="did you mean 'diffusion.target'"):
        load_config(None, [f"recipe={bad}"])
    nested = _write(tmp_path / "nested.yaml", {"recipe": "fast"})
    with pytest.raises(ConfigError, match="cannot name another recipe"):
        load_config(None, [f"recipe={nested}"])


def test_the_shipped_fast_recipe_loads_on_every_preset() -> None:
    assert "fast" in recipe_names()
    _, keys = read_recipe("fast")
    assert set(keys) <= {"diffusion", "log", "eval"}  # the math and the samplers, never a preset's recipe of data
    for name in ("cifar10_32", "celebahq_256", "lsun_church_256", "quickstart", "digits_16"):
        paper = load_config(preset_path(name))
        fast = load_config(preset_path(name), ["recipe=fast"])
        plan_batches(fast, world_size=1)
        assert fast.diffusion != paper.diffusion and fast.train == paper.train and fast.model == paper.model
    digits_fast = load_config(preset_path("digits_16_fast"))
    assert digits_fast.diffusion == load_config(preset_path("digits_16"), ["recipe=fast"]).diffusion


def test_paper_presets_stay_the_papers_recipe() -> None:
    for name in ("cifar10_32", "celebahq_256", "lsun_bedroom_256", "lsun_church_256", "lsun_cat_256"):
        d = load_config(preset_path(name)).diffusion
        assert (d.target, d.loss_weight, d.t_sampling, d.zero_terminal_snr) == ("eps", "uniform", "uniform", False)
