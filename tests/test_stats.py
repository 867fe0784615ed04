"""Rank statistics against scipy, and the noise ceiling against a brute-force loop and a simulation whose
answer is known."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import spearmanr

from benchmark.core.stats import bootstrap_se, mean_se, noise_ceiling, spearman_brown, spearman_rows


@pytest.mark.filterwarnings("ignore::scipy.stats.ConstantInputWarning")  # constant rows are part of the test
@settings(max_examples=50, deadline=None)
@given(st.integers(2, 6), st.integers(3, 30), st.integers(0, 10**6), st.booleans())
def test_spearman_rows_equals_scipy(rows, cols, seed, ties):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(rows, cols))
    b = rng.normal(size=(rows, cols))
    if ties:
        a, b = np.round(a), np.round(b * 0.5)
    got = spearman_rows(a, b)
    for i in range(rows):
        expect = spearmanr(a[i], b[i]).statistic
        if np.isnan(expect):
            assert np.isnan(got[i])
        else:
            assert got[i] == pytest.approx(expect, abs=1e-12)


def _ceiling_by_hand(outputs, target_replicas):
    """The estimator written out with scipy: per query, every split into two halves of ⌊R/2⌋ replicas, the
    Spearman correlation of the half-averages stepped up (Spearman-Brown) to the target's replicas, averaged over
    the splits; the root per query; the mean over queries."""
    r, _, q = outputs.shape
    h = r // 2
    splits = []
    for a in itertools.combinations(range(r), h):
        for b in itertools.combinations([i for i in range(r) if i not in a], h):
            if (b, a) not in splits:
                splits.append((a, b))
    k = target_replicas / h
    per_query = []
    for j in range(q):
        rels = []
        for a, b in splits:
            rho = spearmanr(outputs[list(a), :, j].mean(0), outputs[list(b), :, j].mean(0)).statistic
            rels.append(k * rho / (1 + (k - 1) * rho))
        per_query.append(np.mean(rels))
    return np.asarray(per_query), len(splits)


@pytest.mark.parametrize("replicas", [2, 3, 4])
@pytest.mark.parametrize("target", [None, 1])
def test_noise_ceiling_brute_force(replicas, target):
    rng = np.random.default_rng(0)
    signal = rng.normal(size=(1, 40, 7))
    outputs = signal + 0.8 * rng.normal(size=(replicas, 40, 7))
    nc = noise_ceiling(outputs, target)
    rel, n_splits = _ceiling_by_hand(outputs, replicas if target is None else target)
    assert nc["splits"] == n_splits == {2: 1, 3: 3, 4: 3}[replicas]
    assert (nc["replicas"], nc["subsets"], nc["queries"]) == (replicas, 40, 7)
    assert nc["target_replicas"] == (replicas if target is None else target) and nc["split_half_seeds"] == replicas // 2
    assert nc["reliability"] == pytest.approx(np.mean(rel))
    # the ceiling is the root of each query's own reliability, averaged: not the root of the mean reliability
    assert nc["lds_ceiling"] == pytest.approx(np.mean(np.sqrt(np.clip(rel, 0, None))))
    assert nc["lds_ceiling"] < np.sqrt(np.mean(rel))
    assert 0 < nc["lds_ceiling_se"] < 0.2
    pairs = [np.mean([spearmanr(outputs[i, :, q], outputs[j, :, q]).statistic for q in range(7)])
             for i in range(replicas) for j in range(i + 1, replicas)]
    assert nc["pairwise_single_seed"] == pytest.approx(np.mean(pairs))


def test_noise_ceiling_estimates_the_lds_of_the_true_datamodel():
    """A simulation whose answer is known: targets are a known additive datamodel plus seed noise whose size
    differs from query to query. The true datamodel's mean LDS against the R-seed average target is what a
    perfect attribution reaches; the estimator must land within its standard error of it. The estimator used
    before (root of the Spearman-Brown step-up of the mean split-half correlation) overstates it."""
    rng = np.random.default_rng(2026)
    n, m, q, r = 300, 100, 400, 4
    masks = np.zeros((m, n), dtype=bool)
    for j in range(m):
        masks[j, rng.choice(n, n // 2, replace=False)] = True
    weights = rng.normal(size=(q, n))
    signal = masks @ weights.T  # (M, Q): the true datamodel's prediction of every subset's output
    noise_sd = signal.std(axis=0) * rng.uniform(0.1, 3.0, size=q)  # signal-to-noise varies per query
    outputs = signal[None] + rng.normal(size=(r, m, q)) * noise_sd
    truth = spearman_rows(signal.T, outputs.mean(0).T).mean()
    nc = noise_ceiling(outputs)
    assert abs(nc["lds_ceiling"] - truth) <= nc["lds_ceiling_se"], (nc["lds_ceiling"], truth, nc["lds_ceiling_se"])
    half = spearman_rows(outputs[:2].mean(0).T, outputs[2:].mean(0).T).mean()
    old = np.sqrt(2 * half / (1 + half))
    assert old - truth > 3 * nc["lds_ceiling_se"]


def test_noise_ceiling_needs_two_replicas():
    assert noise_ceiling(np.zeros((1, 5, 3)))["lds_ceiling"] is None


def test_mean_se():
    m, se = mean_se(np.array([1.0, 2.0, 3.0, np.nan]))
    assert m == 2.0 and se == pytest.approx(1 / np.sqrt(3))
    m2, se2 = mean_se(np.array([1.0, 4.0]))  # two values: se = |a - b| / 2
    assert m2 == 2.5 and se2 == pytest.approx(1.5)
    assert np.isnan(mean_se(np.array([5.0]))[1]) and np.isnan(mean_se(np.array([np.nan]))[0])


def test_bootstrap_se_is_the_standard_error_of_the_mean():
    """Resampling the values estimates the se of their mean: σ/√n (ddof 0, as the bootstrap's plug-in), here
    within the ±5% a 1000-resample estimate carries; fixed by its seed; NaNs are left out."""
    v = np.random.default_rng(4).normal(size=300)
    se = bootstrap_se(v)
    assert se == pytest.approx(v.std() / np.sqrt(len(v)), rel=0.05)
    assert bootstrap_se(np.append(v, np.nan)) == se == bootstrap_se(v, n_boot=1000, seed=0)
    assert bootstrap_se(v, seed=1) != se
    assert np.isnan(bootstrap_se(np.array([1.0])))
    # more resamples, a sharper estimate: 4000 land within 2.5%
    assert bootstrap_se(v, n_boot=4000, seed=7) == pytest.approx(v.std() / np.sqrt(len(v)), rel=0.025)


def test_spearman_brown_steps_reliability_up_and_down():
    # doubling the replicas of a reliability-½ average gives 2·½/(1 + ½) = ⅔; halving ⅔ gives ½ back
    assert spearman_brown(0.5, 2) == pytest.approx(2 / 3)
    assert spearman_brown(2 / 3, 0.5) == pytest.approx(0.5)
    assert spearman_brown(0.3, 1) == pytest.approx(0.3)
