"""Floor 1: Kronecker-factored curvature (K-FAC, EK-FAC) for nn.Linear and nn.Conv2d layers.

Per layer, G_l ≈ A ⊗ Y with A the covariance of the layer's inputs (unfolded patches for convolutions, a ones
column for the bias) and Y that of the pre-activation pseudo-gradients, formed either from every label weighted
by √p (``"all"``, exact for the logit Hessian) or from one label sampled from the model (``"sampled"``).
Products are taken in the model's precision, sums and eigendecompositions in float64.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vjp, vmap

from .errors import SolverError
from .params import FunctionalModel, ParamLayout, check_finite, chunks
from .products import logit_hessian_factor, singular_tolerance


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


KRON_ROWS = 64


def kron_apply(layers: list[KronLayer], layout: ParamLayout, vectors: torch.Tensor,
               bases: dict[str, dict[str, torch.Tensor]], scale: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, P) -> (B, P): per layer, V ↦ Q_Y [(Q_Yᵀ V Q_A) / scale] Q_Aᵀ with V the (out, D) matrix of
    [W | b]; ``scale[path]`` (out, D) holds the damped eigenvalues. Computed in float64, ``KRON_ROWS`` vectors at a
    time: the float64 intermediates of a whole query block (five copies of it) would dwarf the block itself."""
    result = torch.empty_like(vectors)
    for sl in chunks(len(vectors), KRON_ROWS):
        flat = layout.unflatten(vectors[sl].double())
        out = {}
        for layer in layers:
            QA, QY = bases[layer.path]["q_a"], bases[layer.path]["q_y"]
            V = layer.to_matrix(flat)
            rotated = QY.T @ V @ QA
            out.update(layer.from_matrix(QY @ (rotated / scale[layer.path]) @ QA.T))
        result[sl] = layout.flatten(out, batch_dims=1)
    return result


def kronecker_eigenbases(fm: FunctionalModel, layers: list[KronLayer], x: torch.Tensor, pseudo_labels: str = "all",
                         seed: int = 0, batch_size: int = 512) -> dict[str, dict[str, torch.Tensor]]:
    """Per layer: eigenvalues and eigenvectors of the Kronecker factors A (input side) and Y (output side)."""
    out = {}
    for path, (A, Y) in kronecker_factors(fm, layers, x, pseudo_labels, seed, batch_size).items():
        (lam_a, q_a), (lam_y, q_y) = eigenbasis(A), eigenbasis(Y)
        out[path] = {"lam_a": lam_a, "q_a": q_a, "lam_y": lam_y, "q_y": q_y}
    return out


DAMPING_MODES = ("absolute", "relative")


def damped_eigenvalues(eigenvalues: dict[str, torch.Tensor], damping: float, solver: str,
                       mode: str = "absolute") -> dict[str, torch.Tensor]:
    """Per-layer eigenvalues + λ, refusing a (numerically) singular result with a clear error.

    ``mode="absolute"``: the same λ for every layer (in units of G of the mean loss). ``"relative"``: layer l gets
    λ · mean(eigenvalues of l) — Kronfluence's heuristic (there with λ = 0.1), which scales the damping to each
    layer's curvature, whose size differs by orders of magnitude between layers."""
    if mode not in DAMPING_MODES:
        raise SolverError(f"{solver}: damping_mode must be one of {DAMPING_MODES}, got {mode!r}")
    if mode == "relative":
        out = {}
        for path, e in eigenvalues.items():
            shift = damping * e.mean()
            tol = singular_tolerance(e.flatten())
            if float(e.min() + shift) <= tol:
                raise SolverError(
                    f"{solver}: layer {path!r} plus relative damping is singular (smallest eigenvalue "
                    f"{float(e.min()):.3g}, mean {float(e.mean()):.3g}, damping={damping}, tolerance {tol:.3g}); "
                    + ("use damping > 0." if float(e.mean()) > 0 else
                       "the layer has no curvature at all, which relative damping cannot fix: use "
                       "damping_mode='absolute'."))
            out[path] = e + shift
        return out
    flat = torch.cat([e.flatten() for e in eigenvalues.values()])
    tol = singular_tolerance(flat)
    if float(flat.min()) + damping <= tol:
        raise SolverError(f"{solver}: the approximate curvature plus damping is singular (smallest eigenvalue "
                          f"{float(flat.min()):.3g}, damping={damping}, tolerance {tol:.3g}); the last layer's "
                          f"output factor of a softmax model is always singular, so use damping > 0.")
    return {path: e + damping for path, e in eigenvalues.items()}
