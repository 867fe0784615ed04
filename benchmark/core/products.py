"""Floor 1: per-example gradients and curvature-vector products, written once with ``torch.func``.

The training objective is the *mean* cross-entropy, so the Gauss-Newton matrix is
``G = (1/N) Σᵢ Jᵢᵀ Hᵢ Jᵢ`` with ``Jᵢ = ∂logits(xᵢ)/∂θ`` and ``Hᵢ = diag(p) − ppᵀ`` (the softmax cross-entropy
Hessian in the logits, which does not depend on the label). Weight decay is *not* part of the per-example
loss; it acts like damping. ``Hᵢ = LᵢLᵢᵀ`` with ``Lᵢ = diag(√p) − p√pᵀ``: column c of Lᵢ is ``−√p_c (p − e_c)``,
i.e. √p_c times the logit-gradient of the loss for label c. So G is the expected outer product of gradients
under labels drawn from the model (the "true Fisher"). G is never formed except by the dense functions,
meant for small models.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.func import grad, jacrev, jvp, vjp, vmap

from .errors import SolverError
from .measurements import MEASUREMENTS
from .params import FunctionalModel, check_finite, chunks


def per_sample_grads(fm: FunctionalModel, x: torch.Tensor, y: torch.Tensor, measurement: str = "loss",
                     chunk: int = 256) -> torch.Tensor:
    """(B, P) gradients of ``measurement`` ("loss" = cross-entropy, or "margin") for each example,
    ``vmap(grad(f))`` over ``functional_call``, ``chunk`` examples at a time."""
    if measurement not in MEASUREMENTS:
        raise SolverError(f"unknown measurement {measurement!r}; choose from {sorted(MEASUREMENTS)}")
    fn = MEASUREMENTS[measurement]

    def one(params, xi, yi):
        return fn(fm(params, xi.unsqueeze(0)), yi.unsqueeze(0)).squeeze(0)

    per_example = vmap(grad(one), in_dims=(None, 0, 0))
    x, y = fm.cast(x), y.to(fm.device)
    out = torch.empty(len(y), fm.numel, dtype=fm.dtype, device=fm.device)
    for sl in chunks(len(y), chunk):
        out[sl] = fm.layout.flatten(per_example(fm.params, x[sl], y[sl]), batch_dims=1)
    return out


def loss_gradient_sum(fm: FunctionalModel, x: torch.Tensor, y: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """(P,) gradient of Σᵢ CE(zᵢ) over the rows of ``(x, y)``: one backward per chunk, no per-example gradients."""
    x, y = fm.cast(x), y.to(fm.device)
    out = torch.zeros(fm.numel, dtype=fm.dtype, device=fm.device)
    for sl in chunks(len(y), chunk):
        xb, yb = x[sl], y[sl]
        out += fm.layout.flatten(grad(lambda p: F.cross_entropy(fm(p, xb), yb, reduction="sum"))(fm.params))
    return out


def logit_hessian(logits: torch.Tensor) -> torch.Tensor:
    """(…, C, C) Hessian of the softmax cross-entropy in the logits: diag(p) − ppᵀ."""
    p = torch.softmax(logits, dim=-1)
    return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)


def logit_hessian_factor(logits: torch.Tensor) -> torch.Tensor:
    """(…, C, C) L with L Lᵀ = diag(p) − ppᵀ: L = diag(√p) − p√pᵀ (column c = √p_c (e_c − p))."""
    p = torch.softmax(logits, dim=-1)
    s = p.sqrt()
    return torch.diag_embed(s) - p.unsqueeze(-1) * s.unsqueeze(-2)


def _apply_logit_hessian(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """H u for a batch of logit-space vectors, without forming H: p⊙u − p (pᵀu)."""
    p = torch.softmax(logits, dim=-1)
    return p * u - p * (p * u).sum(-1, keepdim=True)


def ggn_vector_product(fm: FunctionalModel, vectors: torch.Tensor, x: torch.Tensor,
                       batch_size: int = 1024) -> torch.Tensor:
    """(B, P) -> (B, P): G v for each row, G the Gauss-Newton matrix of the mean loss over ``x``.

    One forward, B Jacobian-vector products (jvp) and B vector-Jacobian products (vjp) per data chunk;
    G is never formed. The label does not enter G (the cross-entropy Hessian in the logits is label-free).
    """
    vectors = vectors.to(fm.device, fm.dtype)
    tangents = fm.layout.unflatten(vectors)
    x = fm.cast(x)
    out = torch.zeros_like(vectors)
    for sl in chunks(len(x), batch_size):
        xb = x[sl]

        def f(params, xb=xb):
            return fm(params, xb)

        logits, vjp_fn = vjp(f, fm.params)
        jv = vmap(lambda t: jvp(f, (fm.params,), (t,))[1])(tangents)  # (B, n, C)
        hjv = _apply_logit_hessian(logits.detach(), jv)
        out += fm.layout.flatten(vmap(vjp_fn)(hjv)[0], batch_dims=1)
    return out / len(x)


def hessian_vector_product(fm: FunctionalModel, vectors: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                           batch_size: int = 1024) -> torch.Tensor:
    """(B, P) -> (B, P): ∇²[(1/N) Σ CE] v, the true Hessian (indefinite away from a minimum)."""
    vectors = vectors.to(fm.device, fm.dtype)
    tangents = fm.layout.unflatten(vectors)
    x, y = fm.cast(x), y.to(fm.device)
    out = torch.zeros_like(vectors)
    for sl in chunks(len(x), batch_size):
        xb, yb = x[sl], y[sl]

        def loss_sum(params, xb=xb, yb=yb):
            return F.cross_entropy(fm(params, xb), yb, reduction="sum")

        hv = vmap(lambda t: jvp(grad(loss_sum), (fm.params,), (t,))[1])(tangents)
        out += fm.layout.flatten(hv, batch_dims=1)
    return out / len(x)


def curvature_vector_product(fm: FunctionalModel, vectors: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                             curvature: str = "ggn", batch_size: int = 1024) -> torch.Tensor:
    if curvature == "ggn":
        return ggn_vector_product(fm, vectors, x, batch_size)
    if curvature == "hessian":
        return hessian_vector_product(fm, vectors, x, y, batch_size)
    raise SolverError(f"curvature must be 'ggn' or 'hessian', got {curvature!r}")


def top_eigenvalue(matvec: Callable[[torch.Tensor], torch.Tensor], size: int, iters: int = 30,
                   generator: torch.Generator | None = None, dtype=torch.float64, device=None) -> float:
    """Largest eigenvalue of a PSD operator by power iteration (Rayleigh quotient of the last iterate)."""
    v = torch.randn(1, size, generator=generator, dtype=dtype).to(device)
    v /= v.norm()
    estimate = 0.0
    for _ in range(iters):
        w = matvec(v)
        estimate = float((v * w).sum())
        norm = w.norm()
        if not torch.isfinite(norm):
            raise SolverError("power iteration for the top eigenvalue produced NaN/Inf: the model's curvature is not finite")
        if norm == 0:
            return 0.0
        v = w / norm
    return estimate


def dense_ggn(fm: FunctionalModel, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(P, P) Gauss-Newton matrix of the mean loss, in ``fm.dtype`` (use float64).

    Built batch by batch as G = (1/N) Σ BᵢᵀBᵢ with Bᵢ = LᵢᵀJᵢ (C × P, Hᵢ = LᵢLᵢᵀ), so it is symmetric PSD
    by construction and memory is one P×P matrix plus a (batch·C, P) block. Only the upper block triangle
    is multiplied (``blocks`` column blocks) and mirrored at the end: the product costs N·C·P² flops, and
    this saves about 40% of them (what a BLAS syrk would do).
    """
    P = fm.numel
    blocks = max(1, min(8, P // 512))
    edges = [P * k // blocks for k in range(blocks + 1)]

    def logits_one(params, xi):
        return fm(params, xi.unsqueeze(0)).squeeze(0)

    jac_fn = vmap(jacrev(logits_one), in_dims=(None, 0))
    x = fm.cast(x)
    G = torch.zeros(P, P, dtype=fm.dtype, device=fm.device)
    for sl in chunks(len(x), batch_size, desc=f"dense GGN ({P:,} x {P:,})"):
        xb = x[sl]
        J = fm.layout.flatten(jac_fn(fm.params, xb), batch_dims=2)  # (n, C, P)
        L = logit_hessian_factor(fm(fm.params, xb).detach())  # (n, C, C)
        check_finite(J, "logit Jacobian", sl.start)
        B = torch.einsum("nkc,nkp->ncp", L, J).reshape(-1, P)
        for i in range(blocks):
            rows = slice(edges[i], edges[i + 1])
            G[rows, edges[i]:].addmm_(B[:, rows].T, B[:, edges[i]:])
    G /= len(x)
    for i in range(blocks):  # mirror the upper blocks; symmetrise the diagonal ones (rounding in gemm)
        rows = slice(edges[i], edges[i + 1])
        G[rows, rows] = (G[rows, rows] + G[rows, rows].T) / 2
        G[edges[i + 1]:, rows] = G[rows, edges[i + 1]:].T
    return G


def dense_hessian(fm: FunctionalModel, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256,
                  chunk_size: int = 256) -> torch.Tensor:
    """(P, P) true Hessian of the mean cross-entropy: Hessian-vector products with ``chunk_size`` basis
    vectors at a time (forward-over-reverse), so memory stays at one P×P matrix plus a block."""
    P = fm.numel
    H = torch.empty(P, P, dtype=fm.dtype, device=fm.device)
    eye = torch.eye(P, dtype=fm.dtype, device=fm.device)
    for cols in chunks(P, chunk_size):
        H[cols] = hessian_vector_product(fm, eye[cols], x, y, batch_size)
    return (H + H.T) / 2


def dense_curvature(fm: FunctionalModel, x: torch.Tensor, y: torch.Tensor, curvature: str = "ggn",
                    batch_size: int = 256) -> torch.Tensor:
    if curvature == "ggn":
        return dense_ggn(fm, x, batch_size)
    if curvature == "hessian":
        return dense_hessian(fm, x, y, batch_size)
    raise SolverError(f"curvature must be 'ggn' or 'hessian', got {curvature!r}")


def singular_tolerance(eigenvalues: torch.Tensor) -> float:
    """Below this, an eigenvalue of a P×P float matrix is indistinguishable from zero."""
    eps = torch.finfo(eigenvalues.dtype).eps
    return float(len(eigenvalues) * eps * eigenvalues.abs().max().clamp_min(1e-300))
