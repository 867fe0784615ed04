"""Ground floor: loading plugin files (``datasets/*.py``, ``solvers/*.py``) by path.

The folders are not packages on purpose: ``datasets/`` must never shadow Hugging Face ``datasets``.
Each file is imported under a private module name, once per process.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parent.parent


def plugin_dirs(kind: str) -> list[Path]:
    """The built-in folder for ``kind`` plus any in ``$TDABENCH_<KIND>_PATH`` (os.pathsep-separated)."""
    dirs = [REPO_ROOT / kind]
    extra = os.environ.get(f"TDABENCH_{kind.upper()}_PATH", "")
    dirs += [Path(p) for p in extra.split(os.pathsep) if p]
    return dirs


def load_plugin_file(path: Path, kind: str) -> ModuleType:
    path = path.resolve()
    name = f"_tdabench_{kind}_{abs(hash(str(path))):x}_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise ImportError(f"could not load {kind} plugin {path}: {type(exc).__name__}: {exc}") from exc
    return module


def load_plugins(kind: str) -> list[ModuleType]:
    modules = []
    for d in plugin_dirs(kind):
        if not d.is_dir():
            continue
        for path in sorted(d.glob("*.py")):
            if not path.name.startswith("_"):
                modules.append(load_plugin_file(path, kind))
    return modules
