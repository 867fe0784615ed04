"""arnoldi: influence on the top eigenspace of G (Schioppa, Zablotskaia, Vilar and Sokolov, "Scaling Up Influence
Functions", AAAI 2022).

Lanczos iterations (Arnoldi's method for a symmetric matrix) on implicit Gauss-Newton products of the mean training
loss (:func:`benchmark.core.ggn_vector_product`, one pass over the training set each; G is never formed) give the
Ritz pairs (λⱼ, uⱼ) of G; keeping the top ``rank`` r of them, the inverse is taken on that subspace only — the paper's
choice — :

    (G + λI)⁻¹ v ≈ Σ_{j ≤ r} uⱼ (uⱼᵀ v) / (λⱼ + λ)

so the directions outside the top-r eigenspace are dropped, not damped (unlike the exact inverse, where they weigh
1/λ). With r = P (and as many iterations) this is the exact damped inverse. Computed in float64 with full
reorthogonalisation (:func:`benchmark.core.lanczos`); deterministic given ``task.seed`` (the start vector).

``iterations`` Lanczos steps (capped at P; ``rank`` too) are run once per model and memoised: every ``rank`` ≤ iterations and every
damping of the grid reuse them, so the grid costs one eigen-decomposition. Cost: ``iterations`` GGN products over the
training set (one forward, one jvp and one vjp of the whole training set each) and memory 2 · iterations · P float64
for the basis and its products (0.4 GB for the MNIST CNN at 512 iterations). Scores use the per-example loss
gradients like every IHVP solver.
"""

import torch

from benchmark import core
from benchmark.evaluate import DAMPING_GRID, Solver, SolverError


class Arnoldi(Solver):
    name = "arnoldi"
    description = "Arnoldi/Lanczos top-r eigenspace of G (implicit GGN products), inverse on that subspace"
    parameters = {"rank": [16, 64, 256], "damping": DAMPING_GRID}
    defaults = {"rank": 64, "damping": 1e-3, "iterations": 512}

    def fit(self, task):
        super().fit(task)
        r, n = self.params["rank"], self.params["iterations"]
        for key, value in (("rank", r), ("iterations", n)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SolverError(f"arnoldi: {key} must be a positive integer, got {value!r}")
        fm = self.functional(torch.float64)
        n, r = min(n, fm.numel), min(r, fm.numel)  # r = P is the whole space
        if r > n:
            raise SolverError(f"arnoldi: rank {r} exceeds the {n} Lanczos iterations (iterations={self.params['iterations']}, "
                              f"{fm.numel:,} parameters); the top-r eigenspace needs at least r iterations")

        def build():
            gen = torch.Generator().manual_seed(task.seed)
            return core.lanczos(lambda v: core.ggn_vector_product(fm, v, task.train_x), fm.numel, n, gen,
                                torch.float64, fm.device, desc=f"Lanczos on G ({n} iterations)")

        self.spectrum = self.cached("lanczos-ggn", build, iterations=n, seed=task.seed)
        self.eigenvalues = self.spectrum["eigenvalues"][:r].clamp_min(0)  # G is PSD: negatives are rounding
        self.eigenvectors = self.spectrum["eigenvectors"][:r]
        self.scale = self.eigenvalues + self.params["damping"]
        if float(self.scale.min()) <= core.singular_tolerance(self.scale):
            raise SolverError(f"arnoldi: an eigenvalue of G among the top {r} is zero (G has rank below {r}), and "
                              f"damping={self.params['damping']}; use damping > 0 or a smaller rank")
        return self

    def ihvp(self, vectors):
        self._require_fit()
        U = self.eigenvectors
        coeff = vectors.to(U.device, U.dtype) @ U.T / self.scale
        return (coeff @ U).to(vectors.dtype)

    def info(self):
        out = super().info()
        if self.task is not None:
            lam = self.eigenvalues
            out.update(rank=len(lam), iterations=self.spectrum["iterations"], restarts=self.spectrum["restarts"],
                       eigenvalue_top=float(lam[0]), eigenvalue_r=float(lam[-1]))
        return out
