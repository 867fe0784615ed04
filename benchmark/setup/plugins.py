"""Floor 2: loading plugin files (``datasets/*.py``, ``solvers/*.py``) by path, under stable module names.

The folders are not packages on purpose: ``datasets/`` must never shadow Hugging Face ``datasets``. Each file
is imported as ``benchmark._plugins.<kind>.<folder key>.<file stem>``, where the folder key is ``builtin`` for
the repository's own folder and a hash of the folder's absolute path for ``$TDABENCH_<KIND>_PATH`` folders.
The names are the same in every process, and :class:`PluginFinder` (installed when ``benchmark`` is imported)
resolves them, so a solver class or a plugin function pickles by reference into a worker process.

A plugin file that fails to import is recorded with its error (:func:`broken`) and skipped: one broken file
never takes the other plugins down with it.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

from .store import IN_CLONE, REPO_ROOT

PACKAGE = "benchmark._plugins"
KINDS = ("datasets", "solvers")
_BROKEN: dict[str, dict[str, str]] = {kind: {} for kind in KINDS}


def builtin_dir(kind: str) -> Path:
    """The project's own ``solvers/`` or ``datasets/``: at the top of a clone, inside the package of an installed
    wheel (pyproject.toml maps them to ``benchmark/_builtin/``)."""
    if kind not in KINDS:
        raise ValueError(f"plugin kinds are {KINDS}, not {kind!r}")
    return REPO_ROOT / kind if IN_CLONE else Path(__file__).resolve().parents[1] / "_builtin" / kind


def plugin_dirs(kind: str) -> list[Path]:
    """The built-in folder for ``kind`` plus any in ``$TDABENCH_<KIND>_PATH`` (os.pathsep-separated)."""
    dirs = [builtin_dir(kind)]
    extra = os.environ.get(f"TDABENCH_{kind.upper()}_PATH", "")
    dirs += [Path(p).expanduser().resolve() for p in extra.split(os.pathsep) if p]
    return dirs


def folder_key(kind: str, folder: Path) -> str:
    folder = Path(folder).resolve()
    if folder == builtin_dir(kind).resolve():
        return "builtin"
    return "d" + hashlib.sha256(str(folder).encode()).hexdigest()[:12]


def module_name(kind: str, path: Path) -> str:
    path = Path(path).resolve()
    return f"{PACKAGE}.{kind}.{folder_key(kind, path.parent)}.{path.stem}"


def _stamp(path: Path) -> tuple[int, int]:
    st = Path(path).stat()
    return st.st_mtime_ns, st.st_size


class _PluginLoader(importlib.machinery.SourceFileLoader):
    """Executes a plugin file and remembers which version of the file it ran (to reload it when it changes)."""

    def exec_module(self, module):
        module.__tdabench_stamp__ = _stamp(self.path)
        super().exec_module(module)


def _spec(name: str, path: Path):
    path = Path(path).resolve()
    return importlib.util.spec_from_file_location(name, path, loader=_PluginLoader(name, str(path)))


class _Namespace(importlib.abc.Loader):
    """Loader of the empty packages above the plugin modules."""

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        module.__path__ = []


class PluginFinder(importlib.abc.MetaPathFinder):
    """Resolves ``benchmark._plugins.<kind>.<key>.<stem>`` to the plugin file it names."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != PACKAGE and not fullname.startswith(PACKAGE + "."):
            return None
        parts = fullname[len(PACKAGE):].lstrip(".").split(".") if fullname != PACKAGE else []
        if len(parts) < 3:
            if parts and parts[0] not in KINDS:
                return None
            return importlib.machinery.ModuleSpec(fullname, _Namespace(), is_package=True)
        kind, key, stem = parts[0], parts[1], ".".join(parts[2:])
        if kind not in KINDS:
            return None
        for folder in plugin_dirs(kind):
            if folder_key(kind, folder) == key and (folder / f"{stem}.py").is_file():
                return _spec(fullname, folder / f"{stem}.py")
        return None


def install_finder() -> None:
    if not any(isinstance(f, PluginFinder) for f in sys.meta_path):
        sys.meta_path.append(PluginFinder())


def load_plugin_file(path: Path, kind: str) -> ModuleType:
    """Import one plugin file under its stable name: once per process, again when the file has changed since."""
    install_finder()
    name = module_name(kind, path)
    cached = sys.modules.get(name)
    if cached is not None and getattr(cached, "__tdabench_stamp__", None) == _stamp(path):
        return cached
    spec = _spec(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise ImportError(f"could not load {kind} plugin {path}: {type(exc).__name__}: {exc}") from exc
    return module


def load_plugins(kind: str) -> list[ModuleType]:
    """Every plugin file of ``kind`` that imports; the ones that do not are recorded in :func:`broken`."""
    modules, trouble = [], {}
    for d in plugin_dirs(kind):
        if not d.is_dir():
            continue
        for path in sorted(d.glob("*.py")):
            if path.name.startswith("_"):
                continue
            try:
                modules.append(load_plugin_file(path, kind))
            except ImportError as exc:
                cause = exc.__cause__ or exc
                trouble[str(path)] = f"{type(cause).__name__}: {cause}"
    _BROKEN[kind] = trouble
    return modules


def broken(kind: str) -> dict[str, str]:
    """``{file: error}`` of the plugin files of ``kind`` that failed to import."""
    return dict(_BROKEN[kind])


class EmptyRegistry(LookupError):
    """No plugin of a kind could be found: the installation is incomplete, never an empty benchmark."""


def empty_registry_error(kind: str) -> EmptyRegistry:
    """Why no plugin of ``kind`` was found: which folders were searched, which exist, which files failed."""
    searched = "; ".join(f"{d} ({'no *.py files' if d.is_dir() else 'missing'})" for d in plugin_dirs(kind))
    trouble = broken(kind)
    failed = ("; files that failed to import: " + "; ".join(f"{f}: {e}" for f, e in trouble.items())) if trouble else ""
    return EmptyRegistry(f"no {kind} found: searched {searched}{failed}. Reinstall tdabench (a clone: `make venv`; "
                         f"a wheel must carry benchmark/_builtin/{kind}/), or name a folder of your own with "
                         f"$TDABENCH_{kind.upper()}_PATH")
