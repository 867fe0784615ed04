"""Floor 4 — evaluating solvers: the Solver API, the scoring engine, metrics, cost and run records.

A solver file needs only this and :mod:`benchmark.core`::

    from benchmark import core
    from benchmark.evaluate import DAMPING_GRID, Solver

- :mod:`.solver`: the Solver API (``Task``, ``Solver``, chunked scores, ``scores_many``);
- :mod:`.registry`: solver files by name (the plugin registry);
- :mod:`.metrics`, :mod:`.cost`: LDS, mislabel recall and AUC with their uncertainty; wall-clock and memory;
- :mod:`.engine`: fit, grid search on validation queries, score, evaluate;
- :mod:`.fingerprint`, :mod:`.records`: run records and when they stop being current;
- :mod:`.campaign`: rerunning the records that are missing or stale.
"""

# A solver that replays a training run (unrolled) trains with the harness's own SGD, bit for bit.
from ..setup.training import train
from .solver import (COMMON_OPTIONS, DAMPING_GRID, Solver, SolverError, Task, Trajectory, record_trajectory,
                     score_memory_budget_mb, scores_many)
