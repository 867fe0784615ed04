"""Metrics against independent references: scipy, brute-force loops, hand-built rankings."""

import mmap
import time
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import mannwhitneyu, spearmanr

from benchmark.evaluate import metrics
from benchmark.evaluate.cost import Cost


def brute_force_lds(scores, masks, target):
    """The paper's definition, literally: one Spearman per query over the M subsets."""
    out = []
    for q in range(scores.shape[0]):
        g = [sum(scores[q, i] for i in range(masks.shape[1]) if masks[j, i]) for j in range(masks.shape[0])]
        out.append(spearmanr(g, target[:, q]).statistic)
    return np.array(out)


@pytest.fixture
def lds_problem():
    rng = np.random.default_rng(3)
    m, n, q = 15, 40, 6
    masks = rng.random((m, n)) < 0.5
    scores = rng.normal(size=(q, n))
    target = masks.astype(float) @ scores.T + rng.normal(scale=2.0, size=(m, q))
    target[:, 0] = np.round(target[:, 0])  # ties in the target
    return scores, masks, target


def test_lds_matches_scipy_brute_force(lds_problem):
    scores, masks, target = lds_problem
    np.testing.assert_allclose(metrics.lds_per_query(scores, masks, target), brute_force_lds(scores, masks, target),
                               atol=1e-12)
    # torch input and chunked accumulation give the same numbers
    chunked = metrics.subset_predictions(torch.from_numpy(scores), masks, chunk=4)
    np.testing.assert_allclose(chunked, masks.astype(float) @ scores.T, atol=1e-12)


def test_lds_is_one_for_a_linear_datamodel_and_minus_one_reversed(lds_problem):
    scores, masks, _ = lds_problem
    exact = masks.astype(float) @ scores.T
    assert np.allclose(metrics.lds_per_query(scores, masks, exact), 1.0)
    assert np.allclose(metrics.lds_per_query(-scores, masks, exact), -1.0)
    # a monotone transform of the target does not change a rank correlation
    assert np.allclose(metrics.lds_per_query(scores, masks, np.exp(exact / 10)), 1.0)


def test_lds_summary_mean_se_bootstrap_and_ceiling(lds_problem):
    scores, masks, target = lds_problem
    per_query = brute_force_lds(scores, masks, target)
    res = metrics.lds(scores, masks, target, ceiling=0.8)
    assert res["mean"] == pytest.approx(per_query.mean())
    assert res["se"] == pytest.approx(per_query.std(ddof=1) / np.sqrt(len(per_query)))
    assert res["ci_low"] <= res["mean"] <= res["ci_high"]
    assert res["of_ceiling"] == pytest.approx(res["mean"] / 0.8)
    assert res["n"] == len(per_query) and res["n_undefined"] == 0


def test_bootstrap_interval_agrees_with_normal_theory():
    v = np.random.default_rng(0).normal(0.3, 1.0, size=2000)
    lo, hi = metrics.bootstrap_ci(v, n_boot=4000)
    se = v.std(ddof=1) / np.sqrt(len(v))
    assert lo == pytest.approx(v.mean() - 1.96 * se, abs=0.25 * se)
    assert hi == pytest.approx(v.mean() + 1.96 * se, abs=0.25 * se)
    # the documented defaults: 2000 resamples, seed 0
    assert metrics.bootstrap_ci(v) == metrics.bootstrap_ci(v, 0.95, 2000, 0)


def test_bootstrap_interval_edge_cases():
    # two values already resample (their mean takes three values); one does not
    assert np.isfinite(metrics.bootstrap_ci([1.0, 2.0])).all() and np.isnan(metrics.bootstrap_ci([1.0])).all()
    # constant values: every resampled mean is that constant, so the interval is degenerate at any level
    assert metrics.bootstrap_ci(np.full(30, 3.14159), level=0.9999) == pytest.approx((3.14159, 3.14159), abs=1e-12)
    # every value can be drawn, the first one too: one outlier among 20 moves the upper end
    assert metrics.bootstrap_ci([1000.0] + [0.0] * 19)[1] > 0


def test_intervals_are_one_fixed_resampling():
    """A record's interval is a function of its per-query values alone: 2000 resamples with seed 0 in every
    summary (summarize, lds_summary, lds), so recomputing a record reproduces it to the last digit."""
    v = np.random.default_rng(3).normal(0.2, 1.0, size=40)
    want = metrics.bootstrap_ci(v, 0.95, 2000, 0)
    assert want != metrics.bootstrap_ci(v, 0.95, 2000, 1) and want != metrics.bootstrap_ci(v, 0.95, 2001, 0)
    out = metrics.summarize(v)
    assert (out["ci_low"], out["ci_high"]) == want and out["ci_level"] == 0.95
    summary = metrics.lds_summary(v)
    assert (summary["ci_low"], summary["ci_high"]) == want and "undefined" not in summary
    # a given seed reaches the resampling through every layer
    seeded = metrics.bootstrap_ci(v, 0.95, 2000, 3)
    assert (metrics.summarize(v, seed=3)["ci_low"], metrics.summarize(v, seed=3)["ci_high"]) == seeded
    assert (metrics.lds_summary(v, seed=3)["ci_low"], metrics.lds_summary(v, seed=3)["ci_high"]) == seeded


def test_lds_interval_and_ceiling_fields(lds_problem):
    scores, masks, target = lds_problem
    per_query = metrics.lds_per_query(scores, masks, target)
    for seed in (0, 3):
        res = metrics.lds(scores, masks, target, ceiling=0.8, **({"seed": seed} if seed else {}))
        assert (res["ci_low"], res["ci_high"]) == metrics.bootstrap_ci(per_query, 0.95, 2000, seed)
    assert res["ceiling"] == 0.8 and np.array_equal(res["per_query"], per_query)
    assert res["of_ceiling"] == pytest.approx(res["mean"] / 0.8) and res["of_ceiling_se"] == pytest.approx(res["se"] / 0.8)
    for ceiling in (None, 0.0):  # unknown, or no reproducible signal at all: no fraction of it
        res = metrics.lds_summary(per_query, ceiling)
        assert res["ceiling"] == ceiling and res["of_ceiling"] is None and res["of_ceiling_se"] is None


def test_lds_of_constant_scores_is_undefined_and_says_why():
    masks = np.array([[1, 0], [0, 1], [1, 0]], dtype=bool)  # equal-sized subsets: constant scores predict a constant
    target = np.array([[0.0, 1.0], [0.0, 2.0], [1.0, 3.0]])
    res = metrics.lds(np.ones((2, 2)), masks, target)
    assert res["n"] == 0 and res["n_undefined"] == 2 and "constant" in res["undefined"]
    one = metrics.lds(np.array([[1.0, 2.0], [1.0, 1.0]]), masks, target)  # one defined query is not undefined
    assert one["n"] == 1 and "undefined" not in one


def test_undefined_queries_are_counted_not_averaged():
    masks = np.array([[1, 0], [0, 1], [1, 1]], dtype=bool)
    scores = np.array([[1.0, 2.0], [1.0, 2.0]])
    target = np.array([[0.0, 1.0], [0.0, 2.0], [0.0, 3.0]])  # query 0: constant target
    res = metrics.lds(scores, masks, target)
    assert res["n_undefined"] == 1 and res["n"] == 1
    assert res["mean"] == pytest.approx(1.0)


def test_subset_predictions_in_query_chunks(lds_problem):
    """Σ_{i∈S_j} τ(q, i) for every subset and query, whatever the query chunk (6 queries in chunks of 2, 4)."""
    scores, masks, _ = lds_problem
    scores = np.concatenate([scores, scores[:1] + 1.0])  # 7 queries: the last chunk is a partial one
    want = np.array([[scores[q, masks[j]].sum() for q in range(len(scores))] for j in range(len(masks))])
    for chunk in (2, 4, 512):
        np.testing.assert_allclose(metrics.subset_predictions(scores, masks, chunk=chunk), want, rtol=1e-12)


def test_lds_rejects_bad_input(lds_problem):
    scores, masks, target = lds_problem
    bad = scores.copy()
    bad[2, 5] = np.nan
    bad[4, :2] = np.inf
    with pytest.raises(ValueError, match="^2 queries have non-finite"):
        metrics.lds_per_query(bad, masks, target)
    with pytest.raises(ValueError, match="do not match"):
        metrics.lds_per_query(scores[:, :-1], masks, target)
    with pytest.raises(ValueError, match="boolean"):
        metrics.lds_per_query(scores, masks.astype(int), target)


# ---------------------------------------------------------------- mislabel detection

def test_recall_on_a_hand_built_ranking():
    # 10 points, flipped {2, 7}; ranking by score: 7, 0, 2, 1, ... -> top1 finds 1 of 2, top3 finds both
    scores = np.array([9.0, 1.0, 8.0, 0.5, 0.4, 0.3, 0.2, 10.0, 0.1, 0.0])
    rec = metrics.recall_at(scores, [2, 7], fractions=(0.1, 0.2, 0.3, 0.5, 1.0))
    np.testing.assert_allclose(rec, [0.5, 0.5, 1.0, 1.0, 1.0])
    out = metrics.mislabel(scores, [2, 7])
    assert out["recall_10"] == 0.5 and out["recall_30"] == 1.0
    # AUC: 7 beats all 8 clean points, 2 beats 7 of 8 (not point 0) -> 15/16
    assert out["auc"] == pytest.approx(15 / 16)


def test_recall_perfect_and_worst():
    n, flipped = 100, np.arange(90, 100)
    perfect = np.zeros(n)
    perfect[flipped] = 1.0
    out = metrics.mislabel(perfect, flipped)
    assert out["recall_10"] == 1.0 and out["auc"] == 1.0
    worst = metrics.mislabel(-perfect, flipped)
    assert worst["recall_50"] == 0.0 and worst["auc"] == 0.0


def test_ties_are_broken_randomly_not_by_index():
    # Flipped points are the first indices: a stable sort of a constant score would "find" them all.
    n, flipped = 1000, np.arange(100)
    rec = metrics.recall_at(np.zeros(n), flipped, fractions=(0.1, 0.5))
    assert 0.02 < rec[0] < 0.2 and 0.35 < rec[1] < 0.65
    assert metrics.roc_auc(np.zeros(n), flipped) == 0.5


def test_auc_matches_scipy_mann_whitney_with_ties():
    rng = np.random.default_rng(1)
    scores = np.round(rng.normal(size=300), 1)  # many ties
    flipped = rng.choice(300, 30, replace=False)
    pos = np.zeros(300, bool)
    pos[flipped] = True
    u = mannwhitneyu(scores[pos], scores[~pos]).statistic
    assert metrics.roc_auc(scores, flipped) == pytest.approx(u / (30 * 270))


def test_recall_curve_area_is_affine_in_auc():
    # With one curve point per training point, the area under recall-vs-fraction is exactly p/2 + (1-p)·AUC.
    rng = np.random.default_rng(2)
    scores = rng.normal(size=100)
    flipped = rng.choice(100, 10, replace=False)
    scores[flipped] += 1.0
    out = metrics.mislabel(scores, flipped)
    p = 10 / 100
    assert out["recall_curve_area"] == pytest.approx(p / 2 + (1 - p) * out["auc"])


def test_random_baseline_is_the_expectation_of_random_orders():
    n, n_flipped = 200, 20
    base = metrics.random_baseline(n, n_flipped)
    rng = np.random.default_rng(0)
    flipped = np.arange(n_flipped)
    sims = np.array([metrics.recall_at(rng.random(n), flipped) for _ in range(3000)])
    np.testing.assert_allclose(sims.mean(0), [base[f"recall_{p}"] for p in (10, 20, 30, 40, 50)], atol=0.01)
    assert base["auc"] == 0.5
    # every field, written out: exact expectations have no sampling error (se 0), the curve is the diagonal
    n = 30  # round(f·N)/N differs from f here (f·N is not whole at 1%, 2%, …)
    want = {"n": n, "n_flipped": 3, "auc": 0.5, "auc_se": 0.0, "recall_curve_area": 0.5,
            "recall_curve": {"fractions": [i / 100 for i in range(101)], "recall": [round(i * n / 100) / n
                                                                                    for i in range(101)]}}
    for p in (10, 20, 30, 40, 50):
        want[f"recall_{p}"], want[f"recall_{p}_se"] = round(p * n / 100) / n, 0.0
    assert metrics.random_baseline(n, 3) == want
    assert metrics.random_baseline(n, 1)["n_flipped"] == 1  # one flipped point is a valid problem
    for bad in (0, n):
        with pytest.raises(ValueError, match="need 0 < n_flipped < n"):
            metrics.random_baseline(n, bad)


def test_auc_se_matches_simulation_under_the_null():
    n1, n0 = 20, 180
    rng = np.random.default_rng(0)
    flipped = np.arange(n1)
    aucs = [metrics.roc_auc(rng.random(n1 + n0), flipped) for _ in range(3000)]
    assert metrics.auc_se(0.5, n1, n0) == pytest.approx(np.std(aucs), rel=0.1)
    assert metrics.recall_se(0.5, 100) == pytest.approx(0.05)


def test_mislabel_section_field_by_field():
    """Every number of the mislabel section against an independent computation: recall by walking the ranking,
    its binomial se, AUC by counting pairs, the Hanley-McNeil se with the flipped points as the positives, the
    recall curve at every percent and its trapezoid area."""
    rng = np.random.default_rng(5)
    n, k = 60, 12
    scores = np.round(rng.normal(size=n), 1)  # ties: the seeded tie-break matters
    flipped = rng.choice(n, k, replace=False)
    scores[flipped] += 0.8
    out = metrics.mislabel(scores, flipped)
    assert out["n"] == n and out["n_flipped"] == k
    recalls = {}
    for seed in (0, 1):  # the tie-break seed reaches every recall
        found = np.concatenate([[0], np.cumsum(np.isin(metrics.rank_descending(scores, seed), flipped))])
        got = metrics.mislabel(scores, flipped, seed=seed)
        recalls[seed] = [got[f"recall_{pct}"] for pct in (10, 20, 30, 40, 50)]
        for pct in (10, 20, 30, 40, 50):
            r = found[pct * n // 100] / k
            assert got[f"recall_{pct}"] == pytest.approx(r)
            assert got[f"recall_{pct}_se"] == pytest.approx(np.sqrt(r * (1 - r) / k))
    assert recalls[0] != recalls[1]
    found = np.concatenate([[0], np.cumsum(np.isin(metrics.rank_descending(scores, 0), flipped))])
    pos, neg = scores[flipped], np.delete(scores, flipped)
    auc = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (k * (n - k))
    assert out["auc"] == pytest.approx(auc)
    q1, q2 = auc / (2 - auc), 2 * auc ** 2 / (1 + auc)
    se = np.sqrt((auc * (1 - auc) + (k - 1) * (q1 - auc ** 2) + (n - k - 1) * (q2 - auc ** 2)) / (k * (n - k)))
    assert out["auc_se"] == pytest.approx(se)
    curve = [found[round(i * n / 100)] / k for i in range(101)]
    assert out["recall_curve"]["fractions"] == pytest.approx([i / 100 for i in range(101)])
    assert out["recall_curve"]["recall"] == pytest.approx(curve)
    assert out["recall_curve_area"] == pytest.approx(sum(curve[i] + curve[i + 1] for i in range(100)) * 0.005)
    # the default tie-break seed is 0, so a record made without one reproduces; here the seed changes the curve
    assert out == metrics.mislabel(scores, flipped, seed=0)
    assert metrics.mislabel(scores, flipped, seed=1)["recall_curve"] != out["recall_curve"]


def test_mislabel_rejects_bad_indices():
    with pytest.raises(ValueError, match="duplicates"):
        metrics.mislabel(np.zeros(10), [1, 1])
    with pytest.raises(ValueError, match="lie in"):
        metrics.mislabel(np.zeros(10), [10])
    with pytest.raises(ValueError, match="not finite"):
        metrics.mislabel(np.array([np.nan] + [0.0] * 9), [1])


# ---------------------------------------------------------------- cost

def test_cost_measures_time_and_peak_memory():
    import gc

    gc.collect()  # garbage of earlier tests freed inside the stage would lower the resident set under the peak
    gc.disable()
    try:
        cost = Cost("cpu")
        with cost.stage("alloc"):
            # 100 MiB of fresh anonymous pages, touched: malloc could hand back memory earlier tests freed but the
            # allocator kept resident, which would not raise the resident set at all
            with mmap.mmap(-1, 100 * 2**20) as block:
                np.frombuffer(block, dtype=np.uint8)[:] = 1
            time.sleep(0.05)
    finally:
        gc.enable()
    rec = cost.stages["alloc"]
    assert rec["seconds"] >= 0.05
    if rec["start_mb"] is not None:  # Linux: resident-set accounting
        assert rec["peak_mb"] - rec["start_mb"] >= 90
    with pytest.raises(RuntimeError, match="nest"):
        with cost.stage("outer"):
            with cost.stage("inner"):
                pass
    assert cost.seconds("missing") is None
    assert cost.seconds("alloc") == pytest.approx(rec["seconds"])


def test_paired_difference_over_the_queries_both_define():
    rng = np.random.default_rng(5)
    a, b = rng.normal(0.3, 0.2, 50), rng.normal(0.2, 0.2, 50)
    a[3], b[7] = np.nan, np.nan
    both = np.isfinite(a) & np.isfinite(b)
    d = a[both] - b[both]
    got = metrics.paired_difference(list(a[:3]) + [None] + list(a[4:]), b)  # None: an undefined query in a record
    assert got["n"] == 48 and got["difference"] == pytest.approx(d.mean(), abs=1e-12)
    assert got["se"] == pytest.approx(d.std(ddof=1) / np.sqrt(48), abs=1e-12)
    assert got["wins"] == pytest.approx((d > 0).mean()) and got["max_abs"] == pytest.approx(np.abs(d).max())
    with pytest.raises(ValueError, match="same items"):
        metrics.paired_difference(a, b[:-1])


# ---------------------------------------------------------------- input forms and edge cases

class _OnAccelerator(torch.Tensor):
    """Stands in for a tensor on an accelerator (CUDA) on a CPU-only machine: like one, it refuses ``.numpy()``
    until ``.to("cpu")`` (or ``.to(device="cpu")``) has copied it to the CPU."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.numpy:
            raise TypeError("can't convert an accelerator tensor to numpy: copy it to the CPU first")
        out = super().__torch_function__(func, types, args, kwargs)
        if func is torch.Tensor.to:
            device = kwargs.get("device", next((a for a in args[1:] if isinstance(a, (str, torch.device))), None))
            if device is not None and torch.device(device).type == "cpu":
                with torch._C.DisableTorchFunctionSubclass():
                    return out.as_subclass(torch.Tensor)
        return out


def test_scores_of_any_real_dtype_and_device_rank_by_their_values():
    # values 0,3,1,2,5 rank 4,1,3,2,0 whatever holds them: unsigned (where -s wraps), bfloat16 (no numpy twin),
    # torch integers, a tensor on an accelerator (stand-in, and CUDA when present)
    values, want = [0, 3, 1, 2, 5], [4, 1, 3, 2, 0]
    forms = [np.array(values, np.uint8), np.array(values, np.uint64), torch.tensor(values, dtype=torch.uint8),
             torch.tensor(values, dtype=torch.bfloat16), torch.tensor(values, dtype=torch.float32).as_subclass(_OnAccelerator)]
    if torch.cuda.is_available():
        forms.append(torch.tensor(values, dtype=torch.float16, device="cuda"))
    for scores in forms:
        assert metrics.rank_descending(scores).tolist() == want
        # flipped {4, 1}: the top two of five, so recall at 40% is 1 and every flipped point beats every clean one
        assert metrics.recall_at(scores, [4, 1], fractions=(0.2, 0.4)).tolist() == [0.5, 1.0]
        assert metrics.roc_auc(scores, [4, 1]) == 1.0
    # boolean flags (a yes/no detector) rank as 1 and 0: the flagged points first
    assert set(metrics.rank_descending(np.array([False, True, False, True]))[:2].tolist()) == {1, 3}
    assert set(metrics.rank_descending(torch.tensor([False, True, False, True]))[:2].tolist()) == {1, 3}
    # the LDS of accelerator-held scores is the LDS of the same scores on the CPU
    masks = np.array([[1, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0]], dtype=bool)
    scores, target = np.array([[1.0, 2.0, 4.0]]), np.array([[5.0], [6.0], [3.0], [1.0]])  # sums 5, 6, 3, 1: LDS 1
    assert metrics.subset_predictions(torch.from_numpy(scores).as_subclass(_OnAccelerator), masks)[:, 0].tolist() == \
        [5.0, 6.0, 3.0, 1.0]
    assert metrics.lds_from_predictions(torch.tensor(target, dtype=torch.bfloat16).as_subclass(_OnAccelerator),
                                        target).tolist() == [1.0]


def test_flipped_indices_given_as_whole_floats_are_indices():
    # indices read back as floats (e.g. from a JSON record) mean the same points as the integers
    scores = np.array([9.0, 1.0, 8.0, 0.5, 0.4, 0.3, 0.2, 10.0, 0.1, 0.0])
    assert metrics.mislabel(scores, np.array([2.0, 7.0])) == metrics.mislabel(scores, [2, 7])
    assert metrics.roc_auc(scores, [2.0, 7.0]) == pytest.approx(15 / 16)  # as in the hand-built ranking above


def test_roc_auc_with_a_single_clean_point():
    # one clean point is a valid problem: the AUC is the share of flipped points above it (ties ½)
    assert metrics.roc_auc([3.0, 2.0, 1.0], [0, 1]) == 1.0
    assert metrics.roc_auc([2.0, 1.0, 3.0], [0, 1]) == 0.0
    assert metrics.roc_auc([3.0, 1.0, 1.0, 0.0], [0, 1, 3]) == pytest.approx((1 + 0.5 + 0) / 3)
    with pytest.raises(ValueError, match="every point is flipped"):
        metrics.roc_auc([3.0, 2.0], [0, 1])


def test_default_tie_break_is_seed_zero_and_seeds_reach_every_recall():
    # constant scores: the order is exactly the tie-break, argsort of default_rng(seed).permutation(n)
    n, flipped = 1000, np.arange(100)
    for seed in (None, 0, 7):
        order = np.argsort(np.random.default_rng(0 if seed is None else seed).permutation(n))
        kw = {} if seed is None else {"seed": seed}
        assert np.array_equal(metrics.rank_descending(np.zeros(n), **kw), order)
        found = np.concatenate([[0], np.cumsum(np.isin(order, flipped))])
        assert metrics.recall_at(np.zeros(n), flipped, **kw).tolist() == [found[p * n // 100] / 100 for p in
                                                                           (10, 20, 30, 40, 50)]
        out = metrics.mislabel(np.zeros(n), flipped, **kw)
        assert [out[f"recall_{p}"] for p in (10, 20, 30, 40, 50)] == [found[p * n // 100] / 100 for p in
                                                                       (10, 20, 30, 40, 50)]
        assert out["recall_curve"]["recall"] == [found[p * n // 100] / 100 for p in range(101)]


def test_bootstrap_interval_is_the_percentile_interval_of_one_seeded_stream():
    # n_boot resamples drawn as one (n_boot, n) block of default_rng(seed).integers, means' 2.5/97.5% quantiles
    v = np.random.default_rng(4).normal(size=40)
    for n_boot, seed in ((2000, 0), (300, 5), (100, 1)):
        idx = np.random.default_rng(seed).integers(0, len(v), size=(n_boot, len(v)))
        want = np.quantile(v[idx].mean(axis=1), [0.025, 0.975])
        assert metrics.bootstrap_ci(v, 0.95, n_boot, seed) == pytest.approx(tuple(want), abs=1e-14)


def test_lds_from_predictions_counts_the_queries_with_non_finite_predictions():
    # 4 subsets x 5 queries; non-finite entries in queries 1 (twice) and 3: two queries, three subsets
    pred = np.arange(20.0).reshape(4, 5)
    pred[0, 1], pred[2, 1], pred[3, 3] = np.nan, np.inf, -np.inf
    with pytest.raises(ValueError, match="^2 queries have non-finite"):
        metrics.lds_from_predictions(pred, np.zeros((4, 5)))
    with pytest.raises(ValueError, match="^2 queries have non-finite"):
        metrics.lds_from_predictions(torch.from_numpy(pred), np.zeros((4, 5)))


def test_paired_difference_edges():
    # per-query correctness (booleans) and unsigned counts: differences of the values, never wrapped-around
    got = metrics.paired_difference([True, True, False, True], [False, True, True, False])  # d = 1, 0, -1, 1
    assert (got["difference"], got["n"], got["max_abs"], got["wins"]) == (0.25, 4, 1.0, 0.5)
    got = metrics.paired_difference(np.array([1, 5, 3], np.uint8), np.array([2, 1, 3], np.uint8))  # d = -1, 4, 0
    assert got["difference"] == pytest.approx(1.0) and got["max_abs"] == 4.0
    # a tie is not a win: wins is the share of strictly positive differences
    assert got["wins"] == pytest.approx(1 / 3)
    # no item defined in both: every field NaN (n 0), quietly
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = metrics.paired_difference([None, 1.0, np.nan], [2.0, np.nan, 3.0])
    assert got["n"] == 0 and all(np.isnan(got[k]) for k in ("difference", "se", "max_abs", "wins"))
