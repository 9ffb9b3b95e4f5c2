"""README's "## Commands" and the code agree: every console script of setup.py is documented there,
every documented command answers ``--help`` with exit code 0, and the options the table names exist.

The commands come from setup.py and README.md, not from a list in this file.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

repo = Path(__file__).resolve().parents[2]


def console_scripts() -> dict[str, str]:
    """name -> "module:function" of setup.py's console_scripts (read from its source, not installed)."""
    for node in ast.walk(ast.parse((repo / "setup.py").read_text())):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == "console_scripts":
                    entries = ast.literal_eval(value)
                    return dict(e.replace(" ", "").split("=", 1) for e in entries)
    raise AssertionError("setup.py has no console_scripts entry point")


def documented() -> dict[str, str]:
    """command -> its row's options column, from the table of README's "## Commands" section."""
    text = (repo / "README.md").read_text()
    m = re.search(r"^## Commands\n(.*?)(?=^## )", text, re.S | re.M)
    assert m, 'README.md has no "## Commands" section'
    rows = {}
    for line in m.group(1).splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        rows[cells[0].strip("`")] = cells[2]
    assert rows, "the Commands section has no table of commands"
    return rows


def help_command(command: str, scripts: dict[str, str]) -> list[str]:
    """How to run ``command --help`` from the source tree (console scripts as pip would call them)."""
    if command.startswith("python -m "):
        return [sys.executable, "-m", command.removeprefix("python -m ").strip(), "--help"]
    module, _, function = scripts[command].partition(":")
    code = f"import sys; sys.argv[0] = {command!r}; from {module} import {function} as f; sys.exit(f())"
    return [sys.executable, "-c", code, "--help"]


def test_every_console_script_is_documented() -> None:
    scripts, rows = console_scripts(), documented()
    missing = sorted(set(scripts) - set(rows))
    assert not missing, f'setup.py console scripts missing from README "## Commands": {missing}'
    unknown = sorted(c for c in rows if c.startswith("ddpm-") and c not in scripts)
    assert not unknown, f'README "## Commands" documents {unknown}, which setup.py does not install'
    assert all(c.startswith(("ddpm-", "python -m ")) for c in rows), sorted(rows)


@pytest.mark.slow
def test_every_documented_command_answers_help_with_its_options() -> None:
    scripts, rows = console_scripts(), documented()
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    procs = {c: subprocess.Popen(help_command(c, scripts), cwd=repo, env=env, text=True, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE) for c in rows if c.startswith("python -m ") or c in scripts}
    failures = []
    for command, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        if proc.returncode != 0:
            failures.append(f"{command} --help: exit {proc.returncode}: {err.strip()[-500:]}")
            continue
        for option in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", rows[command]):
            if not re.search(re.escape(option) + r"(?![\w-])", out):  # --label is not --label-column
                failures.append(f"{command}: README names {option}, which --help does not list")
    assert not failures, "\n".join(failures)
