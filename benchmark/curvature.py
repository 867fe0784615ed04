"""Floor 3: the curvature math every solver shares, written once with ``torch.func``.

Conventions (see ``solver_api.py`` and DESIGN.md):

* A model's parameters are one flat vector θ in ``model.named_parameters()`` order, each tensor flattened
  row-major (:class:`ParamLayout`). Every (B, P) matrix of vectors in this package uses that order.
* The training objective is the *mean* cross-entropy, so the Gauss-Newton matrix is
  ``G = (1/N) Σᵢ Jᵢᵀ Hᵢ Jᵢ`` with ``Jᵢ = ∂logits(xᵢ)/∂θ`` and ``Hᵢ = diag(p) − ppᵀ`` (the softmax
  cross-entropy Hessian in the logits, which does not depend on the label). Weight decay is *not* part of
  the per-example loss; it acts like damping.
* ``Hᵢ = LᵢLᵢᵀ`` with ``Lᵢ = diag(√p) − p√pᵀ``: column c of Lᵢ is ``−√p_c (p − e_c)``, i.e. √p_c times the
  logit-gradient of the loss for label c. So G is the expected outer product of gradients under labels
  drawn from the model (the "true Fisher"), which is also how K-FAC's pseudo-gradients are formed:
  either every label weighted by √p_c (``"all"``, exact) or one label sampled from p (``"sampled"``).

Everything here is pure: functions of a model's frozen parameters and data. Expensive, damping-independent
results (dense matrices, Kronecker eigenbases) are memoised across solver fits in :data:`CACHE`, keyed by the
*content* of the model and data, so a damping grid search builds them once.
"""

from __future__ import annotations

import collections
import hashlib
import math
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp, vjp, vmap

from .models import MEASUREMENTS


class SolverError(ValueError):
    """A solver was asked for something it cannot do (bad parameters, unsupported model, too large)."""


# ---------------------------------------------------------------- parameters as one flat vector

@dataclass(frozen=True)
class ParamLayout:
    """Where each named parameter lives in the flat vector θ (fixed order: ``named_parameters()``)."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def of(cls, model: nn.Module, names: Iterable[str] | None = None) -> "ParamLayout":
        """All of the model's parameters, or only ``names`` (kept in ``named_parameters()`` order)."""
        named = list(model.named_parameters())
        if names is not None:
            keep = set(names)
            unknown = keep - {n for n, _ in named}
            if unknown:
                raise SolverError(f"the model has no parameter(s) {sorted(unknown)[:5]}")
            named = [(n, p) for n, p in named if n in keep]
        return cls(tuple(n for n, _ in named), tuple(p.shape for _, p in named))

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    def slices(self) -> dict[str, slice]:
        out, start = {}, 0
        for name, size in zip(self.names, self.sizes):
            out[name] = slice(start, start + size)
            start += size
        return out

    def flatten(self, tensors: dict[str, torch.Tensor], batch_dims: int = 0) -> torch.Tensor:
        """dict of (*batch, *shape) tensors -> (*batch, P)."""
        parts = []
        for name, shape in zip(self.names, self.shapes):
            t = tensors[name]
            lead = t.shape[:batch_dims]
            if t.shape[batch_dims:] != shape:
                raise ValueError(f"parameter {name}: expected shape {tuple(shape)}, got {tuple(t.shape[batch_dims:])}")
            parts.append(t.reshape(*lead, -1))
        return torch.cat(parts, dim=-1)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """(*batch, P) -> dict of (*batch, *shape) views."""
        if flat.shape[-1] != self.numel:
            raise ValueError(f"flat vector has {flat.shape[-1]} entries, the model has {self.numel} parameters")
        lead = flat.shape[:-1]
        return {name: flat[..., sl].reshape(*lead, *shape)
                for (name, sl), shape in zip(self.slices().items(), self.shapes)}


def model_blocks(model: nn.Module, prefix: str = "") -> list[str]:
    """The model's blocks in order: parameterised children of nn.Sequential / nn.ModuleList containers,
    outermost only — a ResNet's residual blocks across its stages, a ViT's transformer blocks, the layers of
    a plain nn.Sequential model. A lone outermost block is a wrapper (e.g. input normalisation + the
    network): the blocks are looked for inside it."""
    found = []
    for path, m in model.named_modules():
        if isinstance(m, (nn.Sequential, nn.ModuleList)):
            found += [f"{path}.{name}" if path else name for name, child in m.named_children()
                      if any(True for _ in child.parameters())]
    outer = [b for b in found if not any(b.startswith(other + ".") for other in found)]
    if len(outer) == 1:
        inner = model_blocks(model.get_submodule(outer[0]), f"{prefix}{outer[0]}.")
        if inner:
            return inner
    return [prefix + b for b in outer]


def last_blocks_parameters(model: nn.Module, k: int) -> tuple[list[str], dict]:
    """Names of the parameters of the model's last ``k`` blocks (:func:`model_blocks`) and of everything
    registered after the last block (the head and a final norm), with a record of the choice."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise SolverError(f"last_blocks must be a positive integer (or None for every parameter), got {k!r}")
    blocks = model_blocks(model)
    if k > len(blocks):
        raise SolverError(f"last_blocks={k}, but the model has {len(blocks)} blocks ({', '.join(blocks) or 'none'}); "
                          f"use at most {len(blocks)}, or last_blocks=None for every parameter")
    names = [n for n, _ in model.named_parameters()]

    def block_of(name):
        return next((b for b in blocks if name.startswith(b + ".")), None)

    end = max(i for i, n in enumerate(names) if block_of(n) == blocks[-1])
    chosen = set(blocks[-k:])
    keep = [n for i, n in enumerate(names) if block_of(n) in chosen or (i > end and block_of(n) is None)]
    head = [n for i, n in enumerate(names) if i > end and block_of(n) is None]
    return keep, {"last_blocks": k, "of_blocks": len(blocks), "blocks": blocks[-k:], "head": head}


_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise SolverError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


class FunctionalModel:
    """A model with frozen parameters, as pure functions for ``torch.func`` transforms.

    ``dtype`` makes a copy of the parameters in that precision (e.g. float64 curvature for a float32
    model); the model object itself is never modified. ``attributed`` names the parameters influence is
    computed through (default: all); the others are held constant, so gradients, curvature products and
    the flat layout cover only the attributed ones (the GGN of a subset is the sub-block of the full GGN).
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype | str | None = None,
                 attributed: Iterable[str] | None = None):
        self.module = model
        self.layout = ParamLayout.of(model, attributed)
        if self.layout.numel == 0:
            raise SolverError("the model has no parameters to attribute through")
        first = next(model.parameters())
        self.dtype = as_dtype(dtype) if dtype is not None else first.dtype
        self.device = first.device
        keep = set(self.layout.names)
        self.params = {n: p.detach().to(self.dtype) for n, p in model.named_parameters() if n in keep}
        # held-constant parameters travel with the buffers into functional_call
        self.buffers = {n: p.detach().to(self.dtype) for n, p in model.named_parameters() if n not in keep}
        self.buffers.update({n: (b.detach().to(self.dtype) if b.is_floating_point() else b.detach())
                             for n, b in model.named_buffers()})

    @property
    def numel(self) -> int:
        return self.layout.numel

    def theta(self) -> torch.Tensor:
        return self.layout.flatten(self.params)

    def __call__(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.module, (params, self.buffers), (x,))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self(self.params, self.cast(x))

    def cast(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, self.dtype if x.is_floating_point() else x.dtype)


def chunks(n: int, size: int, desc: str | None = None) -> Iterator[slice]:
    """Slices of ``size`` rows covering ``n``; with ``desc``, a progress bar over the rows (the passes over the
    training set that take minutes). ``TDABENCH_PROGRESS=0`` silences the bars."""
    size = max(1, int(size))
    bar = None
    if desc and os.environ.get("TDABENCH_PROGRESS", "1") != "0":
        from tqdm.auto import tqdm

        # mininterval keeps a log file written through a pipe short; the bar still shows rate and ETA
        bar = tqdm(total=n, desc=desc, unit="ex", unit_scale=True, mininterval=5, leave=False)
    try:
        for start in range(0, n, size):
            yield slice(start, min(start + size, n))
            if bar is not None:
                bar.update(min(size, n - start))
    finally:
        if bar is not None:
            bar.close()


def check_finite(t: torch.Tensor, what: str, offset: int | None = 0) -> None:
    """Raise a SolverError if ``t`` holds NaN or Inf, naming the first bad row (example ``offset + row``);
    ``offset=None`` for tensors whose rows are not examples."""
    bad = ~torch.isfinite(t)
    if not bad.any():
        return
    where = ""
    if offset is not None:
        rows = bad.reshape(len(t), -1).any(dim=1).nonzero().flatten()
        where = f" for example {int(rows[0]) + offset} (rows {offset}..{offset + len(t) - 1} checked)"
    raise SolverError(f"non-finite {what}{where}: {int(bad.sum())} NaN/Inf entries. The model or its inputs "
                      f"produce NaN/Inf; check the model's weights and the data (e.g. corrupted or unnormalised "
                      f"inputs) before attributing.")


# ---------------------------------------------------------------- per-example gradients

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


# ---------------------------------------------------------------- the logit Hessian and its factor

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


# ---------------------------------------------------------------- implicit curvature-vector products

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


# ---------------------------------------------------------------- dense matrices (small models)

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


# ---------------------------------------------------------------- Kronecker factors (K-FAC, EK-FAC)

@dataclass(frozen=True)
class KronLayer:
    """One nn.Linear or nn.Conv2d whose parameters [W | b] form a (out, D) matrix, D = in(·k·k) (+1 for bias)."""

    path: str
    module: nn.Module
    weight: str  # parameter names in the layout
    bias: str | None

    @property
    def out_dim(self) -> int:
        return self.module.weight.shape[0]

    @property
    def in_dim(self) -> int:
        return math.prod(self.module.weight.shape[1:]) + (self.bias is not None)

    def patches(self, inp: torch.Tensor) -> torch.Tensor:
        """Layer input -> (n, T, D): rows ã whose products with [W | b] are the T outputs of each example."""
        m = self.module
        if isinstance(m, nn.Conv2d):
            a = F.unfold(inp, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
            a = a.transpose(1, 2)  # (n, T, C_in·kh·kw), same order as weight.reshape(out, -1)
        else:
            a = inp.reshape(len(inp), -1, inp.shape[-1])
        if self.bias is not None:
            a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
        return a

    def output_grads(self, g: torch.Tensor) -> torch.Tensor:
        """(S, n, *out_shape) gradients w.r.t. the layer output -> (S, n, T, out)."""
        if isinstance(self.module, nn.Conv2d):
            S, n, c = g.shape[:3]
            return g.reshape(S, n, c, -1).transpose(2, 3)
        return g.reshape(g.shape[0], g.shape[1], -1, g.shape[-1])

    def to_matrix(self, flat: dict[str, torch.Tensor], batch_dims: int = 1) -> torch.Tensor:
        """Per-parameter tensors (*batch, …) -> (*batch, out, D)."""
        w = flat[self.weight]
        lead = w.shape[:batch_dims]
        w = w.reshape(*lead, self.out_dim, -1)
        if self.bias is None:
            return w
        return torch.cat([w, flat[self.bias].unsqueeze(-1)], dim=-1)

    def from_matrix(self, mat: torch.Tensor, batch_dims: int = 1) -> dict[str, torch.Tensor]:
        lead = mat.shape[:batch_dims]
        w_shape = self.module.weight.shape
        if self.bias is None:
            return {self.weight: mat.reshape(*lead, *w_shape)}
        return {self.weight: mat[..., :-1].reshape(*lead, *w_shape), self.bias: mat[..., -1]}


# Layers K-FAC has no Kronecker factor for. Their parameters can be held constant (excluded from influence),
# as Kronfluence and most users of large models do; the exclusion is recorded with its reason.
NORM_LAYERS = tuple(getattr(nn, n) for n in ("LayerNorm", "GroupNorm", "RMSNorm") if hasattr(nn, n)) + (
    nn.modules.batchnorm._NormBase,)


def _kron_unsupported(m: nn.Module, own: list[str]) -> str | None:
    """Why K-FAC cannot factor this module's parameters, or None if it can."""
    kind = type(m).__name__
    if isinstance(m, NORM_LAYERS):
        return f"normalisation layer ({kind})"
    if not isinstance(m, (nn.Linear, nn.Conv2d)):
        return f"not an nn.Linear or nn.Conv2d ({kind}: embeddings, tokens and other free parameters)"
    if set(own) - {"weight", "bias"}:
        return f"{kind} with extra parameters {sorted(set(own) - {'weight', 'bias'})}"
    if isinstance(m, nn.Conv2d):
        if m.groups != 1:
            return f"grouped convolution (groups={m.groups}); K-FAC/EK-FAC need groups=1"
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            return (f"padding {m.padding!r} / padding_mode {m.padding_mode!r}; K-FAC/EK-FAC unfold patches with "
                    f"explicit integer padding (zeros)")
    return None


def kron_partition(model: nn.Module, within: Iterable[str] | None = None
                   ) -> tuple[list[KronLayer], dict[str, str]]:
    """Split the model's parameters (or those in ``within``) into K-FAC layers (nn.Linear / plain
    nn.Conv2d) and the rest, ``{parameter name: why it cannot be factored}``."""
    keep = None if within is None else set(within)
    layers, excluded = [], {}
    for path, m in model.named_modules():
        prefix = f"{path}." if path else ""
        own = [n for n, _ in m.named_parameters(recurse=False)]
        chosen = [n for n in own if keep is None or prefix + n in keep]
        if not chosen:
            continue
        why = _kron_unsupported(m, own)
        if why is None and "weight" not in chosen:
            why = "a bias without its weight (the layer is only partly attributed)"
        if why is not None:
            excluded.update({prefix + n: why for n in chosen})
            continue
        layers.append(KronLayer(path, m, prefix + "weight", prefix + "bias" if "bias" in chosen else None))
    return layers, excluded


UNSUPPORTED_LAYERS = ("exclude", "error")


def kron_layers_and_exclusions(model: nn.Module, within: Iterable[str] | None = None, unsupported: str = "error"
                               ) -> tuple[list[KronLayer], dict[str, str]]:
    """The model's K-FAC layers and ``{excluded parameter: why}``. Parameters K-FAC cannot factor are a
    SolverError with ``unsupported="error"``, held constant (excluded from influence) with ``"exclude"``."""
    if unsupported not in UNSUPPORTED_LAYERS:
        raise SolverError(f"unsupported_layers must be one of {UNSUPPORTED_LAYERS}, got {unsupported!r}")
    layers, excluded = kron_partition(model, within)
    if excluded and unsupported == "error":
        lines = "; ".join(f"{name}: {why}" for name, why in list(excluded.items())[:4])
        more = f" (and {len(excluded) - 4} more)" if len(excluded) > 4 else ""
        raise SolverError(
            f"K-FAC/EK-FAC support only nn.Linear and nn.Conv2d layers; these parameters cannot be factored: "
            f"{lines}{more}. Exclude them from influence (K-FAC/EK-FAC parameter unsupported_layers='exclude') "
            f"or use the exact, cg, lissa or identity solver for this model.")
    if not layers:
        raise SolverError("K-FAC/EK-FAC found no nn.Linear or nn.Conv2d layer to factor among the attributed "
                          "parameters; use the exact, cg, lissa or identity solver for this model.")
    return layers, excluded


def kron_layers(model: nn.Module, within: Iterable[str] | None = None) -> list[KronLayer]:
    """The model's K-FAC layers; any parameter K-FAC cannot factor is a SolverError."""
    return kron_layers_and_exclusions(model, within, "error")[0]


@contextmanager
def _layer_hooks(layers: list[KronLayer], hook_for: Callable[[KronLayer], Callable]):
    handles = [layer.module.register_forward_hook(hook_for(layer)) for layer in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


PSEUDO_LABELS = ("all", "sampled")


def pseudo_label_cotangents(logits: torch.Tensor, pseudo_labels: str, generator: torch.Generator | None) -> torch.Tensor:
    """(S, n, C) logit-space vectors whose outer products average to Hᵢ (S = C for "all", 1 for "sampled")."""
    if pseudo_labels == "all":
        return logit_hessian_factor(logits).permute(2, 0, 1)  # columns of Lᵢ
    if pseudo_labels == "sampled":
        p = torch.softmax(logits, dim=-1)
        draws = torch.multinomial(p.detach().cpu().double(), 1, generator=generator).squeeze(1).to(p.device)
        return (p - F.one_hot(draws, p.shape[-1]).to(p.dtype)).unsqueeze(0)
    raise SolverError(f"pseudo_labels must be one of {PSEUDO_LABELS}, got {pseudo_labels!r}")


def layer_pseudo_grads(fm: FunctionalModel, layers: list[KronLayer], x: torch.Tensor,
                       cotangents: Callable[[torch.Tensor], torch.Tensor]
                       ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """For one batch: each layer's input patches a (n, T, D) and output gradients dy (S, n, T, out) for
    S logit-space cotangents ``cotangents(logits)`` (S, n, C). The per-example gradient of the layer's
    [W | b] for cotangent s is Σ_t dy[s, n, t] a[n, t]ᵀ.

    With the pseudo-label cotangents of :func:`pseudo_label_cotangents`, Σ_s Σ_{t,t'} (a_t a_t'ᵀ) ⊗ (dy_t dy_t'ᵀ)
    summed over the batch is the layer's diagonal block of N·G (exactly for ``"all"``, in expectation for
    ``"sampled"``). The output gradients come from one vjp of the logits w.r.t. zero perturbations added to
    every layer's output (a forward hook), batched over the S cotangents with vmap.
    """
    x = fm.cast(x)
    inputs, shapes = {}, {}

    def record(layer):
        def hook(module, args, out):
            if layer.path in inputs:
                raise SolverError(f"layer {layer.path!r} is called more than once per forward pass (shared "
                                  f"weights); K-FAC needs one call per layer. Use cg, lissa or identity.")
            inputs[layer.path] = args[0].detach()
            shapes[layer.path] = out.shape
        return hook

    with torch.no_grad(), _layer_hooks(layers, record):
        logits = fm(fm.params, x)
    missing = [layer.path for layer in layers if layer.path not in inputs]
    if missing:
        raise SolverError(f"layers {missing} hold parameters but are not called in the forward pass")
    cot = cotangents(logits)

    def perturbed(eps):
        def add(layer):
            return lambda module, args, out: out + eps[layer.path]

        with _layer_hooks(layers, add):
            return fm(fm.params, x)

    zeros = {path: torch.zeros(shape, dtype=fm.dtype, device=fm.device) for path, shape in shapes.items()}
    _, vjp_fn = vjp(perturbed, zeros)
    out_grads = vmap(vjp_fn)(cot)[0]
    return {layer.path: (layer.patches(inputs[layer.path]), layer.output_grads(out_grads[layer.path]))
            for layer in layers}


def kronecker_factors(fm: FunctionalModel, layers: list[KronLayer], x: torch.Tensor, pseudo_labels: str = "all",
                      seed: int = 0, batch_size: int = 512) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (A, Y) in float64: A = mean over examples of the position-averaged ããᵀ (D × D),
    Y = mean over examples of Σ_{s,t} dy dyᵀ (out × out), so that A ⊗ Y ≈ the layer's block of G
    (exact for a Linear layer when every example has the same logit Hessian)."""
    gen = torch.Generator().manual_seed(seed)
    acc = {layer.path: [torch.zeros(layer.in_dim, layer.in_dim, dtype=torch.float64, device=fm.device),
                        torch.zeros(layer.out_dim, layer.out_dim, dtype=torch.float64, device=fm.device)]
           for layer in layers}
    for sl in chunks(len(x), batch_size, desc="Kronecker factors"):
        cot = lambda logits: pseudo_label_cotangents(logits, pseudo_labels, gen)  # noqa: E731
        for path, (a, dy) in layer_pseudo_grads(fm, layers, x[sl], cot).items():
            # products in the model's precision (the big ones: conv patches), sums over batches in float64
            acc[path][0] += torch.einsum("ntd,nte->de", a, a).double() / a.shape[1]
            acc[path][1] += torch.einsum("sntd,snte->de", dy, dy).double()
    for path, (A, Y) in acc.items():
        check_finite(torch.stack([A.sum(), Y.sum()]), f"Kronecker factor of layer {path!r}", None)
    return {path: (A / len(x), Y / len(x)) for path, (A, Y) in acc.items()}


def eigenbasis(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (clamped at 0: the factors are PSD, negatives are rounding) and eigenvectors, float64."""
    evals, evecs = torch.linalg.eigh(matrix.double())
    return evals.clamp_min(0), evecs


def ekfac_eigenvalues(fm: FunctionalModel, layers: list[KronLayer], x: torch.Tensor,
                      bases: dict[str, dict[str, torch.Tensor]], pseudo_labels: str = "all",
                      seed: int = 0, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """EK-FAC's refitted eigenvalues, per layer (out, D): the mean over examples of the squared per-example
    pseudo-gradients projected on the Kronecker eigenbasis, Λ = E[(Q_Yᵀ DW Q_A)²] with DW = Σ_t dy_t ã_tᵀ.
    ``bases`` as from :func:`kronecker_eigenbases`. For ``"all"`` this is exactly diag((Q_A ⊗ Q_Y)ᵀ G_l (Q_A ⊗ Q_Y))."""
    gen = torch.Generator().manual_seed(seed)
    acc = {layer.path: torch.zeros(layer.out_dim, layer.in_dim, dtype=torch.float64, device=fm.device)
           for layer in layers}
    for sl in chunks(len(x), batch_size, desc="EK-FAC eigenvalues"):
        cot = lambda logits: pseudo_label_cotangents(logits, pseudo_labels, gen)  # noqa: E731
        for path, (a, dy) in layer_pseudo_grads(fm, layers, x[sl], cot).items():
            QA, QY = bases[path]["q_a"].to(a.dtype), bases[path]["q_y"].to(a.dtype)
            a_rot = a @ QA  # (n, T, D), in the model's precision; the sums are float64
            dy_rot = dy @ QY  # (S, n, T, out)
            if a.shape[1] == 1:  # one position: DW is rank one, its squared projection factorises
                acc[path] += torch.einsum("sno,nd->od", dy_rot[:, :, 0] ** 2, a_rot[:, 0] ** 2).double()
            else:
                acc[path] += (torch.einsum("snto,ntd->snod", dy_rot, a_rot) ** 2).sum((0, 1)).double()
    return {path: lam / len(x) for path, lam in acc.items()}


def kron_apply(layers: list[KronLayer], layout: ParamLayout, vectors: torch.Tensor,
               bases: dict[str, dict[str, torch.Tensor]], scale: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, P) -> (B, P): per layer, V ↦ Q_Y [(Q_Yᵀ V Q_A) / scale] Q_Aᵀ with V the (out, D) matrix of
    [W | b]; ``scale[path]`` (out, D) holds the damped eigenvalues. Computed in float64."""
    flat = layout.unflatten(vectors.double())
    out = {}
    for layer in layers:
        QA, QY = bases[layer.path]["q_a"], bases[layer.path]["q_y"]
        V = layer.to_matrix(flat)
        rotated = QY.T @ V @ QA
        out.update(layer.from_matrix(QY @ (rotated / scale[layer.path]) @ QA.T))
    return layout.flatten(out, batch_dims=1).to(vectors.dtype)


def kronecker_eigenbases(fm: FunctionalModel, layers: list[KronLayer], x: torch.Tensor, pseudo_labels: str = "all",
                         seed: int = 0, batch_size: int = 512) -> dict[str, dict[str, torch.Tensor]]:
    """Per layer: eigenvalues and eigenvectors of the Kronecker factors A (input side) and Y (output side)."""
    out = {}
    for path, (A, Y) in kronecker_factors(fm, layers, x, pseudo_labels, seed, batch_size).items():
        (lam_a, q_a), (lam_y, q_y) = eigenbasis(A), eigenbasis(Y)
        out[path] = {"lam_a": lam_a, "q_a": q_a, "lam_y": lam_y, "q_y": q_y}
    return out



def damped_eigenvalues(eigenvalues: dict[str, torch.Tensor], damping: float, solver: str) -> dict[str, torch.Tensor]:
    """Per-layer eigenvalues + λ, refusing a (numerically) singular result with a clear error."""
    flat = torch.cat([e.flatten() for e in eigenvalues.values()])
    tol = singular_tolerance(flat)
    if float(flat.min()) + damping <= tol:
        raise SolverError(f"{solver}: the approximate curvature plus damping is singular (smallest eigenvalue "
                          f"{float(flat.min()):.3g}, damping={damping}, tolerance {tol:.3g}); the last layer's "
                          f"output factor of a softmax model is always singular, so use damping > 0.")
    return {path: e + damping for path, e in eigenvalues.items()}

# ---------------------------------------------------------------- memoising damping-independent work

def fingerprint(model: nn.Module, *tensors: torch.Tensor) -> str:
    """Content hash of a model's parameters and buffers (batch-norm statistics) and some data tensors."""
    h = hashlib.blake2b(digest_size=16)
    for name, p in [*model.named_parameters(), *model.named_buffers()]:
        h.update(name.encode())
        h.update(p.detach().to("cpu").contiguous().numpy().tobytes())
    for t in tensors:
        h.update(str((tuple(t.shape), t.dtype)).encode())
        h.update(t.detach().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.element_size() * value.numel()
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return 0


class CurvatureCache:
    """A small LRU of damping-independent results keyed by content (model, data, what, options).

    A grid search over damping fits the same solver on the same model many times; the dense GGN, its
    eigendecomposition and Kronecker factors do not change between those fits. Bounded in bytes
    (``$TDABENCH_CURVATURE_CACHE_MB``, default 4096); entries record how long they took to build.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple, build: Callable[[], object]) -> tuple[object, float, bool]:
        """Returns (value, seconds it took to build, whether it was built now)."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                value, seconds = self._items[key]
                return value, seconds, False
        t0 = time.perf_counter()
        value = build()
        seconds = time.perf_counter() - t0
        size = _nbytes(value)
        with self._lock:
            if size <= self.max_bytes:
                self._items[key] = (value, seconds)
                while sum(_nbytes(v) for v, _ in self._items.values()) > self.max_bytes:
                    self._items.popitem(last=False)
        return value, seconds, True

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


CACHE = CurvatureCache(int(float(os.environ.get("TDABENCH_CURVATURE_CACHE_MB", "4096")) * 2**20))

