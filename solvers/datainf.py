"""datainf: DataInf, the closed-form per-layer inverse (Kwon, Wu, Wu and Zou, "DataInf: Efficiently Estimating Data
Influence in LoRA-tuned LLMs and Diffusion Models", ICLR 2024).

What is approximated, in three steps (their Eq. 4–5):

1. G is block-diagonal over layers (here: over parameter tensors, as the authors' code does per weight matrix);
2. each block is the *empirical Fisher* (1/N) Σᵢ gᵢgᵢᵀ of the per-example loss gradients gᵢ = ∇_l L(zᵢ) with the
   true labels (not the Gauss-Newton matrix of the other solvers);
3. the inverse of the damped average is replaced by the average of the inverses of its rank-one terms,
   ((1/N) Σᵢ gᵢgᵢᵀ + λ_l I)⁻¹ ≈ (1/N) Σᵢ (gᵢgᵢᵀ + λ_l I)⁻¹, each of which Sherman–Morrison inverts in closed form:

       (G_l + λ_l I)⁻¹ v ≈ (1/λ_l) (v − (1/N) Σᵢ gᵢ (gᵢᵀv) / (λ_l + ‖gᵢ‖²)).

   Step 3 is exact only when N = 1; its error grows with the layer's dimension (their Theorem 1), which is why the
   method targets low-rank adapters. On a full MNIST layer it is a coarse approximation; the benchmark measures how
   coarse.

Damping per layer as in the paper: λ_l = ``damping`` × (1/(N d_l)) Σᵢ ‖∇_l L(zᵢ)‖², the mean squared gradient entry
of the layer times a constant (the paper's 0.1; searched on validation here).

Cost: no curvature to fit beyond one pass for the λ_l (memoised across the grid), but every ``ihvp`` call sweeps the
training set once (per-example gradients, then 2·B·N·P flops for B vectors), like one CG iteration; so scoring costs
one sweep per block of ≤ ``ihvp_block`` queries and self-influence one sweep per block of training points
(quadratic in N). Memory: the block of vectors and its accumulator in float64, plus one block of train gradients.
"""

import torch

from benchmark import core
from benchmark.evaluate import DAMPING_GRID, Solver, SolverError


class DataInf(Solver):
    name = "datainf"
    description = "DataInf: per-layer Sherman–Morrison average of rank-one inverses (empirical Fisher)"
    parameters = {"damping": DAMPING_GRID}
    defaults = {"damping": 0.1}
    ihvp_block = 2048  # each ihvp sweeps the training set; 2,048 float64 vectors of 46,730 parameters are 0.8 GB

    def fit(self, task):
        super().fit(task)
        if not self.params["damping"] > 0:
            raise SolverError(f"datainf: damping must be > 0 (got {self.params['damping']}): each rank-one term "
                              f"gᵢgᵢᵀ + λI is singular at λ = 0")
        self.fm = self.functional()
        self.blocks = self.fm.layout.slices()
        power = self.cached("datainf-gradient-power", self._gradient_power)
        dead = [name for name, p in power.items() if not p > 0]
        if dead:
            raise SolverError(f"datainf: parameters {dead[:4]} have a zero loss gradient on every training example, "
                              f"so their damping (relative to the gradients' size) is zero; hold them constant "
                              f"(last_blocks) or use another solver")
        self.lam = {name: self.params["damping"] * p for name, p in power.items()}
        return self

    def _gradient_power(self) -> dict[str, float]:
        """Per parameter tensor l: (1/(N d_l)) Σᵢ ‖∇_l L(zᵢ)‖²."""
        t = self._require_fit()
        total = {name: 0.0 for name in self.blocks}
        for _, g in self._train_grads(desc="DataInf: layer damping"):
            for name, sl in self.blocks.items():
                total[name] += float((g[:, sl].double() ** 2).sum())
        return {name: total[name] / (len(t.train_y) * (sl.stop - sl.start)) for name, sl in self.blocks.items()}

    def _train_grads(self, desc: str):
        t = self._require_fit()
        _, tc = self.chunk_sizes()
        for ts in core.chunks(len(t.train_y), tc, desc=desc):
            g = core.per_sample_grads(self.fm, t.train_x[ts], t.train_y[ts], "loss")
            core.check_finite(g, "train loss gradient", ts.start)
            yield ts, g

    def ihvp(self, vectors):
        t = self._require_fit()
        v = vectors.to(self.fm.device, torch.float64)
        acc = torch.zeros_like(v)
        for _, g in self._train_grads(desc=f"DataInf: sweep of the training set for {len(v)} vectors"):
            for name, sl in self.blocks.items():
                gb = g[:, sl].double()
                coeff = (v[:, sl] @ gb.T) / (self.lam[name] + (gb * gb).sum(1))  # (B, n): gᵢᵀv / (λ_l + ‖gᵢ‖²)
                acc[:, sl] += coeff @ gb
        out = torch.empty_like(v)
        for name, sl in self.blocks.items():
            out[:, sl] = (v[:, sl] - acc[:, sl] / len(t.train_y)) / self.lam[name]
        return out.to(vectors.dtype)

    def info(self):
        out = super().info()
        if self.task is not None:
            out["layer_damping"] = {name: float(lam) for name, lam in self.lam.items()}
        return out
