"""Floor 2: optional dependencies, imported only when a feature needs them.

``ray`` (distributed ground truth), ``timm``/``datasets``/``torchvision`` (natural-image settings),
``kronfluence``/``trak``/``dattri`` (peer libraries as solvers) are extras, not requirements: the core benchmark installs and runs without them. :func:`require` imports one
and, when it is missing, raises an error that names the feature and the install line.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

# module -> the pyproject extra that installs it
EXTRAS = {"ray": "distributed", "timm": "vision", "datasets": "vision", "torchvision": "vision",
          "huggingface_hub": "vision", "kronfluence": "peers", "trak": "peers", "dattri": "peers"}


class MissingDependency(ImportError):
    """An optional package a feature needs is not installed."""


def install_hint(module: str) -> str:
    extra = EXTRAS.get(module.split(".")[0])
    return f"pip install 'tdabench[{extra}]'" if extra else f"pip install {module.split('.')[0]}"


def require(module: str, purpose: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependency(
            f"{purpose} needs the optional package {module.split('.')[0]!r}, which cannot be imported ({exc}). "
            f"Install it with: {install_hint(module)}") from exc


def available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None
