"""identity: the gradient dot product τ = −∇f(z_q)ᵀ ∇L(zᵢ) (TracIn with one checkpoint), no core.

The baseline every curvature-aware solver has to beat. Equivalent to (G + λI)⁻¹ ≈ I/λ up to the scale
1/λ, which no ranking or correlation metric can see.
"""

from benchmark.evaluate import Solver


class Identity(Solver):
    name = "identity"
    description = "gradient dot product (TracIn, one checkpoint): no curvature"
    parameters = {}
    defaults = {}

    def fit(self, task):
        return super().fit(task)

    def ihvp(self, vectors):
        self._require_fit()
        return vectors
