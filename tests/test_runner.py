"""Evaluation end to end — the engine, run records and when they go stale, the mislabel artifact, the leaderboard,
Table 1 and the figures — on a small synthetic ground truth with toy solver files in temporary solver folders
(the same way a user adds a solver)."""

import dataclasses
import json
import pickle
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from eval_helpers import synthetic_store, write_solver
from scipy.stats import spearmanr

from benchmark.evaluate import Task, campaign, engine, fingerprint, metrics, records, registry, score_memory_budget_mb
from benchmark.evaluate.cost import Cost
from benchmark.evaluate.engine import LOSS, RANDOM, RunError
from benchmark.groundtruth import artifact as gt_artifact
from benchmark.groundtruth import index, mislabel
from benchmark.report import figures, leaderboard, tables
from benchmark.setup import settings
from benchmark.setup.artifacts import MANIFEST, ArtifactError, file_hashes, read_json, write_json
from benchmark.setup.store import ResultsStore, StoreError
from benchmark.studies import qualitative, table1

SETTING = "synthetic-mlp"
S = settings.get(SETTING)
QUIET = dict(device="cpu", log=lambda *a: None)


@pytest.fixture
def toy(tmp_path, monkeypatch):
    folder = tmp_path / "solvers"
    path = write_solver(folder)
    monkeypatch.setenv("TDABENCH_SOLVERS_PATH", str(folder))
    return path


@pytest.fixture
def store(tmp_path):
    return synthetic_store(tmp_path)


def _gt(store):
    return gt_artifact.load(store, S)


def test_run_selects_on_validation_and_reports_the_brute_force_lds(toy, store, monkeypatch):
    gt = _gt(store)
    data = S.data()
    seen = []
    real = engine.ensemble_predictions

    def spy(candidates, qx, qy, tx, ty, membership, cost, stage):
        seen.append((len(candidates), qx.clone()))
        return real(candidates, qx, qy, tx, ty, membership, cost, stage)

    monkeypatch.setattr(engine, "ensemble_predictions", spy)
    cls = registry.get("toy-exact")
    rec = records.run(store, S, cls, **QUIET)

    # the search scored every configuration on the validation queries only, together in one pass; the
    # reported queries were scored once, at the end, for the chosen configuration
    grid = cls.parameters["damping"]
    val_x = data.test_x[torch.from_numpy(gt.validation_queries)]
    assert [n for n, _ in seen] == [len(grid), 1]
    assert torch.equal(seen[0][1], val_x) and torch.equal(seen[1][1], data.test_x[torch.from_numpy(gt.queries)])
    trials = rec["lds"]["selection"]["trials"]
    assert rec["lds"]["selection"]["validation_scoring"].startswith("one shared pass")
    # each configuration's validation LDS is what scoring it alone gives
    model = gt.full_model(0)
    v = torch.from_numpy(gt.validation_queries)
    v_target = gt.outputs["margin"][:, :, len(gt.queries):].mean(0)
    for t in trials:
        alone = cls(**t["params"]).fit(Task(model, data.train_x, data.train_y, 4))
        tau = alone.scores(data.test_x[v], data.test_y[v], data.train_x, data.train_y).double().numpy()
        want = np.mean([spearmanr(gt.masks.astype(float) @ tau[i], v_target[:, i]).statistic for i in range(len(v))])
        assert t["validation_lds"] == pytest.approx(want, abs=1e-6)
    best = max(trials, key=lambda t: t["validation_lds"])
    assert rec["params"] == best["params"]

    # the reported LDS, recomputed from scratch with scipy over the seed-averaged target
    solver = cls(**rec["params"]).fit(Task(gt.full_model(0), data.train_x, data.train_y, 4))
    q = torch.from_numpy(gt.queries)
    tau = solver.scores(data.test_x[q], data.test_y[q], data.train_x, data.train_y).double().numpy()
    target = gt.outputs["margin"][:, :, :len(gt.queries)].mean(0)
    expect = [spearmanr(gt.masks.astype(float) @ tau[i], target[:, i]).statistic for i in range(len(gt.queries))]
    assert rec["lds"]["mean"] == pytest.approx(np.mean(expect), abs=1e-6)
    assert rec["lds"]["per_query"] == pytest.approx(expect, abs=1e-5)
    assert rec["lds"]["ceiling"] == pytest.approx(gt.manifest["noise_ceiling"]["margin"]["lds_ceiling"])
    assert rec["lds"]["mean"] > 0.5  # a real attribution on this easy problem

    # provenance: the artifact and its pinned root hash, the replicas, the target, the fingerprint, costs
    used = rec["lds"]["ground_truth"]
    assert used["complete"] and used["replicas"] == [0, 1] and used["version"] == gt.root.name
    assert used["root_hash"] == index.pinned(store, gt.root) == gt.root_hash()
    assert rec["lds"]["fingerprint"]["solver"]["scores"] and rec["lds"]["fingerprint"]["metrics"]["lds"]
    assert rec["cost"]["fit_s"] > 0 and rec["cost"]["score_s"] > 0 and rec["cost"]["peak_mb"] > 0
    # the memory budget the score blocks were sized from (what the peak depends on) is recorded with it
    assert rec["lds"]["cost"]["memory_budget_mb"] == rec["mislabel"]["cost"]["memory_budget_mb"] == score_memory_budget_mb()
    assert rec["mislabel"]["params_source"].startswith("chosen for LDS on validation queries")
    on_disk = read_json(records.run_path(store, SETTING, "toy-exact"))
    assert on_disk["lds"]["mean"] == rec["lds"]["mean"]
    assert records.stale_reasons(on_disk, store, S, cls) == {}


def test_records_go_stale_when_what_computed_them_changes(toy, store, tmp_path, monkeypatch):
    cls = registry.get("toy-exact")
    rec = records.run(store, S, cls, search=False, **QUIET)
    assert records.stale_reasons(rec, store, S, cls) == {}

    # code that computes the same numbers keeps the record: a comment, or the file moved to another folder
    toy.write_text(toy.read_text() + "\n# a comment\n")
    assert records.stale_reasons(rec, store, S, registry.get("toy-exact")) == {}
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.move(str(toy), moved / "renamed_toy.py")
    monkeypatch.setenv("TDABENCH_SOLVERS_PATH", str(moved))
    assert records.stale_reasons(rec, store, S, registry.get("toy-exact")) == {}

    # a solver that computes something else: everything is stale
    write_solver(tmp_path / "changed", sign=-1)
    monkeypatch.setenv("TDABENCH_SOLVERS_PATH", str(tmp_path / "changed"))
    why = records.stale_reasons(rec, store, S, registry.get("toy-exact"))
    assert set(why) == {"lds", "mislabel"} and "solver computes something else" in why["lds"][0]
    monkeypatch.setenv("TDABENCH_SOLVERS_PATH", str(moved))
    cls = registry.get("toy-exact")

    # the training recipe of the setting changed (the ground truth is stale too)
    changed = dataclasses.replace(S, recipe=dataclasses.replace(S.recipe, lr=S.recipe.lr * 2))
    assert any("training recipe changed" in w for w in records.stale_reasons(rec, store, changed, cls)["lds"])

    # metric code that computes something else
    real = metrics.lds_per_query
    fingerprint.metric_probe.cache_clear()
    monkeypatch.setattr(metrics, "lds_per_query", lambda *a: real(*a) * 0.9)
    assert any("metric code" in w for w in records.stale_reasons(rec, store, S, cls)["lds"])
    monkeypatch.setattr(metrics, "lds_per_query", real)
    fingerprint.metric_probe.cache_clear()

    # target code that yields another target
    real_target = gt_artifact.GroundTruth.target
    monkeypatch.setattr(gt_artifact.GroundTruth, "target", lambda self, *a, **k: real_target(self, *a, **k)[::-1])
    records._OPENED.clear()
    assert any("target" in w for w in records.stale_reasons(rec, store, S, cls)["lds"])
    monkeypatch.setattr(gt_artifact.GroundTruth, "target", real_target)
    assert records.stale_reasons(rec, store, S, cls) == {}

    # a newer ground-truth version makes the LDS stale, not the mislabel section
    src = gt_artifact.latest(store.gt, S)
    dst = src.with_name(f"v{int(src.name[1:]) + 1}")
    shutil.copytree(src, dst)
    man = read_json(dst / MANIFEST)
    man["version"] = dst.name
    write_json(dst / MANIFEST, man)
    why = records.stale_reasons(rec, store, S, cls)
    assert list(why) == ["lds"] and "ground truth is now" in why["lds"][0]
    shutil.rmtree(dst)

    # files rewritten together with their hashes (and re-pinned): the root hash tells
    man = read_json(src / MANIFEST)
    unit = src / "units" / "r00_s0000.npz"
    with np.load(unit) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["outputs"][0] *= -1
    np.savez(unit, **arrays)
    man["files"].update(file_hashes(src, ["units/r00_s0000.npz"]))
    write_json(src / MANIFEST, man)
    index.pin(store, src, index.root_hash(man), "ground truth")
    assert any("root hash changed" in w for w in records.stale_reasons(rec, store, S, cls)["lds"])


def test_incomplete_ground_truth_uses_complete_replicas_and_says_so(toy, store):
    root = gt_artifact.latest(store.gt, S)
    man = read_json(root / MANIFEST)
    for name in [f for f in man["files"] if f.startswith("units/r01_")][:3]:
        del man["files"][name]  # replica 1 unfinished
        (root / name).unlink()
    man["complete"], man["noise_ceiling"], man["summary"] = False, None, {}
    man["units_done"] -= 3
    write_json(root / MANIFEST, man)
    pins = read_json(store.index)
    del pins["artifacts"][store.relative(root)]  # as a build in progress: unfinished artifacts are not pinned
    write_json(store.index, pins)
    rec = records.run(store, S, registry.get("toy-exact"), search=False, tasks=["lds"], **QUIET)
    used = rec["lds"]["ground_truth"]
    assert not used["complete"] and used["replicas"] == [0]
    assert rec["lds"]["ceiling"] is None  # one replica: no noise ceiling
    assert rec["lds"]["queries"] == len(gt_artifact.GroundTruth.open(root, S, allow_incomplete=True).queries)
    df, _ = leaderboard.collect(store, [S], [registry.get("toy-exact")])
    row = df[df.solver == "toy-exact"].iloc[0]
    assert "incomplete ground truth" in row.status and "INCOMPLETE" in row.ground_truth


def test_grid_and_parameter_errors(toy):
    cls = registry.get("toy-exact")
    assert [g["damping"] for g in engine.param_grid(cls)] == cls.parameters["damping"]
    assert engine.param_grid(cls, {"damping": 0.5}) == [{"damping": 0.5}]
    with pytest.raises(RunError, match="no parameter"):
        engine.param_grid(cls, {"dampin": 1})
    assert engine.parse_param("damping=1e-3") == ("damping", 1e-3)
    assert engine.parse_param("curvature=ggn") == ("curvature", "ggn")
    big = settings.get("mnist-cnn").model(0)
    with pytest.raises(RunError, match="accepts models up to"):
        engine.check_applicable(cls, big)
    # last_blocks narrows what the solver attributes through: the 650-parameter head fits a dense solver
    engine.check_applicable(cls, big, {"last_blocks": 1})
    with pytest.raises(RunError, match="last 2 block"):
        engine.check_applicable(cls, big, {"last_blocks": 2})


def test_mislabel_artifact_is_versioned_and_verified(tmp_path):
    store = ResultsStore(tmp_path)
    path = mislabel.build(S, mislabel.Spec(), store=store, device="cpu", log=lambda *a: None)
    assert mislabel.build(S, mislabel.Spec(), store=store, device="cpu", log=lambda *a: None) == path
    art = mislabel.load(store, S, mislabel.Spec())
    assert index.pinned(store, path) == art.root_hash()
    data = S.data()
    assert len(art.flipped) == round(0.1 * len(data.train_y))
    assert (art.labels[art.flipped] != data.train_y[art.flipped]).all()
    keep = np.setdiff1d(np.arange(len(data.train_y)), art.flipped)
    assert torch.equal(art.labels[keep], data.train_y[keep])
    other = mislabel.build(S, mislabel.Spec(seed=1), store=store, device="cpu", log=lambda *a: None)
    assert other.name == "v2" and path.name == "v1"
    labels = np.load(path / "labels.npy")
    labels[0] = (labels[0] + 1) % 4
    np.save(path / "labels.npy", labels)
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        mislabel.load(store, S, mislabel.Spec())


def test_mislabel_baselines_and_a_broken_solver(tmp_path, store, monkeypatch):
    folder = tmp_path / "broken"
    write_solver(folder, "toy-broken", sign=-1)
    monkeypatch.setenv("TDABENCH_SOLVERS_PATH", str(folder))
    art = mislabel.load(store, S)
    loss = engine.evaluate_mislabel(art, LOSS, device="cpu")
    rand = engine.evaluate_mislabel(art, RANDOM, device="cpu")
    broken = engine.evaluate_mislabel(art, registry.get("toy-broken"), {"damping": 0.1}, device="cpu")
    assert rand["recall_10"] == pytest.approx(0.1, abs=0.01) and rand["auc"] == 0.5
    assert loss["recall_10"] > 0.5  # the corrupted labels are hard to fit: high loss
    assert broken["recall_10"] < rand["recall_10"] and broken["auc"] < 0.5


def _leaderboard(store, settings_list, methods, **kw):
    _, failures = campaign.update(store, settings_list, methods, **QUIET, **kw)
    df, found = leaderboard.collect(store, settings_list, [*methods, RANDOM, LOSS], failures=failures)
    leaderboard.write(store, df, log=lambda *a: None)
    figures.leaderboard(df, found, store.figures, log=lambda *a: None)
    return df


def test_add_a_solver_gives_a_leaderboard_row(tmp_path, store, monkeypatch):
    """README "Add a solver": one file in a solvers folder, rebuild the leaderboard, a new row with numbers."""
    folder = tmp_path / "my_solvers"
    write_solver(folder, "my-new-solver")
    monkeypatch.setenv("TDABENCH_SOLVERS_PATH", str(folder))
    cnn = settings.get("mnist-cnn")
    mine = registry.get("my-new-solver")
    df = _leaderboard(store, [S, cnn], [mine])
    table = pd.read_csv(store.root / "leaderboard.csv")
    assert list(table.columns)[:3] == ["setting", "solver", "status"]
    for col in ("lds", "lds_se", "lds_ceiling", "recall_10", "recall_50", "auc", "fit_s", "score_s", "peak_mb",
                "device"):
        assert col in table.columns
    row = table[(table.setting == SETTING) & (table.solver == "my-new-solver")].iloc[0]
    assert row.status == "ok" and 0.5 < row.lds <= 1 and row.recall_10 > 0 and row.fit_s > 0
    # settings without a run are listed, with no numbers
    cnn_row = table[table.setting == "mnist-cnn"].iloc[0]
    assert cnn_row.status.startswith("n/a") or cnn_row.status.startswith("not yet run")
    assert pd.isna(cnn_row.lds) and pd.isna(cnn_row.recall_10)
    assert {"baseline-random", "baseline-loss"} <= set(table[table.setting == SETTING].solver)
    md = (store.root / "leaderboard.md").read_text()
    assert "my-new-solver" in md and "`mnist-cnn`" in md  # a setting without results: one line
    for name in ("lds.png", "mislabel_recall.png"):
        assert (store.figures / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(df) == len(table)
    # nothing is stale now: a second pass reruns nothing; a solver that computes differently reruns only it
    done, failures = campaign.update(store, [S], [mine], **QUIET)
    assert done == [] and failures == {}
    write_solver(folder, "my-new-solver", sign=-1)
    done, _ = campaign.update(store, [S], [registry.get("my-new-solver")], **QUIET)
    assert [(s, n) for s, n, _ in done] == [(SETTING, "my-new-solver")]


def test_a_rerun_keeps_the_options_its_record_fixed(store, monkeypatch):
    """A row run with an option its grid does not search (Arnoldi's float32 products on the CNNs, given with
    `tdabench run --param`) is rerun with that option when it goes stale, not with the solver's default."""
    cls = registry.get("arnoldi")
    fixed = {**cls.defaults, "rank": 256, "damping": 1e-2, "precision": "float32"}
    assert campaign.kept_options(cls, {"lds": {"params": fixed}}) == {"precision": "float32"}  # searched ones go
    assert campaign.kept_options(cls, {"lds": {"params": cls.defaults}}) == campaign.kept_options(cls, None) == {}
    write_json(records.run_path(store, SETTING, cls.name), {"lds": {"params": fixed}})
    monkeypatch.setattr(records, "record_problems", lambda *a, **k: [])  # a hand-made record: only its params count
    monkeypatch.setattr(records, "stale_reasons", lambda *a, **k: {"lds": ["the solver computes something else"]})
    calls = {}
    monkeypatch.setattr(records, "run", lambda store, setting, method, **kw: calls.setdefault(method.name, kw))
    logged = []
    campaign.update(store, [S], [cls], log=logged.append)
    assert calls["arnoldi"]["params"] == {"precision": "float32"} and "lds" in calls["arnoldi"]["tasks"]
    assert any("keeping its options {'precision': 'float32'}" in line for line in logged)


def test_rerunning_some_rows_keeps_the_others(tmp_path, store, monkeypatch):
    """`make leaderboard SETTINGS=… SOLVERS=…` reruns only those rows; the tables keep every other row."""
    for name in ("solver-a", "solver-b"):
        write_solver(tmp_path / "solvers", name)
    monkeypatch.setenv("TDABENCH_SOLVERS_PATH", str(tmp_path / "solvers"))
    from benchmark import cli

    monkeypatch.setattr(campaign, "leaderboard_settings", lambda: [S])
    base = ["--results", str(store.root), "leaderboard", "--device", "cpu", "--no-figures"]
    assert cli.main(base + ["--setting", SETTING, "--solver", "solver-a"]) == 0
    a_created = read_json(records.run_path(store, SETTING, "solver-a"))["created"]
    assert cli.main(base + ["--setting", SETTING, "--solver", "solver-b"]) == 0
    table = pd.read_csv(store.root / "leaderboard.csv")
    rows = table[table.setting == SETTING].set_index("solver")
    assert rows.loc["solver-a", "status"] == "ok" and rows.loc["solver-b", "status"] == "ok"
    assert read_json(records.run_path(store, SETTING, "solver-a"))["created"] == a_created  # not rerun
    # the report is rebuilt with the tables: it shows both rows
    page = (store.report / "index.html").read_text()
    assert "<b>solver-a</b>" in page and "<b>solver-b</b>" in page


def test_table1_recompute_chooses_among_the_committed_records_candidates():
    """`make lds-mnist` replays the record's search: parameters it fixed (``--param``) stay fixed, the ones it
    searched are searched over the same values, whatever the solver's grid has become since."""
    cls = registry.get("ekfac")
    base = {"damping_mode": "absolute", "pseudo_labels": "sampled", "unsupported_layers": "exclude"}
    trials = [{"params": {"damping": d, **base}} for d in (1e-4, 1e-3)]
    fixed, grid = table1.search_space(cls, {"params": trials[0]["params"], "selection": {"trials": trials}})
    assert fixed == base and grid == {"damping": [1e-4, 1e-3]}
    assert engine.param_grid(cls, fixed, grid) == [{**cls.defaults, **t["params"]} for t in trials]
    assert len(engine.param_grid(cls)) > len(trials)  # the solver's own grid is wider
    # a record that searched nothing is replayed with its parameters; without a record, the solver's grid
    assert table1.search_space(cls, {"params": {"damping": 0.1}, "selection": {"searched": False}}) == (
        {"damping": 0.1}, None)
    assert table1.search_space(cls, None) == ({}, None)


def test_table1_recomputes_and_compares_with_the_committed_record(toy, store):
    cls = registry.get("toy-exact")
    rec = records.run(store, S, cls, **QUIET)
    result = table1.recompute(store, S, cls, device="cpu", log=lambda *a: None)
    cmp = result["comparison"]
    assert cmp["agree"] and cmp["difference"] == pytest.approx(0, abs=1e-9) and cmp["max_query_difference"] < 1e-9
    assert set(result["stages"]) >= {"verify_s", "fit_s", "score_s", "total_s"}
    text = tables.table1_recomputed(S, result)
    assert "RECOMPUTED" in text and "AGREE" in text and f"{rec['lds']['mean']:.3f}" in text
    # the paper's row shows its published LDS in the LDS column, never "undefined"
    paper = dataclasses.replace(S, paper_lds=0.5)
    line = next(x for x in tables.table1_recomputed(paper, result).splitlines() if x.startswith("paper"))
    assert line.split()[4] == "0.50" and "undefined" not in line
    # a committed record with other numbers (whole and sealed, as another machine's would be) disagrees, and says so
    on_disk = read_json(records.run_path(store, SETTING, "toy-exact"))
    halved = [None if v is None else v / 2 for v in on_disk["lds"]["per_query"]]
    on_disk["lds"].update(metrics.lds_summary([np.nan if v is None else v for v in halved], on_disk["lds"]["ceiling"]))
    on_disk["lds"]["per_query"] = halved
    write_json(records.run_path(store, SETTING, "toy-exact"), records.seal(records._clean(on_disk)))
    result = table1.recompute(store, S, cls, device="cpu", log=lambda *a: None)
    assert not result["comparison"]["agree"] and "DISAGREE" in tables.table1_recomputed(S, result)
    # the fast path shows committed records as they are, never as current when they are not
    rows = table1.committed(store, S, [cls])
    assert not rows[0]["stale"]
    assert "COMMITTED" in tables.table1_committed(S, rows, [])
    rows[0]["stale"] = {"lds": ["the solver computes something else now"]}
    text = tables.table1_committed(S, rows, [])
    assert "STALE, not shown" in text and f"{on_disk['lds']['mean']:.3f}" not in text


def test_mislabel_table_prints_real_numbers(toy, store):
    from benchmark.studies import mislabel as mislabel_study

    manifest, rows = mislabel_study.rows(store, S, [registry.get("toy-exact")], records.MISLABEL_SPEC, **QUIET)
    text = tables.mislabel_table(S, manifest, rows, records.MISLABEL_SPEC)
    assert "training loss" in text and "random order" in text
    assert ("wins" in text) or ("no clear winner" in text)


def test_qualitative_study_and_figures(toy, store, tmp_path):
    cls = registry.get("toy-exact")
    inf = qualitative.influential(store, S, cls, n_queries=2, top=3, **QUIET)
    selfs = qualitative.self_influence(store, S, cls, top=10, **QUIET)
    data = S.data()
    q = inf["queries"][0]
    assert len(inf["queries"]) == 2 and len(q["positive"]) == len(q["negative"]) == 3
    assert q["positive"][0]["score"] >= q["positive"][-1]["score"] >= q["negative"][-1]["score"]
    assert all(p["label"] == int(data.train_y[p["index"]]) for p in q["positive"])
    assert [p["rank"] for p in selfs["top"]] == list(range(1, 11))
    path = qualitative.save(store, S, cls, inf, selfs)
    assert qualitative.read(store, SETTING, "toy-exact")["influential"]["queries"][0]["index"] == q["index"]
    grid = figures.influence_grid(data, [inf], tmp_path / "g.png")
    top = figures.self_influence_top(data, selfs, tmp_path / "s.png")
    for p in (grid, top):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    assert path.is_file()


def test_cost_reported_without_cache_discount():
    cost = Cost("cpu")
    with cost.stage("fit"):
        pass
    infos = [{"shared_seconds": 2.0, "cache_hit": True}, {"shared_seconds": 3.0, "cache_hit": False}]
    assert engine.fit_seconds(cost, infos) == pytest.approx(cost.seconds("fit") + 2.0)
    # a fit that built part of what it used (one of several cached curvatures) is charged the part it reused
    partly = [{"shared_seconds": 5.0, "built_seconds": 1.5, "cache_hit": False}]
    assert engine.fit_seconds(cost, partly) == pytest.approx(cost.seconds("fit") + 3.5)
    assert json.dumps(records._clean({"a": float("nan"), "b": np.float32(1.5)})) == '{"a": null, "b": 1.5}'


def test_ensemble_predictions_average_the_ensemble(toy, store):
    gt = _gt(store)
    data = S.data()
    cls = registry.get("toy-exact")
    fitted = [cls(damping=0.1).fit(Task(gt.full_model(0), data.train_x, data.train_y, 4))]
    membership = torch.from_numpy(gt.masks)
    q = torch.from_numpy(gt.queries[:5])
    pred = engine.ensemble_predictions([fitted], data.test_x[q], data.test_y[q], data.train_x, data.train_y,
                                       membership, Cost("cpu"), "score")[0]
    scores = fitted[0].scores(data.test_x[q], data.test_y[q], data.train_x, data.train_y).double()
    torch.testing.assert_close(pred, membership.double() @ scores.T, rtol=1e-7, atol=1e-9)


def test_cli_run_lds_and_table1(toy, store, capsys):
    from benchmark import cli

    base = ["--results", str(store.root)]
    assert cli.main(base + ["run", "--setting", SETTING, "--solver", "toy-exact", "--param", "damping=0.1",
                            "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    rec = records.read_record(store, SETTING, "toy-exact")
    assert rec["params"] == {"damping": 0.1} and rec["lds"]["selection"]["method"] == "given by the user"
    assert f"LDS {rec['lds']['mean']:.4f}" in out and "mislabel recall" in out
    assert cli.main(base + ["run", "--setting", SETTING, "--solver", "baseline-random", "--device", "cpu"]) == 0
    assert "LDS" in capsys.readouterr().out
    assert cli.main(base + ["table1", SETTING, "--solver", "toy-exact"]) == 0
    assert "COMMITTED" in capsys.readouterr().out
    # the committed record used damping 0.1 given by hand; the recomputation chooses on validation: they may
    # differ, and the exit status says whether they agree
    assert cli.main(base + ["lds", SETTING, "--solver", "toy-exact", "--device", "cpu"]) in (0, 1)
    assert "RECOMPUTED" in capsys.readouterr().out
    assert cli.main(base + ["run", "--setting", SETTING, "--solver", "no-such-solver"]) == 2
    assert "unknown solver" in capsys.readouterr().err


def test_results_folder_from_the_environment_and_unwritable_results(toy, store, tmp_path, monkeypatch, capsys):
    from benchmark import cli

    monkeypatch.setenv("TDABENCH_RESULTS", str(store.root))
    assert ResultsStore.default() == store
    assert cli.main(["run", "--setting", SETTING, "--solver", "baseline-random", "--device", "cpu"]) == 0
    assert records.run_path(store, SETTING, "baseline-random").is_file()
    # the runs folder cannot be created (a file stands where it should be): one clear line, before any work
    blocked = synthetic_store(tmp_path / "blocked")
    shutil.rmtree(blocked.runs, ignore_errors=True)
    blocked.runs.write_text("not a folder")
    fits = []
    monkeypatch.setattr(engine, "fit", lambda *a, **k: fits.append(1))
    with pytest.raises(StoreError, match="cannot write"):
        records.run(blocked, S, registry.get("toy-exact"), **QUIET)
    assert fits == []
    assert cli.main(["--results", str(blocked.root), "run", "--setting", SETTING, "--solver", "toy-exact"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write" in err and "--results" in err


def test_no_space_left_is_one_clear_line():
    import errno

    from benchmark.setup.store import describe_os_error

    text = describe_os_error(OSError(errno.ENOSPC, "No space left on device"), "results/runs")
    assert "no space left" in text and "resumes" in text


def test_constant_scores_give_an_undefined_lds_not_a_crash(tmp_path, store, monkeypatch, capsys):
    folder = tmp_path / "flat"
    folder.mkdir()
    (folder / "flat.py").write_text(
        "import torch\nfrom benchmark.evaluate import Solver\n\n\n"
        "class Flat(Solver):\n    name = 'flat'\n    description = 'zero scores'\n\n"
        "    def fit(self, task):\n        return super().fit(task)\n\n"
        "    def ihvp(self, vectors):\n        return torch.zeros_like(vectors)\n")
    monkeypatch.setenv("TDABENCH_SOLVERS_PATH", str(folder))
    rec = records.run(store, S, registry.get("flat"), tasks=["lds"], **QUIET)
    assert rec["lds"]["mean"] is None and "undefined" in rec["lds"]["undefined"]
    from benchmark import cli

    assert cli.main(["--results", str(store.root), "run", "--setting", SETTING, "--solver", "flat", "--task", "lds",
                     "--device", "cpu"]) == 0
    assert "LDS undefined" in capsys.readouterr().out
    df, _ = leaderboard.collect(store, [S], [registry.get("flat")])
    assert "LDS undefined" in df[df.solver == "flat"].iloc[0].status
    assert "undefined" in tables.table1_recomputed(S, {"recomputed": rec["lds"], "committed": None,
                                                       "comparison": None, "solver": "flat",
                                                       "stages": {"verify_s": 0, "fit_s": 0, "search_s": 0,
                                                                  "score_s": 0, "total_s": 0, "peak_mb": 0}})


def test_a_broken_solver_file_is_listed_and_the_others_still_work(tmp_path, store, monkeypatch, capsys):
    folder = tmp_path / "mixed"
    write_solver(folder, "toy-exact")
    (folder / "broken.py").write_text("import this_module_does_not_exist\n")
    monkeypatch.setenv("TDABENCH_SOLVERS_PATH", str(folder))
    assert "toy-exact" in registry.available() and "ekfac" in registry.available()
    broken = registry.broken()
    assert list(broken) == [str(folder / "broken.py")] and "ModuleNotFoundError" in broken[str(folder / "broken.py")]
    from benchmark import cli

    assert cli.main(["solvers"]) == 0
    assert "BROKEN solver file" in capsys.readouterr().out
    assert cli.main(["--results", str(store.root), "run", "--setting", SETTING, "--solver", "identity", "--task",
                     "lds", "--device", "cpu"]) == 0
    assert cli.main(["--results", str(store.root), "run", "--setting", SETTING, "--solver", "no-such"]) == 2
    assert "failed to import" in capsys.readouterr().err


def test_derived_settings_are_read_strictly():
    assert settings.get("mnist-cnn@drop_last=true").recipe.drop_last is True
    assert settings.get("mnist-cnn@drop_last=0").recipe.drop_last is False
    with pytest.raises(KeyError, match="true or false"):
        settings.get("mnist-cnn@drop_last=yes")
    with pytest.raises(KeyError, match="epochs is given twice"):
        settings.get("mnist-cnn@epochs=3,epochs=5")
    with pytest.raises(KeyError, match="needs a int"):
        settings.get("mnist-cnn@epochs=three")


def test_plugins_have_stable_names_and_pickle_into_another_process(toy):
    import multiprocessing as mp

    cls = registry.get("toy-exact")
    assert cls.__module__.startswith("benchmark._plugins.solvers.d")  # a folder key, not a per-process hash
    with mp.get_context("spawn").Pool(1) as pool:
        name, setting_name = pool.apply(_roundtrip, (pickle.dumps(cls), pickle.dumps(S)))
    assert (name, setting_name) == ("toy-exact", SETTING)


def _roundtrip(cls_blob, setting_blob):
    return pickle.loads(cls_blob).name, pickle.loads(setting_blob).name


def test_leaderboard_leaves_days_long_solver_runs_to_the_user():
    """CG and LiSSA sweep the training set per IHVP: the leaderboard runs them on the small settings only and
    says why elsewhere; exact is refused above its parameter limit."""
    lr, cnn = settings.get("mnist-lr"), settings.get("mnist-cnn")
    assert campaign.not_applicable(lr, registry.get("cg")) is None
    assert campaign.not_applicable(lr, registry.get("lissa")) is None
    for solver in ("cg", "lissa"):
        assert campaign.not_applicable(cnn, registry.get(solver)).startswith("not run automatically: model has 46,730")
    assert campaign.not_applicable(cnn, registry.get("ekfac")) is None
    assert "accepts up to 12,000" in campaign.not_applicable(cnn, registry.get("exact"))


def test_mislabel_is_redone_with_the_parameters_lds_chose(toy, store, monkeypatch):
    cls = registry.get("toy-exact")
    calls, real = [], engine.evaluate_mislabel
    monkeypatch.setattr(engine, "evaluate_mislabel", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    first = records.run(store, S, cls, tasks=["mislabel"], **QUIET)  # before any LDS: the defaults
    assert first["mislabel"]["params"] == {"damping": 0.1}
    rec = records.run(store, S, cls, {"damping": 1e-3}, tasks=["lds"], search=False, **QUIET)
    assert rec["lds"]["params"] == rec["mislabel"]["params"] == {"damping": 1e-3}
    assert rec["mislabel"]["params_source"].startswith("chosen for LDS")
    assert len(calls) == 2
    again = records.run(store, S, cls, {"damping": 1e-3}, tasks=["lds"], search=False, **QUIET)
    assert len(calls) == 2 and again["mislabel"] == rec["mislabel"]  # same parameters: kept, not redone


def test_explaining_zoo_models_is_recorded_and_checked(toy, store):
    from benchmark.groundtruth import zoo as zoo_mod
    from benchmark.groundtruth.executors import LocalExecutor

    build = dict(store=store, executor=LocalExecutor(1), progress=False, log=lambda *a: None)
    zoo_mod.build(S, zoo_mod.ZooSpec(models=2), **build)
    cls = registry.get("toy-exact")
    rec = records.run(store, S, cls, search=False, tasks=["lds"], ensemble=2, explain="zoo", **QUIET)
    explained = rec["lds"]["explained"]
    assert explained["source"] == "zoo" and explained["models"] == [0, 1]
    assert rec["lds"]["ground_truth"]["full_models_used"] == 0  # the ground truth's models were not read
    # the same LDS as fitting the zoo's models by hand and averaging their scores
    zoo, gt, data = zoo_mod.load(store, S), _gt(store), S.data()
    q = torch.from_numpy(gt.queries)
    scores = sum(cls(damping=0.1).fit(Task(zoo.model(k), data.train_x, data.train_y, 4))
                 .scores(data.test_x[q], data.test_y[q], data.train_x, data.train_y).double().numpy()
                 for k in range(2)) / 2
    target = gt.outputs["margin"][:, :, :len(gt.queries)].mean(0)
    expect = [spearmanr(gt.masks.astype(float) @ scores[i], target[:, i]).statistic for i in range(len(gt.queries))]
    assert rec["lds"]["mean"] == pytest.approx(np.mean(expect), abs=1e-6)
    assert records.stale_reasons(rec, store, S, cls) == {}
    zoo_mod.build(S, zoo_mod.ZooSpec(models=3), **build)  # the zoo grows: the models used are unchanged
    assert records.stale_reasons(rec, store, S, cls) == {}
    victim = zoo.root / "k01" / f"epoch_{zoo.epochs:02d}.safetensors"
    victim.write_bytes(victim.read_bytes()[:-8] + b"\0" * 8)
    assert any("zoo" in w for w in records.stale_reasons(rec, store, S, cls)["lds"])


def test_new_rows_explain_the_zoo_and_reruns_keep_their_explained_model(tmp_path):
    """The uncoupled protocol by default: a new row explains a zoo model where the setting has a zoo; a rerun
    explains what its record explained (so it stays paired with it); a solver that needs a trajectory, the zoo."""
    from benchmark.groundtruth import zoo as zoo_mod
    from benchmark.groundtruth.executors import LocalExecutor

    store, setting = synthetic_store(tmp_path), settings.get(SETTING)
    ekfac = registry.get("ekfac")
    assert not zoo_mod.exists(store, setting)
    assert campaign.default_explain(store, setting, ekfac, None) == "ground truth"
    assert campaign.default_explain(store, setting, registry.get("tracin"), None) == "zoo"
    zoo_mod.build(setting, zoo_mod.ZooSpec(models=1), store=store, executor=LocalExecutor(1), progress=False,
                  log=lambda *a: None)
    assert zoo_mod.exists(store, setting)
    assert campaign.default_explain(store, setting, ekfac, None) == "zoo"
    assert campaign.default_explain(store, setting, ekfac, {"lds": {"mean": 0.1}}) == "ground truth"
    assert campaign.default_explain(store, setting, ekfac, {"lds": {"explained": {"source": "zoo"}}}) == "zoo"
    assert campaign.default_explain(store, setting, RANDOM, None) == "ground truth"


def test_ensemble_rows_stand_beside_the_single_model_row(toy, store, monkeypatch):
    """A solver's ``leaderboard_ensembles`` gives it one row per size: <name>-ens<n> averages n zoo models with the
    parameters its single-model row chose on validation queries, LDS only; it reruns when that choice changes, and
    a size the zoo cannot hold is n/a with the command that trains the models."""
    from benchmark.groundtruth import zoo as zoo_mod
    from benchmark.groundtruth.executors import LocalExecutor

    assert records.parse_row_name(records.row_name("trak", 8)) == ("trak", 8)
    assert records.parse_row_name("kronfluence-ekfac") == ("kronfluence-ekfac", 1)
    assert records.parse_row_name("odd-ens1") == ("odd-ens1", 1)
    cls = registry.get("toy-exact")
    monkeypatch.setattr(cls, "leaderboard_ensembles", (1, 2, 3))
    zoo_mod.build(S, zoo_mod.ZooSpec(models=2), store=store, executor=LocalExecutor(1), progress=False,
                  log=lambda *a: None)
    planned, _ = campaign.update(store, [S], [cls], dry_run=True, **QUIET)
    assert [r for _, r, _ in planned if r.startswith("toy")] == ["toy-exact", "toy-exact-ens2"]
    done, failures = campaign.update(store, [S], [cls], **QUIET)
    assert failures == {}
    assert (SETTING, "toy-exact-ens2", ["lds"]) in done and not any(r == "toy-exact-ens3" for _, r, _ in done)
    single = records.read_record(store, SETTING, "toy-exact")
    ens = records.read_record(store, SETTING, "toy-exact", 2)
    assert ens is not None and records.run_path(store, SETTING, "toy-exact", 2).name == "toy-exact-ens2.json"
    assert ens["ensemble"] == 2 and "mislabel" not in ens
    assert ens["lds"]["explained"]["source"] == "zoo" and ens["lds"]["explained"]["models"] == [0, 1]
    assert ens["lds"]["params"] == single["lds"]["params"]
    assert "single-model toy-exact row" in ens["lds"]["selection"]["method"]
    assert single["lds"]["explained"]["models"] == [0]  # the single-model row is untouched by its ensemble
    assert campaign.update(store, [S], [cls], **QUIET)[0] == []  # both fresh

    # the same LDS as averaging two zoo models' scores by hand
    zoo, gt, data = zoo_mod.load(store, S), _gt(store), S.data()
    q = torch.from_numpy(gt.queries)
    scores = sum(cls(**single["lds"]["params"]).fit(Task(zoo.model(k), data.train_x, data.train_y, 4))
                 .scores(data.test_x[q], data.test_y[q], data.train_x, data.train_y).double().numpy()
                 for k in range(2)) / 2
    target = gt.outputs["margin"][:, :, :len(gt.queries)].mean(0)
    expect = [spearmanr(gt.masks.astype(float) @ scores[i], target[:, i]).statistic for i in range(len(gt.queries))]
    assert ens["lds"]["mean"] == pytest.approx(np.mean(expect), abs=1e-6)

    df, found = leaderboard.collect(store, [S], [cls])
    row = df[df["solver"] == "toy-exact-ens2"].iloc[0]
    assert row["explained"] == "zoo 0–1" and row["record"].endswith("toy-exact-ens2.json")
    assert row["lds"] == pytest.approx(ens["lds"]["mean"])
    three = df[df["solver"] == "toy-exact-ens3"].iloc[0]
    assert three["status"].startswith("not yet run") and "tdabench zoo synthetic-mlp --models 3" in three["status"]

    # the single-model row chooses other parameters: its ensemble follows
    other = next(d for d in cls.parameters["damping"] if d != single["lds"]["params"]["damping"])
    records.run(store, S, cls, {"damping": other}, tasks=["lds"], search=False, explain="zoo", **QUIET)
    done, _ = campaign.update(store, [S], [cls], **QUIET)
    assert [r for _, r, _ in done] == ["toy-exact-ens2"]
    assert records.read_record(store, SETTING, "toy-exact", 2)["lds"]["params"] == {"damping": other}


def test_compare_pairs_rows_that_explain_the_same_model_and_queries(toy, store, monkeypatch):
    """`tdabench compare`: the paired difference is the mean of the per-query differences; an ensemble pairs with
    a single model of the same artifact, while rows explaining another artifact's models are shown but not
    differenced, with the reason."""
    from benchmark.groundtruth import zoo as zoo_mod
    from benchmark.groundtruth.executors import LocalExecutor

    write_solver(toy.parent, "toy-broken", sign=-1)
    good, bad = registry.get("toy-exact"), registry.get("toy-broken")
    a = records.run(store, S, good, search=False, tasks=["lds"], **QUIET)["lds"]
    b = records.run(store, S, bad, search=False, tasks=["lds"], **QUIET)["lds"]
    zoo_mod.build(S, zoo_mod.ZooSpec(models=2), store=store, executor=LocalExecutor(1), progress=False,
                  log=lambda *x: None)
    records.run(store, S, good, search=False, tasks=["lds"], ensemble=2, explain="zoo", **QUIET)
    single_zoo = records.run(store, S, bad, search=False, tasks=["lds"], ensemble=1, explain="zoo", write=False,
                             **QUIET)["lds"]
    ens = records.read_record(store, SETTING, "toy-exact", 2)["lds"]
    assert records.unpaired_reasons(ens, single_zoo) == []  # zoo 0–1 against zoo 0: the same queries and target
    # the zoo grows (its root hash changes): a row explaining the new model still pairs with the older rows
    zoo_mod.build(S, zoo_mod.ZooSpec(models=3), store=store, executor=LocalExecutor(1), progress=False,
                  log=lambda *x: None)
    later = records.run(store, S, bad, search=False, tasks=["lds"], ensemble=1, explain="zoo", write=False,
                        **QUIET)["lds"]
    assert later["explained"]["root_hash"] != ens["explained"]["root_hash"]
    assert records.unpaired_reasons(ens, later) == []
    assert records.unpaired_reasons(ens, {**later, "explained": {**later["explained"], "version": "v9"}})
    legacy = {k: v for k, v in a.items() if k != "explained"}  # records from before `explained` was written
    assert a["explained"]["source"] == "ground truth" and records.unpaired_reasons(a, legacy) == []
    assert records.explained_label(legacy) == records.explained_label(a) == "gt 0"
    items = records.compare_rows(store, S, ["toy-exact", "toy-broken", "toy-exact-ens2"],
                                 {"toy-exact": good, "toy-broken": bad})
    d = np.array(b["per_query"], dtype=float) - np.array(a["per_query"], dtype=float)
    assert items[1]["paired"] and items[1]["difference"] == pytest.approx(np.nanmean(d), abs=1e-12)
    assert items[1]["difference"] < 0 and items[1]["wins"] < 0.5  # the anti-correlated solver loses
    assert items[1]["n"] == np.isfinite(d).sum()
    assert not items[2]["paired"] and "different artifacts (zoo 0–1 vs gt 0)" in items[2]["unpaired_reasons"][0]
    text = tables.compare_table(S, items)
    assert "not paired" in text and f"{items[1]['difference']:+.4f}" in text
    with pytest.raises(RunError, match="no LDS for 'toy-missing'"):
        records.compare_rows(store, S, ["toy-exact", "toy-missing"], {"toy-exact": good})
