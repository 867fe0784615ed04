"""Floor 1: the top of a symmetric operator's spectrum by Lanczos iterations (Arnoldi for a symmetric matrix).

Used for the Gauss-Newton matrix G, which is only available as products G v (one pass over the training data
each, :func:`benchmark.core.ggn_vector_product`). After n iterations the orthonormal Krylov basis Q (n × P) gives
the Rayleigh–Ritz approximation: the eigenpairs of T = Q G Qᵀ (n × n) lifted back by Qᵀ. Written for accuracy
over speed: float64 (as the operator), full reorthogonalisation (two Gram–Schmidt passes per step), T formed
from the stored products G qⱼ rather than from the three-term recurrence, and a restart from a fresh random
direction orthogonal to Q whenever the Krylov space becomes invariant (G is singular for every softmax model,
and repeated eigenvalues end a Krylov space early), so n = P iterations span the whole space and recover G's
full eigendecomposition. Memory: 2·n·P numbers (the basis and its products).
"""

from __future__ import annotations

from typing import Callable

import torch

from .errors import SolverError
from .params import check_finite, chunks


def _orthogonalise(w: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """w minus its projection on the rows of ``basis`` (orthonormal), twice ("twice is enough")."""
    for _ in range(2):
        w = w - (basis @ w) @ basis
    return w


def lanczos(matvec: Callable[[torch.Tensor], torch.Tensor], size: int, iterations: int,
            generator: torch.Generator, dtype=torch.float64, device=None, desc: str | None = None
            ) -> dict[str, torch.Tensor | int]:
    """Ritz pairs of a symmetric operator after ``iterations`` (capped at ``size``) Lanczos steps.

    ``matvec`` maps (B, size) to (B, size). Returns ``eigenvalues`` (n,) in descending order, ``eigenvectors``
    (n, size) as orthonormal rows, and ``restarts`` (how many times the Krylov space became invariant). The start
    vector and every restart come from ``generator``, so the result is deterministic given its seed.
    """
    n = min(int(iterations), int(size))
    if n < 1:
        raise SolverError(f"Lanczos needs at least one iteration, got {iterations}")
    basis = torch.zeros(n, size, dtype=dtype, device=device)
    products = torch.zeros(n, size, dtype=dtype, device=device)

    def random_direction(j: int) -> torch.Tensor:
        for _ in range(5):
            q = _orthogonalise(torch.randn(size, generator=generator, dtype=dtype).to(device), basis[:j])
            norm = q.norm()
            if norm > 1e-8:
                return q / norm
        raise SolverError(f"Lanczos could not find a direction orthogonal to {j} basis vectors in {size} dimensions")

    q, beta, scale, restarts = random_direction(0), 0.0, 0.0, 0
    for sl in chunks(n, 1, desc=desc):
        j = sl.start
        basis[j] = q
        w = matvec(q[None])[0].to(dtype)
        check_finite(w, "curvature-vector product in Lanczos", None)
        products[j] = w
        alpha = float(q @ w)
        scale = max(scale, abs(alpha))
        w = w - alpha * q - (beta * basis[j - 1] if j else 0.0)
        w = _orthogonalise(w, basis[:j + 1])
        beta = float(w.norm())
        if j + 1 == n:
            break
        # An invariant subspace (β at rounding level): continue from a fresh direction orthogonal to it.
        if beta <= 1e-10 * max(scale, 1e-300):
            q, beta, restarts = random_direction(j + 1), 0.0, restarts + 1
        else:  # re-orthogonalised after scaling: a small β magnifies what rounding left of the basis in w
            q = _orthogonalise(w / beta, basis[:j + 1])
            q = q / q.norm()
    tri = basis @ products.T  # T = Q G Qᵀ, from the products themselves
    evals, evecs = torch.linalg.eigh((tri + tri.T) / 2)
    order = torch.argsort(evals, descending=True)
    return {"eigenvalues": evals[order], "eigenvectors": evecs[:, order].T @ basis, "restarts": restarts,
            "iterations": n}
