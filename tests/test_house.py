"""The shape of the house: every module of ``benchmark/`` sits in a floor, imports run only downward, there are no
import circles, and names become objects only in the command line and the registries. Checked by reading the
source with ``ast`` (no imports run), so a planted violation is caught too."""

import ast
import shutil
from pathlib import Path

import pytest

from benchmark.setup.plugins import REPO_ROOT

FLOORS = ("core", "setup", "groundtruth", "evaluate", "studies", "report", "cli")
# The only places that may turn a setting's or solver's name into an object.
RESOLVERS = {"cli", "setup/settings.py", "evaluate/registry.py"}
LOOKUPS = {("settings", "get"), ("settings_mod", "get"), ("registry", "get"), ("registry", "resolve")}


def _modules(package: Path) -> dict[str, Path]:
    return {".".join(p.relative_to(package.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in package.rglob("*.py")}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every module of the package that ``name`` imports (top-level or inside functions)."""
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                if target in modules:
                    found.add(target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
    return found - {name}


def floor_of(name: str) -> int | None:
    parts = name.split(".")
    return FLOORS.index(parts[1]) if len(parts) > 1 and parts[1] in FLOORS else None


def violations(package: Path) -> list[str]:
    """Upward imports, modules outside every floor, and import circles."""
    modules = _modules(package)
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    problems = []
    for m, targets in graph.items():
        if m.split(".")[-1] in ("__init__", "__main__") or m == package.name:
            continue  # the package's front door (installs the plugin finder; runs the CLI)
        here = floor_of(m)
        if here is None:
            problems.append(f"{m} is in no floor ({', '.join(FLOORS)})")
            continue
        for t in targets:
            there = floor_of(t)
            if there is not None and there > here:
                problems.append(f"{m} (floor {here + 1}, {FLOORS[here]}) imports {t} (floor {there + 1}, "
                                f"{FLOORS[there]}): imports must run downward")
    colour, stack = {}, []

    def visit(u):
        colour[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if v.endswith("__init__") or v == package.name or graph.get(v) is None:
                continue
            if colour.get(v) == 1:
                problems.append("import circle: " + " -> ".join(stack[stack.index(v):] + [v]))
            elif not colour.get(v):
                visit(v)
        stack.pop()
        colour[u] = 2

    for m in sorted(graph):
        if not colour.get(m) and not m.endswith("__init__"):
            visit(m)
    return problems


def name_lookups(package: Path) -> list[str]:
    """Calls like ``settings.get(name)`` / ``registry.get(name)`` outside the command line and the registries."""
    found = []
    for path in package.rglob("*.py"):
        rel = str(path.relative_to(package))
        if rel.split("/")[0] in RESOLVERS or rel in RESOLVERS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and (node.func.value.id, node.func.attr) in LOOKUPS):
                found.append(f"{rel}:{node.lineno}: {node.func.value.id}.{node.func.attr}(...)")
    return found


def test_imports_run_downward_without_circles():
    assert violations(REPO_ROOT / "benchmark") == []


def test_names_become_objects_only_in_the_command_line_and_the_registries():
    assert name_lookups(REPO_ROOT / "benchmark") == []


@pytest.mark.parametrize("files,expect", [
    ({"core/planted.py": "from ..report import leaderboard\n"}, "must run downward"),
    ({"setup/planted.py": "def f():\n    from ..evaluate import engine\n"}, "must run downward"),  # lazy ones too
    ({"evaluate/planted_a.py": "from . import planted_b\n", "evaluate/planted_b.py": "from . import planted_a\n"},
     "import circle"),
    ({"stray.py": "x = 1\n"}, "is in no floor"),
])
def test_a_planted_violation_is_caught(tmp_path, files, expect):
    package = tmp_path / "benchmark"
    shutil.copytree(REPO_ROOT / "benchmark", package, ignore=shutil.ignore_patterns("__pycache__"))
    for rel, source in files.items():
        (package / rel).write_text(source)
    assert any(expect in v for v in violations(package)), violations(package)


def test_a_planted_name_lookup_is_caught(tmp_path):
    package = tmp_path / "benchmark"
    shutil.copytree(REPO_ROOT / "benchmark", package, ignore=shutil.ignore_patterns("__pycache__"))
    (package / "studies" / "planted.py").write_text("from ..setup import settings\n\n"
                                                    "def f():\n    return settings.get('mnist-cnn')\n")
    assert name_lookups(package) == ["studies/planted.py:4: settings.get(...)"]
