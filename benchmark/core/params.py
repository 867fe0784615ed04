"""Floor 1: the explained model as pure functions of its attributed parameters, laid out as one flat vector.

A model's parameters are one flat vector θ in ``model.named_parameters()`` order, each tensor flattened
row-major (:class:`ParamLayout`). Every (B, P) matrix of vectors in this package uses that order. Influence
goes through the *attributed* parameters (all by default, the last k blocks with ``last_blocks``); the others
are held constant.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch import nn
from torch.func import functional_call

from .errors import SolverError


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
    if t.numel() == 0:
        return
    flat = t.reshape(len(t), -1) if t.dim() else t.reshape(1, 1)
    # a block of rows at a time: isfinite allocates float temporaries the size of its input
    if all(bool(torch.isfinite(flat[sl]).all()) for sl in chunks(len(flat), 256)):
        return
    bad = ~torch.isfinite(t)
    where = ""
    if offset is not None:
        rows = bad.reshape(len(t), -1).any(dim=1).nonzero().flatten()
        where = f" for example {int(rows[0]) + offset} (rows {offset}..{offset + len(t) - 1} checked)"
    raise SolverError(f"non-finite {what}{where}: {int(bad.sum())} NaN/Inf entries. The model or its inputs "
                      f"produce NaN/Inf; check the model's weights and the data (e.g. corrupted or unnormalised "
                      f"inputs) before attributing.")
