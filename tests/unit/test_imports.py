"""The project's own imports form no circle (lazy imports inside functions count too)."""

from __future__ import annotations

import ast
from pathlib import Path

repo = Path(__file__).resolve().parents[2]
packages = ("trainer", "models", "data_pipeline", "launch", "configs", "benchmarks")


def module_name(path: Path) -> str:
    """trainer/evaluation/reference.py -> trainer.evaluation.reference; a package's __init__ -> the package."""
    parts = list(path.relative_to(repo).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    """Every module of the project's packages by dotted name."""
    return {module_name(p): p for pkg in packages for p in sorted((repo / pkg).rglob("*.py"))}


def imports_of(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """Project modules that ``path`` imports anywhere in its body (module level or inside functions).

    ``from pkg import x`` is an edge to ``pkg.x`` when that is a module, else to ``pkg``. The implicit
    import of a parent package is not counted: it is how Python loads submodules, not a dependency.
    """
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = finished
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_finder_sees_a_circle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_lazy_imports_are_edges(tmp_path: Path) -> None:
    src = "def f():\n    from trainer.config import Config\n"
    mod = tmp_path / "m.py"
    mod.write_text(src)
    modules = project_modules()
    assert imports_of(mod, "x.m", modules) == {"trainer.config"}


def test_no_import_circles() -> None:
    modules = project_modules()
    assert len(modules) > 30
    graph = {name: imports_of(path, name, modules) for name, path in modules.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_models_stay_pure() -> None:
    """models/ imports nothing of the trainer, the data pipeline or the launcher, nor torch.distributed."""
    modules = project_modules()
    for name, path in modules.items():
        if name.split(".")[0] != "models":
            continue
        deps = imports_of(path, name, modules)
        assert not {d for d in deps if d.split(".")[0] != "models"}, (name, deps)
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.update([node.module] + [f"{node.module}.{a.name}" for a in node.names])
        assert not any(m.startswith("torch.distributed") for m in imported), name


MAX_LINES = 500  # a file that grows past it holds two jobs (DESIGN.md)


def test_no_python_file_over_500_lines() -> None:
    """Every Python file of the repository outside tests/ stays at or under 500 lines."""
    too_long = []
    for path in sorted(repo.rglob("*.py")):
        rel = path.relative_to(repo)
        if rel.parts[0] in ("tests", ".venv", "runs", "build") or rel.parts[0].startswith("."):
            continue
        n = len(path.read_text().splitlines())
        if n > MAX_LINES:
            too_long.append(f"{rel}: {n}")
    assert not too_long, f"over {MAX_LINES} lines: {too_long}"


def test_train_reads_top_to_bottom_in_at_most_150_lines() -> None:
    """trainer.loop.train and the loop it runs stay short (EDM2's training_loop style)."""
    tree = ast.parse((repo / "trainer" / "loop.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in ("train", "loop"):
            assert node.end_lineno - node.lineno + 1 <= 150, (node.name, node.end_lineno - node.lineno + 1)


def test_storage_is_imported_without_torch() -> None:
    """data_pipeline.storage and trainer.run_lock are standard library only: the launcher reads run
    records after a job step without importing torch."""
    import subprocess
    import sys

    code = "import sys, data_pipeline.storage, trainer.run_lock, launch.submit; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
