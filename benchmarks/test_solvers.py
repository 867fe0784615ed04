"""Each solver's cost on mnist-cnn's explained model at a fixed reduced size (benchmarks/conftest.py: 6,000
training points, 200 queries, 50 subsets, 100 validation queries, 1,000 self-influences): fit, pairwise scores,
the LDS path, the validation grid pass and self-influence, each with its peak memory and, where the work is a
known set of matrix products, its flop floor.

Every solver in the registry is benchmarked (peer libraries where installed). CG and LiSSA sweep the training
set for every IHVP iteration: they run 2 iterations on 2 queries (4 self-influences), and Arnoldi 64 Lanczos steps
in float32 instead of 512 in float64, as extra_info's params say.
A benchmark that only scores reuses the solver its session fitted once (untimed); fits are test_fit's.
"""

from __future__ import annotations

import pytest
import torch

from benchmark import core
from benchmark.evaluate import Solver, Task, registry
from benchmark.evaluate.engine import RunError, check_applicable, ensemble_predictions
from benchmark.evaluate.cost import Cost
from benchmark.evaluate.solver import subset_predictions

from .conftest import SELF

SOLVERS = sorted(registry.available())
# float64 G-products over 6,000 CNN images cost ≈ 25 s per vector block here: two iterations on 2 queries
ITERATIVE = {"cg": {"max_iter": 2}, "lissa": {"depth": 2}}  # options, on ITERATIVE_QUERIES queries
# Arnoldi's 512 float64 Lanczos steps over 6,000 points take half an hour here: 64 steps with float32 products (its
# leaderboard CNN rows' precision), scoring every query; its fit scales linearly in the steps.
REDUCED = {"arnoldi": {"iterations": 64, "precision": "float32"}}
ITERATIVE_QUERIES = 2
ITERATIVE_SELF = 4
# Passes of per-example (pseudo-)gradients over the training set a fit cannot avoid.
FIT_PASSES = {"kfac": 1, "ekfac": 2, "kronfluence-diagonal": 1, "kronfluence-kfac": 1, "kronfluence-ekfac": 2}
GRID = ("ekfac", "kfac", "kronfluence-ekfac")  # solvers whose damping grid the LDS evaluation searches


def solver_class(name, cnn):
    cls = registry.get(name)
    if cls.unavailable():
        pytest.skip(f"{name} {cls.unavailable()}")
    try:
        check_applicable(cls, cnn.model)
    except RunError as exc:
        pytest.skip(str(exc))
    if cls.needs_trajectory and cnn.trajectory is None:
        pytest.skip(f"{name} attributes through training; {cnn.source} carries no training run (build the zoo: "
                    f"`make zoo`)")
    return cls


def params(name, cls):
    return {**cls.defaults, **ITERATIVE.get(name, {}), **REDUCED.get(name, {})}


def fitted(cls, p, cnn, cache=None):
    task = Task(cnn.model, cnn.tx, cnn.ty, cnn.num_classes, cnn.setting.measurement, cnn.device, seed=0,
                cache=cache or core.CurvatureCache(), trajectory=cnn.trajectory)
    return cls(**p).fit(task)


_FITTED: dict = {}


def shared(name, cls, cnn):
    """The solver fitted once per session with its benchmark parameters (for the benchmarks that only score)."""
    if name not in _FITTED:
        _FITTED[name] = fitted(cls, params(name, cls), cnn)
    return _FITTED[name]


def generic(cls) -> bool:
    """Scores by the bilinear default (query features = IHVPs, train features = loss gradients)."""
    return cls.has_ihvp() and cls.scores is Solver.scores and cls.ihvp_block is None


@pytest.mark.parametrize("name", SOLVERS)
def test_fit(name, cnn, timed):
    cls = solver_class(name, cnn)
    p = params(name, cls)
    passes = FIT_PASSES.get(name)
    timed(lambda: fitted(cls, p, cnn), floor_flops=passes * len(cnn.ty) * cnn.grad_flops if passes else None,
          train=len(cnn.ty), params=p)


@pytest.mark.parametrize("name", SOLVERS)
def test_scores(name, cnn, timed):
    """Pairwise scores, queries × training points."""
    cls = solver_class(name, cnn)
    p = params(name, cls)
    solver = shared(name, cls, cnn)
    q = ITERATIVE_QUERIES if name in ITERATIVE else len(cnn.qy)
    n, d = len(cnn.ty), solver.feature_dim()
    floor = 2 * q * n * d + (n + q) * cnn.grad_flops if generic(cls) else None
    out = timed(lambda: solver.scores(cnn.qx[:q], cnn.qy[:q], cnn.tx, cnn.ty), floor_flops=floor, queries=q, train=n,
                params=p)
    assert out.shape == (q, n) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", SOLVERS)
def test_lds_path(name, cnn, timed):
    """The LDS evaluation's scoring: Σ_{i∈S} τ(q, i) for every subset S (one train pass summed per subset, then
    M products a query; full scores summed for solvers that override scores)."""
    cls = solver_class(name, cnn)
    p = params(name, cls)
    q = ITERATIVE_QUERIES if name in ITERATIVE else len(cnn.qy)
    m, n = len(cnn.membership), len(cnn.ty)

    solver = shared(name, cls, cnn)

    def setup():  # the per-subset sums are memoised in the task's cache: empty it (the fitted solver keeps its own)
        solver.task.cache.clear()
        return ()

    def run():
        return subset_predictions([solver], cnn.qx[:q], cnn.qy[:q], cnn.tx, cnn.ty, cnn.membership)[0]

    d = cnn.parameters
    floor = 2 * m * n * d + 2 * m * q * d + (n + q) * cnn.grad_flops if generic(cls) else None
    out = timed(run, setup=setup, floor_flops=floor, queries=q, subsets=m, train=n, params=p)
    assert out.shape == (m, q) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", GRID)
def test_validation_grid_pass(name, cnn, timed):
    """The grid search's scoring: every damping of the grid on the validation queries, from one shared pass of
    train gradients where the solver's structure allows it (the fits are benchmarked by test_fit)."""
    cls = solver_class(name, cnn)
    grid = cls.parameters["damping"]
    m, n, v = len(cnn.membership), len(cnn.ty), len(cnn.vy)

    def setup():
        cache = core.CurvatureCache()
        return ([[fitted(cls, {**cls.defaults, "damping": lam}, cnn, cache)] for lam in grid],)

    def run(candidates):
        return ensemble_predictions(candidates, cnn.vx, cnn.vy, cnn.tx, cnn.ty, cnn.membership, Cost(cnn.device),
                                    "score")

    d, c = cnn.parameters, len(grid)
    floor = 2 * m * n * d + 2 * c * m * v * d + (n + v) * cnn.grad_flops if generic(cls) else None
    out = timed(run, setup=setup, floor_flops=floor, configurations=c, validation_queries=v, subsets=m, train=n)
    assert len(out) == c and all(o.shape == (m, v) for o in out)


@pytest.mark.parametrize("name", SOLVERS)
def test_self_influence(name, cnn, timed):
    cls = solver_class(name, cnn)
    if not cls.has_self_influence:
        pytest.skip(f"{name} computes no self-influence")
    p = params(name, cls)
    solver = shared(name, cls, cnn)
    k = ITERATIVE_SELF if name in ITERATIVE else SELF
    d = solver.feature_dim()
    floor = k * cnn.grad_flops + 2 * k * d if generic(cls) else None
    out = timed(lambda: solver.self_scores(cnn.tx[:k], cnn.ty[:k]), floor_flops=floor, train=k, params=p)
    assert out.shape == (k,) and torch.isfinite(out).all()
