"""Floor 4: what a solver is — the API every file in ``solvers/`` implements.

A solver approximates v = (G + λI)⁻¹ g, where G is the Gauss-Newton matrix of the *mean* training loss
(G = (1/N) Σᵢ Jᵢᵀ Hᵢ Jᵢ, Hᵢ the Hessian of the cross-entropy in the logits) of the explained model, and
turns it into influence scores with the sign convention of docs/protocol.md ("Conventions"):

    τ(q, i) = −∇f(z_q)ᵀ (G + λI)⁻¹ ∇L(z_i)      (positive = up-weighting i helps the query's measurement f)
    self(i) =  ∇L(z_i)ᵀ (G + λI)⁻¹ ∇L(z_i)       (rank descending to find mislabeled points)

Scale: τ is the derivative of f with respect to the weight ε of an extra term ε·L(z_i) added to the mean
loss. Removing train point i is ε = −1/N, so retraining without i changes f by about −τ(q, i)/N
(tests/test_solvers.py checks this against actual leave-one-out retraining).

A solver file in ``solvers/`` defines one subclass of :class:`Solver` with a unique ``name``; adding the
file adds a leaderboard row (:mod:`.registry` finds it). Shared math (per-sample gradients, GGN products,
Kronecker factors) lives in :mod:`benchmark.core`; solver files stay thin.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import numpy as np
import torch
from torch import nn

from .. import core
from ..core import CurvatureCache, SolverError  # SolverError is raised by the math below too; re-exported here
from ..setup import deps
from ..setup.config import TrainRecipe

__all__ = ["Task", "Trajectory", "Solver", "SolverError", "SolverContractError", "DAMPING_GRID", "scores_many",
           "subset_predictions", "record_trajectory"]

# Memory the generic chunked scores may use for gradient blocks (query and train chunks together). Every
# block of queries costs one pass over the training set, so a large model on a large GPU wants a larger
# budget (all queries in one block = one pass): set $TDABENCH_SCORE_MEMORY_MB.
DEFAULT_MEMORY_BUDGET_MB = 1024


def score_memory_budget_mb() -> float:
    raw = os.environ.get("TDABENCH_SCORE_MEMORY_MB")
    if raw is None or raw == "":
        return DEFAULT_MEMORY_BUDGET_MB
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value <= 0:
        raise SolverError(f"TDABENCH_SCORE_MEMORY_MB must be a positive number of MiB, got {raw!r}")
    return value

# The damping grid every damped solver searches (absolute λ, in units of G of the *mean* loss), so solvers
# are compared at the same λ. It spans the values the paper's §6 error analysis is about.
DAMPING_GRID = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]


@dataclass
class Trajectory:
    """How an explained model was trained, for solvers that attribute through training (TracIn, SOURCE): its
    weights after each epoch (``checkpoint(0)`` is the initialisation, ``checkpoint(epochs)`` the model) and the
    learning rate of every SGD step, epoch by epoch. ``recipe`` (momentum, weight decay, batch size) and ``seed``
    (initialisation and data order) are known for the zoo's models: with them the run can be replayed step by
    step (:func:`benchmark.setup.training.train`), on the task's training data in its order."""

    epochs: int
    checkpoint: Callable[[int], nn.Module]
    learning_rates: np.ndarray  # (epochs, steps per epoch)
    recipe: TrainRecipe | None = None
    seed: int | None = None


def record_trajectory(model: nn.Module, x: torch.Tensor, y: torch.Tensor, recipe: TrainRecipe, seed: int
                      ) -> tuple[nn.Module, Trajectory]:
    """Train a copy of ``model`` (its initialisation) on all of (x, y) with ``recipe`` and ``seed``, keeping every
    epoch's weights in memory: the trained model and its trajectory (small models: the fingerprint probe, tests)."""
    import copy

    from ..setup.training import train

    states, rates = [], []

    def keep(epoch, m, schedule):
        states.append({k: v.detach().clone() for k, v in m.state_dict().items()})
        if epoch:
            rates.append(schedule)

    def checkpoint(epoch: int) -> nn.Module:
        m = copy.deepcopy(model)
        m.load_state_dict(states[epoch])
        return m.eval()

    final = train(copy.deepcopy(model), x, y, recipe, seed, on_epoch=keep)
    return final, Trajectory(recipe.epochs, checkpoint, np.asarray(rates, dtype=np.float64), recipe, seed)


@dataclass
class Task:
    """Everything a solver needs about the explained model.

    ``train_x``/``train_y`` are the data the curvature is fitted on (the model's own training data).
    ``measurement`` names the query function f: "margin" (default) or "loss".
    ``cache`` holds damping-independent curvature across fits: give the fits of one grid search the same cache
    (the evaluation does), and the curvature is built once. ``trajectory`` is the model's training run when it
    is known (explained models from the zoo); solvers that need it refuse a task without one. A Task describes one fixed model: do not change the
    model's weights after creating it (the cache is keyed by the content of the model and data).
    """

    model: nn.Module
    train_x: torch.Tensor
    train_y: torch.Tensor
    num_classes: int
    measurement: str = "margin"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0  # for solvers that sample (LiSSA mini-batches, random projections)
    cache: CurvatureCache = field(default_factory=CurvatureCache)
    trajectory: Trajectory | None = None  # where the explained model comes from the zoo

    def fingerprint(self) -> str:
        """Content hash of the model and its training data (cached on first use)."""
        if getattr(self, "_fingerprint", None) is None:
            self._fingerprint = core.fingerprint(self.model, self.train_x, self.train_y)
        return self._fingerprint


class SolverContractError(SolverError):
    """A solver's hook returned something of the wrong shape or kind: a bug in the solver file, the same for every
    hyper-parameter, so a grid search stops at it instead of trying the next configuration."""


# The hooks a solver file may override, and the shape each must return, read off its arguments. Every override is
# checked where it returns, whoever calls it (the engine, a study, a test): a block one row short would otherwise
# be scored silently (a query's column of subset predictions left as uninitialised memory) or fail as a raw
# torch traceback.
HOOKS = ("ihvp", "train_features", "query_features", "scores", "self_scores")


def _solver_file(cls) -> str:
    path = getattr(sys.modules.get(cls.__module__), "__file__", None)
    return f" ({path})" if path else ""


def _describe(out) -> str:
    if not isinstance(out, torch.Tensor):
        return f"a {type(out).__name__}, not a torch.Tensor"
    return f"shape {tuple(out.shape)}" + ("" if out.is_floating_point() else f" of dtype {out.dtype}")


def contract_error(solver, hook: str, got: str, want: str) -> SolverContractError:
    """The one-line error for a hook that broke its contract, naming the solver, its file and the hook."""
    return SolverContractError(f"solver {solver.name!r}{_solver_file(type(solver))}: {hook}() returned {got}, "
                               f"expected {want}; fix {hook} in the solver's file")


def _check_hook(solver, hook: str, out, values: list) -> None:
    """Raise a SolverContractError when ``out``, returned by ``hook`` called with ``values`` (its arguments after
    self, in order), is not a floating tensor of the shape the hook's contract gives."""
    if hook == "ihvp":
        if not isinstance(values[0], torch.Tensor):
            return
        want, why = tuple(values[0].shape), "the shape of its input vectors: one (G + λI)⁻¹v per vector"
    elif hook in ("train_features", "query_features"):
        n, offset = len(values[1]), values[2]
        what, one = ("training examples", "example") if hook == "train_features" else ("queries", "query")
        if not (isinstance(out, torch.Tensor) and out.dim() == 2 and len(out) == n and out.is_floating_point()):
            raise contract_error(solver, hook, f"{_describe(out)} for {n} {what} ({offset}..{offset + n - 1})",
                                 f"({n}, D): one feature row per {one}")
        return
    elif hook == "scores":
        want, why = (len(values[1]), len(values[3])), "(queries, training examples)"
    else:  # self_scores
        want, why = (len(values[1]),), "one self-influence score per training example"
    if not (isinstance(out, torch.Tensor) and tuple(out.shape) == want and out.is_floating_point()):
        raise contract_error(solver, hook, _describe(out), f"shape {want} ({why})")
    if hook == "self_scores":  # (N,) is cheap to check; NaN would sink silently into the mislabel ranking
        core.check_finite(out, f"self-influence score ({solver.name})", 0)


def _checked_hook(hook: str, method):
    """``method`` (a subclass's override of ``hook``), returning what it returns once :func:`_check_hook` passes."""
    signature = inspect.signature(method)
    needed = {"ihvp": 1, "train_features": 3, "query_features": 3, "scores": 4, "self_scores": 2}[hook]

    @functools.wraps(method)
    def checked(self, *args, **kwargs):
        out = method(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs)  # it ran, so its arguments bind
        bound.apply_defaults()
        values = list(bound.args[1:])  # the positional arguments after self, defaults (a block's offset) filled in
        if len(values) >= needed:  # an override with an unusual signature is left unchecked rather than broken
            _check_hook(self, hook, out, values)
        return out

    checked.__tdabench_checked__ = True
    return checked


# Options every solver takes on top of its own ``defaults`` (recorded in a run's params only when given).
# last_blocks: attribute through the parameters of the model's last k blocks and its head only (what most
# users of large models do); None = every parameter. See core.last_blocks_parameters.
COMMON_OPTIONS = {"last_blocks": None}


class Solver:
    """Base class. Subclasses set ``name``, ``parameters`` (a grid per hyper-parameter, searched on
    validation queries by the runner) and ``defaults`` (every parameter the solver takes; those without a
    grid are fixed options), and implement ``fit`` (calling ``super().fit(task)`` first) and ``ihvp``.
    ``scores``/``self_scores`` have chunked generic implementations built on ``ihvp``; solvers with a
    cheaper structure may override them.

    Influence goes through the *attributed* parameters: every parameter by default, those of the last k
    blocks with ``last_blocks=k``, and a solver may narrow them further with :meth:`exclude` (K-FAC holds
    normalisation layers constant). The others are held constant; ``info()`` records what was left out.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    parameters: ClassVar[dict[str, list]] = {}
    defaults: ClassVar[dict] = {}
    max_params: ClassVar[int | None] = None  # largest model (parameter count) the solver accepts
    # Largest model the leaderboard runs the solver on by itself; beyond it a run takes days on a CPU (solvers
    # that sweep the training set per IHVP iteration). `tdabench run` still runs it when asked.
    leaderboard_max_params: ClassVar[int | None] = None
    # Ensemble sizes the leaderboard shows a row for (scores averaged over n zoo models, cost summed over them); a
    # size beyond what a setting's zoo holds is listed as n/a there. 1 is the single-model row.
    leaderboard_ensembles: ClassVar[tuple[int, ...]] = (1,)
    memory_budget_mb: ClassVar[float | None] = None  # None: $TDABENCH_SCORE_MEMORY_MB, else 1024
    # Largest batch of vectors per ihvp call, for solvers whose ihvp iterates over the training set (CG,
    # LiSSA): their cost is the same in small blocks, and a progress bar then moves between blocks.
    ihvp_block: ClassVar[int | None] = None
    # Solvers that attribute through the training run (TracIn, SOURCE, unrolled differentiation) need the task's
    # ``trajectory``: they are refused a task without one, and evaluated on the zoo's models (``--explain zoo``).
    needs_trajectory: ClassVar[bool] = False
    # Optional packages (import names) the solver needs, e.g. a peer library it adapts: where one is missing the
    # solver is listed as unavailable with its install line (:meth:`unavailable`), never an import error.
    requires: ClassVar[tuple[str, ...]] = ()
    # Whether the solver computes self-influence (mislabel detection). A peer library without such an entry point
    # says False and the evaluations leave that part out instead of failing. (Whether it has an ``ihvp``:
    # :meth:`has_ihvp`.)
    has_self_influence: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for hook in HOOKS:  # the overrides this class defines (inherited ones were wrapped where they were defined)
            method = cls.__dict__.get(hook)
            if inspect.isfunction(method) and not getattr(method, "__tdabench_checked__", False):
                setattr(cls, hook, _checked_hook(hook, method))

    @classmethod
    def unavailable(cls) -> str | None:
        """Why the solver cannot run here (an optional package it needs is not installed, and the line that
        installs it), or None."""
        missing = [m for m in cls.requires if not deps.available(m)]
        if not missing:
            return None
        hints = sorted({deps.install_hint(m) for m in missing})
        return f"needs {', '.join(missing)}: {'; '.join(hints)}"

    @classmethod
    def probe_params(cls, params: dict) -> dict:
        """The parameters its behavioural fingerprint runs it with (:mod:`benchmark.evaluate.fingerprint`), given a
        record's. The probe is a 48-example problem: where the record's parameters make it ill-conditioned there (a
        projection wider than 48 points without a ridge, an iteration far from converged), round-off decides the
        probe's scores and the record would read stale on another CPU. Such a solver returns parameters under
        which the same code runs well-conditioned on the probe; the default is the record's own."""
        return dict(params)

    @classmethod
    def accepted(cls) -> set[str]:
        """Every parameter name the solver takes: its own and the common options."""
        return set(cls.defaults) | set(COMMON_OPTIONS)

    def __init__(self, **params):
        unknown = set(params) - self.accepted()
        if unknown:
            raise SolverError(f"solver {self.name!r} has no parameter(s) {sorted(unknown)}; "
                              f"it takes {sorted(self.accepted())}")
        self.params = {**self.defaults, **params}
        if "damping" in self.params:
            d = self.params["damping"]
            if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d) or d < 0:
                raise SolverError(f"solver {self.name!r}: damping must be a finite number >= 0, got {d!r}")
        k = self.params.get("last_blocks")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise SolverError(f"solver {self.name!r}: last_blocks must be a positive integer or None, got {k!r}")
        self.task: Task | None = None
        self.attributed: list[str] | None = None  # None: every parameter
        self.attribution: dict = {}
        self._shared_seconds = 0.0  # build time of the damping-independent results this fit used
        self._built_seconds = 0.0  # ... of those that this fit built (not taken from the cache)

    # -- to implement -------------------------------------------------------------------------
    def fit(self, task: Task) -> "Solver":
        """Validate the task and keep it. Subclasses call this first, then fit their curvature."""
        why = self.unavailable()
        if why:
            raise SolverError(f"solver {self.name!r} {why}")
        self.attributed, self.attribution = None, {}
        if self.params.get("last_blocks") is not None:
            self.attributed, self.attribution = core.last_blocks_parameters(task.model, self.params["last_blocks"])
        n = self._count(task.model, self.attributed)
        if self.max_params is not None and n > self.max_params:
            raise SolverError(f"solver {self.name!r} accepts models up to {self.max_params:,} parameters; this model "
                              f"has {n:,}{' attributed' if self.attributed is not None else ''}. Use cg, lissa, kfac, "
                              f"ekfac or identity for models this large (or fewer parameters with last_blocks).")
        if len(task.train_y) == 0 or len(task.train_x) != len(task.train_y):
            raise SolverError(f"task has {len(task.train_x)} training inputs and {len(task.train_y)} labels; "
                              f"need the same positive number of each")
        for name, param in task.model.named_parameters():
            core.check_finite(param.detach(), f"model parameter {name!r}", None)
        if task.train_x.is_floating_point():
            core.check_finite(task.train_x, "training input")
        if task.measurement not in ("margin", "loss"):
            raise SolverError(f"unknown measurement {task.measurement!r}; use 'margin' or 'loss'")
        if self.needs_trajectory and task.trajectory is None:
            raise SolverError(f"solver {self.name!r} attributes through the training run and needs the model's "
                              f"trajectory (its per-epoch checkpoints and learning rates): explain the zoo's models "
                              f"(`tdabench run ... --explain zoo`), which keep theirs")
        task.model.eval()
        self.task = task
        return self

    def ihvp(self, vectors: torch.Tensor) -> torch.Tensor:
        """(B, P) flat vectors -> (B, P) approximations of (G + λI)⁻¹ v. A solver whose scores are not one inverse-
        curvature product (TracIn, SOURCE, unrolled, traker) does not define it: :meth:`has_ihvp` is then False."""
        raise SolverError(f"solver {self.name!r} has no inverse-curvature product: it attributes by another route "
                          f"(its file says which), so it has no IHVP of arbitrary vectors")

    @classmethod
    def has_ihvp(cls) -> bool:
        """Whether the solver approximates (G + λI)⁻¹ v (and so has an IHVP error against the exact one)."""
        return cls.ihvp is not Solver.ihvp

    # Every score is bilinear: τ(q, i) = −⟨query_features(q), train_features(i)⟩. By default the train features
    # are the per-example loss gradients over the attributed parameters and the query features their
    # preconditioned query gradients (G + λI)⁻¹∇f(z_q); a solver with another structure (random projections,
    # several checkpoints) overrides the pair, and every scoring path — full scores, the subset sums LDS needs,
    # a grid's shared pass — follows.
    def train_features(self, train_x: torch.Tensor, train_y: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """(n, D) right-hand factors b(zᵢ) of the score, for a block of training points starting at example
        ``offset`` (for error messages)."""
        g = core.per_sample_grads(self.functional(), train_x, train_y, "loss")
        core.check_finite(g, "train loss gradient", offset)
        return g

    def query_features(self, query_x: torch.Tensor, query_y: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """(Q, D) left-hand factors a(z_q) of the score, for a block of queries starting at query ``offset``."""
        task, fm = self._require_fit(), self.functional()
        g = core.per_sample_grads(fm, query_x, query_y, task.measurement)
        core.check_finite(g, f"query gradient ({task.measurement})", offset)
        r = self.ihvp(g)
        core.check_finite(r, f"inverse-curvature product of a query gradient ({self.name})", offset)
        return r.to(fm.dtype)

    def feature_key(self) -> tuple:
        """Solvers fitted to one model whose ``feature_key`` is equal have equal train features, so they share a
        pass over the training set (a damping grid does)."""
        return ("loss-gradients", None if self.attributed is None else tuple(self.attributed))

    def feature_dim(self) -> int:
        """D, the length of a feature vector (for the memory budget)."""
        return self._count(self._require_fit().model, self.attributed)

    # -- provided -----------------------------------------------------------------------------
    def functional(self, dtype=None) -> core.FunctionalModel:
        """The explained model as pure functions of its attributed parameters."""
        return core.FunctionalModel(self._require_fit().model, dtype, self.attributed)

    def exclude(self, excluded: dict[str, str]) -> None:
        """Hold these parameters constant too (``{name: why}``), e.g. layers a curvature model cannot handle."""
        if not excluded:
            return
        model = self._require_fit().model
        current = self.attributed if self.attributed is not None else [n for n, _ in model.named_parameters()]
        self.attributed = [n for n in current if n not in excluded]
        by_reason: dict[str, list[str]] = {}
        for name, why in excluded.items():
            by_reason.setdefault(why, []).append(name)
        self.attribution = {**self.attribution, "excluded": by_reason}

    def kron_layers(self, unsupported: str) -> list:
        """The attributed nn.Linear/nn.Conv2d layers for Kronecker-factored curvature; parameters that cannot
        be factored are held constant (``unsupported="exclude"``, recorded) or a SolverError (``"error"``)."""
        layers, excluded = core.kron_layers_and_exclusions(self._require_fit().model, self.attributed,
                                                                unsupported)
        self.exclude(excluded)
        return layers

    @staticmethod
    def _count(model: nn.Module, names: list[str] | None) -> int:
        keep = None if names is None else set(names)
        return sum(p.numel() for n, p in model.named_parameters() if keep is None or n in keep)

    def cached(self, what: str, build: Callable[[], object], **options):
        """Memoise a damping-independent result for this task (content-keyed, shared across fits)."""
        task = self._require_fit()
        scope = None if self.attributed is None else tuple(self.attributed)
        key = (task.fingerprint(), str(task.device), what, scope, tuple(sorted(options.items())))
        value, seconds, built = task.cache.get(key, build)
        self._shared_seconds += seconds
        if built:
            self._built_seconds += seconds
        return value

    @classmethod
    def budget_mb(cls) -> float:
        """MiB the solver's score blocks may use: its ``memory_budget_mb``, else $TDABENCH_SCORE_MEMORY_MB (1024)."""
        return cls.memory_budget_mb or score_memory_budget_mb()

    def chunk_sizes(self, query_chunk: int | None = None, train_chunk: int | None = None) -> tuple[int, int]:
        """Rows of (P,)-vectors per block, from the memory budget. The query block (gradients + their IHVPs)
        gets 3/4 of it, because with full scores every query block costs one more pass of train gradients
        (1 GiB holds 2,000 preconditioned queries of the 46,730-parameter MNIST CNN: one pass); the train block
        gets 1/4, half for the block and half for the temporaries of computing it (per-example gradients in
        chunks, the finiteness check, float64 conversions of ``DOUBLE_ROWS`` rows; measured about as large as the
        block on the MNIST CNN). Iterative solvers cap a block at ``ihvp_block`` rows so their progress bars move."""
        # bytes of one float32 row: a feature, or the per-example gradient it is made from when that is longer
        row = 4 * max(self.feature_dim(), self._count(self._require_fit().model, self.attributed))
        budget = int(self.budget_mb() * 2**20)
        q = query_chunk or max(1, min(8192, self.ihvp_block or 8192, budget * 3 // 4 // (2 * row)))
        t = train_chunk or max(1, min(4096, budget // 4 // (2 * row)))  # the block and its temporaries (measured ~1×)
        return int(q), int(t)

    def scores(self, query_x: torch.Tensor, query_y: torch.Tensor, train_x: torch.Tensor,
               train_y: torch.Tensor, *, query_chunk: int | None = None,
               train_chunk: int | None = None) -> torch.Tensor:
        """(Q, N) influence scores τ of every train point on every query's measurement.

        Queries are preconditioned (ihvp) a block at a time; train gradients are computed a block at a
        time and dropped after their dot products, so memory is bounded by the chunk sizes.
        """
        return _scores_in_one_pass([self], query_x, query_y, train_x, train_y, query_chunk, train_chunk)[0]

    def self_scores(self, train_x: torch.Tensor, train_y: torch.Tensor, *,
                    train_chunk: int | None = None) -> torch.Tensor:
        """(N,) self-influence ∇L(zᵢ)ᵀ (G + λI)⁻¹ ∇L(zᵢ)."""
        self._require_fit()
        fm = self.functional()
        _, tc = self.chunk_sizes(None, train_chunk)
        tc = min(tc, self.ihvp_block or tc)
        out = torch.empty(len(train_y), dtype=torch.float32)
        for ts in core.chunks(len(train_y), tc, desc=f"self-influence ({self.name})"):
            g = core.per_sample_grads(fm, train_x[ts], train_y[ts], "loss")
            core.check_finite(g, "train loss gradient", ts.start)
            r = self.ihvp(g)
            core.check_finite(r, f"inverse-curvature product of a train gradient ({self.name})", ts.start)
            out[ts] = _rowwise_dot64(g, r).float().cpu()
        return out

    def query_feature_blocks(self, query_x: torch.Tensor, query_y: torch.Tensor, *, query_chunk: int | None = None,
                             desc: str | None = None):
        """Yields (slice, query features of those queries, in their own dtype), a block at a time (a progress bar
        with ``desc``), so a caller that reduces them never holds all Q × D at once. No train pass follows a block
        here, so blocks need not be large: by default each (gradients and their IHVPs) fits the train block's share
        of the budget, not the query block's three times larger one — unless the solver's IHVP itself sweeps the
        training set (``ihvp_block``: DataInf, CG, LiSSA), where fewer, larger blocks mean fewer sweeps."""
        qc, tc = self.chunk_sizes()
        qc = query_chunk or (qc if self.ihvp_block else max(1, tc // 2))
        for qs in core.chunks(len(query_y), qc, desc=desc):
            yield qs, _checked(self.query_features(query_x[qs], query_y[qs], qs.start), self, qs.start)

    def info(self) -> dict:
        """Diagnostics for the run record (e.g. CG residuals, LiSSA step size); JSON-serialisable.
        ``shared_seconds``: build time of the damping-independent curvature this fit used (also when it
        came from the cache, so a grid search can report the true cost of one configuration); ``built_seconds``:
        the part of it this fit built itself."""
        out = {"shared_seconds": round(self._shared_seconds, 3), "built_seconds": round(self._built_seconds, 3),
               "cache_hit": self._built_seconds == 0 and self._shared_seconds > 0}
        if self.task is not None:
            total = self._count(self.task.model, None)
            out["attributed_params"] = self._count(self.task.model, self.attributed)
            out["total_params"] = total
            out.update(self.attribution)
        return out

    def _require_fit(self) -> Task:
        if self.task is None:
            raise SolverError(f"solver {self.name!r}: call fit(task) before ihvp/scores/self_scores")
        return self.task


def scores_many(solvers: list[Solver], query_x: torch.Tensor, query_y: torch.Tensor, train_x: torch.Tensor,
                train_y: torch.Tensor, *, query_chunk: int | None = None,
                train_chunk: int | None = None) -> list[torch.Tensor]:
    """``[s.scores(...) for s in solvers]`` for solvers fitted to the same model (e.g. one per damping of a
    grid), sharing the per-example train gradients — the dominant cost — in one pass. They may differ in
    measurement (margin and loss queries share the pass); solvers that override ``scores`` or differ in model
    or attributed parameters are scored one by one."""
    if not solvers:
        return []
    first, task = solvers[0], solvers[0]._require_fit()
    shareable = all(type(s).scores is Solver.scores and s._require_fit().model is task.model
                    and s.feature_key() == first.feature_key() for s in solvers)
    if not shareable or len(solvers) == 1:
        return [s.scores(query_x, query_y, train_x, train_y, query_chunk=query_chunk, train_chunk=train_chunk)
                for s in solvers]
    return _scores_in_one_pass(solvers, query_x, query_y, train_x, train_y, query_chunk, train_chunk)


def _scores_in_one_pass(solvers: list[Solver], query_x, query_y, train_x, train_y, query_chunk, train_chunk
                        ) -> list[torch.Tensor]:
    """The chunked scores of one or more solvers with the same train features: per block of queries, each
    solver's query features; then one pass of train features, dotted with all of them."""
    first = solvers[0]
    qc, tc = first.chunk_sizes(query_chunk, train_chunk)
    if query_chunk is None:  # the query block holds every solver's query features
        qc = max(1, qc // len(solvers))
    outs = [torch.empty(len(query_y), len(train_y), dtype=torch.float32) for _ in solvers]
    passes = -(-len(query_y) // qc)
    configs = f", {len(solvers)} configurations" if len(solvers) > 1 else ""
    for p, qs in enumerate(core.chunks(len(query_y), qc)):
        features = [_checked(s.query_features(query_x[qs], query_y[qs], qs.start), s, qs.start) for s in solvers]
        for s, a in zip(solvers, features):
            _check_widths(s, a, features[0].shape[1], "another configuration's query_features()")
        stacked = torch.cat(features)
        rows = qs.stop - qs.start
        desc = f"scores ({first.name}{configs}): queries {qs.start}-{qs.stop} of {len(query_y)}, pass {p + 1}/{passes}"
        for ts in core.chunks(len(train_y), tc, desc=desc):
            b = _checked(first.train_features(train_x[ts], train_y[ts], ts.start), first, ts.start)
            _check_widths(first, stacked, b.shape[1], "train_features()")
            block = -(stacked @ b.to(stacked.dtype).T).float().cpu()
            for j, out in enumerate(outs):
                out[qs, ts] = block[j * rows:(j + 1) * rows]
    return outs


DOUBLE_ROWS = 256  # rows converted to float64 at a time: a float64 copy of a whole block would double its memory


def _double_rows(t: torch.Tensor):
    """Yields (slice, float64 copy of those rows of ``t``), ``DOUBLE_ROWS`` rows at a time."""
    for sl in core.chunks(len(t), DOUBLE_ROWS):
        yield sl, t[sl].double()


def _rowwise_dot64(g: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """(n,) float64 ⟨gᵢ, rᵢ⟩ over the rows of two (n, D) blocks."""
    out = torch.empty(len(g), dtype=torch.float64, device=g.device)
    for sl, g64 in _double_rows(g):
        out[sl] = (g64 * r[sl].double()).sum(-1)
    return out


def _check_widths(solver: Solver, query_features: torch.Tensor, width: int, other: str) -> None:
    """A score is −⟨query feature, train feature⟩: both must have the same length D (else a raw matmul error)."""
    if query_features.shape[1] != width:
        raise contract_error(solver, "query_features", f"rows of {query_features.shape[1]} values",
                             f"{width}, the length of {other} rows: a score is −⟨query feature, train feature⟩")


def _checked(features: torch.Tensor, solver: Solver, offset: int) -> torch.Tensor:
    """Features of a solver that defines its own are checked here too: NaN/Inf is a clear error naming the example."""
    core.check_finite(features, f"feature ({solver.name})", offset)
    return features


def membership_key(membership: torch.Tensor) -> str:
    """A short content hash of a (M, N) membership matrix (which training points each subset holds)."""
    import hashlib

    return hashlib.blake2b(membership.detach().cpu().numpy().tobytes(), digest_size=12).hexdigest()


def train_subset_sums(solver: Solver, train_x: torch.Tensor, train_y: torch.Tensor, membership: torch.Tensor, *,
                      train_chunk: int | None = None) -> torch.Tensor:
    """(M, D) float64: Σᵢ membership[m, i] · train_features(zᵢ) — one pass over the training set, memoised in the
    run's cache for every solver of the same model with the same ``feature_key``."""
    task = solver._require_fit()
    _, tc = solver.chunk_sizes(None, train_chunk)
    weights = membership.to(torch.float64)

    def build():
        sums = None
        for ts in core.chunks(len(train_y), tc, desc="train features, summed per subset"):
            b = _checked(solver.train_features(train_x[ts], train_y[ts], ts.start), solver, ts.start).cpu()
            for sub, b64 in _double_rows(b):
                part = weights[:, ts.start + sub.start:ts.start + sub.stop] @ b64  # (M, D)
                if sums is None:
                    sums = part
                else:
                    sums += part
        return sums

    # keyed like solver.cached, but not charged to the solver's fit: this is scoring work
    key = (task.fingerprint(), str(task.device), "train-subset-sums", solver.feature_key(), membership_key(membership),
           core.fingerprint(nn.Identity(), train_x, train_y))
    return task.cache.get(key, build)[0]


def subset_predictions(solvers: list[Solver], query_x: torch.Tensor, query_y: torch.Tensor, train_x: torch.Tensor,
                       train_y: torch.Tensor, membership: torch.Tensor, *, query_chunk: int | None = None,
                       train_chunk: int | None = None) -> list[torch.Tensor]:
    """For each solver, the (M, Q) predictions g(q, Sₘ) = Σᵢ membership[m, i] τ(q, i) that LDS compares with
    the ground truth.

    τ(q, i) = −⟨a(q), b(zᵢ)⟩ is linear in the train features (by default b = ∇L(zᵢ), a = (G + λI)⁻¹∇f(z_q)), so
    Σ_{i∈S} τ(q, i) = −⟨a(q), Σ_{i∈S} b(zᵢ)⟩: the subset sums of the train features (M × D) are taken in one pass
    per model (:func:`train_subset_sums`, shared by every configuration and every query set of the run), and each
    query then costs its features and M dot products instead of N. Solvers that override ``scores`` itself are
    scored in full and summed.
    """
    weights = membership.to(torch.float64)
    out = []
    for s in solvers:
        s._require_fit()
        if type(s).scores is not Solver.scores:
            full = s.scores(query_x, query_y, train_x, train_y, query_chunk=query_chunk, train_chunk=train_chunk)
            summed = torch.empty(len(weights), len(full), dtype=torch.float64)
            for qs in core.chunks(len(full), 256):  # a float64 copy of the (Q, N) scores is never held at once
                summed[:, qs] = weights @ full[qs].double().cpu().T
            out.append(summed)
            continue
        sums = train_subset_sums(s, train_x, train_y, weights, train_chunk=train_chunk)
        pred = torch.empty(len(weights), len(query_y), dtype=torch.float64)
        filled = 0  # every query's column must be written: an unwritten one is uninitialised memory
        for qs, a in s.query_feature_blocks(query_x, query_y, query_chunk=query_chunk,
                                            desc=f"query features of {len(query_y):,} queries ({s.name})"):
            if len(a) != qs.stop - qs.start or qs.start != filled:
                raise contract_error(s, "query_feature_blocks", f"{len(a)} feature rows for queries "
                                     f"{qs.start}..{qs.stop - 1} after {filled} queries",
                                     "consecutive blocks with one row per query")
            _check_widths(s, a, sums.shape[1], "train_features()")
            filled = qs.stop
            for sub, a64 in _double_rows(a.cpu()):  # block by block: Q × D features (D = L·P for SOURCE)
                pred[:, qs.start + sub.start:qs.start + sub.stop] = -(sums @ a64.T)
        if filled != len(query_y):
            raise contract_error(s, "query_feature_blocks", f"blocks for {filled} queries",
                                 f"blocks covering all {len(query_y)}")
        out.append(pred)
    return out
