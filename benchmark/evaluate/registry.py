"""Floor 4: the solver registry — every ``Solver`` subclass in ``solvers/*.py`` (and ``$TDABENCH_SOLVERS_PATH``).

The one place below the command line that turns a solver's name into its class. A solver file that fails to
import is listed as broken with its error (:func:`broken`) and the others work as before.
"""

from __future__ import annotations

from ..setup.plugins import broken as broken_plugins
from ..setup.plugins import load_plugins
from .solver import Solver, SolverError


def available() -> dict[str, type[Solver]]:
    """Every Solver subclass defined in a solver file that imports, by name."""
    found: dict[str, type[Solver]] = {}
    for module in load_plugins("solvers"):
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, Solver) and obj.name and obj.__module__ == module.__name__:
                if obj.name in found and found[obj.name] is not obj:
                    raise SolverError(f"two solver files define the name {obj.name!r}")
                found[obj.name] = obj
    return dict(sorted(found.items()))


def broken() -> dict[str, str]:
    """``{file: error}`` of the solver files that failed to import."""
    load_plugins("solvers")
    return broken_plugins("solvers")


def get(name: str) -> type[Solver]:
    solvers = available()
    if name not in solvers:
        trouble = broken()
        hint = ("; solver files that failed to import: " + "; ".join(f"{f}: {e}" for f, e in trouble.items())
                if trouble else "")
        raise SolverError(f"unknown solver {name!r}; available: {', '.join(solvers) or '(none)'}{hint}")
    return solvers[name]


def resolve(name: str):
    """A method by name: a baseline (``baseline-random``, ``baseline-loss``) or a solver class."""
    from .engine import BASELINES

    return BASELINES[name] if name in BASELINES else get(name)
