"""Floor 4: the numbers the benchmark reports, each with its uncertainty.

- **LDS** (Park et al. 2023; the paper's §7.3). For query q and subsets S_1..S_M, the attribution predicts
  g_τ(q, S_j) = Σ_{i∈S_j} τ(q, i); LDS(q) is the Spearman correlation over j between g_τ(q, S_j) and the
  ground-truth output of models trained on S_j (averaged over seed replicas). Reported: the mean over
  queries, its standard error, a percentile bootstrap interval over queries, and the mean as a fraction
  of the ground truth's noise ceiling (the LDS a perfect attribution is expected to reach against a target
  that noisy; see ``core.stats.noise_ceiling``).
- **Mislabel detection** (§7.2). Rank training points by a score, largest first; recall at a fraction f is
  the share of the flipped points among the first round(f·N) ranked. ``auc`` is the **ROC AUC**,
  P(score of a flipped point > score of a clean point) with ties counted ½: 0.5 for a random order, 1.0
  for a perfect one, whatever the corruption rate. The area under the recall-vs-fraction-inspected curve
  (as in the paper's Fig. 3) is an affine function of it, p/2 + (1 − p)·AUC for a flipped share p, and is
  stored too as ``recall_curve_area``. Ties in the score are broken by a seeded random order, so a constant
  score behaves like the random baseline instead of favouring low indices.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import rankdata

from ..core.stats import mean_se, spearman_rows

FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5)
CURVE_FRACTIONS = tuple(round(0.01 * i, 2) for i in range(101))


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


# ---------------------------------------------------------------- summaries with uncertainty

def bootstrap_ci(values, level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over the finite ``values`` (resampling them)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for start in range(0, n_boot, 256):  # blocks keep memory at 256 x len(v)
        stop = min(n_boot, start + 256)
        means[start:stop] = v[rng.integers(0, len(v), size=(stop - start, len(v)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def summarize(values, level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean, standard error and bootstrap interval of per-item values; NaNs (undefined items) are counted
    and left out."""
    v = np.asarray(values, dtype=np.float64)
    mean, se = mean_se(v)
    lo, hi = bootstrap_ci(v, level, n_boot, seed)
    return {"mean": mean, "se": se, "ci_low": lo, "ci_high": hi, "ci_level": level,
            "n": int(np.isfinite(v).sum()), "n_undefined": int((~np.isfinite(v)).sum())}


# ---------------------------------------------------------------- LDS

def paired_difference(a, b) -> dict:
    """Mean ± standard error of the per-item differences ``a - b`` over the items defined in both (two solvers'
    per-query LDS on the same queries): the comparison whose error excludes the between-query spread both share."""
    a, b = (np.array([np.nan if v is None else v for v in x], dtype=np.float64) for x in (a, b))
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same items: {a.shape} vs {b.shape}")
    d = a - b
    mean, se = mean_se(d)
    finite = d[np.isfinite(d)]
    return {"difference": mean, "se": se, "n": int(len(finite)),
            "max_abs": float(np.abs(finite).max()) if len(finite) else float("nan"),
            "wins": float((finite > 0).mean()) if len(finite) else float("nan")}


def subset_predictions(scores, masks, chunk: int = 512) -> np.ndarray:
    """g_τ(q, S_j) = Σ_{i∈S_j} τ(q, i) for every subset j and query q: (M, Q) float64.

    ``scores``: (Q, N); ``masks``: (M, N) bool. Computed in query chunks so a float64 copy of all scores
    is never held at once.
    """
    m = np.asarray(masks)
    if m.dtype != bool:
        raise ValueError(f"masks must be boolean (M, N), got dtype {m.dtype}")
    q_total = scores.shape[0]
    if scores.ndim != 2 or scores.shape[1] != m.shape[1]:
        raise ValueError(f"scores {tuple(scores.shape)} do not match masks {m.shape}: need (Q, N) with the "
                         f"same N training points")
    mf = m.astype(np.float64)
    out = np.empty((m.shape[0], q_total))
    for start in range(0, q_total, chunk):
        block = _as_numpy(scores[start:start + chunk])
        if not np.isfinite(block).all():
            bad = int((~np.isfinite(block)).any(axis=1).sum())
            raise ValueError(f"{bad} queries have non-finite influence scores (NaN or inf); the solver diverged "
                             f"or its damping is too small")
        out[:, start:start + chunk] = mf @ block.T
    return out


def lds_per_query(scores, masks, target) -> np.ndarray:
    """(Q,) Spearman correlation over the M subsets between Σ_{i∈S_j} τ(q, i) and ``target[j, q]``.

    ``target``: (M, Q) ground-truth outputs (already averaged over seed replicas). A query whose target
    or prediction is constant over subsets gets NaN.
    """
    return lds_from_predictions(subset_predictions(scores, masks), target)


def lds_from_predictions(predictions, target) -> np.ndarray:
    """(Q,) Spearman correlation over the M subsets between the predicted ``predictions[j, q]`` =
    Σ_{i∈S_j} τ(q, i) and ``target[j, q]``; NaN where either is constant over subsets."""
    pred, target = _as_numpy(predictions), np.asarray(target, dtype=np.float64)
    if target.shape != pred.shape:
        raise ValueError(f"target {target.shape} does not match (subsets, queries) = {pred.shape}")
    if not np.isfinite(pred).all():
        bad = int((~np.isfinite(pred)).any(axis=0).sum())
        raise ValueError(f"{bad} queries have non-finite influence scores (NaN or inf); the solver diverged "
                         f"or its damping is too small")
    return spearman_rows(pred.T, target.T)


def lds(scores, masks, target, ceiling: float | None = None, seed: int = 0) -> dict:
    """LDS summary: mean over queries ± se, bootstrap interval, per-query values and, when the noise
    ceiling is known, the mean as a fraction of it."""
    return lds_summary(lds_per_query(scores, masks, target), ceiling, seed)


def lds_summary(per_query, ceiling: float | None = None, seed: int = 0) -> dict:
    """The summary of :func:`lds` from per-query LDS values."""
    per_query = np.asarray(per_query, dtype=np.float64)
    out = summarize(per_query, seed=seed)
    if out["n"] == 0:
        out["undefined"] = ("LDS is undefined on every query: the predicted subset sums (or the target) are constant "
                            "across subsets, e.g. constant scores")
    out["ceiling"] = ceiling
    if ceiling is not None and ceiling > 0:
        # The ceiling is itself an estimate; this se covers only the query sampling of the LDS.
        out["of_ceiling"] = out["mean"] / ceiling
        out["of_ceiling_se"] = out["se"] / ceiling
    else:
        out["of_ceiling"] = out["of_ceiling_se"] = None
    out["per_query"] = per_query
    return out


# ---------------------------------------------------------------- mislabel detection

def rank_descending(scores, seed: int = 0) -> np.ndarray:
    """Indices ordered by score, largest first; ties broken by a seeded random order."""
    s = _as_numpy(scores).ravel()
    if not np.isfinite(s).all():
        raise ValueError(f"{int((~np.isfinite(s)).sum())} scores are not finite; cannot rank")
    tiebreak = np.random.default_rng(seed).permutation(len(s))
    return np.lexsort((tiebreak, -s))


def _flipped_mask(flipped, n: int) -> np.ndarray:
    idx = np.asarray(flipped, dtype=np.int64).ravel()
    if len(idx) == 0:
        raise ValueError("no flipped indices: mislabel recall is undefined")
    if idx.min() < 0 or idx.max() >= n:
        raise ValueError(f"flipped indices must lie in [0, {n}), got range [{idx.min()}, {idx.max()}]")
    if len(np.unique(idx)) != len(idx):
        raise ValueError("flipped indices contain duplicates")
    mask = np.zeros(n, dtype=bool)
    mask[idx] = True
    return mask


def recall_at(scores, flipped, fractions=FRACTIONS, seed: int = 0) -> np.ndarray:
    """Share of the flipped points found among the first round(f·N) ranked, for each fraction f."""
    s = _as_numpy(scores).ravel()
    is_flipped = _flipped_mask(flipped, len(s))[rank_descending(s, seed)]
    found = np.concatenate([[0], np.cumsum(is_flipped)])
    ks = np.array([int(round(f * len(s))) for f in fractions])
    return found[ks] / is_flipped.sum()


def roc_auc(scores, flipped) -> float:
    """P(score of a flipped point > score of a clean point) + ½ P(tie): the Mann-Whitney U over n₁n₀."""
    s = _as_numpy(scores).ravel()
    pos = _flipped_mask(flipped, len(s))
    n1, n0 = int(pos.sum()), int((~pos).sum())
    if n0 == 0:
        raise ValueError("every point is flipped: AUC is undefined")
    ranks = rankdata(s)  # average ranks count ties as one half
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def auc_se(auc: float, n_pos: int, n_neg: int) -> float:
    """Standard error of a ROC AUC (Hanley & McNeil 1982)."""
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc ** 2) + (n_neg - 1) * (q2 - auc ** 2)) / (n_pos * n_neg)
    return float(np.sqrt(max(var, 0.0)))


def recall_se(recall: float, n_flipped: int) -> float:
    """Binomial standard error of a recall over ``n_flipped`` points (sampling of which points are flipped;
    it does not include retraining noise)."""
    return float(np.sqrt(max(recall * (1 - recall), 0.0) / n_flipped))


def mislabel(scores, flipped, seed: int = 0) -> dict:
    """Recall at 10..50% inspected (± binomial se), ROC AUC (± Hanley-McNeil se) and the recall curve."""
    s = _as_numpy(scores).ravel()
    n, n_flipped = len(s), len(np.asarray(flipped).ravel())
    rec = recall_at(s, flipped, FRACTIONS, seed)
    curve = recall_at(s, flipped, CURVE_FRACTIONS, seed)
    auc = roc_auc(s, flipped)
    out = {"n": n, "n_flipped": n_flipped}
    for f, r in zip(FRACTIONS, rec):
        key = f"recall_{round(100 * f)}"
        out[key] = float(r)
        out[f"{key}_se"] = recall_se(float(r), n_flipped)
    out["auc"] = auc
    out["auc_se"] = auc_se(auc, n_flipped, n - n_flipped)
    out["recall_curve"] = {"fractions": list(CURVE_FRACTIONS), "recall": [float(r) for r in curve]}
    out["recall_curve_area"] = float(np.trapezoid(curve, CURVE_FRACTIONS)) if hasattr(np, "trapezoid") \
        else float(np.trapz(curve, CURVE_FRACTIONS))
    return out


def random_baseline(n: int, n_flipped: int) -> dict:
    """The *expected* performance of a uniformly random inspection order (exact, no sampling noise):
    recall at f is round(f·N)/N, AUC ½."""
    if not 0 < n_flipped < n:
        raise ValueError(f"need 0 < n_flipped < n, got {n_flipped} of {n}")
    out = {"n": n, "n_flipped": n_flipped}
    for f in FRACTIONS:
        out[f"recall_{round(100 * f)}"] = round(f * n) / n
        out[f"recall_{round(100 * f)}_se"] = 0.0
    out["auc"], out["auc_se"] = 0.5, 0.0
    curve = [round(f * n) / n for f in CURVE_FRACTIONS]
    out["recall_curve"] = {"fractions": list(CURVE_FRACTIONS), "recall": curve}
    out["recall_curve_area"] = 0.5
    return out
