"""Recipes: named sets of config keys (configs/recipes/<name>.yaml) between the defaults and a config file.

``recipe: fast`` at the top of a config file, or ``recipe=fast`` on the command line (which wins;
``recipe=none`` turns a file's recipe off), applies the recipe's keys on top of the defaults; the
file and the command line then change any of them. The precedence is defaults < recipe < file <
command line, so a preset that names a recipe can still tune it, and a recipe added on the command
line to any preset changes only the keys that preset leaves at their defaults (one note names
every recipe key the file sets otherwise). This module imports nothing of the trainer.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

RECIPES_DIR = Path(__file__).resolve().parents[1] / "configs" / "recipes"
_OFF = ("", "none", "null", "false", "off")


def recipe_names() -> list[str]:
    """Names of the shipped recipes."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML file's mapping; ValueError naming the file when it is not valid YAML or not a mapping."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config sections, got {type(data).__name__}")
    return data


def recipe_name(file_data: dict[str, Any], overrides: Sequence[tuple[str, Any]]) -> str | None:
    """The recipe asked for: the last ``recipe=`` override, else the file's ``recipe:``; None when off."""
    asked = [v for k, v in overrides if k == "recipe"]
    name = asked[-1] if asked else file_data.get("recipe")
    return None if name is None or str(name).lower() in _OFF else str(name)


def read_recipe(name: str) -> tuple[Path, dict[str, Any]]:
    """(file, keys) of a shipped recipe name or a YAML path; ValueError naming the shipped ones if neither."""
    p = Path(name)
    if not (p.suffix in (".yaml", ".yml") and p.is_file()):
        p = RECIPES_DIR / f"{name}.yaml"
    if not p.is_file():
        raise ValueError(f"recipe '{name}' not found: give one of {', '.join(recipe_names())} or a YAML path")
    data = read_yaml(p)
    if "recipe" in data:
        raise ValueError(f"{p}: a recipe cannot name another recipe")
    return p, data


def recipe_notes(name: str, path: Path, recipe_keys: dict[str, Any], file_keys: dict[str, Any]) -> list[str]:
    """One line naming the recipe's keys, and one per recipe key the config file sets otherwise (flat dicts)."""
    notes = [f"recipe {name} ({path}): " + ", ".join(f"{k}={v}" for k, v in recipe_keys.items())]
    notes += [f"{k}={file_keys[k]!r} from the config file replaces the recipe's {v!r}"
              for k, v in recipe_keys.items() if k in file_keys and file_keys[k] != v]
    return notes
