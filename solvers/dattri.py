"""dattri-*: the attributors of dattri 0.3.0 (TRAIS-Lab's data-attribution library) as solvers — a peer
implementation on our task, explained model and ground truth, as Kronfluence and traker are.

One row per attributor, because each is another method: ``dattri-if-explicit`` (the explicit damped inverse),
``dattri-if-cg``, ``dattri-if-lissa``, ``dattri-if-arnoldi``, ``dattri-if-datainf`` and ``dattri-if-ekfac`` (its
influence-function attributors, ``IFAttributor*``), and ``dattri-trak`` (``TRAKAttributor``). Each is built with
dattri's ``AttributionTask`` and fitted with the attributor's own ``cache``; the influence-function rows apply the
attributor's ``transform_test_rep`` (its IHVP) to our gradients, and tests/test_dattri.py checks that this is
what dattri's own ``attribute`` scores. The adapter maps our conventions onto dattri's:

- *Curvature*: G, the Gauss–Newton matrix of the *mean* training loss. dattri's explicit, CG, LiSSA and Arnoldi
  attributors invert the Hessian of the loss function they are given, over the training set as one batch (they
  add up one inverse per batch otherwise), so they get the mean cross-entropy of the model *linearised* at its
  weights, f(θ₀) + J(θ − θ₀): its Hessian is G and its gradient at θ₀ the loss gradient (``curvature="hessian"``
  gives them the model itself). EK-FAC fits its factors on the gradients of the task's target function, given
  labels drawn from the model (the true Fisher, G for the cross-entropy; our ekfac's ``pseudo_labels="sampled"``);
  DataInf's curvature is by design the empirical Fisher of the training loss.
- *Damping*: our λ is absolute, in units of G; it is each attributor's ``regularization`` (explicit, CG, Arnoldi,
  DataInf) or ``damping`` (EK-FAC) unchanged, and LiSSA's ``damping × scaling`` (its recursion is
  x ← v + (1 − d)x − Hx/s, whose fixed point divided by s is (H + d·s·I)⁻¹v).
- *Sign*: dattri scores ∇target(q)ᵀ H⁻¹ ∇loss(zᵢ) with target our measurement f, so τ(q, i) is minus that;
  TRAK scores with the margin, positive = helps, as ours, and its kernel sums over the training set where
  ours is the mean: τ = N × dattri's TRAK score.
- *Parameters*: the attributed ones (``last_blocks``) are the ones dattri sees — a copy of the model whose
  other parameters do not require gradients; EK-FAC takes the attributed nn.Linear layers (dattri's EK-FAC
  handles no other layer; the others are held constant, ``info()`` records them).
- *Precision*: the model's; dattri makes some tensors in torch's default dtype, set to the model's while it runs.

Run as shipped, stated: dattri 0.3.0's EK-FAC rotates by its eigenvector matrices Q where the eigenbasis is Qᵀ
(``q_s @ v @ q_a.T`` with ``q`` from ``torch.linalg.eigh``, whose eigenvectors are columns), and it reshapes a
layer's [weight, bias] vector to (out, in + 1) as if each row's bias followed it, while its factors put the bias
in the last column. Its curvature is still a positive diagonal fitted in an orthogonal basis and inverted in
the same one, but not EK-FAC's: where EK-FAC is exact (one Linear layer, one example) it is 0.24–0.39 from the
inverse, and with Qᵀ and the [W | b] layout it would be exact (tests/test_dattri.py pins the first). The adapter
hands its transform our flat vectors, the layout dattri's own ``attribute`` hands it. Its CG starts from x₀ = v
and runs ``max_iter`` steps whatever the residual (it ignores ``tol``, and divides by zero once the residual
vanishes). Its Arnoldi does not re-orthogonalise and, where that makes Ritz values ≤ tol² (models with few
parameters against ``max_iter``), keeps them although it warns that it drops them: the adapter drops their
columns of its projection (NaN or huge). Its TRAK has no self-influence with a cached training set, so
``dattri-trak`` has no mislabel row. Needs ``pip install 'tdabench[peers]'``; without it the rows are listed as
unavailable.
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F
from torch import nn

from benchmark import core
from benchmark.evaluate import DAMPING_GRID, Solver, SolverError

VERSION = "0.3.0"  # the version these adapters were checked against (pyproject's peers extra pins it)
CURVATURES = ("ggn", "hessian")
FIT_BATCH = 512  # examples per batch where dattri streams the training set (EK-FAC, TRAK)


@contextlib.contextmanager
def _default_dtype(dtype):
    """dattri makes some tensors in torch's default dtype (the identity it adds, DataInf's accumulator, Arnoldi's
    start vector); while it runs that is the model's, so a float64 model stays float64."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _loader(x, y, batch_size=None):
    data = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(data, batch_size=batch_size or len(y), shuffle=False)


class _Functions:
    """The functions dattri differentiates, in its torch.func style: ``f(params, data)`` with ``params`` the
    attributed parameters by name and ``data`` one batch (x, y) or, where dattri vmaps without a batch axis
    (TRAK), one example."""

    def __init__(self, model, example_ndim, measurement, curvature="ggn"):
        self.model, self.example_ndim, self.curvature = model, example_ndim, curvature
        self.measure = core.MEASUREMENTS[measurement]
        self.theta0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        self.dtype = next(iter(self.theta0.values())).dtype

    def _batch(self, data):
        x, y = data
        if x.dim() == self.example_ndim:  # one example
            x, y = x.unsqueeze(0), y.reshape(1)
        # dattri's LiSSA casts every input to float32 (labels too)
        return (x.to(self.dtype) if x.is_floating_point() else x), y.long()

    def logits(self, params, x):
        return torch.func.functional_call(self.model, params, (x,))

    def curvature_logits(self, params, x):
        """The model's logits, linearised at θ₀ for the GGN: the Hessian of a loss of f(θ₀) + J(θ − θ₀) is G."""
        if self.curvature == "hessian":
            return self.logits(params, x)
        delta = {n: params[n] - t for n, t in self.theta0.items()}
        out, tangent = torch.func.jvp(lambda p: self.logits(p, x), (self.theta0,), (delta,))
        return out + tangent

    def loss(self, params, data):
        """Mean cross-entropy of the batch: dattri's curvature is this function's Hessian."""
        x, y = self._batch(data)
        return F.cross_entropy(self.curvature_logits(params, x), y)

    def target(self, params, data):
        """Our measurement f (summed over a batch of one)."""
        x, y = self._batch(data)
        return self.measure(self.logits(params, x), y).sum()

    def sampled_loss(self, params, data):
        """Mean cross-entropy with labels drawn from the model: its gradients' covariance is the true Fisher."""
        x, _ = self._batch(data)
        logits = self.logits(params, x)
        with torch.no_grad():
            y = torch.multinomial(torch.softmax(logits.detach(), dim=-1), 1).flatten()
        return F.cross_entropy(logits, y)

    def correct_probability(self, params, data):
        x, y = self._batch(data)
        return torch.softmax(self.logits(params, x), dim=-1).gather(1, y[:, None]).squeeze()


def _attributed_copy(model: nn.Module, attributed) -> nn.Module:
    """The model as dattri sees it: its parameters outside ``attributed`` do not require gradients (dattri
    differentiates the ones that do, in ``named_parameters`` order: our flat layout)."""
    out = copy.deepcopy(model).eval()
    keep = None if attributed is None else set(attributed)
    for name, p in out.named_parameters():
        p.requires_grad_(keep is None or name in keep)
    return out


class _Dattri(Solver):
    """The shared adapter: a dattri AttributionTask on a copy of the explained model."""

    requires = ("dattri",)

    def _setup(self, task, curvature="ggn", target="target"):
        import dattri
        from dattri.task import AttributionTask

        if curvature not in CURVATURES:
            raise SolverError(f"{self.name}: curvature must be one of {', '.join(CURVATURES)}, got {curvature!r}")
        self.version = dattri.__version__ if hasattr(dattri, "__version__") else _version()
        self.dmodel = _attributed_copy(task.model, self.attributed)
        self.fns = _Functions(self.dmodel, task.train_x.dim() - 1, task.measurement, curvature)
        self.dtype, self.device = self.fns.dtype, str(task.device)
        self.dtask = AttributionTask(loss_func=self.fns.loss, model=self.dmodel,
                                     checkpoints=self.dmodel.state_dict(), target_func=getattr(self.fns, target))

    def _run(self, fn, *args, seed=None, **kwargs):
        """Call into dattri in the model's precision (and, for what it samples, seeded by the task)."""
        task = self._require_fit()
        with _default_dtype(self.dtype), torch.random.fork_rng(
                devices=[task.device] if task.device.type == "cuda" else []):
            torch.manual_seed(task.seed if seed is None else seed)
            return fn(*args, **kwargs)

    def info(self):
        return {**super().info(), "library": "dattri", "library_version": getattr(self, "version", None)}


class _DattriIF(_Dattri):
    """An influence-function attributor: its transform_test_rep is the IHVP, applied to our gradients."""

    parameters = {"damping": DAMPING_GRID}
    defaults = {"damping": 1e-3, "curvature": "ggn"}
    max_params = 12_000  # dattri works on the full training set as one batch
    leaderboard_max_params = 12_000

    def fit(self, task):
        super().fit(task)
        self._setup(task, self.params.get("curvature", "ggn"))
        self.attributor = self._attributor()
        return self

    def _attributor(self):
        """The fitted dattri attributor for this damping."""
        raise NotImplementedError

    def _fresh(self, cls, **kwargs):
        attributor = cls(task=self.dtask, device=self.device, **kwargs)
        task = self._require_fit()
        self._run(attributor.cache, _loader(task.train_x, task.train_y))
        return attributor

    nonfinite = "the curvature or the damping is too small for it"  # why an IHVP can come out NaN/Inf

    def ihvp(self, vectors):
        self._require_fit()
        v = vectors.to(self.device, self.dtype)
        return self._finite(self._run(self.attributor.transform_test_rep, 0, v).detach()).to(vectors.dtype)

    def _finite(self, out):
        if not torch.isfinite(out).all():
            raise SolverError(f"{self.name}: dattri returned a non-finite inverse-curvature product: "
                              f"{self.nonfinite}")
        return out

    def info(self):
        return {**super().info(), "attributor": type(getattr(self, "attributor", None)).__name__,
                "curvature": self.params.get("curvature")}


class DattriExplicit(_DattriIF):
    name = "dattri-if-explicit"
    description = f"dattri {VERSION} IFAttributorExplicit: explicit (G + λI)⁻¹ (peer implementation of exact)"
    # dattri builds the dense curvature (torch.func.hessian, all N examples in one vmap over P directions) at every
    # call: few calls. Measured rows on 2 cores: mnist-lr 6.4 min, 7.6 GB; mnist-mlp-small 9.2 min, 11.8 GB
    ihvp_block = 4096

    def _attributor(self):
        from dattri.algorithm import IFAttributorExplicit

        return self._fresh(IFAttributorExplicit, regularization=float(self.params["damping"]))


class DattriCG(_DattriIF):
    name = "dattri-if-cg"
    description = f"dattri {VERSION} IFAttributorCG: conjugate gradient (peer implementation of cg)"
    defaults = {"damping": 1e-3, "curvature": "ggn", "max_iter": 10}  # dattri's default iterations
    ihvp_block = 256  # each ihvp sweeps the training set max_iter times
    nonfinite = ("its CG runs all max_iter steps whatever the residual and divides by zero once the residual "
                 "vanishes; use fewer iterations (max_iter) or more damping")

    @classmethod
    def probe_params(cls, params):
        # 10 steps from x₀ = v at λ = 1e-2 are far from converged on the 48-example probe (round-off moved its scores
        # 20%); at λ ≥ 1 the same 10 steps converge (moves 5e-7)
        return {**params, "damping": max(float(params.get("damping", cls.defaults["damping"])), 1.0)}

    def _attributor(self):
        from dattri.algorithm import IFAttributorCG

        it = self.params["max_iter"]
        if isinstance(it, bool) or not isinstance(it, int) or it < 1:
            raise SolverError(f"{self.name}: max_iter must be a positive integer, got {it!r}")
        return self._fresh(IFAttributorCG, regularization=float(self.params["damping"]), max_iter=it)


class DattriLiSSA(_DattriIF):
    name = "dattri-if-lissa"
    description = f"dattri {VERSION} IFAttributorLiSSA: stochastic Neumann series (peer implementation of lissa)"
    # depth and batch as our lissa's; scaling None: 1.5 × the largest top eigenvalue of four mini-batch GGNs + λ
    defaults = {"damping": 1e-3, "curvature": "ggn", "recursion_depth": 1000, "batch_size": 64, "num_repeat": 1,
                "scaling": None}
    ihvp_block = 64
    # one vector at a time (see ihvp): a row on the small settings would take hours; `tdabench run` still runs it
    leaderboard_max_params = 1_000

    def _attributor(self):
        from dattri.algorithm import IFAttributorLiSSA

        p = self.params
        for key in ("recursion_depth", "batch_size", "num_repeat"):
            if isinstance(p[key], bool) or not isinstance(p[key], int) or p[key] < 1:
                raise SolverError(f"{self.name}: {key} must be a positive integer, got {p[key]!r}")
        lam = float(p["damping"])
        if p["scaling"] is None:
            top = self.cached("dattri-lissa-top-eigenvalue", self._top_eigenvalue, batch_size=p["batch_size"])
            self.scaling = 1.5 * top + lam
        elif not float(p["scaling"]) > 0:
            raise SolverError(f"{self.name}: scaling must be > 0 or None (estimate it), got {p['scaling']!r}")
        else:
            self.scaling = float(p["scaling"])
        return self._fresh(IFAttributorLiSSA, batch_size=p["batch_size"], num_repeat=p["num_repeat"],
                           recursion_depth=p["recursion_depth"], damping=lam / self.scaling,
                           scaling=self.scaling)

    def ihvp(self, vectors):
        """One vector at a time, each from the same seed: dattri draws each vector of a block its own mini-batches
        (vmap, randomness="different"), so a vector's IHVP would depend on the block it came in."""
        self._require_fit()
        v = vectors.to(self.device, self.dtype)
        out = torch.cat([self._run(self.attributor.transform_test_rep, 0, row[None]).detach() for row in v])
        return self._finite(out).to(vectors.dtype)

    def _top_eigenvalue(self) -> float:
        """LiSSA converges where the scaling exceeds the curvature of every mini-batch it draws."""
        task, fm = self._require_fit(), self.functional()
        g = torch.Generator().manual_seed(task.seed)
        tops = []
        for _ in range(4):
            rows = torch.randperm(len(task.train_y), generator=g)[:self.params["batch_size"]]
            xb = task.train_x[rows]
            tops.append(core.top_eigenvalue(lambda v: self._batch_curvature(fm, v, xb, task.train_y[rows]),
                                            fm.numel, generator=g, dtype=fm.dtype, device=fm.device))
        return max(tops)

    def _batch_curvature(self, fm, v, x, y):
        if self.params["curvature"] == "hessian":
            return core.hessian_vector_product(fm, v, x, y)
        return core.ggn_vector_product(fm, v, x)

    def info(self):
        return {**super().info(), "scaling": getattr(self, "scaling", None)}


class DattriArnoldi(_DattriIF):
    name = "dattri-if-arnoldi"
    description = f"dattri {VERSION} IFAttributorArnoldi: top eigenvectors by Arnoldi (peer implementation)"
    defaults = {"damping": 1e-3, "curvature": "ggn", "proj_dim": 100, "max_iter": 100}  # dattri's defaults
    nonfinite = ("its Arnoldi iteration lost orthogonality and found negative eigenvalues; use a smaller max_iter "
                 "and proj_dim, or more damping")

    @classmethod
    def probe_params(cls, params):
        # 100 steps without re-orthogonalisation in the probe's 357 parameters lose orthogonality (round-off moved its
        # scores by 5e6); 20 steps for the top 8 eigenvectors do not (moves 3e-5)
        return {**params, "proj_dim": min(int(params.get("proj_dim", 100)), 8),
                "max_iter": min(int(params.get("max_iter", 100)), 20)}

    def _attributor(self):
        from dattri.algorithm import IFAttributorArnoldi

        p = self.params
        for key in ("proj_dim", "max_iter"):
            if isinstance(p[key], bool) or not isinstance(p[key], int) or p[key] < 1:
                raise SolverError(f"{self.name}: {key} must be a positive integer, got {p[key]!r}")
        numel = sum(t.numel() for t in self.fns.theta0.values())
        attributor = self._fresh(IFAttributorArnoldi, proj_dim=p["proj_dim"], max_iter=p["max_iter"],
                                 regularization=float(p["damping"]), seed=self._require_fit().seed)
        # the eigenspace is computed on first use: here, within fit (and seeded)
        # dattri scores with its projection J = V Λ^(-1/2) on both sides, (Jg)ᵀ(Jq): the IHVP is JᵀJ. J is linear
        # (and its output detached), so it is read off dattri's projection of the identity, in blocks of rows.
        rows = []
        for block in core.chunks(numel, 1024):
            eye = torch.zeros(block.stop - block.start, numel, dtype=self.dtype, device=self.device)
            eye[:, block].fill_diagonal_(1.0)
            rows.append(self._run(attributor.transform_test_rep, 0, eye))
        projection = torch.cat(rows)  # (P, k): row p is J's column p
        # Column j is a Ritz vector over √λⱼ. dattri counts the Ritz values above tol² = 1e-14 and warns that it keeps
        # only those, but keeps them all (NaN columns for λⱼ < 0, huge ones for λⱼ ≈ 0, where a tiny model's Krylov
        # basis has lost orthogonality); the adapter drops them, as the warning says
        keep = torch.isfinite(projection).all(dim=0) & (projection.square().sum(0) < 1e14)
        self.projection = self._finite(projection[:, keep])
        if self.projection.shape[1] == 0:
            raise SolverError(f"{self.name}: dattri's Arnoldi found no positive eigenvalue; use more damping")
        return attributor

    def ihvp(self, vectors):
        self._require_fit()
        v = vectors.to(self.device, self.dtype)
        return self._finite((v @ self.projection) @ self.projection.T).to(vectors.dtype)

    def info(self):
        return {**super().info(), "rank": None if not hasattr(self, "projection") else self.projection.shape[1]}


class DattriDataInf(_DattriIF):
    name = "dattri-if-datainf"
    description = f"dattri {VERSION} IFAttributorDataInf: layer-wise rank-one inverses (peer implementation)"
    defaults = {"damping": 0.1}
    ihvp_block = 64  # dattri's DataInf holds (block × block × layer size) numbers at once
    # it streams every training gradient per block of 64 queries: mnist-lr's row was still in its grid search after
    # 20 minutes on 2 cores; `tdabench run` still runs it
    leaderboard_max_params = 1_000

    def fit(self, task):
        if not float(self.params["damping"]) > 0:
            raise SolverError(f"{self.name}: DataInf divides by its damping; use damping > 0, e.g. one of "
                              f"{[d for d in DAMPING_GRID if d > 0]}")
        super(_DattriIF, self).fit(task)
        self._setup(task, "hessian")  # the training gradients only: the linearisation would change nothing
        from dattri.algorithm import IFAttributorDataInf

        # the cached training gradients do not depend on the damping: one attributor per model
        cached = self.cached("dattri-datainf", lambda: self._fresh(IFAttributorDataInf, regularization=1.0))
        self.attributor = copy.copy(cached)
        self.attributor.regularization = float(self.params["damping"])
        return self


class DattriEKFAC(_DattriIF):
    name = "dattri-if-ekfac"
    description = f"dattri {VERSION} IFAttributorEKFAC: EK-FAC of the sampled Fisher (peer implementation)"
    defaults = {"damping": 1e-3, "unsupported_layers": "exclude"}
    max_params = None
    leaderboard_max_params = None

    @classmethod
    def probe_params(cls, params):
        # the probe's Kronecker factors are rank-deficient (48 examples, 109 inputs), so round-off picks their null
        # eigenvectors, and dattri's rotation by Q (where EK-FAC uses Qᵀ) does not cancel that choice: scores moved
        # 25% at λ = 1e-3. A damping that dominates the eigenvalues leaves 3e-6.
        return {**params, "damping": max(float(params.get("damping", cls.defaults["damping"])), 1e4)}

    def fit(self, task):
        super(_DattriIF, self).fit(task)
        layers = self.kron_layers(self.params["unsupported_layers"])
        convs = {n: "dattri's EK-FAC factors nn.Linear layers only" for layer in layers
                 if not isinstance(layer.module, nn.Linear) for n in (layer.weight, layer.bias) if n}
        if convs and self.params["unsupported_layers"] == "error":
            raise SolverError(f"{self.name}: dattri's EK-FAC factors nn.Linear layers only; {sorted(convs)} are "
                              f"not (unsupported_layers='exclude' holds them constant)")
        self.exclude(convs)
        self.layers = [layer for layer in layers if isinstance(layer.module, nn.Linear)]
        if not self.layers:
            raise SolverError(f"{self.name}: the model has no attributed nn.Linear layer for dattri's EK-FAC")
        # EK-FAC fits on the target's gradients: labels drawn from the model. Our flat layout (each layer's
        # weight, then its bias) is the one dattri's own attribute() hands its transform.
        self._setup(task, target="sampled_loss")
        from dattri.algorithm import IFAttributorEKFAC

        def build():
            attributor = IFAttributorEKFAC(task=self.dtask, module_name=[layer.path for layer in self.layers],
                                           device=self.device, damping=0.0)
            self._run(attributor.cache, _loader(task.train_x, task.train_y, FIT_BATCH))
            return attributor

        cached = self.cached("dattri-ekfac", build, layers=tuple(layer.path for layer in self.layers),
                             batch=FIT_BATCH, seed=task.seed)
        self.attributor = copy.copy(cached)  # the factors do not depend on the damping
        self.attributor.damping = float(self.params["damping"])
        return self


class DattriTRAK(_Dattri):
    name = "dattri-trak"
    description = f"dattri {VERSION} TRAKAttributor: projected margin gradients, (ΦᵀΦ)⁻¹ kernel (peer)"
    has_self_influence = False
    parameters = {}
    defaults = {"proj_dim": 2048, "regularization": 0.0, "batch_size": 256}

    @classmethod
    def probe_params(cls, params):
        # 2,048 projections of 48 probe examples without a ridge: a singular kernel (scores moved 110% under
        # round-off); 16 < 48 keeps it invertible (moves 1e-6)
        return {**params, "proj_dim": min(int(params.get("proj_dim", 2048)), 16)}

    def fit(self, task):
        super().fit(task)
        from dattri.algorithm import TRAKAttributor

        if task.measurement != "margin":
            raise SolverError(f"{self.name}: TRAK attributes the margin; this task's measurement is "
                              f"{task.measurement!r}")
        k, bs = self.params["proj_dim"], self.params["batch_size"]
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in (k, bs)):
            raise SolverError(f"{self.name}: proj_dim and batch_size must be positive integers, got {k!r} and {bs!r}")
        self._setup(task, "hessian", target="target")
        # TRAK differentiates the margin for the training points too
        self.dtask = type(self.dtask)(loss_func=self.fns.target, model=self.dmodel,
                                      checkpoints=self.dmodel.state_dict(), target_func=self.fns.target)
        kwargs = {"proj_dim": k, "proj_max_batch_size": 32, "proj_seed": task.seed, "device": self.device}
        self.attributor = TRAKAttributor(task=self.dtask, correct_probability_func=self.fns.correct_probability,
                                         projector_kwargs=dict(kwargs), device=self.device,
                                         regularization=float(self.params["regularization"]))
        self.attributor.projector_kwargs = dict(kwargs)  # dattri 0.3.0 updates a module-level dict in place
        self._run(self.attributor.cache, _loader(task.train_x, task.train_y, bs))
        return self

    def scores(self, query_x, query_y, train_x, train_y, *, query_chunk=None, train_chunk=None):
        task = self._require_fit()
        for x, what in ((train_x, "train loss gradient"), (query_x, "query gradient (margin)")):
            if x.is_floating_point():
                core.check_finite(x, what, 0)  # a NaN/Inf input has a NaN/Inf gradient
        if train_x is not task.train_x and not (train_x.shape == task.train_x.shape and torch.equal(
                train_x.cpu(), task.train_x.cpu()) and torch.equal(train_y.cpu(), task.train_y.cpu())):
            raise SolverError(f"{self.name}: TRAK's kernel belongs to the training set it was fitted on; score that "
                              f"set (fit again to score another)")
        qc = query_chunk or self.params["batch_size"]
        out = self._run(self.attributor.attribute, _loader(query_x, query_y, qc))  # (N, Q)
        scores = (len(train_y) * out.T).float().cpu().contiguous()  # our scale: the mean loss's curvature
        core.check_finite(scores, f"score ({self.name})", None)
        return scores

    def self_scores(self, train_x, train_y, *, train_chunk=None):
        raise SolverError(f"{self.name}: dattri's TRAK computes no self-influence for the training set it cached (no "
                          f"mislabel-detection row); use a solver with an IHVP, e.g. ekfac")

    def info(self):
        return {**super().info(), "attributor": "TRAKAttributor", "proj_dim": self.params["proj_dim"],
                "projector": "normal (dattri's CPU/CUDA projector)", "scale": "N x dattri's TRAK score"}


def _version():
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dattri")
    except PackageNotFoundError:
        return None
