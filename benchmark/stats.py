"""Ground floor: vectorised rank statistics shared by the ground truth (noise ceiling) and the metrics."""

from __future__ import annotations

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


def noise_ceiling(outputs: np.ndarray) -> dict:
    """How reproducible a ground truth is, from its seed replicas.

    ``outputs``: (R, M, Q) model outputs for R replicas, M subsets, Q queries. For each query, the
    Spearman correlation across subsets between replicas measures how much of the subset-to-subset
    variation is signal rather than training noise.

    - ``pairwise_single_seed``: mean over queries of the mean over replica pairs (two 1-seed truths).
    - ``split_half``: the first ⌊R/2⌋ replicas averaged vs the next ⌊R/2⌋ averaged.
    - ``reliability_full``: Spearman-Brown step-up of ``split_half`` to all R replicas, kρ/(1+(k-1)ρ) with
      k = R/⌊R/2⌋ (2ρ/(1+ρ) for even R).
    - ``lds_ceiling``: sqrt(reliability_full), the LDS a perfect attribution is expected to reach
      against the R-seed average (correlation with a noisy target is bounded by the root of its
      reliability).
    """
    outputs = np.asarray(outputs, dtype=np.float64)
    r = outputs.shape[0]
    out: dict = {"replicas": int(r), "subsets": int(outputs.shape[1]), "queries": int(outputs.shape[2])}
    if r < 2:
        out.update(pairwise_single_seed=None, split_half=None, reliability_full=None, lds_ceiling=None,
                   note="needs at least two seed replicas")
        return out
    pair_vals = []
    for i in range(r):
        for j in range(i + 1, r):
            pair_vals.append(spearman_rows(outputs[i].T, outputs[j].T))
    stacked = np.stack(pair_vals)
    defined = np.isfinite(stacked).any(axis=0)  # a query whose output never varies (e.g. a float32 loss
    per_query = np.full(stacked.shape[1], np.nan)  # saturated at 0) has no rank correlation at all
    per_query[defined] = np.nanmean(stacked[:, defined], axis=0)
    out["undefined_queries"] = int((~defined).sum())
    pw, pw_se = mean_se(per_query)
    h = r // 2
    sh, sh_se = mean_se(spearman_rows(outputs[:h].mean(0).T, outputs[h:2 * h].mean(0).T))
    k = r / h  # all R replicas are k times as many as each half (k = 2 when R is even)
    rel = k * sh / (1 + (k - 1) * sh) if sh > -1 else float("nan")
    out.update(pairwise_single_seed=pw, pairwise_single_seed_se=pw_se, split_half=sh, split_half_se=sh_se,
               split_half_seeds=h, reliability_full=rel, lds_ceiling=float(np.sqrt(max(rel, 0.0))))
    return out
