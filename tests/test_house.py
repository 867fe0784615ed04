"""The shape of the house: every module of ``benchmark/`` sits in a floor, imports run only downward, there are no
import circles, and names become objects only in the command line and the registries. Checked by reading the
source with ``ast`` (no imports run), so a planted violation is caught too. And the project stands alone: nothing
cites a file a clone of the repository lacks, and every relative Markdown link in README.md and docs/ resolves."""

import ast
import re
import shutil
import subprocess
import sys
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


# ---------------------------------------------------------------- the project stands alone
# A clone holds only the repository: the team's notes beside it (the design file, the seed paper's text, the
# shared folder next to the checkout) are not there, so nothing in the project may send a reader to them. The
# pattern is assembled from pieces so that this file does not match it.
FOREIGN = re.compile("|".join([r"\b" + "DESIGN" + r"\.md", r"\.\./" + "shared" + r"\b", "seed" + r"-paper\.txt"]))
STANDALONE = ("benchmark", "solvers", "datasets", "docs", "tests", "scripts", ".ci", "README.md", "Makefile")


def foreign_citations(root: Path) -> list[str]:
    """``path:line: text`` for each line under ``STANDALONE`` that names a file a clone of the repository lacks."""
    found = []
    for name in STANDALONE:
        top = root / name
        for path in sorted([top] if top.is_file() else top.rglob("*")):
            if not path.is_file() or "__pycache__" in path.parts:
                continue
            text = path.read_bytes().decode("utf-8", errors="replace")
            found += [f"{path.relative_to(root)}:{n}: {line.strip()}"
                      for n, line in enumerate(text.splitlines(), 1) if FOREIGN.search(line)]
    return found


def test_nothing_cites_a_file_outside_the_repository():
    assert foreign_citations(REPO_ROOT) == []


def test_a_planted_foreign_citation_is_caught(tmp_path):
    design, shared = "DESIGN" + ".md", ".." + "/shared"
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text(f"fine\nthe sign of {design}\n")
    (tmp_path / "benchmark" / "core").mkdir(parents=True)
    (tmp_path / "benchmark" / "core" / "m.py").write_text(f"# sources in {shared}/notes.txt\n")
    (tmp_path / "README.md").write_text("a README that cites nothing\n")
    assert foreign_citations(tmp_path) == [f"benchmark/core/m.py:1: # sources in {shared}/notes.txt",
                                           f"docs/a.md:2: the sign of {design}"]


MD_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _prose(text: str) -> str:
    """Markdown without fenced code blocks and inline code, where brackets are code, not links."""
    return re.sub(r"`[^`\n]*`", "", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M))


def anchors(path: Path) -> set[str]:
    """The heading anchors GitHub renders for a Markdown file: lower case, punctuation dropped, spaces to hyphens,
    repeats numbered."""
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*$", re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M),
                         re.M):
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1))  # a link in a heading anchors by its text
        slug = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _ignored(root: Path, paths: list[Path]) -> set[Path]:
    """Those of ``paths`` git ignores (a clone never has them); none where git cannot say."""
    try:
        res = subprocess.run(["git", "check-ignore", "--stdin"], cwd=root, capture_output=True, text=True,
                             input="\n".join(str(p.relative_to(root)) for p in paths), timeout=30)
    except (OSError, subprocess.SubprocessError):
        return set()
    return {root / line for line in res.stdout.splitlines()} if res.returncode in (0, 1) else set()


def broken_links(root: Path) -> list[str]:
    """Every relative link in README.md and docs/*.md whose file or folder is not in the repository, or whose
    ``#anchor`` is no heading of the Markdown file it points into."""
    problems, targets = [], []
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        for target in MD_LINK.findall(_prose(doc.read_text())):
            if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):
                continue  # a URL (https:, mailto:), not a file of the repository
            where = f"{doc.relative_to(root)}: ({target})"
            file, _, anchor = target.partition("#")
            path = (doc.parent / file).resolve() if file else doc
            if root.resolve() not in [path, *path.parents] or not path.exists():
                problems.append(f"{where} points to no file or folder of the repository")
                continue
            targets.append((where, path))
            if anchor and path.suffix == ".md" and anchor not in anchors(path):
                problems.append(f"{where}: {path.name} has no heading #{anchor}")
    ignored = _ignored(root.resolve(), [p for _, p in targets])
    problems += [f"{where} points to a file git ignores, which a clone lacks" for where, p in targets if p in ignored]
    return problems


def test_every_relative_markdown_link_resolves():
    docs = [REPO_ROOT / "README.md", *(REPO_ROOT / "docs").glob("*.md")]
    assert sum(len(MD_LINK.findall(_prose(d.read_text()))) for d in docs) > 20  # the scan sees the links
    assert broken_links(REPO_ROOT) == []


def test_a_planted_broken_link_is_caught(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.md").write_text("# B\n\n## Two words\n")
    (tmp_path / "README.md").write_text(
        "[ok](docs/b.md) [ok](docs/b.md#two-words) [ok](#a-readme) [web](https://example.org/x.md)\n"
        "# A README\n[gone](docs/missing.md) [bad anchor](docs/b.md#three) [outside](../elsewhere.md)\n"
        "```\n[in code](docs/missing.md)\n```\n`[inline](docs/missing.md)`\n")
    assert broken_links(tmp_path) == ["README.md: (docs/missing.md) points to no file or folder of the repository",
                                      "README.md: (docs/b.md#three): b.md has no heading #three",
                                      "README.md: (../elsewhere.md) points to no file or folder of the repository"]


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to say what a clone lacks")
def test_a_link_to_an_ignored_file_is_caught(tmp_path):
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / ".gitignore").write_text("build/\n")
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "out.html").write_text("made here, never committed\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("[docs](docs) [ours](build/out.html)\n")
    assert broken_links(tmp_path) == ["README.md: (build/out.html) points to a file git ignores, which a clone lacks"]


def test_help_and_argument_errors_load_no_torch():
    """`tdabench --help` answers without importing torch or any plugin (it took 74 s on a loaded machine)."""
    code = ("import sys\nfrom benchmark.cli import main\n"
            "for argv in (['--help'], ['run', '--help'], ['compare']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'numpy', 'benchmark.evaluate.registry') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_every_setting_argument_says_what_it_takes():
    """A command's setting argument has help text (it had none on `run` and `compare`)."""
    from benchmark.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    missing = [name for name, sub in commands.items() for a in sub._actions
               if a.dest == "setting" and not a.help]
    assert missing == []
