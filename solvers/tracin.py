"""tracin: TracIn over the checkpoints of one training run (Pruthi, Liu, Kale and Sundararajan, "Estimating Training
Data Influence by Tracing Gradient Descent", NeurIPS 2020; TracInCP, their Eq. 4).

    τ(q, i) = −Σ_c η_c ∇f(z_q; θ_c) · ∇L(zᵢ; θ_c)        self(i) = Σ_c η_c ‖∇L(zᵢ; θ_c)‖²

with θ_c the model after epoch e_c (checkpoint c) and η_c the learning rate of the period it ends, from the
trajectory: the mean learning rate of each epoch since the previous checkpoint, summed over those epochs (with a
checkpoint every epoch, the mean learning rate of that epoch, as in the paper). The sign follows docs/protocol.md: an
SGD step on zᵢ moves θ by −η∇L(zᵢ) and the query's measurement by −η∇f·∇L(zᵢ), so positive = helpful. There is no
curvature and no inverse: TracIn has no IHVP. Momentum and weight decay are ignored, as in the paper (momentum
0.9 scales every η_c alike, which no ranking sees).

``checkpoints``: how many, evenly spaced over the run and ending at the explained model (epochs round(E·j/c),
j = 1..c), or "all" (every epoch); searched on validation, capped at the run's E epochs. The features are the
concatenation over checkpoints, √η_c ∇L(zᵢ; θ_c) and √η_c ∇f(z_q; θ_c): dimension c·P, so scoring costs c
passes of per-example gradients and the subset sums LDS needs take M·c·P numbers.

It needs the explained model's training run (``task.trajectory``): explained models from the zoo
(`tdabench run --explain zoo`). The trajectory must end at the explained model (checked).
"""

import math

import numpy as np
import torch

from benchmark import core
from benchmark.evaluate import Solver, SolverError


class TracIn(Solver):
    name = "tracin"
    description = "TracInCP: learning-rate-weighted gradient dot products summed over training checkpoints"
    parameters = {"checkpoints": [1, 4, "all"]}
    defaults = {"checkpoints": "all"}
    needs_trajectory = True

    def fit(self, task):
        super().fit(task)
        trajectory = task.trajectory  # the base class refused a task without one
        epochs, rates = int(trajectory.epochs), np.asarray(trajectory.learning_rates, dtype=np.float64)
        if epochs < 1 or rates.ndim != 2 or rates.shape[0] != epochs or rates.shape[1] < 1:
            raise SolverError(f"tracin: the trajectory has {epochs} epochs but learning rates of shape {rates.shape}; "
                              f"need one row of step learning rates per epoch")
        if not np.isfinite(rates).all() or (rates < 0).any():
            raise SolverError("tracin: the trajectory's learning rates must be finite and >= 0")
        c = self.params["checkpoints"]
        if c != "all" and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
            raise SolverError(f"tracin: checkpoints must be a positive integer or 'all', got {c!r}")
        c = epochs if c == "all" else min(c, epochs)
        self.epochs = [round(epochs * (j + 1) / c) for j in range(c)]
        starts = [0] + self.epochs[:-1]
        per_epoch = rates.mean(axis=1)
        self.etas = [float(per_epoch[a:b].sum()) for a, b in zip(starts, self.epochs)]
        self.models = []
        for e in self.epochs:
            model = trajectory.checkpoint(e).to(task.device).eval()
            self.models.append(core.FunctionalModel(model, None, self.attributed))
        final = dict(task.model.named_parameters())  # the last checkpoint is epoch E: it must be the model itself
        for name, p in self.models[-1].module.named_parameters():
            if not torch.equal(p.detach().cpu(), final[name].detach().cpu()):
                raise SolverError(f"tracin: the trajectory's last checkpoint differs from the explained model "
                                  f"(parameter {name!r}); the task's trajectory must be the model's own training run")
        self.scales = [math.sqrt(eta) for eta in self.etas]
        return self

    def _features(self, x, y, measurement: str, what: str, offset: int) -> torch.Tensor:
        parts = []
        for fm, scale in zip(self.models, self.scales):
            g = core.per_sample_grads(fm, x, y, measurement)
            core.check_finite(g, what, offset)
            parts.append(scale * g)
        return torch.cat(parts, dim=-1)

    def train_features(self, train_x, train_y, offset=0):
        self._require_fit()
        return self._features(train_x, train_y, "loss", "train loss gradient", offset)

    def query_features(self, query_x, query_y, offset=0):
        task = self._require_fit()
        return self._features(query_x, query_y, task.measurement, f"query gradient ({task.measurement})", offset)

    def feature_key(self):
        self._require_fit()
        return ("tracin", tuple(self.epochs), tuple(round(eta, 12) for eta in self.etas),
                None if self.attributed is None else tuple(self.attributed))

    def feature_dim(self):
        return len(self.models) * self._count(self._require_fit().model, self.attributed)

    def self_scores(self, train_x, train_y, *, train_chunk=None):
        """Σ_c η_c ‖∇L(zᵢ; θ_c)‖², the paper's self-influence (the squared norm of the train features)."""
        self._require_fit()
        _, tc = self.chunk_sizes(None, train_chunk)
        out = torch.empty(len(train_y), dtype=torch.float32)
        for ts in core.chunks(len(train_y), tc, desc=f"self-influence ({self.name})"):
            b = self.train_features(train_x[ts], train_y[ts], ts.start).double()
            out[ts] = (b * b).sum(-1).float().cpu()
        return out

    def info(self):
        out = super().info()
        if self.task is not None:
            out.update(checkpoint_epochs=self.epochs, learning_rate_weights=self.etas,
                       epochs=int(self.task.trajectory.epochs))
        return out
