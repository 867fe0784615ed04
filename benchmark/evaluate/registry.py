"""Floor 4: the solver registry — every ``Solver`` subclass in ``solvers/*.py`` (and ``$TDABENCH_SOLVERS_PATH``).

The one place below the command line that turns a solver's name into its class. A solver file that fails to
import is listed as broken with its error (:func:`broken`) and the others work as before; so are two solvers that
claim the same name (which one a record belongs to would be a guess): both are left out, naming both files.
"""

from __future__ import annotations

from ..setup.plugins import broken as broken_plugins
from ..setup.plugins import empty_registry_error, load_plugins
from .solver import Solver, SolverError


def _found() -> tuple[dict[str, type[Solver]], dict[str, list[str]]]:
    """The Solver subclasses of every solver file that imports, by name, and ``{name: files}`` of the names more
    than one class claims (left out of the first)."""
    found: dict[str, list[tuple[type[Solver], str]]] = {}
    for module in load_plugins("solvers"):
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, Solver) and obj.name and obj.__module__ == module.__name__:
                claims = found.setdefault(obj.name, [])
                if all(cls is not obj for cls, _ in claims):
                    claims.append((obj, str(module.__file__)))
    unique = {name: claims[0][0] for name, claims in found.items() if len(claims) == 1}
    ambiguous = {name: [f for _, f in claims] for name, claims in found.items() if len(claims) > 1}
    return dict(sorted(unique.items())), ambiguous


def _ambiguity(name: str, files: list[str]) -> str:
    where = " and ".join(sorted(set(files))) if len(set(files)) > 1 else f"{files[0]} ({len(files)} classes)"
    return (f"solver name {name!r} is defined by {where}; both are left out until one is renamed (its "
            f"`name = ...`), since a record could belong to either")


def available() -> dict[str, type[Solver]]:
    """Every Solver subclass defined in a solver file that imports, by name (a name two classes claim: neither).
    None at all is an incomplete installation: an error saying which folders were searched."""
    solvers, ambiguous = _found()
    if not solvers and not ambiguous:
        raise empty_registry_error("solvers")
    return solvers


def broken() -> dict[str, str]:
    """``{file: error}`` of the solver files that failed to import or claim a solver name another class claims."""
    load_plugins("solvers")
    trouble = broken_plugins("solvers")
    for name, files in _found()[1].items():
        for f in sorted(set(files)):
            trouble[f] = "; ".join(filter(None, [trouble.get(f), _ambiguity(name, files)]))
    return trouble


def get(name: str) -> type[Solver]:
    solvers, ambiguous = _found()
    if not solvers and not ambiguous:
        raise empty_registry_error("solvers")
    if name in ambiguous:
        raise SolverError(_ambiguity(name, ambiguous[name]))
    if name not in solvers:
        trouble = broken()
        hint = ("; solver files left out (they failed to import, or claim a name twice): "
                + "; ".join(f"{f}: {e}" for f, e in trouble.items()) if trouble else "")
        raise SolverError(f"unknown solver {name!r}; available: {', '.join(solvers) or '(none)'}{hint}")
    return solvers[name]


def resolve(name: str):
    """A method by name: a baseline (``baseline-random``, ``baseline-loss``) or a solver class."""
    from .engine import BASELINES

    return BASELINES[name] if name in BASELINES else get(name)
