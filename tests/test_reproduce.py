"""`tdabench gt SETTING --reproduce N`: retrained units against the committed ones and against seed noise.

On the tiny synthetic setting (tests/eval_helpers.py: three seed replicas, two full-data models): an untouched
artifact retrains bit-identically; a unit whose stored outputs came from another seed is "not reproduced" (exit
status 1 through the real CLI); one whose outputs came from the same model trained by the vmap trainer (the same
arithmetic in another summation order) is "reproduced within round-off"; and the yardstick is the artifact's own
seed noise.
"""

import itertools

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr

from benchmark import groundtruth as G
from benchmark.cli import main
from benchmark.groundtruth import builder as B
from benchmark.groundtruth import reproduce as R
from benchmark.groundtruth.executors import LocalExecutor
from benchmark.groundtruth.protocol import OUTPUT_ROWS, subset_indices, unit_file
from benchmark.setup import settings
from benchmark.setup.artifacts import MANIFEST, read_json, save_npz
from benchmark.setup.config import unit_seed
from benchmark.setup.training import evaluate, train, train_batched
from eval_helpers import synthetic_store

S = settings.get("synthetic-mlp")
QUIET = dict(log=lambda *a: None)


def _reproduce(store, n, full=0, seed=0):
    gt = G.load(store, S)
    return R.reproduce(gt, R.draw_units(gt, n, full, seed), executor=LocalExecutor(1), **QUIET)


def _cli(store, n, seed=0, extra=()):
    return main(["--results", str(store.root), "gt", S.name, "--reproduce", str(n), "--draw-seed", str(seed),
                 "--workers", "1", *extra])


def _outputs(gt, model):
    d = gt.setting.data()
    q = torch.from_numpy(np.concatenate([gt.queries, gt.validation_queries]))
    ev = evaluate(model, d.test_x[q], d.test_y[q])
    return np.stack([ev[k].numpy().astype(np.float32) for k in OUTPUT_ROWS])


def _replace_outputs(store, unit, outputs):
    """Overwrite a unit's stored outputs and make the artifact consistent again as a tamperer with write access
    would: file hashes, noise ceiling and summary rewritten in the manifest, root hash re-pinned."""
    gt = G.load(store, S)
    path = unit_file(gt.root, unit)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    assert arrays["outputs"].shape == outputs.shape and not np.array_equal(arrays["outputs"], outputs)
    arrays["outputs"] = outputs
    save_npz(path, **arrays)
    B.finalize(gt.root, read_json(gt.root / MANIFEST), S, store)  # rewrites the hashes, pins the new root hash
    G.load(store, S)  # opens and verifies: nothing but the retrain can tell


def _subset_model(gt, unit, seed, trainer="loop"):
    d = gt.setting.data()
    idx = torch.from_numpy(subset_indices(gt.protocol, len(d.train_y), unit.subset))
    model = gt.setting.model(seed)
    if trainer == "loop":
        return train(model, d.train_x, d.train_y, gt.setting.recipe, seed, idx)
    model.load_state_dict(train_batched([model], d.train_x, d.train_y, gt.setting.recipe, [seed], [idx])[0])
    return model.eval()


def _yardstick_from_files(root, unit, replicas):
    """The seed-noise yardstick recomputed independently, from the unit files of the unit's subset."""
    rows = [np.load(root / "units" / f"r{r:02d}_s{unit.subset:04d}.npz")["outputs"][0].astype(np.float64)
            for r in range(replicas)]
    pairs = list(itertools.combinations(rows, 2))
    return {"pearson": np.mean([pearsonr(a, b).statistic for a, b in pairs]),
            "spearman": np.mean([spearmanr(a, b).statistic for a, b in pairs]),
            "mean_abs_diff": np.mean([np.abs(a - b).mean() for a, b in pairs])}


def test_untouched_artifact_is_identical(tmp_path):
    store = synthetic_store(tmp_path, "ensemble")
    rep = _reproduce(store, 3, full=1)
    assert [u["unit"] for u in rep["units"]][0].startswith("full_k")  # full-data models included when asked
    assert rep["overall"]["verdict"] == R.IDENTICAL and rep["overall"]["identical"] == 4
    for u in rep["units"]:
        assert u["identical"] and u["verdict"] == R.IDENTICAL and u["mean_abs_diff"] == 0 and u["seconds"] > 0
    full = rep["units"][0]
    assert full["weights_identical"] and full["max_weight_diff"] == 0
    assert full["test_accuracy"]["committed"] == full["test_accuracy"]["retrained"]


def test_another_seeds_outputs_are_not_reproduced_and_the_yardstick_is_the_artifacts(tmp_path, capsys):
    store = synthetic_store(tmp_path, "ensemble")
    gt = G.load(store, S)
    units = R.draw_units(gt, 3, seed=4)
    victim = units[1]
    before = R.yardstick(gt, victim)
    other = _outputs(gt, _subset_model(gt, victim, unit_seed(gt.protocol, victim) + 1))
    _replace_outputs(store, victim, other)

    rep = _reproduce(store, 3, seed=4)
    by_unit = {u["unit"]: u for u in rep["units"]}
    assert list(by_unit) == [u.name for u in units]
    # The yardstick is the artifact's own seed noise: recomputed from the files (the tampered unit included, so
    # it moved), for every drawn unit.
    root = G.load(store, S).root
    for u in units:
        want = _yardstick_from_files(root, u, gt.protocol.seeds)
        got = by_unit[u.name]["yardstick"]
        assert got["pairs"] == 3
        for k, v in want.items():
            assert got[k] == pytest.approx(v, rel=1e-9), (u.name, k)
    bad = by_unit[victim.name]
    assert bad["yardstick"]["mean_abs_diff"] != pytest.approx(before["mean_abs_diff"], rel=1e-3)

    assert bad["verdict"] == R.NOT_REPRODUCED and not bad["identical"]
    assert bad["fraction_of_yardstick"]["disagreement"] > 1  # as far from the committed unit as another seed is
    assert all(by_unit[u.name]["verdict"] == R.IDENTICAL for u in units if u != victim)
    assert rep["overall"]["verdict"] == R.NOT_REPRODUCED
    assert _cli(store, 3, seed=4) == 1
    assert "verdict: NOT REPRODUCED (2 identical, 1 not reproduced" in capsys.readouterr().out


def test_round_off_differences_are_reproduced_within_round_off(tmp_path, capsys):
    """The same model trained by the vmap trainer (same arithmetic, another summation order) stands in for a unit
    built on other hardware: not identical, far closer than seed noise, exit status 0."""
    store = synthetic_store(tmp_path, "ensemble")
    gt = G.load(store, S)
    victim = R.draw_units(gt, 1, seed=2)[0]
    stored = np.load(unit_file(gt.root, victim))["outputs"]
    batched = _outputs(gt, _subset_model(gt, victim, unit_seed(gt.protocol, victim), trainer="vmap"))
    assert 0 < np.abs(batched - stored).max() < 1e-3  # a round-off difference, not another model
    _replace_outputs(store, victim, batched)

    assert _cli(store, 1, seed=2) == 0
    out = capsys.readouterr().out
    assert "verdict: REPRODUCED WITHIN ROUND-OFF" in out and "differs" in out


def test_verdict_rule():
    yard = {"pearson": 0.8, "mean_abs_diff": 2.0}

    def stats(abs_frac, dis_frac):
        return {"mean_abs_diff": abs_frac * 2.0, "pearson": 1 - dis_frac * 0.2}

    assert R.verdict(True, stats(0, 0), yard) == R.IDENTICAL
    assert R.verdict(False, stats(0.5, 0.3), yard) == R.ROUNDOFF
    assert R.verdict(False, stats(R.MAX_ABS_DIFF_FRACTION + 0.01, 0.1), yard) == R.NOT_REPRODUCED
    assert R.verdict(False, stats(0.1, R.MAX_DISAGREEMENT_FRACTION + 0.01), yard) == R.NOT_REPRODUCED
    assert R.verdict(False, {"mean_abs_diff": 0.1, "pearson": float("nan")}, yard) == R.NOT_REPRODUCED


def test_draw_needs_units_and_a_yardstick(tmp_path):
    gt = G.load(synthetic_store(tmp_path), S)  # one full-data model: no seed noise to compare a retrain with
    a, b = R.draw_units(gt, 5, seed=1), R.draw_units(gt, 5, seed=1)
    assert a == b and len(set(a)) == 5 and all(u.subset is not None for u in a)
    assert R.draw_units(gt, 5, seed=2) != a
    with pytest.raises(ValueError, match="full_k00 has no seed-noise yardstick"):
        R.draw_units(gt, 1, 1)
    with pytest.raises(ValueError, match="cannot draw 49"):
        R.draw_units(gt, 49)
    with pytest.raises(ValueError, match="at least one unit"):
        R.draw_units(gt, 0)


def test_retrain_jobs_pickle():
    """Jobs cross process and Ray boundaries by pickle (the Setting by name)."""
    import pickle

    job = R.RetrainJob(S, S.protocols["default"], (G.all_units(S.protocols["default"])[-1],), "cpu", 1)
    back = pickle.loads(pickle.dumps(job))
    assert back == job and back.setting is S
