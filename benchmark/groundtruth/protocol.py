"""Floor 3: a ground-truth protocol made concrete — which training points each subset holds, which test points
are queries, which units exist and where their files go. Pure functions of the protocol and the data sizes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..setup.config import Protocol, Unit, stable_hash

OUTPUT_ROWS = ("margin", "loss", "correct")


def subset_size(protocol: Protocol, n_train: int) -> int:
    return int(round(protocol.alpha * n_train))


def subset_indices(protocol: Protocol, n_train: int, j: int) -> np.ndarray:
    """Training indices of subset j. Depends only on (base_seed, j, n, α): extending M keeps old subsets."""
    rng = np.random.default_rng(int(stable_hash([protocol.base_seed, "subset", j, n_train], 8), 16))
    return np.sort(rng.choice(n_train, subset_size(protocol, n_train), replace=False))


def query_indices(protocol: Protocol, n_test: int) -> tuple[np.ndarray, np.ndarray]:
    """Reported queries and disjoint validation queries, a seeded draw from the test set."""
    if protocol.queries + protocol.validation_queries > n_test:
        raise ValueError(f"{protocol.queries} queries + {protocol.validation_queries} validation queries "
                         f"exceed the {n_test} test points")
    rng = np.random.default_rng(int(stable_hash([protocol.base_seed, "queries", n_test], 8), 16))
    perm = rng.permutation(n_test)
    q = perm[:protocol.queries]
    return np.sort(q), np.sort(perm[protocol.queries:protocol.queries + protocol.validation_queries])


def all_units(protocol: Protocol) -> list[Unit]:
    """Full-data models first (solvers need them), then replica by replica: a partial build holds
    complete single-seed ground truths as early as possible."""
    full = [Unit(k, None) for k in range(protocol.full_models)]
    return full + [Unit(r, j) for r in range(protocol.seeds) for j in range(protocol.subsets)]


def unit_file(root: Path, unit: Unit) -> Path:
    return root / ("full" if unit.subset is None else "units") / f"{unit.name}.npz"


def checkpoint_file(root: Path, k: int) -> Path:
    return root / "full" / f"full_k{k:02d}.safetensors"


def unit_names(protocol: Protocol) -> list[str]:
    """Every file a complete artifact of ``protocol`` holds, relative to its folder."""
    names = ["masks.npy", "queries.npy", "validation_queries.npy"]
    for u in all_units(protocol):
        names.append(f"{'full' if u.subset is None else 'units'}/{u.name}.npz")
        if u.subset is None:
            names.append(f"full/{u.name}.safetensors")
    return names
