"""Floor 1: vectorised rank statistics shared by the ground truth (noise ceiling) and the metrics."""

from __future__ import annotations

import itertools

import numpy as np
from scipy.stats import rankdata


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation between ``a[i]`` and ``b[i]`` for every row i (ties get average ranks).

    Equals ``scipy.stats.spearmanr(a[i], b[i]).statistic`` row by row; a row that is constant in
    either input has no defined correlation and gives NaN.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"need two 2-D arrays of equal shape, got {a.shape} and {b.shape}")
    ra = rankdata(a, axis=1)
    rb = rankdata(b, axis=1)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    denom = np.sqrt((ra * ra).sum(axis=1) * (rb * rb).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (ra * rb).sum(axis=1) / np.where(denom > 0, denom, 1.0), np.nan)


def mean_se(values: np.ndarray) -> tuple[float, float]:
    """Mean and standard error of the finite entries."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")


def replica_splits(replicas: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Every distinct way to pick two disjoint halves of ⌊R/2⌋ replicas each (the order of the halves does
    not count): 3 splits of 4 replicas, 1 of 2, 3 of 3 (one replica left out each time)."""
    h = replicas // 2
    seen, out = set(), []
    for a in itertools.combinations(range(replicas), h):
        rest = [r for r in range(replicas) if r not in a]
        for b in itertools.combinations(rest, h):
            key = frozenset((a, b))
            if key not in seen:
                seen.add(key)
                out.append((a, b))
    return out


def spearman_brown(rho, factor: float):
    """Reliability of an average of ``factor`` times as many replicas as the one with reliability ``rho``."""
    rho = np.asarray(rho, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return factor * rho / (1 + (factor - 1) * rho)


def bootstrap_se(values, n_boot: int = 1000, seed: int = 0) -> float:
    """Bootstrap standard error of the mean of the finite ``values`` (resampling them)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) < 2:
        return float("nan")
    rng = np.random.default_rng(seed)
    means = np.concatenate([v[rng.integers(0, len(v), size=(min(256, n_boot - s), len(v)))].mean(axis=1)
                            for s in range(0, n_boot, 256)])
    return float(means.std(ddof=1))


def noise_ceiling(outputs: np.ndarray, target_replicas: int | None = None) -> dict:
    """How reproducible a ground truth is, from its seed replicas, and the LDS a perfect attribution can reach.

    ``outputs``: (R, M, Q) model outputs for R replicas, M subsets, Q queries; the target is the average of
    ``target_replicas`` replicas (default: all R). For each query q and each of the distinct splits of the
    replicas into two halves of h = ⌊R/2⌋ (:func:`replica_splits`), the Spearman correlation across subsets
    between the two half-averages is the reliability of an h-replica average; Spearman–Brown steps it up to
    the target's replicas, the reliabilities are averaged over the splits, and the query's ceiling is the
    square root (a perfect attribution correlates with a noisy target at most as the root of its reliability).

    - ``lds_ceiling`` (± ``lds_ceiling_se``, bootstrap over queries): the mean over queries of the per-query
      ceilings. Averaging per query *after* the square root matters: both maps are concave, so the root of
      the mean reliability (this function's estimate before issue 19, kept in the docs as ``ceiling_v1``)
      overstates the ceiling when queries differ in reliability.
    - ``reliability``: the mean over queries of the per-query reliability of the target.
    - ``pairwise_single_seed``: the mean over queries and replica pairs of the Spearman correlation between two
      1-seed ground truths (how much two single-seed benchmarks would agree).
    - ``split_half``: the mean over queries and splits of the half-average correlation.
    """
    outputs = np.asarray(outputs, dtype=np.float64)
    r, m, q = outputs.shape
    target = r if target_replicas is None else int(target_replicas)
    out: dict = {"replicas": int(r), "subsets": int(m), "queries": int(q), "target_replicas": target,
                 "estimator": "per-query Spearman-Brown reliability averaged over all splits, root, mean over queries"}
    if r < 2:
        out.update(pairwise_single_seed=None, split_half=None, reliability=None, lds_ceiling=None,
                   lds_ceiling_se=None, note="needs at least two seed replicas")
        return out
    if target < 1:
        raise ValueError(f"target_replicas must be >= 1, got {target}")
    pair_vals = np.stack([spearman_rows(outputs[i].T, outputs[j].T) for i, j in itertools.combinations(range(r), 2)])
    defined = np.isfinite(pair_vals).any(axis=0)  # a query whose output never varies (e.g. a float32 loss
    out["undefined_queries"] = int((~defined).sum())  # saturated at 0) has no rank correlation at all
    pairwise = np.full(q, np.nan)
    pairwise[defined] = np.nanmean(pair_vals[:, defined], axis=0)
    h = r // 2
    halves = np.stack([spearman_rows(outputs[list(a)].mean(0).T, outputs[list(b)].mean(0).T)
                       for a, b in replica_splits(r)])  # (splits, Q)
    reliability = np.full(q, np.nan)
    reliability[defined] = np.nanmean(spearman_brown(halves[:, defined], target / h), axis=0)
    ceiling = np.sqrt(np.clip(reliability, 0.0, None))
    pw, pw_se = mean_se(pairwise)
    sh, sh_se = mean_se(np.nanmean(halves[:, defined], axis=0) if defined.any() else np.full(q, np.nan))
    rel, _ = mean_se(reliability)
    c, _ = mean_se(ceiling)
    out.update(pairwise_single_seed=pw, pairwise_single_seed_se=pw_se, split_half=sh, split_half_se=sh_se,
               split_half_seeds=h, splits=len(halves), reliability=rel, lds_ceiling=c,
               lds_ceiling_se=bootstrap_se(ceiling))
    return out
