"""The shipped presets: one YAML per dataset (data, not code branches)."""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def preset_names() -> list[str]:
    """Names of the shipped presets."""
    return sorted(p.stem for p in _HERE.glob("*.yaml"))


def preset_path(name: str) -> Path | None:
    """The YAML file of a preset name (with or without .yaml), or None."""
    p = _HERE / (name if name.endswith(".yaml") else f"{name}.yaml")
    return p if p.is_file() else None
