"""unrolled: exact unrolled differentiation through the explained model's SGD run — the reference SOURCE approximates.

The run is replayed from its initial checkpoint with the zoo's recipe and seed (the same batches in the same order,
the same learning rates, momentum and weight decay: :func:`benchmark.setup.training.train` itself, one thread, as
the zoo trains), and every epoch's weights are checked against the saved checkpoint before anything is trusted (a
replay that drifts beyond ``tolerance`` is refused). The replay starts at epoch 0 because a checkpoint holds the
weights but not SGD's momentum buffer: a run cannot be resumed exactly from the middle.

With the weights θ_k before every step k recorded, τ(q, i) = ∇f(θ_T)ᵀ dθ_T/dε_i is the reverse-mode adjoint of the
linearised SGD recursion (:func:`benchmark.core.unrolled_scores`): up-weighting zᵢ by ε in the mean loss adds
ε·(N/|B_k|)·∇L(zᵢ, θ_k) to the gradient of every step whose batch B_k holds zᵢ, and the adjoint carries the query
gradient back through each step's exact Hessian-vector product (the true Hessian of the batch's mean loss, plus
weight decay) and momentum, in float64. This is first order in ε and exact otherwise — no stationarity, no
curvature approximation, the actual batches — so it is what SOURCE would compute with infinitely many segments,
exact curvature and the real data order.

``epochs=k`` differentiates through the last k epochs only (the perturbation starts k epochs before the end);
``None`` through all of training. Cost: one replay of training plus, per block of queries, one backward sweep over
every step of the window with a per-example gradient of the batch and B Hessian-vector products (B the queries in
the block): about (queries × training steps × batch) example-gradients — minutes on the small settings, hopeless
beyond them (``max_params``). Self-influence needs one sweep per block of training points.
"""

import time

import numpy as np
import torch
from torch import nn

from benchmark import core
from benchmark.evaluate import Solver, SolverError, train

# Modules whose output differs between training and evaluation: the adjoint evaluates every step in one mode.
_MODE_DEPENDENT = (nn.modules.batchnorm._NormBase, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                   nn.AlphaDropout)


class Unrolled(Solver):
    name = "unrolled"
    description = ("exact unrolled differentiation: the reverse-mode adjoint of the replayed SGD run (its batches, "
                   "learning rates, momentum and weight decay), the reference SOURCE approximates")
    parameters = {}
    defaults = {"epochs": None, "tolerance": 1e-5}
    max_params = 12_000
    ihvp_block = 1024  # queries per backward sweep: their adjoints and Hessian-vector products stay in memory
    needs_trajectory = True

    def fit(self, task):
        super().fit(task)
        traj = task.trajectory
        if traj.recipe is None or traj.seed is None:
            raise SolverError("unrolled: the trajectory has no training recipe or seed, so the run cannot be replayed; "
                              "explain the zoo's models (`--explain zoo`), which record both")
        window = self.params["epochs"] if self.params["epochs"] is not None else traj.epochs
        if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= traj.epochs:
            raise SolverError(f"unrolled: epochs must be None (all) or an integer from 1 to {traj.epochs}, got "
                              f"{self.params['epochs']!r}")
        bad = sorted({type(m).__name__ for m in task.model.modules() if isinstance(m, _MODE_DEPENDENT)})
        if bad:
            raise SolverError(f"unrolled: the model holds {', '.join(bad)}, which behave differently in training; "
                              f"the adjoint evaluates every step in one mode, so it is not exact here")
        self.window = window
        t0 = time.perf_counter()
        self._replay(task, traj, (traj.epochs - window) * traj.learning_rates.shape[1])
        self.replay_seconds = time.perf_counter() - t0
        return self

    def _replay(self, task, traj, first_step):
        keep = set(self.functional().layout.names)
        states, batches, rates, deviations = [], [], [], []

        def record(step, model, batch, lr):
            if step >= first_step:
                states.append(torch.cat([p.detach().reshape(-1) for n, p in model.named_parameters() if n in keep]))
                batches.append(batch.cpu())
                rates.append(lr)

        def verify(epoch, model, schedule):
            saved = traj.checkpoint(epoch)
            deviations.append(max(float((p.detach().cpu() - q.detach().cpu()).abs().max()) for p, q in
                                  zip(model.parameters(), saved.parameters()))
                              / max(float(q.detach().abs().max()) for q in saved.parameters()))
            if epoch and not np.allclose(schedule, traj.learning_rates[epoch - 1], rtol=1e-12, atol=0):
                raise SolverError(f"unrolled: the replayed learning rates of epoch {epoch} differ from the recorded "
                                  f"ones; the trajectory's recipe is not the one it was trained with")

        before = torch.get_num_threads()
        torch.set_num_threads(1)  # as the zoo trains: another thread count sums in another order, and SGD amplifies it
        try:
            dtype = next(task.model.parameters()).dtype  # replayed in the explained model's precision, data too
            start = traj.checkpoint(0).to(task.device, dtype)
            train(start, task.train_x.to(dtype), task.train_y, traj.recipe, traj.seed, on_epoch=verify, on_step=record)
        finally:
            torch.set_num_threads(before)
        off = [e for e, d in enumerate(deviations) if not d <= self.params["tolerance"]]
        if off:
            raise SolverError(f"unrolled: replaying the recipe from the initial checkpoint does not reproduce the saved "
                              f"checkpoint of epoch {off[0]} (max relative deviation {deviations[off[0]]:.2e} > tolerance "
                              f"{self.params['tolerance']:g}); the trajectory's seed, recipe or training data are not "
                              f"the ones it was trained with (or this machine sums in another order)")
        self.states = torch.stack(states)
        self.batches, self.rates, self.deviations = batches, rates, deviations

    def scores(self, query_x, query_y, train_x, train_y, *, query_chunk=None, train_chunk=None):
        return self._adjoint(query_x, query_y, train_x, train_y, self._require_fit().measurement, query_chunk,
                             "scores").float().cpu()

    def self_scores(self, train_x, train_y, *, train_chunk=None):
        """−τ_loss(i, i): the predicted fall of zᵢ's own loss from up-weighting it (the sign of ∇Lᵀ H⁻¹ ∇L)."""
        qc, _ = self.chunk_sizes()
        out = torch.empty(len(train_y), dtype=torch.float32)
        for block in core.chunks(len(train_y), qc):
            tau = self._adjoint(train_x[block], train_y[block], train_x, train_y, "loss", None, "self-influence")
            out[block] = -tau[torch.arange(block.stop - block.start), torch.arange(block.start, block.stop)].float().cpu()
        return out

    def _adjoint(self, query_x, query_y, train_x, train_y, measurement, query_chunk, what):
        task = self._require_fit()
        if len(train_y) != len(task.train_y) or len(train_x) != len(train_y):
            raise SolverError(f"unrolled: the run was trained on {len(task.train_y)} examples; scores need all of them "
                              f"in the same order, got {len(train_x)} inputs and {len(train_y)} labels")
        fm = self.functional(torch.float64)
        recipe = task.trajectory.recipe
        qc, _ = self.chunk_sizes(query_chunk, None)
        out = torch.empty(len(query_y), len(train_y), dtype=torch.float64)
        for qs in core.chunks(len(query_y), qc):
            g = core.per_sample_grads(fm, query_x[qs], query_y[qs], measurement)
            core.check_finite(g, f"query gradient ({measurement})", qs.start)
            out[qs] = core.unrolled_scores(fm, self.states, self.batches, self.rates, recipe.momentum,
                                           recipe.weight_decay, fm.cast(train_x), train_y.to(fm.device), g,
                                           desc=f"{what} (unrolled): queries {qs.start}-{qs.stop} of {len(query_y)}, "
                                                f"steps backwards").cpu()
        return out

    def info(self):
        out = super().info()
        if hasattr(self, "states"):
            out.update(epochs_unrolled=self.window, steps_unrolled=len(self.states),
                       replay_seconds=round(self.replay_seconds, 3),
                       replay_max_relative_deviation=float(max(self.deviations)))
        return out
