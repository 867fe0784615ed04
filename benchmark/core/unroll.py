"""Floor 1: differentiating through a training run — SOURCE's per-segment matrix functions and the exact
reverse-mode adjoint of mini-batch SGD.

The optimiser is ``torch.optim.SGD`` with momentum β and weight decay μ (no dampening, no Nesterov) on the mean
loss J_B of mini-batch B_k at learning rate η_k:

    m_{k+1} = β m_k + ∇J_{B_k}(θ_k) + μ θ_k,        θ_{k+1} = θ_k − η_k m_{k+1}        (m_0 = 0).

Up-weighting training point i by ε in the mean loss (J + ε L_i, the convention of every score here) turns each
step's batch loss, unbiased for it, into J_{B_k} + ε (N/|B_k|) L_i when i ∈ B_k. To first order in ε the run
is the linear recursion

    δm_{k+1} = β δm_k + (∇²J_{B_k}(θ_k) + μI) δθ_k + s_k,   δθ_{k+1} = δθ_k − η_k δm_{k+1},
    s_k = (N/|B_k|) 1[i ∈ B_k] ∇L_i(θ_k),

and τ(q, i) = ∇f(θ_T)ᵀ δθ_T. :func:`unrolled_scores` runs its adjoint backwards from ∇f(θ_T) for a block of
queries at once, accumulating every step's contribution to the points of its batch. SOURCE (solvers/source.py)
replaces the recursion within a segment by a stationary one; :func:`segment_scales` gives its two matrix
functions in a Kronecker eigenbasis.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from .errors import SolverError
from .params import FunctionalModel, check_finite, chunks
from .products import hessian_vector_product, per_sample_grads


def segment_bounds(epochs: int, segments: int) -> list[tuple[int, int]]:
    """``segments`` contiguous ranges of epochs (start, end] covering 1..``epochs``, as equal as they can be."""
    if isinstance(segments, bool) or not isinstance(segments, int) or not 1 <= segments <= epochs:
        raise SolverError(f"segments must be an integer from 1 to the trajectory's {epochs} epochs (segments end at "
                          f"saved per-epoch checkpoints), got {segments!r}")
    ends = [round(s * epochs / segments) for s in range(segments + 1)]
    return list(zip(ends[:-1], ends[1:]))


def segment_times(learning_rates: np.ndarray, bounds: list[tuple[int, int]], momentum: float) -> list[float]:
    """Per segment, the time T = Σ η_k / (1 − β) over its steps: heavy-ball momentum with ηλ ≪ (1 − β)² follows
    gradient flow with step η/(1 − β), so its K steps move like K·η/(1 − β) of plain gradient descent."""
    if not 0 <= momentum < 1:
        raise SolverError(f"momentum must be in [0, 1), got {momentum}")
    rates = np.asarray(learning_rates, dtype=np.float64)
    return [float(rates[start:end].sum()) / (1.0 - momentum) for start, end in bounds]


def segment_scales(eigenvalues: dict[str, torch.Tensor], time: float, shift: float
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """For a segment of time T whose curvature is Q diag(Λ) Qᵀ + shift·I: the ``scale`` arguments of
    :func:`~.kronecker.kron_apply` (which divides by them) that apply

    - the propagation   S = exp(−T H̃)                  (scale 1 / exp(−T Λ̃), capped where it underflows), and
    - the response      R = (I − exp(−T H̃)) H̃⁻¹        (scale Λ̃ / (1 − exp(−T Λ̃)); T where Λ̃ = 0),

    with Λ̃ = Λ + shift ≥ 0. R is finite at Λ̃ = 0: a flat direction keeps moving for the whole segment."""
    propagate, respond = {}, {}
    for path, lam in eigenvalues.items():
        lt = (lam.double() + shift).clamp_min(0) * time
        propagate[path] = torch.exp(lt.clamp_max(700.0))  # exp(-700) is far below float64 resolution of any score
        grow = -torch.expm1(-lt)  # 1 − e^{−TΛ̃}, accurate for small TΛ̃
        safe = torch.where(lt > 0, lt, torch.ones_like(lt))
        respond[path] = torch.where(lt > 0, safe / (grow * time), torch.full_like(lt, 1.0 / time))
    return propagate, respond


def unrolled_scores(fm: FunctionalModel, states: torch.Tensor, batches: list[torch.Tensor], rates: list[float],
                    momentum: float, weight_decay: float, train_x: torch.Tensor, train_y: torch.Tensor,
                    query_grads: torch.Tensor, desc: str | None = None) -> torch.Tensor:
    """(Q, N) τ(q, i) = ∇f(θ_T)ᵀ dθ_T/dε_i through the recorded steps, by the adjoint of the recursion above.

    ``states`` (K, P): θ_k before each step k of the window (flat attributed parameters); ``batches[k]`` the
    positions in ``train_x`` of step k's batch; ``rates[k]`` its learning rate; ``query_grads`` (Q, P) ∇f(θ_T).
    With adjoints (a_θ, a_m) of (θ_{k+1}, m_{k+1}), starting at (∇f(θ_T), 0), a step backwards is

        ā = a_m − η_k a_θ          (the adjoint of the step's gradient)
        τ(·, i) += (N/|B_k|) ⟨ā, ∇L_i(θ_k)⟩   for i ∈ B_k
        a_m ← β ā,    a_θ ← a_θ + (∇²J_{B_k}(θ_k) + μI) ā.

    The perturbation starts with the window (δθ = δm = 0 at its first step). Products in ``fm.dtype`` (float64
    for a reference); the true Hessian of each batch's mean loss, by forward-over-reverse products."""
    n = len(train_y)
    if not (len(states) == len(batches) == len(rates)):
        raise SolverError(f"{len(states)} states, {len(batches)} batches and {len(rates)} learning rates: one each "
                          f"per step is needed")
    a_theta = query_grads.to(fm.device, fm.dtype).clone()
    a_m = torch.zeros_like(a_theta)
    scores = torch.zeros(len(a_theta), n, dtype=fm.dtype, device=fm.device)
    step_fm = copy.copy(fm)  # the same function, evaluated at each step's weights
    for done in chunks(len(states), 1, desc=desc):  # backwards: k = K−1, …, 0
        k = len(states) - 1 - done.start
        step_fm.params = fm.layout.unflatten(states[k].to(fm.device, fm.dtype))
        batch = batches[k].to(fm.device)
        xb, yb = train_x[batch], train_y[batch]
        a_bar = a_m - rates[k] * a_theta
        grads = per_sample_grads(step_fm, xb, yb, "loss")
        bad = (~torch.isfinite(grads)).any(dim=1).nonzero().flatten()
        if len(bad):  # name the training example, not its row in the batch
            row = int(bad[0])
            check_finite(grads[row:row + 1], "train loss gradient", int(batch[row]))
        scores[:, batch] += (n / len(batch)) * (a_bar @ grads.T)
        a_m = momentum * a_bar
        a_theta = a_theta + hessian_vector_product(step_fm, a_bar, xb, yb, batch_size=len(batch)) + weight_decay * a_bar
    return scores
