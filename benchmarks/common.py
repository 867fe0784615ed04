"""What the cost benchmarks share: where results go, the machine's measured matrix-multiply rate (the denominator
of every flop floor), the work of a model's forward pass, and time + peak memory of a call.

A *floor* is the arithmetic a stage cannot avoid divided by the rate this machine multiplies float32 matrices at:
no implementation of that stage can be faster here, so ``seconds / floor`` says how much is left to gain.
"""

from __future__ import annotations

import functools
import os
import re
import time
from pathlib import Path

import torch
from torch import nn

from benchmark.evaluate.cost import Cost, machine_load
from benchmark.setup.artifacts import cpu_model
from benchmark.setup.plugins import REPO_ROOT

PERF = REPO_ROOT / "results" / "perf"


def device_slug(device: torch.device | str) -> str:
    """A folder name for the machine's figures: ``cpu-<model>-<cores>c`` or the GPU's name, e.g. ``nvidia-h200``."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu-{cpu_model()}-{os.cpu_count()}c"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@functools.lru_cache(maxsize=8)
def matmul_rate(device: torch.device | str, size: int = 2048, repeats: int = 5, dtype=torch.float32) -> float:
    """Flop/s of a square matrix product on ``device`` (best of ``repeats``): the machine's attainable rate,
    measured once per process."""
    device = torch.device(device)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up (thread pool, kernels)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


def forward_flops(model: nn.Module, example: torch.Tensor) -> float:
    """Flops of one example's forward pass through the model's nn.Linear and nn.Conv2d layers (2 per
    multiply-add; activations and pooling are left out: they are not matrix products)."""
    total = [0.0]

    def hook(module, args, out):
        if isinstance(module, nn.Linear):
            total[0] += 2.0 * module.in_features * out.numel()
        elif isinstance(module, nn.Conv2d):
            k = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            total[0] += 2.0 * k * out.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for h in handles:
            h.remove()
    return total[0]


def gradient_flops(model: nn.Module, example: torch.Tensor) -> float:
    """Flops of one example's forward and backward pass (backward ≈ twice the forward: the gradients with
    respect to activations and to weights are one product each)."""
    return 3.0 * forward_flops(model, example)


def measured(fn, device: torch.device | str = "cpu"):
    """(result, seconds, peak MiB) of ``fn()``: wall-clock, and the process's resident-set peak during the call
    on CPU (reset first) or the allocator's peak on a GPU (:class:`benchmark.evaluate.cost.Cost`)."""
    cost = Cost(device)
    with cost.stage("call"):
        out = fn()
    return out, cost.seconds("call"), cost.peak_mb("call")


def machine() -> dict:
    """Load average, cores and threads now (a loaded machine runs slower: every figure carries it)."""
    return machine_load()


def perf_dir(device: torch.device | str) -> Path:
    return PERF / device_slug(device)
