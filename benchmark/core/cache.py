"""Floor 1: memoising damping-independent curvature (dense G, Kronecker eigenbases) across solver fits.

A grid search over damping fits the same solver on the same model many times; the curvature that does not
depend on λ is built once. The cache is an object owned by whoever runs the fits (one per evaluation), keyed
by the *content* of the model and data, and bounded in bytes.
"""

from __future__ import annotations

import collections
import hashlib
import threading
import time
from typing import Callable

import torch
from torch import nn

DEFAULT_CACHE_MB = 4096


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
    (default 4096 MiB); entries record how long they took to build.
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_MB * 2**20):
        self.max_bytes = int(max_bytes)
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
