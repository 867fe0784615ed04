"""trak: TRAK (Park, Georgiev, Ilyas, Leclerc and Madry, "TRAK: Attributing Model Behavior at Scale", ICML 2023).

The model output is the correct-class margin f (TRAK's log-odds: p = σ(f) is the model's probability of the correct
class). Each example's gradient is compressed by a seeded Gaussian random projection R (P × k, N(0, 1/k) entries,
:class:`benchmark.core.RandomProjection`): φᵢ = Rᵀ∇f(zᵢ). With Φ the (N × k) matrix of the training points' φ,

    τ(q, i) = φ_qᵀ (ΦᵀΦ/N + λ̃I)⁻¹ φᵢ (1 − pᵢ)

— the paper's kernel (ΦᵀΦ)⁻¹ over the training set and its 1 − p reweighting. Because the cross-entropy is
log(1 + e^{−f}), ∇L(zᵢ) = −(1 − pᵢ)∇f(zᵢ) exactly, so the reweighted train features are the projected loss gradients
Rᵀ∇L(zᵢ), and TRAK is an influence function with the implicit inverse R(ΦᵀΦ/N + λ̃I)⁻¹Rᵀ: the inverse of the
projected *empirical Fisher of the margin* (mean ∇f∇fᵀ, no logit Hessian) in place of (G + λI)⁻¹. ``ihvp`` is that
product, so TRAK has an IHVP error against the exact one; scores go through k-dimensional features.

Differences from the paper, stated: the kernel is the mean (ΦᵀΦ/N; the paper's sum differs by a constant that no
ranking sees), and λ̃ = ``damping`` × mean eigenvalue of ΦᵀΦ/N is a small ridge for stability (the paper has none;
with k near or above the rank of Φ the kernel is singular). ``reweight=False`` drops the 1 − p factor.

``proj_dim`` (k, searched on validation) is capped at the number of attributed parameters P; at k = P the
projection is a change of basis, and with ``damping=0`` the scores are the unprojected formula whatever the seed.
The paper works with k ≪ N; as k approaches the number of training points the kernel approaches singular and the
scores degrade (the validation search then prefers a smaller k).
The projection is seeded by ``task.seed``, so each model of an ensemble (the paper's TRAK with n models is the
average of n single-model scores) gets its own R, and a run is reproducible.

Cost: two passes of per-example gradients over the training set (the kernel at fit; the train features when
scoring), each with a projection of N·P·k flops, then a k × k Cholesky per fit. Memory: the kernel and its factor
(2·k² float64: 1 GiB at k = 8,192), and R when it fits the memory budget (4·P·k bytes), else one block of 1,024
rows of R (32 MiB at k = 8,192) regenerated at every product.
"""

import torch

from benchmark import core
from benchmark.evaluate import Solver, SolverError


class TRAK(Solver):
    name = "trak"
    description = "TRAK: random projections of output gradients, (ΦᵀΦ)⁻¹ kernel, 1 − p reweighting"
    parameters = {"proj_dim": [128, 512, 2048, 8192]}
    leaderboard_ensembles = (1, 8)  # the TRAK paper averages over models; 8 is what every zoo here holds
    defaults = {"proj_dim": 2048, "damping": 1e-4, "reweight": True}

    def fit(self, task):
        super().fit(task)
        k = self.params["proj_dim"]
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise SolverError(f"trak: proj_dim must be a positive integer, got {k!r}")
        if not isinstance(self.params["reweight"], bool):
            raise SolverError(f"trak: reweight must be true or false, got {self.params['reweight']!r}")
        fm = self.functional()
        self.k = min(k, fm.numel)
        self.projection = core.RandomProjection(fm.numel, self.k, task.seed, device=task.device,
                                                keep_mb=self.budget_mb())
        self.kernel = self.cached("trak-kernel", lambda: core.projected_gram(
            fm, self.projection, task.train_x, task.train_y, "margin", desc=f"TRAK kernel (k = {self.k:,})"),
            proj_dim=self.k, seed=task.seed)
        self.ridge = self.params["damping"] * float(self.kernel.diagonal().mean())
        shifted = self.kernel + self.ridge * torch.eye(self.k, dtype=self.kernel.dtype, device=self.kernel.device)
        self.factor, info = torch.linalg.cholesky_ex(shifted)
        pivots = self.factor.diagonal() ** 2
        if int(info) != 0 or not torch.isfinite(pivots).all() or float(pivots.min()) <= core.singular_tolerance(
                self.kernel.diagonal() + self.ridge):
            raise SolverError(f"trak: the kernel ΦᵀΦ/N + λ̃I (k = {self.k:,}) is singular with damping="
                              f"{self.params['damping']}: k exceeds the rank of the projected gradients. Use "
                              f"damping > 0 (relative to the kernel's mean eigenvalue, e.g. 1e-4) or a smaller "
                              f"proj_dim.")
        self.pivots = pivots
        return self

    def _solve(self, phi: torch.Tensor) -> torch.Tensor:
        """(B, k) -> (ΦᵀΦ/N + λ̃I)⁻¹ φ, float64."""
        return torch.cholesky_solve(phi.T.to(self.factor), self.factor).T

    def _projected_grads(self, x, y, measurement: str, what: str, offset: int) -> torch.Tensor:
        g = core.per_sample_grads(self.functional(), x, y, measurement)
        core.check_finite(g, what, offset)
        return self.projection(g)

    def ihvp(self, vectors):
        self._require_fit()
        w = self._solve(self.projection(vectors.to(self.projection.device, torch.float64)))
        return self.projection.transpose(w).to(vectors.dtype)

    def train_features(self, train_x, train_y, offset=0):
        self._require_fit()
        if self.params["reweight"]:  # Rᵀ∇L = −(1 − p) Rᵀ∇f
            return self._projected_grads(train_x, train_y, "loss", "train loss gradient", offset)
        return -self._projected_grads(train_x, train_y, "margin", "train margin gradient", offset)

    def query_features(self, query_x, query_y, offset=0):
        task = self._require_fit()
        phi = self._projected_grads(query_x, query_y, task.measurement, f"query gradient ({task.measurement})", offset)
        return self._solve(phi)

    def feature_key(self):
        return ("trak", self.k, self._require_fit().seed, self.params["reweight"],
                None if self.attributed is None else tuple(self.attributed))

    def feature_dim(self):
        self._require_fit()
        return self.k

    def self_scores(self, train_x, train_y, *, train_chunk=None):
        """∇L(zᵢ)ᵀ R(ΦᵀΦ/N + λ̃I)⁻¹Rᵀ ∇L(zᵢ) (with ``reweight``; without, (1 − pᵢ) φᵢᵀ(ΦᵀΦ/N + λ̃I)⁻¹φᵢ, the
        influence of zᵢ on its own loss through the unweighted train features)."""
        self._require_fit()
        _, tc = self.chunk_sizes(None, train_chunk)
        out = torch.empty(len(train_y), dtype=torch.float32)
        for ts in core.chunks(len(train_y), tc, desc=f"self-influence ({self.name})"):
            loss_phi = self._projected_grads(train_x[ts], train_y[ts], "loss", "train loss gradient", ts.start)
            b = loss_phi if self.params["reweight"] else self.train_features(train_x[ts], train_y[ts], ts.start)
            out[ts] = (self._solve(loss_phi) * b.double()).sum(-1).float().cpu()
        return out

    def info(self):
        out = super().info()
        if self.task is not None:
            out.update(proj_dim=self.k, ridge=self.ridge, kernel_mean_eigenvalue=float(self.kernel.diagonal().mean()),
                       cholesky_pivot_min=float(self.pivots.min()), projection_held_mb=self.projection.nbytes / 2**20)
        return out
