"""kfac: Kronecker-factored Gauss-Newton (§5.2, Eq. 4–5), block-diagonal over layers.

Per nn.Linear / nn.Conv2d layer, G_l ≈ A ⊗ Y with A the covariance of the layer's inputs (unfolded patches
for convolutions, a ones column for the bias) and Y that of the pre-activation pseudo-gradients. Both are
eigendecomposed in float64 (A = Q_A Λ_A Q_Aᵀ, Y = Q_Y Λ_Y Q_Yᵀ) and the damped inverse is applied in the
Kronecker eigenbasis: (A ⊗ Y + λI)⁻¹ v = (Q_A ⊗ Q_Y)(Λ_A ⊗ Λ_Y + λI)⁻¹(Q_A ⊗ Q_Y)ᵀ v.

``pseudo_labels``: "all" forms Y from every class's gradient weighted by √p (exact for the logit Hessian),
"sampled" from one label drawn from the model's prediction per example (unbiased, C times cheaper; the
choice of Kronfluence). The factors do not depend on λ and are memoised across a damping grid.

``unsupported_layers``: parameters of layers K-FAC cannot factor (normalisation layers, ViT tokens and
position embeddings, grouped convolutions) are held constant and left out of influence ("exclude", recorded
in the run record) or refused ("error").
"""

from benchmark import core
from benchmark.evaluate import DAMPING_GRID, Solver


class KFAC(Solver):
    name = "kfac"
    description = "K-FAC: per-layer A ⊗ Y Kronecker factors, damped inverse in their eigenbasis"
    parameters = {"damping": DAMPING_GRID, "damping_mode": list(core.DAMPING_MODES),
                  "pseudo_labels": ["sampled", "all"]}
    defaults = {"damping": 1e-3, "damping_mode": "absolute", "pseudo_labels": "sampled",
                "unsupported_layers": "exclude"}

    def fit(self, task):
        super().fit(task)
        # Layers without a Kronecker factor (normalisation, tokens) are held constant, or a SolverError.
        self.layers = self.kron_layers(self.params["unsupported_layers"])
        fm = self.functional()
        labels = self.params["pseudo_labels"]
        self.bases = self.cached("kronecker-eigenbases", lambda: core.kronecker_eigenbases(
            fm, self.layers, task.train_x, labels, task.seed), pseudo_labels=labels, seed=task.seed)
        eigenvalues = {path: b["lam_y"][:, None] * b["lam_a"][None, :] for path, b in self.bases.items()}
        self.scale = core.damped_eigenvalues(eigenvalues, self.params["damping"], self.name,
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

