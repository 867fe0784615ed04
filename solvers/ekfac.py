"""ekfac: eigenvalue-corrected K-FAC (§5.2; George et al. 2018, Grosse et al. 2023).

Keeps K-FAC's Kronecker eigenbasis Q = Q_A ⊗ Q_Y per layer but replaces the eigenvalues Λ_A ⊗ Λ_Y with
the mean squared projection of the per-example pseudo-gradients on that basis,
Λ_ii = E[((Q_A ⊗ Q_Y)ᵀ Dθ)_i²], then (G + λI)⁻¹ v ≈ Q (Λ + λI)⁻¹ Qᵀ v. With ``pseudo_labels="all"`` Λ is
exactly the diagonal of each layer's block of G in the Kronecker eigenbasis: the best diagonal
approximation there. The eigenbasis is shared with (and memoised for) K-FAC. Layers it cannot factor are
held constant or refused, as in K-FAC (``unsupported_layers``).
"""

from benchmark import core
from benchmark.evaluate import DAMPING_GRID, Solver


class EKFAC(Solver):
    name = "ekfac"
    description = "EK-FAC: K-FAC eigenbasis with eigenvalues refitted to projected per-example pseudo-gradients"
    parameters = {"damping": DAMPING_GRID, "damping_mode": list(core.DAMPING_MODES),
                  "pseudo_labels": ["sampled", "all"]}
    leaderboard_ensembles = (1, 8)  # averaging over models is the gap study's largest lever on the CNNs
    defaults = {"damping": 1e-3, "damping_mode": "absolute", "pseudo_labels": "sampled",
                "unsupported_layers": "exclude"}

    def fit(self, task):
        super().fit(task)
        # Layers without a Kronecker factor (normalisation, tokens) are held constant, or a SolverError.
        self.layers = self.kron_layers(self.params["unsupported_layers"])
        fm = self.functional()
        labels, seed = self.params["pseudo_labels"], task.seed
        self.bases = self.cached("kronecker-eigenbases", lambda: core.kronecker_eigenbases(
            fm, self.layers, task.train_x, labels, seed), pseudo_labels=labels, seed=seed)
        self.eigenvalues = self.cached("ekfac-eigenvalues", lambda: core.ekfac_eigenvalues(
            fm, self.layers, task.train_x, self.bases, labels, seed), pseudo_labels=labels, seed=seed)
        self.scale = core.damped_eigenvalues(self.eigenvalues, self.params["damping"], self.name,
                                            self.params["damping_mode"])
        self.layout = fm.layout
        return self

    def ihvp(self, vectors):
        self._require_fit()
        return core.kron_apply(self.layers, self.layout, vectors, self.bases, self.scale)

    def info(self):
        return {**super().info(), "layers": [layer.path for layer in self.layers],
                "pseudo_labels": self.params["pseudo_labels"],
                "damping_mode": self.params["damping_mode"]}
