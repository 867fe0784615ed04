"""exact: the damped Gauss-Newton inverse, dense, in float64 — the reference the other solvers are measured against.

Builds G (P × P) batch by batch in float64 (G = (1/N) Σ BᵢᵀBᵢ, Bᵢ = LᵢᵀJᵢ), then factors G + λI by Cholesky
and solves. G does not depend on λ, so it is memoised per model and data: a damping grid builds it once and
pays one Cholesky (P³/3 flops) per damping — several times cheaper than an eigendecomposition on a CPU.
Small models only (memory ≈ 2·P² float64 numbers), hence ``max_params``. ``curvature="hessian"`` uses the
true Hessian of the mean loss instead, which must be positive definite after damping.
"""

import torch

from benchmark import core
from benchmark.evaluate import DAMPING_GRID, Solver, SolverError


class Exact(Solver):
    name = "exact"
    description = "dense (G + λI)⁻¹ in float64 by Cholesky (small models only)"
    parameters = {"damping": DAMPING_GRID}
    defaults = {"damping": 1e-3, "curvature": "ggn"}
    max_params = 12_000  # G and its Cholesky factor: 2 × 12k² float64 ≈ 2.3 GB

    def fit(self, task):
        super().fit(task)
        kind = self.params["curvature"]

        def build():
            fm = self.functional(torch.float64)
            matrix = core.dense_curvature(fm, task.train_x, task.train_y, kind)
            core.check_finite(matrix, f"dense {kind} matrix", None)
            return matrix

        self.matrix = self.cached("dense-matrix", build, curvature=kind)
        lam = self.params["damping"]
        shifted = self.matrix + lam * torch.eye(len(self.matrix), dtype=self.matrix.dtype, device=self.matrix.device)
        self.factor, info = torch.linalg.cholesky_ex(shifted)
        # A zero (or rounding-level) pivot means G + λI is singular; a failed one, that it is indefinite.
        pivots = self.factor.diagonal() ** 2
        tol = core.singular_tolerance(self.matrix.diagonal().abs() + lam)
        if int(info) != 0 or not torch.isfinite(pivots).all() or float(pivots.min()) <= tol:
            if kind == "ggn":
                raise SolverError(
                    f"exact: G + λI is singular with damping={lam} (Cholesky pivot {float(pivots.nan_to_num(0).min()):.3g} "
                    f"≤ tolerance {tol:.3g}). The Gauss-Newton matrix of a softmax model is singular (adding a "
                    f"constant to every logit changes nothing), so use damping > 0, e.g. one of {DAMPING_GRID}.")
            low = float(torch.linalg.eigvalsh(self.matrix).min())
            raise SolverError(
                f"exact: H + λI is not positive definite with damping={lam}: the Hessian's smallest eigenvalue is "
                f"{low:.3g} (the model is not at a minimum of its training loss). Use damping > {max(-low, 0):.3g} "
                f"or curvature='ggn'.")
        self.pivots = pivots
        return self

    def ihvp(self, vectors):
        self._require_fit()
        out = torch.cholesky_solve(vectors.T.to(self.factor), self.factor).T
        return out.to(vectors.dtype)

    def info(self):
        return {**super().info(), "curvature": self.params["curvature"],
                "cholesky_pivot_min": float(self.pivots.min()), "cholesky_pivot_max": float(self.pivots.max())}
