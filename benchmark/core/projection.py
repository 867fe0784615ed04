"""Floor 1: a seeded Gaussian random projection of P-dimensional vectors to k dimensions, in blocks (TRAK).

R is a (P, k) matrix of independent N(0, 1/k) entries, so E[R Rᵀ] = I: projected vectors keep their norms and
inner products in expectation (Johnson–Lindenstrauss). As one dense float32 matrix R takes 4·P·k bytes —
1.5 GB for the 46,730-parameter MNIST CNN at k = 8,192, 800 GB for a ResNet-50 — so R is defined block by block:
rows [b·rows, (b+1)·rows) of R are drawn by their own CPU generator, seeded by (seed, b). The same seed therefore
gives the same R whether it is held in memory (when it fits ``keep_mb``) or regenerated block by block at every
product (then memory is one block of 1,024 rows, 32 MiB at k = 8,192, and each product pays P·k Gaussian draws on
the CPU). Drawing on the CPU makes R the same on every device.
"""

from __future__ import annotations

import torch

from .errors import SolverError
from .params import FunctionalModel, check_finite, chunks
from .products import per_sample_grads

BLOCK_ROWS = 1024  # rows of R drawn by one generator: R depends on (P, k, seed) only


class RandomProjection:
    """x ↦ x R for (B, P) batches, and w ↦ w Rᵀ back; R (P, k) seeded Gaussian with N(0, 1/k) entries."""

    def __init__(self, dim_in: int, dim_out: int, seed: int, *, device=None, keep_mb: float = 1024.0):
        if dim_in < 1 or dim_out < 1:
            raise SolverError(f"a random projection needs positive dimensions, got {dim_in} -> {dim_out}")
        self.dim_in, self.dim_out, self.seed = int(dim_in), int(dim_out), int(seed)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.block_rows = BLOCK_ROWS
        self._dense = self.matrix() if 4 * self.dim_in * self.dim_out <= keep_mb * 2**20 else None

    @property
    def nbytes(self) -> int:
        """Memory R holds (0 when its blocks are regenerated at every product)."""
        return 0 if self._dense is None else self._dense.element_size() * self._dense.numel()

    def _block(self, b: int) -> torch.Tensor:
        start = b * self.block_rows
        rows = min(self.block_rows, self.dim_in - start)
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + b) % 2**63)
        return torch.randn(rows, self.dim_out, generator=gen) / self.dim_out ** 0.5

    def _blocks(self):
        for b in range(-(-self.dim_in // self.block_rows)):
            start = b * self.block_rows
            yield slice(start, min(start + self.block_rows, self.dim_in)), self._block(b).to(self.device)

    def matrix(self) -> torch.Tensor:
        """R itself, (P, k) float32 (for small P and for tests)."""
        return torch.cat([block for _, block in self._blocks()])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(B, P) -> (B, k) = x R, in x's precision."""
        if x.shape[-1] != self.dim_in:
            raise SolverError(f"random projection of {self.dim_in}-dimensional vectors got {x.shape[-1]} entries")
        if self._dense is not None:
            return x @ self._dense.to(x.dtype)
        out = torch.zeros(*x.shape[:-1], self.dim_out, dtype=x.dtype, device=x.device)
        for rows, block in self._blocks():
            out += x[..., rows] @ block.to(x.dtype)
        return out

    def transpose(self, w: torch.Tensor) -> torch.Tensor:
        """(B, k) -> (B, P) = w Rᵀ."""
        if w.shape[-1] != self.dim_out:
            raise SolverError(f"random projection back from {self.dim_out} dimensions got {w.shape[-1]} entries")
        if self._dense is not None:
            return w @ self._dense.to(w.dtype).T
        return torch.cat([w @ block.to(w.dtype).T for _, block in self._blocks()], dim=-1)


def projected_gram(fm: FunctionalModel, projection: RandomProjection, x: torch.Tensor, y: torch.Tensor,
                   measurement: str = "margin", batch_size: int = 512, desc: str | None = None) -> torch.Tensor:
    """(k, k) float64 (1/N) Σᵢ φᵢφᵢᵀ over the examples, with φᵢ = Rᵀ∇f(zᵢ) the projected per-example gradient of
    ``measurement``: one pass of per-example gradients, products in the model's precision, sums in float64."""
    gram = torch.zeros(projection.dim_out, projection.dim_out, dtype=torch.float64, device=fm.device)
    for sl in chunks(len(y), batch_size, desc=desc):
        g = per_sample_grads(fm, x[sl], y[sl], measurement)
        check_finite(g, f"train {measurement} gradient", sl.start)
        phi = projection(g)
        gram += (phi.T @ phi).double()
    return gram / len(y)
