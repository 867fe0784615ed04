"""Floor 1: vectorised rank statistics shared by the ground truth (noise ceiling) and the metrics."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import norm, rankdata


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


# Beyond this many distinct splits (R = 8 has 35; R = 32 has 3 × 10⁸) a fixed seeded sample of them is averaged: the
# reliability's average over splits converges long before, and enumerating them all would not end.
MAX_SPLITS = 64


def replica_splits(replicas: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Every distinct way to pick two disjoint halves of ⌊R/2⌋ replicas each (the order of the halves does
    not count): 3 splits of 4 replicas, 1 of 2, 3 of 3 (one replica left out each time); where there are more
    than :data:`MAX_SPLITS`, that many distinct ones drawn with a fixed seed."""
    h = replicas // 2
    if math.comb(replicas, h) * math.comb(replicas - h, h) // 2 > MAX_SPLITS:
        rng = np.random.default_rng(replicas)
        seen, out = set(), []
        while len(out) < MAX_SPLITS:
            perm = rng.permutation(replicas)
            a, b = tuple(sorted(perm[:h].tolist())), tuple(sorted(perm[h:2 * h].tolist()))
            key = frozenset((a, b))
            if key not in seen:
                seen.add(key)
                out.append((a, b))
        return out
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


# -- the noise ceiling's bias, and its correction (issue 35) --------------------------------------------------------
#
# noise_ceiling is kept exactly as it is (ground-truth manifests record it, and their hashes are pinned); its bias is
# measured beside it by simulating ground truths whose answer is known, calibrated to the one at hand.


@dataclass(frozen=True)
class CeilingSimulation:
    """Settings of :func:`ceiling_bias`'s simulation.

    ``repeats`` simulated ground truths (each with every calibrated query) give the bias and its standard error;
    ``calibration_steps`` rounds of quantile matching, each on ``calibration_draws`` simulated observations per query,
    deconvolve the per-query reliabilities; ``level`` is the corrected ceiling's interval coverage."""

    repeats: int = 24
    calibration_steps: int = 12
    calibration_draws: int = 4
    seed: int = 0
    level: float = 0.95

    def __post_init__(self):
        if self.repeats < 2 or self.calibration_draws < 1 or self.calibration_steps < 0:
            raise ValueError(f"CeilingSimulation needs repeats >= 2, calibration_draws >= 1 and calibration_steps >= 0,"
                             f" got {self}")
        if not 0 < self.level < 1:
            raise ValueError(f"CeilingSimulation.level must lie in (0, 1), got {self.level}")


# A single-seed reliability stays inside (0, 1) so that the noise's size sqrt((1 - ρ)/ρ) is finite.
_RELIABILITY_RANGE = (1e-4, 1 - 1e-4)


def pairwise_agreement(outputs: np.ndarray) -> np.ndarray:
    """(Q,) per query, the mean over replica pairs of the Spearman correlation across subsets between two single
    replicas (how much two 1-seed ground truths agree; NaN where a query never varies). Each replica is ranked once:
    this equals averaging :func:`spearman_rows` over the pairs."""
    outputs = np.asarray(outputs, dtype=np.float64)
    r = outputs.shape[0]
    if outputs.ndim != 3 or r < 2:
        raise ValueError(f"need (R >= 2, M, Q) outputs, got shape {outputs.shape}")
    ranks = rankdata(outputs, axis=1)
    ranks -= ranks.mean(axis=1, keepdims=True)
    length = np.sqrt((ranks * ranks).sum(axis=1))  # (R, Q)
    vals = []
    for i, j in itertools.combinations(range(r), 2):
        denom = length[i] * length[j]
        with np.errstate(invalid="ignore", divide="ignore"):
            vals.append(np.where(denom > 0, (ranks[i] * ranks[j]).sum(axis=0) / np.where(denom > 0, denom, 1.0),
                                 np.nan))
    return np.mean(vals, axis=0)


def _spearman_of_gaussian(pearson):
    """Spearman's correlation of a bivariate normal pair with Pearson correlation ``pearson`` (6/π·asin(ρ/2))."""
    return 6 / np.pi * np.arcsin(np.asarray(pearson) / 2)


def _pearson_of_gaussian(spearman):
    return 2 * np.sin(np.pi * np.asarray(spearman) / 6)


def simulate_ground_truth(reliability: np.ndarray, replicas: int, subsets: int, rng: np.random.Generator,
                          extra_replicas: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A ground truth whose answer is known: per query q a true datamodel signal s_q ~ N(0, 1) over the subsets, and
    ``replicas`` (+ ``extra_replicas``) seed replicas s_q + σ_q·ε with σ_q² = (1 − ρ_q)/ρ_q, so that one replica's
    Pearson correlation with another is ``reliability[q]``. Returns the signal (M, Q) and the outputs (R, M, Q)."""
    rho = np.clip(np.asarray(reliability, dtype=np.float64), *_RELIABILITY_RANGE)
    signal = rng.standard_normal((subsets, len(rho)))
    sigma = np.sqrt((1 - rho) / rho)
    return signal, signal[None] + rng.standard_normal((replicas + extra_replicas, subsets, len(rho))) * sigma


def calibrate_reliability(observed: np.ndarray, replicas: int, subsets: int, sim: CeilingSimulation,
                          steps: int | None = None) -> dict:
    """Per-query single-seed reliabilities whose simulated pairwise agreement is distributed like ``observed``.

    The observed per-query agreements are noisy (about ±0.05 at 100 subsets), so their spread is wider than the
    spread of the true reliabilities; taking them at face value would put too many queries near 0 and near the
    top. The deconvolution iterates to consistency: start from the observed values (mapped from Spearman to
    Pearson as for a normal pair), simulate each query's agreement ``calibration_draws`` times with fixed random
    numbers, and move the k-th smallest reliability (on the Spearman scale) by the gap between the k-th observed
    quantile and the same quantile of the simulated agreements; the fixed point reproduces the observed
    distribution. ``steps=0`` is the plug-in calibration, without deconvolution."""
    obs = np.asarray(observed, dtype=np.float64)
    obs = obs[np.isfinite(obs)]
    q = len(obs)
    if q < 2:
        raise ValueError(f"calibrating the ceiling's simulation needs at least 2 queries with a defined agreement, "
                         f"got {q}")
    steps = sim.calibration_steps if steps is None else steps
    d = sim.calibration_draws
    rng = np.random.default_rng([sim.seed, 1])
    signal = rng.standard_normal((subsets, q * d))
    noise = rng.standard_normal((replicas, subsets, q * d))  # common random numbers: every step sees the same draws
    probs = (np.arange(q) + 0.5) / q
    target_quantiles = np.sort(obs)
    rho = np.clip(_pearson_of_gaussian(obs), *_RELIABILITY_RANGE)

    def simulated(rho):
        sigma = np.repeat(np.sqrt((1 - rho) / rho), d)
        return pairwise_agreement(signal[None] + noise * sigma)

    history = []
    for _ in range(steps + 1):
        agreement = simulated(rho)
        gap = target_quantiles - np.quantile(agreement, probs)
        history.append(float(np.abs(gap).mean()))
        if len(history) == steps + 1:
            break
        order = np.argsort(rho, kind="stable")
        on_scale = _spearman_of_gaussian(rho[order]) + gap
        rho[order] = np.clip(_pearson_of_gaussian(np.clip(on_scale, -1, 1)), *_RELIABILITY_RANGE)
    return {"reliability": rho, "simulated_agreement": agreement, "mean_abs_quantile_gap": history}


def _bias_repeats(reliability: np.ndarray, replicas: int, subsets: int, target: int, sim: CeilingSimulation,
                  stream: int) -> np.ndarray:
    """(repeats, 2): the estimator's ceiling and the true datamodel's LDS in each simulated ground truth."""
    rng = np.random.default_rng([sim.seed, stream])
    rows = []
    for _ in range(sim.repeats):
        signal, outputs = simulate_ground_truth(reliability, replicas, subsets, rng, max(0, target - replicas))
        estimate = noise_ceiling(outputs[:replicas], target)["lds_ceiling"]
        # the target averages the replicas the ceiling is estimated from, as in an evaluation
        truth = np.nanmean(spearman_rows(signal.T, outputs[:target].mean(0).T))
        rows.append((estimate, truth))
    return np.asarray(rows)


def ceiling_bias(outputs: np.ndarray, target_replicas: int | None = None,
                 sim: CeilingSimulation = CeilingSimulation()) -> dict:
    """The bias of :func:`noise_ceiling` on this ground truth, and the ceiling corrected for it.

    ``noise_ceiling`` averages over queries the root of a Spearman–Brown step-up of a noisy split-half correlation:
    both maps are concave, so noise in each query's correlation (about ±0.05 at 100 subsets) pulls the estimate
    below the LDS the true datamodel reaches. The bias is measured on simulated ground truths whose answer is known
    (:func:`simulate_ground_truth`), with this one's replicas and subsets and its per-query reliabilities
    deconvolved from the observed single-seed agreements (:func:`calibrate_reliability`):

        bias = E[estimate − LDS of the true datamodel against the target]   (± its se over ``sim.repeats``)
        corrected ceiling = ceiling − bias,  se = √(ceiling_se² + bias_se²)

    where ceiling_se is the estimator's bootstrap se over queries. The simulation assumes normal signal and seed
    noise per query (Spearman correlations are rank-based, so only the shape of their joint ranks matters).
    ``bias_plugin`` is the bias under the plug-in calibration (observed agreements at face value): the difference
    says how much the deconvolution matters. Deterministic for a fixed ``sim.seed``."""
    outputs = np.asarray(outputs, dtype=np.float64)
    if outputs.ndim != 3 or outputs.shape[0] < 2:
        raise ValueError(f"ceiling_bias needs (R >= 2, M, Q) outputs, got shape {outputs.shape}")
    r, m, _ = outputs.shape
    target = r if target_replicas is None else int(target_replicas)
    ceiling = noise_ceiling(outputs, target)
    observed = pairwise_agreement(outputs)
    cal = calibrate_reliability(observed, r, m, sim)
    plugin = calibrate_reliability(observed, r, m, sim, steps=0)
    rows = _bias_repeats(cal["reliability"], r, m, target, sim, stream=2)
    diff = rows[:, 0] - rows[:, 1]
    bias, bias_se = float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(len(diff)))
    plugin_rows = _bias_repeats(plugin["reliability"], r, m, target, sim, stream=3)
    c, c_se = ceiling["lds_ceiling"], ceiling["lds_ceiling_se"]
    corrected = c - bias
    se = float(np.hypot(c_se, bias_se))
    z = float(norm.ppf(0.5 + sim.level / 2))
    defined = observed[np.isfinite(observed)]
    return {
        "lds_ceiling": c, "lds_ceiling_se": c_se,
        "bias": bias, "bias_se": bias_se,
        "corrected": corrected, "corrected_se": se,
        "interval": [corrected - z * se, corrected + z * se], "level": sim.level,
        "bias_plugin": float((plugin_rows[:, 0] - plugin_rows[:, 1]).mean()),
        "simulated_truth": float(rows[:, 1].mean()), "simulated_estimate": float(rows[:, 0].mean()),
        "calibration": {
            "observed_agreement": _summary(defined),
            "simulated_agreement": _summary(cal["simulated_agreement"]),
            "single_seed_reliability": _summary(cal["reliability"]),
            "mean_abs_quantile_gap": [round(g, 6) for g in cal["mean_abs_quantile_gap"]],
        },
        "simulation": {"replicas": r, "subsets": m, "queries": int(len(defined)), "target_replicas": target,
                       "repeats": sim.repeats, "calibration_steps": sim.calibration_steps,
                       "calibration_draws": sim.calibration_draws, "seed": sim.seed,
                       "model": "per query: normal signal over subsets plus normal seed noise, its size from the "
                                "deconvolved single-seed reliability"},
    }


def _summary(values: np.ndarray) -> dict:
    v = np.asarray(values, dtype=np.float64)
    qs = np.quantile(v, [0.05, 0.25, 0.5, 0.75, 0.95])
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)),
            "quantiles": {str(p): float(x) for p, x in zip((5, 25, 50, 75, 95), qs)}}
