"""Rank statistics against scipy, and the noise ceiling against a brute-force loop."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import spearmanr

from benchmark.stats import mean_se, noise_ceiling, spearman_rows


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


def test_noise_ceiling_brute_force():
    rng = np.random.default_rng(0)
    signal = rng.normal(size=(1, 40, 7))
    outputs = signal + 0.8 * rng.normal(size=(4, 40, 7))
    nc = noise_ceiling(outputs)
    pairs = [np.mean([spearmanr(outputs[i, :, q], outputs[j, :, q]).statistic for q in range(7)])
             for i in range(4) for j in range(i + 1, 4)]
    per_query = [np.mean([spearmanr(outputs[i, :, q], outputs[j, :, q]).statistic
                          for i in range(4) for j in range(i + 1, 4)]) for q in range(7)]
    assert nc["pairwise_single_seed"] == pytest.approx(np.mean(pairs))
    assert nc["pairwise_single_seed_se"] == pytest.approx(np.std(per_query, ddof=1) / np.sqrt(7))
    half = np.mean([spearmanr(outputs[:2, :, q].mean(0), outputs[2:, :, q].mean(0)).statistic for q in range(7)])
    assert nc["split_half"] == pytest.approx(half)
    assert nc["reliability_full"] == pytest.approx(2 * half / (1 + half))
    # More seeds average out noise: the 2-seed halves agree better than single seeds.
    assert nc["split_half"] > nc["pairwise_single_seed"]
    # three replicas: halves of one seed each, stepped up to three seeds (not two)
    nc3 = noise_ceiling(outputs[:3])
    one = np.mean([spearmanr(outputs[0, :, q], outputs[1, :, q]).statistic for q in range(7)])
    assert nc3["split_half"] == pytest.approx(one)
    assert nc3["reliability_full"] == pytest.approx(3 * one / (1 + 2 * one))


def test_noise_ceiling_needs_two_replicas():
    assert noise_ceiling(np.zeros((1, 5, 3)))["lds_ceiling"] is None


def test_mean_se():
    m, se = mean_se(np.array([1.0, 2.0, 3.0, np.nan]))
    assert m == 2.0 and se == pytest.approx(1 / np.sqrt(3))
