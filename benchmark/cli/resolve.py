"""Floor 7: turning the command line's names into objects (the registries do the lookups)."""

from __future__ import annotations

import os
from pathlib import Path

from ..setup.store import RESULTS_ENV, ResultsStore

# Every command's setting argument says the same.
SETTING_HELP = ("a setting (`tdabench settings` lists them), e.g. mnist-lr; SETTING@field=value,... derives "
                "one with another recipe")

# The registries import torch and every plugin: imported where a name is resolved, so that `tdabench --help` and
# argument errors answer at once.


def store(args, reading: bool = False) -> ResultsStore:
    """``--results``, else $TDABENCH_RESULTS, else the repository's results/. A command that only reads (``reading``)
    refuses a root that does not exist; one that writes creates it."""
    given = getattr(args, "results", None)
    chosen = ResultsStore(Path(given).expanduser()) if given else ResultsStore.default()
    if reading:
        chosen.check_exists("--results" if given else "$" + RESULTS_ENV if os.environ.get(RESULTS_ENV)
                            else "the default")
    return chosen


def setting(name: str):
    from ..setup import settings as settings_mod

    return settings_mod.get(name)


def settings(names: list[str] | None) -> list:
    """The named settings, or every leaderboard setting when none is named."""
    from ..evaluate.campaign import leaderboard_settings

    return [setting(n) for n in names] if names else leaderboard_settings()


def method(name: str):
    """A solver class or a baseline (``baseline-random``, ``baseline-loss``)."""
    from ..evaluate import registry

    return registry.resolve(name)


def solver(name: str):
    from ..evaluate import registry

    return registry.get(name)


def solvers(names: list[str] | None) -> dict:
    """{name: class} of the named solvers, or of every solver that imports when none is named."""
    from ..evaluate import registry

    return {n: registry.get(n) for n in names} if names else registry.available()


def params(items) -> dict:
    from ..evaluate.engine import parse_param

    return dict(parse_param(t) for t in items or [])
