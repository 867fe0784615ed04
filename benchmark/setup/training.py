"""Floor 2: training one model (plain loop) or many at once (``torch.func`` vmap), identically.

A model is determined by (setting, training indices, seed): the seed fixes the initialisation and the
data order. Both trainers consume randomness the same way, so the same seed gives the same model up
to floating-point summation order (checked by tests/test_training.py).

Which trainer is faster depends on the device: batching many small models with vmap wins on a GPU
(docs/results.md: 0.32 s a model on an H200), while on 2 CPU cores a plain loop measured 1.7-2.7x faster per
model, yet tiny models (logistic regression) are per-step overhead that vmap amortises even on a CPU.
``choose_trainer`` therefore times a few steps of each; ``make bench-train`` measures them properly.
"""

from __future__ import annotations

import contextlib
import copy
import os
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from .config import TrainRecipe
from ..core.measurements import margin

ORDER_SEED_OFFSET = 0x5EED  # data order and initialisation come from different streams of one seed


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def worker_training(threads: int = 0) -> Iterator[None]:
    """How ground-truth, zoo and retrain workers train: with ``threads`` torch threads (0: as they are) and torch's
    deterministic algorithms, so that one machine gives the same bits every time it trains the same unit.

    On a CPU the kernels these models use are already deterministic for a fixed thread count, so this changes no
    number there (tests/test_training.py checks it bitwise); on a GPU it makes cuDNN and cuBLAS pick deterministic
    kernels (cuBLAS needs its workspace setting before its first call). ``warn_only``: an op without a
    deterministic kernel warns instead of failing the build. Across machines nothing is promised: other vector
    instructions or another GPU round differently, and SGD amplifies the difference (docs/ground-truth.md).
    Everything is restored on exit, so an in-process worker leaves its caller as it found it.
    """
    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if threads:
        torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        torch.use_deterministic_algorithms(before[1], warn_only=before[2])


def choose_trainer(setting, device: torch.device, n_models: int, models: int = 4, steps: int = 4) -> tuple[str, dict]:
    """Pick the faster trainer by timing a few steps of each on this device (vmap always on a GPU).

    The answer depends on model size, not only the device: on 2 CPU cores the MNIST CNN trains faster
    in a plain loop, while logistic regression is dominated by per-step overhead that vmap amortises.
    """
    if n_models < 2:
        return "loop", {}
    if device.type == "cuda":
        return "vmap", {}
    import dataclasses
    import time

    data = setting.data()
    n = min(len(data.train_y), steps * setting.recipe.batch_size)
    recipe = dataclasses.replace(setting.recipe, epochs=1)
    idx = [torch.arange(n)] * models
    x, y = data.train_x[:n], data.train_y[:n]
    train(setting.model(0), x, y, recipe, 0, idx[0])  # warm-up
    t = time.perf_counter()
    for s in range(models):
        train(setting.model(s), x, y, recipe, s, idx[s])
    loop = (time.perf_counter() - t) / models
    t = time.perf_counter()
    train_batched([setting.model(s) for s in range(models)], x, y, recipe, list(range(models)), idx)
    batched = (time.perf_counter() - t) / models
    return ("vmap" if batched < loop else "loop"), {"loop_s_per_model": loop, "vmap_s_per_model": batched}


def _lr_at(recipe: TrainRecipe, step: int, total: int) -> float:
    if recipe.schedule == "constant":
        return recipe.lr
    return recipe.lr * (1.0 - step / total)


def _steps_per_epoch(n: int, recipe: TrainRecipe) -> int:
    return n // recipe.batch_size if recipe.drop_last else -(-n // recipe.batch_size)


def _epoch_batches(n: int, recipe: TrainRecipe, gen: torch.Generator) -> list[torch.Tensor]:
    perm = torch.randperm(n, generator=gen)
    return [perm[i * recipe.batch_size:(i + 1) * recipe.batch_size] for i in range(_steps_per_epoch(n, recipe))]


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    # channels_last measured 1.4x faster for the MNIST CNN on 2 CPU cores (7.8 s -> 5.5 s an epoch, 1 thread)
    return torch.channels_last if x.dim() == 4 else torch.contiguous_format


def _order_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed + ORDER_SEED_OFFSET) % (2**63))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, recipe: TrainRecipe, seed: int,
          indices: torch.Tensor | None = None, on_epoch=None, on_step=None) -> nn.Module:
    """Train ``model`` in place on ``x[indices], y[indices]`` (all data when ``indices`` is None).

    ``on_epoch(epoch, model, schedule)``, when given, is called before the first step (epoch 0) and after
    every epoch, with the learning rates of that epoch's steps (``schedule``); ``on_step(step, model, batch,
    lr)`` before every SGD step, with the model's weights before the step, the positions of the batch's
    examples in ``x`` and the step's learning rate (replaying a run step by step: unrolled differentiation).
    Neither may change the model."""
    device = x.device
    model = model.to(device).train()
    fmt = _memory_format(x)
    model = model.to(memory_format=fmt)
    idx = torch.arange(len(y)) if indices is None else indices.cpu()
    n = len(idx)
    if n == 0:
        raise ValueError("cannot train on an empty index set")
    gen = _order_generator(seed)
    opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                          weight_decay=recipe.weight_decay)
    total = recipe.epochs * _steps_per_epoch(n, recipe)
    step = 0
    if on_epoch is not None:
        on_epoch(0, model, [])
    for epoch in range(recipe.epochs):
        rates = []
        for batch in _epoch_batches(n, recipe, gen):
            sel = idx[batch].to(device)
            rates.append(_lr_at(recipe, step, total))
            for group in opt.param_groups:
                group["lr"] = rates[-1]
            if on_step is not None:
                on_step(step, model, sel, rates[-1])
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[sel].contiguous(memory_format=fmt)), y[sel]).backward()
            opt.step()
            step += 1
        if on_epoch is not None:
            on_epoch(epoch + 1, model, rates)
    return model.eval()


def train_batched(models: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor, recipe: TrainRecipe,
                  seeds: Sequence[int], indices: Sequence[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Train several same-architecture models at once with vmap; returns one state dict each.

    Every model's index set must have the same size (true for α-subsets), so each step's batches stack.
    SGD's update is elementwise, so one optimiser over stacked parameters equals one per model.
    """
    if not (len(models) == len(seeds) == len(indices)) or not models:
        raise ValueError("models, seeds and indices must be non-empty and of equal length")
    sizes = {len(i) for i in indices}
    if len(sizes) != 1:
        raise ValueError(f"batched training needs equal-sized index sets, got sizes {sorted(sizes)}")
    n = sizes.pop()
    device = x.device
    for m in models:
        m.to(device).train()
    params, buffers = stack_module_state(list(models))
    base = copy.deepcopy(models[0]).to("meta")

    def loss_fn(p, b, xb, yb):
        return F.cross_entropy(functional_call(base, (p, b), (xb,)), yb)

    batched_loss = vmap(loss_fn)
    opt = torch.optim.SGD(params.values(), lr=recipe.lr, momentum=recipe.momentum,
                          weight_decay=recipe.weight_decay)
    gens = [_order_generator(s) for s in seeds]
    idx = torch.stack([i.cpu() for i in indices])  # (B, n)
    total = recipe.epochs * _steps_per_epoch(n, recipe)
    step = 0
    for _ in range(recipe.epochs):
        per_model = [_epoch_batches(n, recipe, g) for g in gens]
        for k in range(len(per_model[0])):
            sel = torch.stack([idx[b, per_model[b][k]] for b in range(len(models))]).to(device)
            for group in opt.param_groups:
                group["lr"] = _lr_at(recipe, step, total)
            opt.zero_grad(set_to_none=True)
            batched_loss(params, buffers, x[sel], y[sel]).sum().backward()
            opt.step()
            step += 1
    out = []
    for b in range(len(models)):
        state = {k: v[b].detach().clone() for k, v in params.items()}
        state.update({k: v[b].detach().clone() for k, v in buffers.items()})
        out.append(state)
    return out


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 4096) -> dict[str, torch.Tensor]:
    """Per-example margin, loss and correctness of ``model`` on ``(x, y)``, on the CPU, float32."""
    model.eval()
    margins, losses, correct = [], [], []
    for i in range(0, len(y), chunk):
        logits = model(x[i:i + chunk])
        yb = y[i:i + chunk]
        margins.append(margin(logits, yb))
        losses.append(F.cross_entropy(logits, yb, reduction="none"))
        correct.append(logits.argmax(-1) == yb)
    return {"margin": torch.cat(margins).float().cpu(), "loss": torch.cat(losses).float().cpu(),
            "correct": torch.cat(correct).cpu()}
