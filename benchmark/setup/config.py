"""Floor 2: configuration types and the hashing that ties artifacts to code.

Everything that changes what a trained model *is* belongs in :class:`TrainRecipe`; everything that
changes which models a ground truth holds belongs in :class:`Protocol`. Both hash stably (sorted JSON,
sha256), so an artifact can tell whether the code that reads it still means the same thing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

# Bump when training semantics change in a way the recipe fields do not capture
# (e.g. a different data-order algorithm). Every ground truth built before becomes stale.
TRAINING_CODE_VERSION = 1

SEED_POLICIES = ("varied", "shared")


def stable_hash(obj: Any, length: int = 16) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys), truncated to ``length`` hex digits."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


@dataclass(frozen=True)
class TrainRecipe:
    """How one model is trained. SGD with momentum, linear decay to zero over all steps."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "linear"  # "linear" (decay to 0) or "constant"
    drop_last: bool = False

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"invalid recipe {self}: epochs, batch_size and lr must be positive")
        if self.schedule not in ("linear", "constant"):
            raise ValueError(f"unknown schedule {self.schedule!r}; use 'linear' or 'constant'")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Protocol:
    """Which models a ground-truth artifact holds.

    ``subsets`` random subsets of size ``round(alpha * n_train)``, each trained with ``seeds`` seeds;
    outputs recorded on ``queries`` test points (reported) and ``validation_queries`` disjoint test
    points (for hyper-parameter selection); ``full_models`` models trained on all training data.
    """

    alpha: float = 0.5
    subsets: int = 100
    seeds: int = 4
    queries: int = 2000
    validation_queries: int = 500
    full_models: int = 4
    seed_policy: str = "shared"
    base_seed: int = 0

    def __post_init__(self):
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        for name in ("subsets", "seeds", "queries", "full_models"):
            if getattr(self, name) < 1:
                raise ValueError(f"protocol.{name} must be >= 1, got {getattr(self, name)}")
        if self.validation_queries < 0:
            raise ValueError("protocol.validation_queries must be >= 0")
        if self.seed_policy not in SEED_POLICIES:
            raise ValueError(f"seed_policy must be one of {SEED_POLICIES}, got {self.seed_policy!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def extends(self, other: "Protocol") -> bool:
        """True if every unit of ``other`` is also a unit of ``self`` with identical meaning."""
        same = ("alpha", "queries", "validation_queries", "seed_policy", "base_seed")
        return all(getattr(self, k) == getattr(other, k) for k in same) and (
            self.subsets >= other.subsets
            and self.seeds >= other.seeds
            and self.full_models >= other.full_models
        )


@dataclass(frozen=True)
class Unit:
    """One independent piece of ground-truth work: a model trained on subset ``subset`` (or on all
    data when ``subset`` is None) with replica/seed index ``replica``."""

    replica: int
    subset: int | None

    @property
    def name(self) -> str:
        return f"full_k{self.replica:02d}" if self.subset is None else f"r{self.replica:02d}_s{self.subset:04d}"


def unit_seed(protocol: Protocol, unit: Unit) -> int:
    """The seed that drives a unit's initialisation and data order.

    ``shared``: every subset model of replica r, and full-data model k=r, use one seed, which takes
    initialisation noise out of the comparison across subsets. ``varied``: every subset model has its
    own seed; full-data model k still uses replica k's shared seed.
    """
    if unit.subset is None or protocol.seed_policy == "shared":
        key = [protocol.base_seed, "replica", unit.replica]
    else:
        key = [protocol.base_seed, "unit", unit.replica, unit.subset]
    return int(stable_hash(key, 8), 16)


@dataclass(frozen=True)
class DataSpec:
    """Identity of the data a setting trains on: files and their sha256, plus any fixed subsetting."""

    name: str
    files: dict = field(default_factory=dict)  # file name -> sha256
    train_size: int = 0
    test_size: int = 0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
