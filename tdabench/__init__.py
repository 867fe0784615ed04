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


def load(setting: str, *, results=None, device=None):
    """A setting's verified ground truth, the model its leaderboard explains, and its data, ready for your code
    (:class:`benchmark.evaluate.external.Bench`): ``bench.evaluate(scores)`` on the reported queries,
    ``bench.evaluate_validation(scores)`` for tuning, ``bench.evaluate_mislabel(self_scores)``,
    ``bench.compare(result, "ekfac")``, ``bench.run(MySolver)``. ``results``: the results folder (default:
    $TDABENCH_RESULTS, else the repository's results/)."""
    from pathlib import Path

    from benchmark.evaluate import external, registry
    from benchmark.setup import settings as settings_mod
    from benchmark.setup.store import ResultsStore

    store = ResultsStore(Path(results).expanduser()) if results else ResultsStore.default()
    return external.Bench.load(store, settings_mod.get(setting), resolve=registry.resolve, device=device)


def solver(name: str):
    """The registered solver class called ``name`` (``tdabench solvers`` lists them)."""
    from benchmark.evaluate import registry

    return registry.get(name)


# Imported on first use, so that `import tdabench` stays cheap (no torch until it is needed).
_LAZY = {"Solver": "benchmark.evaluate", "Task": "benchmark.evaluate", "DAMPING_GRID": "benchmark.evaluate",
         "ScoresError": "benchmark.evaluate.external"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tdabench' has no attribute {name!r}")


__all__ = ["DAMPING_GRID", "ScoresError", "Solver", "Task", "__version__", "load", "main", "settings", "solver",
           "solvers"]
