"""Datamodels (ridge regression on retrained subset models): the regression against a dense solve, recovery of a
simulated linear datamodel, independence from the ground truth, and the result file going stale."""

import json

import numpy as np
import pytest
from eval_helpers import synthetic_store, write_solver
from scipy.stats import spearmanr

from benchmark.evaluate import metrics, records, registry
from benchmark.groundtruth import artifact as gt_artifact
from benchmark.groundtruth import datamodel_models as dm
from benchmark.groundtruth.zoo import ground_truth_seeds
from benchmark.setup import settings
from benchmark.setup.artifacts import MANIFEST, ArtifactError, read_json, write_json
from benchmark.studies import datamodels

S = settings.get("synthetic-mlp")
QUIET = dict(progress=False, log=lambda *a: None)
SPEC = dm.Spec(models=20, chunk=10)


@pytest.mark.parametrize("n, n_train", [(15, 40), (60, 20)])  # dual (n < N) and primal (n > N)
def test_ridge_equals_a_dense_solve(n, n_train):
    rng = np.random.default_rng(n)
    masks = rng.random((n, n_train)) < 0.5
    y = rng.normal(size=(n, 3))
    x = masks - masks.mean(axis=0)
    yc = y - y.mean(axis=0)
    for c in (1e-2, 1.0, 100.0):
        lam = c * (x * x).sum() / n_train
        dense = np.linalg.solve(x.T @ x + lam * np.eye(n_train), x.T @ yc)
        np.testing.assert_allclose(datamodels.ridge_weights(masks, y, c), dense, rtol=1e-8, atol=1e-10)


def _simulated(n_models, rng, theta, noise):
    masks = rng.random((n_models, theta.shape[1])) < 0.5
    return masks, masks @ theta.T + noise * rng.normal(size=(n_models, theta.shape[0]))


def test_a_simulated_linear_datamodel_is_recovered_and_approaches_the_ceiling():
    rng = np.random.default_rng(0)
    n_train, q = 60, 40
    theta_rep, theta_val = rng.normal(size=(q, n_train)), rng.normal(size=(q, n_train))
    # the evaluation ground truth: 50 subsets, a less noisy (seed-averaged) target
    gt_masks = rng.random((50, n_train)) < 0.5
    t_rep = gt_masks @ theta_rep.T + 2.0 * rng.normal(size=(50, q))
    t_val = gt_masks @ theta_val.T + 2.0 * rng.normal(size=(50, q))
    ceiling = np.mean(metrics.lds_from_predictions(gt_masks @ theta_rep.T, t_rep))  # the true datamodel's LDS
    masks = rng.random((2000, n_train)) < 0.5
    noise = 3.0 * rng.normal(size=(2000, 2 * q))
    out = np.concatenate([masks @ theta_rep.T, masks @ theta_val.T], axis=1) + noise
    lds, corr = [], []
    for n in (30, 200, 2000):
        f = datamodels.fit_datamodel(masks[:n], out[:n, :q], out[:n, q:], gt_masks, t_rep, t_val,
                                     datamodels.RIDGE_GRID)
        lds.append(np.mean(f.per_query))
        w = datamodels.ridge_weights(masks[:n], out[:n, :q], f.ridge)
        corr.append(np.mean([np.corrcoef(w[:, k], theta_rep[k])[0, 1] for k in range(q)]))
    assert lds[0] < lds[1] < lds[2] and corr[0] < corr[1] < corr[2]
    assert corr[2] > 0.95
    assert ceiling - 0.02 < lds[2] <= ceiling + 0.01
    assert lds[0] < ceiling - 0.1  # 30 noisy models are far from it: the test can tell


def test_independence_refuses_a_shared_subset_or_seed():
    rng = np.random.default_rng(1)
    gt_masks = rng.random((5, 30)) < 0.5
    masks = rng.random((8, 30)) < 0.5
    dm.assert_independent(masks, range(8), gt_masks, [100, 101])
    planted = masks.copy()
    planted[3] = gt_masks[2]
    with pytest.raises(ArtifactError, match=r"models \[3\] train on a ground-truth subset"):
        dm.assert_independent(planted, range(8), gt_masks, [100, 101])
    with pytest.raises(ArtifactError, match=r"seeds \[101\] are ground-truth seeds"):
        dm.assert_independent(masks, [1, 2, 101], gt_masks, [100, 101])


def test_a_build_whose_seed_is_a_ground_truth_seed_trains_nothing(tmp_path, monkeypatch):
    store = synthetic_store(tmp_path)
    gt = gt_artifact.load(store, S)
    clash = sorted(ground_truth_seeds(store, S))[0]
    monkeypatch.setattr(dm, "model_seed", lambda spec, j: clash if j == 4 else 10 ** 12 + j)
    with pytest.raises(ArtifactError, match="seeds .* are ground-truth seeds"):
        dm.build(S, SPEC, store=store, gt=gt, **QUIET)
    assert not dm.family(store, S).exists()


@pytest.fixture
def built(tmp_path, monkeypatch):
    folder = tmp_path / "solvers"
    write_solver(folder)
    monkeypatch.setenv("TDABENCH_SOLVERS_PATH", str(folder))
    store = synthetic_store(tmp_path)
    gt = gt_artifact.load(store, S)
    records.run(store, S, registry.get("toy-exact"), device="cpu", log=lambda *a: None)
    dm.build(S, SPEC, store=store, gt=gt, **QUIET)
    result = datamodels.run(store, S, datamodels.Options(sizes=(10, 20), spec=SPEC), gt=gt, **QUIET)
    datamodels.write(store, S, result)
    return store, gt, result


def test_the_result_pairs_with_rows_and_reads_back(built):
    store, gt, result = built
    art = dm.SubsetModels.open(store, S, dm.latest(store, S, SPEC, gt), gt)
    assert art.n == 20 and result["sizes"] == [10, 20]
    assert not set(map(bytes, np.packbits(art.masks, axis=1))) & set(map(bytes, np.packbits(gt.masks, axis=1)))
    row = records.read_record(store, S.name, "toy-exact")["lds"]["per_query"]
    for p in result["points"]:
        assert p["training_s"] == pytest.approx(float(art.seconds[:p["members"]].sum()))
        assert p["compute_s"] == pytest.approx(p["training_s"] + p["fit_s"])
        # the paired difference is the plain mean of the per-query differences, over the same queries
        d = [a - b for a, b in zip(p["per_query"], row)]
        assert p["paired"]["toy-exact"]["difference"] == pytest.approx(np.mean(d), abs=1e-12)
        # the per-query LDS is Spearman of the ridge weights' subset sums against the target, query by query
        w = datamodels.ridge_weights(art.masks[:p["members"]], art.outputs("queries")[:p["members"]], p["ridge"])
        target = gt.target("margin", "queries")
        k = 3
        assert p["per_query"][k] == pytest.approx(spearmanr(gt.masks @ w[:, k], target[:, k])[0], abs=1e-6)
    assert set(result["smallest_n_beating"]) == {"toy-exact"}
    assert datamodels.read(store, S)["points"][0]["lds"] == result["points"][0]["lds"]
    assert datamodels.stale_reasons(datamodels.read(store, S), store, S) == []


def test_a_hand_edited_number_is_refused(built):
    store, _, _ = built
    path = datamodels.path_of(store, S)
    data = json.loads(path.read_text())
    data["points"][1]["lds"] += 0.01
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="content_sha256"):
        datamodels.read(store, S)


def test_the_result_goes_stale_when_the_training_models_change(built):
    store, gt, result = built
    root = dm.latest(store, S, SPEC, gt)
    man = read_json(root / MANIFEST)
    man["files"]["chunks/c0001.npz"] = "0" * 64
    write_json(root / MANIFEST, man)
    why = datamodels.stale_reasons(result, store, S)
    assert why == ["n=20: the training models it used changed"]


def test_the_result_goes_stale_when_the_ground_truth_or_a_row_changes(built):
    store, gt, result = built
    records.run_path(store, S.name, "toy-exact").unlink()
    assert datamodels.stale_reasons(result, store, S) == ["leaderboard row toy-exact changed"]
    man = read_json(gt.root / MANIFEST)
    first = sorted(man["files"])[0]
    man["files"][first] = "0" * 64
    write_json(gt.root / MANIFEST, man)
    assert "the ground truth's files or root hash changed" in datamodels.stale_reasons(result, store, S)


def test_the_command_line_fits_writes_and_says_current_or_stale(built, capsys):
    from benchmark.cli import main

    store, gt, _ = built
    args = ["--results", str(store.root), "datamodels", S.name, "--models", "10", "20", "--chunk", "10"]
    assert main(args + ["--no-train", "--quiet"]) == 0
    assert "wrote datamodels/synthetic-mlp.json" in capsys.readouterr().out
    assert main(args + ["--show"]) == 0
    assert capsys.readouterr().out.startswith("current\n")  # the verdict comes before the numbers
    records.run_path(store, S.name, "toy-exact").unlink()
    assert main(args + ["--show"]) == 0
    assert capsys.readouterr().out.startswith("STALE")
    assert main(args[:4] + ["--models", "15", "--chunk", "10", "--quiet"]) == 2
    assert "not a multiple of the chunk size 10" in capsys.readouterr().err
