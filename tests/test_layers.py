"""The layers mean what the folders say: read every module's imports (``ast``, nothing is imported).

- ``modelpress/`` is the shared library: it imports neither ``workers/`` nor ``service/``.
- ``service/`` (the API) imports of ``workers/`` only ``workers.celery_app``, to send jobs;
  ``workers/`` never imports ``service/``.
- No import cycle among the project's modules, counting imports inside functions too.
- Settings are read from the environment in ``modelpress/config.py`` only, with the exceptions
  in ``ENVIRONMENT_READERS`` (none of them a setting).

docs/architecture.md, "Layers", says why.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("modelpress", "service", "workers")
# What the API may import of the worker package: the Celery application it sends jobs with (it
# imports only modelpress itself). Anything else (the sandbox, the supervisor) is asked through Redis.
SERVICE_MAY_IMPORT = frozenset({"workers.celery_app"})
# Cycles that exist today and are being removed; each entry is the set of modules in one cycle.
KNOWN_CYCLES: frozenset[frozenset[str]] = frozenset()
# Modules that touch os.environ without reading a setting (a prefix names a whole folder).
ENVIRONMENT_READERS = {
    "modelpress/config.py": "every setting",
    "modelpress/fault_injection.py": "MODELPRESS_TEST_PAUSE, the fault tests' switch (not a setting)",
    "modelpress/stack.py": "passes its own environment on to the processes it starts",
    "workers/job_protocol.py": "the supervisor-to-job protocol (progress descriptor) and OpenBLAS workarounds passed on",
    "workers/job_process.py": "the job's end of that protocol (network probe address), and the variable names it reports",
    "workers/fork_sandbox.py": "a forked job process's progress descriptor (that protocol's variable)",
    "workers/engine/": "torch's own variables around AOTInductor (CXX, TORCH_FORCE_WEIGHTS_ONLY_LOAD)",
}


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    imported: str  # dotted name of a project module (the most specific one the statement names)
    line: int
    runtime: bool  # False under ``if TYPE_CHECKING:``, which never runs


def test_the_shared_library_imports_neither_workers_nor_service() -> None:
    assert upward_imports(project_imports(ROOT)) == []


def test_the_api_and_the_workers_import_each_other_only_through_the_celery_app() -> None:
    assert crossing_imports(project_imports(ROOT)) == []


def test_no_import_cycle_besides_the_known_ones() -> None:
    cycles = import_cycles(project_imports(ROOT))
    assert [cycle for cycle in cycles if frozenset(cycle) not in KNOWN_CYCLES] == []


def test_no_module_of_the_project_is_over_450_lines() -> None:
    """A module a reader can hold in mind (tests and benchmarks aside); the engine's test also bounds classes."""
    too_long = {
        str(path.relative_to(ROOT)): lines
        for package in PACKAGES + ("scripts",)
        for path in sorted((ROOT / package).rglob("*.py"))
        if (lines := len(path.read_text().splitlines())) > 450
    }
    assert too_long == {}


def test_settings_are_read_from_the_environment_in_config_only() -> None:
    assert environment_reads(ROOT) == []


@pytest.mark.parametrize(
    "planted, imported",
    [
        ("from workers.sandbox import gpu_devices\n", "workers.sandbox"),
        ("from workers import sandbox\n", "workers.sandbox"),
        ("def later():\n    import service.health\n", "service.health"),  # inside a function counts too
    ],
)
def test_the_walk_finds_a_planted_upward_import(tmp_path: Path, planted: str, imported: str) -> None:
    tree = _copy_of_the_project(tmp_path)
    (tree / "modelpress" / "planted.py").write_text(planted)
    assert [(i.importer, i.imported) for i in upward_imports(project_imports(tree))] == [
        ("modelpress.planted", imported)
    ]


def test_the_walk_finds_a_planted_crossing_and_a_planted_cycle(tmp_path: Path) -> None:
    tree = _copy_of_the_project(tmp_path)
    (tree / "service" / "planted.py").write_text("from workers.sandbox import confined\n")
    (tree / "workers" / "planted.py").write_text("def later():\n    from service import planted\n")
    imports = project_imports(tree)
    assert {(i.importer, i.imported) for i in crossing_imports(imports)} == {
        ("service.planted", "workers.sandbox"),
        ("workers.planted", "service.planted"),
    }
    (tree / "modelpress" / "a.py").write_text("from . import b\n")
    (tree / "modelpress" / "b.py").write_text("def later():\n    from modelpress.a import x\n")
    assert ["modelpress.a", "modelpress.b"] in import_cycles(project_imports(tree))


def test_the_walk_finds_a_planted_environment_read(tmp_path: Path) -> None:
    tree = _copy_of_the_project(tmp_path)
    (tree / "service" / "planted.py").write_text("import os\nLIMIT = os.environ.get('MODELPRESS_LIMIT')\n")
    (tree / "workers" / "planted.py").write_text("from os import getenv\nLIMIT = getenv('MODELPRESS_LIMIT')\n")
    assert environment_reads(tree) == ["service/planted.py:2", "workers/planted.py:1"]


# ----------------------------------------------------------------------------- the walk


def project_imports(root: Path) -> list[Import]:
    """Every import statement of every module under ``PACKAGES`` that names a project module."""
    modules = {
        _module_name(path, root): path for package in PACKAGES for path in sorted((root / package).rglob("*.py"))
    }
    imports = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        type_only = {
            id(node)
            for block in ast.walk(tree)
            if _is_type_checking_block(block)
            for statement in block.body
            for node in ast.walk(statement)
        }
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            for target in _targets(node, package):
                resolved = _project_module(target, modules)
                if resolved:
                    imports.append(Import(name, resolved, node.lineno, id(node) not in type_only))
    return imports


def upward_imports(imports: list[Import]) -> list[Import]:
    return [i for i in imports if _top(i.importer) == "modelpress" and _top(i.imported) in ("workers", "service")]


def crossing_imports(imports: list[Import]) -> list[Import]:
    return [
        i
        for i in imports
        if (_top(i.importer) == "service" and _top(i.imported) == "workers" and i.imported not in SERVICE_MAY_IMPORT)
        or (_top(i.importer) == "workers" and _top(i.imported) == "service")
    ]


def import_cycles(imports: list[Import]) -> list[list[str]]:
    """Each group of modules that import each other, directly or around a loop (strongly connected
    components of the runtime import graph), sorted; a module importing itself is one too."""
    graph: dict[str, set[str]] = {}
    for i in imports:
        if i.runtime:
            graph.setdefault(i.importer, set()).add(i.imported)
            graph.setdefault(i.imported, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(start: str) -> None:  # Tarjan's algorithm, iterative (the graph has hundreds of modules)
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph[successor]))))
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.append(member)
                        if member == node:
                            break
                    if len(group) > 1 or node in graph[node]:
                        groups.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return sorted(groups)


def environment_reads(root: Path) -> list[str]:
    """``path:line`` of each use of ``os.environ`` or ``os.getenv`` outside ``ENVIRONMENT_READERS``."""
    found = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            relative = path.relative_to(root).as_posix()
            if any(
                relative == allowed or (allowed.endswith("/") and relative.startswith(allowed))
                for allowed in ENVIRONMENT_READERS
            ):
                continue
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if _reads_environment(node):
                    found.append(f"{relative}:{node.lineno}")
    return found


def _targets(node: ast.AST, package: str) -> list[str]:
    """The dotted names an import statement may bind: ``from a import b`` may be module ``a.b``."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
            source = f"{base}.{node.module}" if node.module else base
        else:
            source = node.module or ""
        return [f"{source}.{alias.name}" for alias in node.names] or [source]
    return []


def _project_module(dotted: str, modules: dict[str, Path]) -> str | None:
    """The most specific project module ``dotted`` names (``a.b.name`` -> ``a.b``), or None."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in modules:
            return ".".join(parts[:end])
    return None


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top(module: str) -> str:
    return module.split(".", 1)[0]


def _is_type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and (
        (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
        or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING")
    )


def _reads_environment(node: ast.AST) -> bool:
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "os":
        return node.attr in ("environ", "getenv", "environb")
    if isinstance(node, ast.ImportFrom) and node.module == "os":
        return any(alias.name in ("environ", "getenv", "environb") for alias in node.names)
    return False


def _copy_of_the_project(tmp_path: Path) -> Path:
    """The project's packages, to plant a bad import in without touching the real ones."""
    tree = tmp_path / "project"
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            target = tree / path.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(path.read_text())
    return tree
