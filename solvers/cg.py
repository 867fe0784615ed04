"""cg: conjugate gradient on (G + λI) x = v with implicit Gauss-Newton products over all training data.

Every product G p is one pass over the training set with jvp/vjp (benchmark.curvature), never forming G.
The vectors of one ihvp call are solved together (one data pass per iteration for the whole block), each
with its own CG coefficients; a vector stops when ‖v − (G + λI)x‖ ≤ tol·‖v‖ or after ``max_iter``
iterations. ``info()`` reports iterations, how many vectors met the tolerance, and the final *true* relative
residual (recomputed with one more product, not the recurrence's), so an unconverged solve is visible.
"""

import torch

from benchmark import core
from benchmark.evaluate import DAMPING_GRID, Solver, SolverError


class ConjugateGradient(Solver):
    name = "cg"
    description = "conjugate gradient on implicit (G + λI) products (jvp/vjp over all training data)"
    parameters = {"damping": DAMPING_GRID}
    defaults = {"damping": 1e-3, "tol": 1e-6, "max_iter": 100, "curvature": "ggn", "dtype": "float64"}
    # one training-set sweep per iteration for every query block: 2,000 queries on mnist-cnn (46,730
    # parameters, 60,000 examples) extrapolate to days (README, Solvers), so the leaderboard runs it on the
    # small settings only.
    leaderboard_max_params = 12_000
    ihvp_block = 64  # each ihvp sweeps the training set: blocks of 64 vectors cost the same and show progress
    data_chunk = 1024  # training examples per jvp/vjp pass (memory, not accuracy)

    def fit(self, task):
        super().fit(task)
        if not self.params["tol"] > 0 or int(self.params["max_iter"]) < 1:
            raise SolverError(f"cg: need tol > 0 and max_iter >= 1, got tol={self.params['tol']}, "
                              f"max_iter={self.params['max_iter']}")
        self.fm = self.functional(self.params["dtype"])
        self.calls = []
        # Scale for recognising a singular direction: the Rayleigh quotient of a random vector (≈ mean
        # eigenvalue of G + λI), one product over the data; also catches non-finite curvature at fit.
        z = torch.randn(1, self.fm.numel, generator=torch.Generator().manual_seed(task.seed), dtype=self.fm.dtype)
        self.scale = float((z * self.matvec(z.to(self.fm.device)).cpu()).sum() / (z * z).sum())
        core.check_finite(torch.tensor([self.scale]), "curvature-vector product", None)
        return self

    def matvec(self, p):
        t = self._require_fit()
        gp = core.curvature_vector_product(self.fm, p, t.train_x, t.train_y, self.params["curvature"],
                                                self.data_chunk)
        return gp + self.params["damping"] * p

    def ihvp(self, vectors):
        self._require_fit()
        b = vectors.to(self.fm.device, self.fm.dtype)
        x, r = torch.zeros_like(b), b.clone()
        p, rs = r.clone(), (r * r).sum(1)
        bnorm = b.norm(dim=1)
        active = bnorm > 0
        iters = torch.zeros(len(b), dtype=torch.long, device=b.device)  # indexed by idx, on b's device
        for _ in range(int(self.params["max_iter"])):
            idx = active.nonzero().flatten()
            if len(idx) == 0:
                break
            pa = p[idx]
            Ap = self.matvec(pa)
            pAp = (pa * Ap).sum(1)
            curv = pAp / (pa * pa).sum(1)  # Rayleigh quotient along each search direction
            if (curv <= 1e-10 * abs(self.scale)).any():
                what = "singular" if self.params["curvature"] == "ggn" else "not positive definite"
                raise SolverError(
                    f"cg: the matrix is {what} along a search direction (pᵀAp/pᵀp = {float(curv.min()):.3g}, "
                    f"damping={self.params['damping']}). Use damping > 0"
                    + (" or curvature='ggn'." if self.params["curvature"] == "hessian" else "."))
            alpha = rs[idx] / pAp
            x[idx] += alpha[:, None] * pa
            r[idx] -= alpha[:, None] * Ap
            rs_new = (r[idx] ** 2).sum(1)
            p[idx] = r[idx] + (rs_new / rs[idx])[:, None] * pa
            rs[idx] = rs_new
            iters[idx] += 1
            active[idx[rs_new.sqrt() <= self.params["tol"] * bnorm[idx]]] = False
        true_res = (b - self.matvec(x)).norm(dim=1) / bnorm.clamp_min(1e-300)
        self.calls.append({"vectors": len(b), "iterations_max": int(iters.max()), "iterations_mean": float(iters.float().mean()),
                           "residual_max": float(true_res.max()), "residual_mean": float(true_res.mean()),
                           "converged": int((~active).sum())})
        return x.to(vectors.dtype)

    def info(self):
        calls = self.calls
        out = {**super().info(), "ihvp_calls": len(calls)}
        if calls:
            vectors = sum(c["vectors"] for c in calls)
            out.update(iterations_max=max(c["iterations_max"] for c in calls),
                       iterations_mean=sum(c["iterations_mean"] * c["vectors"] for c in calls) / vectors,
                       final_residual_max=max(c["residual_max"] for c in calls),
                       final_residual_mean=sum(c["residual_mean"] * c["vectors"] for c in calls) / vectors,
                       converged_fraction=sum(c["converged"] for c in calls) / vectors)
        return out
