"""tdabench: a benchmark for training-data attribution with influence functions.

The importable face of the ``tdabench`` distribution (the harness itself lives in the ``benchmark`` package;
``tdabench`` on the command line is :func:`main`).
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("tdabench")
except _metadata.PackageNotFoundError:  # a clone used without installing it
    __version__ = "unknown"


def main(argv=None) -> int:
    """The command line, as ``tdabench ...`` runs it."""
    from benchmark.cli import main as cli_main

    return cli_main(argv)


def settings() -> list[str]:
    """The names of the registered settings (an incomplete installation is an error saying why)."""
    from benchmark.setup import settings as settings_mod

    return list(settings_mod.available())


def solvers() -> list[str]:
    """The names of the registered solvers (an incomplete installation is an error saying why)."""
    from benchmark.evaluate import registry

    return list(registry.available())


__all__ = ["__version__", "main", "settings", "solvers"]
