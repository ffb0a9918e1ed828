"""The engine's layout keeps its plan: no import cycle among its modules, no module over 450 lines,
no class over 150 lines, and every module imports."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[2] / "workers" / "engine"
MAX_MODULE_LINES = 450
MAX_CLASS_LINES = 150
# Bottom to top: the modules at the engine's root, then each folder; a module imports only its own
# level and the ones below (targets sit beside methods: both work on formats, the run uses both).
LEVELS = {"": 0, "analysis": 1, "formats": 2, "methods": 3, "targets": 3, "run": 4}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(ENGINE.rglob("*.py")):
        parts = path.relative_to(ENGINE.parent.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _engine_imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The engine modules ``path`` imports, at any depth of the file (lazy imports count too)."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        imported |= {name for name in names if name in modules}
    return imported


def test_no_import_cycle_among_engine_modules() -> None:
    modules = _modules()
    graph = {name: _engine_imports(path, modules) - {name} for name, path in modules.items()}
    done: set[str] = set()

    def visit(name: str, stack: list[str]) -> None:
        if name in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(name) :] + [name]))
        if name in done:
            return
        for imported in sorted(graph[name]):
            # A package's __init__ importing its own modules is how a package exports them.
            if not (imported.startswith(name + ".") and modules[name].name == "__init__.py"):
                visit(imported, stack + [name])
        done.add(name)

    for name in graph:
        visit(name, [])


def test_each_folder_imports_only_the_levels_below_it() -> None:
    modules = _modules()

    def level(name: str) -> int:
        parts = name.split(".")
        return LEVELS[parts[2] if len(parts) > 3 or (len(parts) == 3 and parts[2] in LEVELS) else ""]

    upward = [
        f"{name} -> {imported}"
        for name, path in modules.items()
        for imported in _engine_imports(path, modules)
        if level(imported) > level(name)
    ]
    assert not upward


def test_modules_and_classes_stay_small() -> None:
    too_big = []
    for name, path in _modules().items():
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_big.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                too_big.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not too_big


def test_every_engine_module_imports() -> None:
    for name in _modules():
        importlib.import_module(name)
