"""source: SOURCE — Bae, Lin, Lorraine & Grosse, "Training Data Attribution via Approximate Unrolled
Differentiation" (NeurIPS 2024, arXiv:2405.12186): training cut into L segments at saved checkpoints, each
unrolled in closed form under a stationary approximation, with EK-FAC curvature.

**Derivation.** SGD (momentum β, weight decay μ, learning rate η_k, mini-batch B_k of the mean loss). Up-weighting
zᵢ by ε in the mean loss adds ε·(N/|B_k|)·∇L(zᵢ, θ_k) to the gradient of every step whose batch holds zᵢ — on
average over the batches, ε·∇L(zᵢ, θ_k) at *every* step. Without momentum, to first order in ε,

    dθ_T/dε = −Σ_k η_k [Π_{k<j<T} (I − η_j H̃_j)] s_k,        H̃_j = ∇²J_{B_j}(θ_j) + μI,

the exact unrolled response (solvers/unrolled.py computes it for the real batches). SOURCE splits the T steps into
L segments and, inside segment ℓ, assumes stationarity: H̃_j ≈ H̃_ℓ and s_k ≈ ḡ_ℓ(zᵢ) (both taken at checkpoints
of the segment). With commuting factors and ηH̃ small, Π_j (I − η_j H̃_ℓ) ≈ exp(−T_ℓ H̃_ℓ), T_ℓ = Σ_{k∈ℓ} η_k, and
the segment's own steps sum in closed form:

    Σ_{k∈ℓ} η_k Π_{k<j∈ℓ} (I − η_j H̃_ℓ) ḡ_ℓ ≈ (I − e^{−T_ℓ H̃_ℓ}) H̃_ℓ⁻¹ ḡ_ℓ.

A later segment ℓ' carries the change on through S_ℓ' = e^{−T_ℓ' H̃_ℓ'}. So (the paper's Eq. for SOURCE)

    dθ_T/dε ≈ −Σ_ℓ S_L ⋯ S_{ℓ+1} (I − S_ℓ) H̃_ℓ⁻¹ ḡ_ℓ(zᵢ),
    τ(q, i) = ∇f(θ_T)ᵀ dθ_T/dε = −Σ_ℓ ⟨a_ℓ(q), ḡ_ℓ(zᵢ)⟩,    a_ℓ = (I − S_ℓ) H̃_ℓ⁻¹ S_{ℓ+1} ⋯ S_L ∇f(θ_T)

(each factor is symmetric and a function of one H̃_ℓ, so (I − S_ℓ)H̃_ℓ⁻¹ is well defined where H̃_ℓ is singular:
it is T_ℓ there). The query features are the a_ℓ, computed backwards from ∇f(θ_T) — a_L first, then propagate by
S_L, and so on; the train features are the per-segment gradients. With one segment and T → ∞ (a converged run,
or any long last segment) a_1 → H̃⁻¹∇f: the influence function at the final checkpoint with damping μ
(tests/test_source.py checks both this limit and the short-time one, τ → −Σ_ℓ T_ℓ⟨∇f, ḡ_ℓ⟩).

**What enters how.**
- *Curvature*: H̃_ℓ ≈ Q_ℓ (Λ_ℓ + μ + λ) Q_ℓᵀ, EK-FAC of the Gauss-Newton matrix of the mean loss at the
  checkpoint that closes segment ℓ (the existing Kronecker machinery, memoised per checkpoint, so every L and λ
  share it). Both matrix functions are diagonal in that eigenbasis (:func:`benchmark.core.segment_scales`).
- *Weight decay* μ (the recipe's): part of the objective's Hessian, added exactly. *Damping* λ (searched on
  validation queries): added the same way, as if the run had had more weight decay.
- *Momentum* β: heavy ball with ηλ ≪ (1 − β)² follows gradient flow with step η/(1 − β), so a segment's time is
  T_ℓ = Σ_{k∈ℓ} η_k / (1 − β), from the recorded learning rate of every step.
- *Segments*: L contiguous groups of epochs, as equal as possible, ending at saved per-epoch checkpoints.
- *Gradients* ḡ_ℓ: ``gradients="end"`` takes ∇L(zᵢ) at the checkpoint that closes the segment (where its
  curvature is taken); ``"mean"`` averages it over every epoch checkpoint in the segment (the stationary mean the
  derivation asks for, estimated from more checkpoints).

**Cost.** The train features are the loss gradients at every epoch checkpoint 1..E (E·P numbers per training point,
one pass over the training set with E per-example gradients each): every L, λ and gradient estimator is a
different weighting of them, so a whole grid search shares that single pass (``feature_key``). Fitting costs one
EK-FAC per checkpoint that closes a segment (two passes over the training set each); a query costs its gradient
and L(L + 1)/2 Kronecker-factored products. Approximation error against the exact unrolled reference is measured
on the small settings (docs/solvers.md).
"""

import numpy as np
import torch

from benchmark import core
from benchmark.evaluate import DAMPING_GRID, Solver, SolverError

GRADIENTS = ("end", "mean")


class Source(Solver):
    name = "source"
    description = ("SOURCE: training cut into segments at checkpoints, each unrolled in closed form with its "
                   "EK-FAC curvature (exp(-ηKH) propagation, (I - exp(-ηKH))H⁻¹ response)")
    parameters = {"segments": [1, 2, 4, 8], "damping": [0.0] + DAMPING_GRID}
    defaults = {"segments": 2, "damping": 0.0, "gradients": "end", "pseudo_labels": "sampled",
                "unsupported_layers": "exclude"}
    needs_trajectory = True

    def fit(self, task):
        super().fit(task)
        traj = task.trajectory
        if traj.recipe is None:
            raise SolverError("source: the trajectory has no training recipe (momentum and weight decay enter the "
                              "unrolling); explain the zoo's models (`--explain zoo`), which record it")
        rates = np.asarray(traj.learning_rates, dtype=np.float64)
        if rates.ndim != 2 or rates.shape[0] != traj.epochs:
            raise SolverError(f"source: learning rates of shape {rates.shape}; one row of per-step rates per epoch "
                              f"({traj.epochs}) is needed")
        if self.params["gradients"] not in GRADIENTS:
            raise SolverError(f"source: gradients must be one of {GRADIENTS}, got {self.params['gradients']!r}")
        self.bounds = core.segment_bounds(traj.epochs, self.params["segments"])
        self.times = core.segment_times(rates, self.bounds, traj.recipe.momentum)
        self.layers = self.kron_layers(self.params["unsupported_layers"])
        self.layout = self.functional().layout
        self.checkpoints = {e: self._checkpoint(task, e) for e in range(1, traj.epochs + 1)}
        shift = traj.recipe.weight_decay + self.params["damping"]
        labels = self.params["pseudo_labels"]
        self.segments = []
        for (_, end), time in zip(self.bounds, self.times):
            bases, eigenvalues = self.cached("source-checkpoint-ekfac", lambda e=end: self._ekfac(task, e),
                                             epoch=end, pseudo_labels=labels, seed=task.seed)
            propagate, respond = core.segment_scales(eigenvalues, time, shift)
            self.segments.append({"bases": bases, "propagate": propagate, "respond": respond})
        return self

    def _checkpoint(self, task, epoch):
        """Epoch ``epoch``'s weights as a model like the explained one (device, precision, parameter names)."""
        model = task.trajectory.checkpoint(epoch).to(task.device, next(task.model.parameters()).dtype).eval()
        want = [(n, p.shape) for n, p in task.model.named_parameters()]
        if [(n, p.shape) for n, p in model.named_parameters()] != want:
            raise SolverError(f"source: the trajectory's checkpoint of epoch {epoch} has other parameters than the "
                              f"explained model; the trajectory belongs to another architecture")
        return core.FunctionalModel(model, attributed=self.layout.names)

    def _ekfac(self, task, epoch):
        fm = self.checkpoints[epoch]
        layers, _ = core.kron_layers_and_exclusions(fm.module, self.layout.names, "error")
        labels = self.params["pseudo_labels"]
        bases = core.kronecker_eigenbases(fm, layers, task.train_x, labels, task.seed)
        return bases, core.ekfac_eigenvalues(fm, layers, task.train_x, bases, labels, task.seed)

    # τ(q, i) = −⟨a(q), b(zᵢ)⟩ with b = the loss gradients at every epoch checkpoint, a = each segment's a_ℓ placed on
    # the epochs whose gradients estimate ḡ_ℓ.
    def train_features(self, train_x, train_y, offset=0):
        self._require_fit()
        P = self.layout.numel
        out = None
        for e, fm in self.checkpoints.items():
            g = core.per_sample_grads(fm, train_x, train_y, "loss")
            core.check_finite(g, "train loss gradient", offset)
            if out is None:
                out = torch.empty(len(train_y), len(self.checkpoints) * P, dtype=g.dtype, device=g.device)
            out[:, (e - 1) * P:e * P] = g
        return out

    def query_features(self, query_x, query_y, offset=0):
        return self._segment_weighted(query_x, query_y, self._require_fit().measurement, offset)

    def _segment_weighted(self, x, y, measurement, offset):
        fm = self.functional()
        g = core.per_sample_grads(fm, x, y, measurement)
        core.check_finite(g, f"query gradient ({measurement})", offset)
        P = self.layout.numel
        out = torch.zeros(len(y), len(self.checkpoints) * P, dtype=torch.float64, device=g.device)
        v = g.double()
        for (start, end), seg in zip(reversed(self.bounds), reversed(self.segments)):
            a = core.kron_apply(self.layers, self.layout, v, seg["bases"], seg["respond"])
            epochs = [end] if self.params["gradients"] == "end" else range(start + 1, end + 1)
            for e in epochs:
                out[:, (e - 1) * P:e * P] = a / len(epochs)
            v = core.kron_apply(self.layers, self.layout, v, seg["bases"], seg["propagate"])
        core.check_finite(out, f"segment-weighted query gradient ({self.name})", offset)
        return out.to(fm.dtype)

    def feature_key(self):
        task = self._require_fit()
        return ("loss-gradients-at-every-epoch", task.trajectory.epochs, tuple(self.layout.names))

    def feature_dim(self):
        return len(self._require_fit().trajectory.learning_rates) * self.layout.numel

    def self_scores(self, train_x, train_y, *, train_chunk=None):
        """⟨a_loss(zᵢ), b(zᵢ)⟩ = −τ_loss(i, i): the predicted fall of zᵢ's own loss when it is up-weighted."""
        self._require_fit()
        _, tc = self.chunk_sizes(None, train_chunk)
        out = torch.empty(len(train_y), dtype=torch.float32)
        for ts in core.chunks(len(train_y), tc, desc=f"self-influence ({self.name})"):
            a = self._segment_weighted(train_x[ts], train_y[ts], "loss", ts.start)
            b = self.train_features(train_x[ts], train_y[ts], ts.start)
            out[ts] = (a.double() * b.double()).sum(-1).float().cpu()
        return out

    def info(self):
        out = {**super().info(), "layers": [layer.path for layer in self.layers],
               "pseudo_labels": self.params["pseudo_labels"], "gradients": self.params["gradients"]}
        if self.task is not None and hasattr(self, "bounds"):
            recipe = self.task.trajectory.recipe
            out.update(segments=[{"epochs": [start + 1, end], "checkpoint": end, "time": round(t, 6)}
                                 for (start, end), t in zip(self.bounds, self.times)],
                       momentum=recipe.momentum, weight_decay=recipe.weight_decay)
        return out
