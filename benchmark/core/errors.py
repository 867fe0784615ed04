"""Floor 1: the one error the math below the solvers raises."""


class SolverError(ValueError):
    """A solver was asked for something it cannot do (bad parameters, unsupported model, too large, NaN input)."""
