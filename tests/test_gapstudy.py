"""The Table 1 gap study on a small synthetic ground truth with two full-data models and three replicas:
every row recomputed independently with scipy."""

import dataclasses

import numpy as np
import pytest
import torch
from eval_helpers import synthetic_store, write_solver
from scipy.stats import spearmanr

from benchmark import groundtruth
from benchmark.evaluate import Task, records, registry
from benchmark.groundtruth.executors import LocalExecutor
from benchmark.report import figures, tables
from benchmark.setup import artifacts, settings
from benchmark.studies import gap as gapstudy
from benchmark.studies import table1

SETTING = "synthetic-mlp"
S = settings.get(SETTING)
QUIET = dict(device="cpu", log=lambda *a: None)


@pytest.fixture
def toy(tmp_path, monkeypatch):
    folder = tmp_path / "solvers"
    write_solver(folder)
    monkeypatch.setenv("TDABENCH_SOLVERS_PATH", str(folder))
    return registry.get("toy-exact")


@pytest.fixture
def store(tmp_path):
    return synthetic_store(tmp_path, "ensemble")


def scipy_lds(scores: np.ndarray, masks: np.ndarray, target: np.ndarray) -> np.ndarray:
    pred = masks.astype(np.float64) @ scores.T  # (M, Q): summed attributions of each subset
    return np.array([spearmanr(pred[:, q], target[:, q]).statistic for q in range(target.shape[1])])


def test_gap_study_rows_match_a_direct_computation(toy, store, tmp_path):
    rec = gapstudy.run(store, S, toy, params={"damping": 0.1}, dampings=[1e-3, 10.0, 0.1], **QUIET)
    gt = groundtruth.load(store, S)
    data = S.data()
    v = torch.from_numpy(gt.validation_queries)
    vx, vy = data.test_x[v], data.test_y[v]
    cls = toy

    def scores(k, measurement="margin"):
        task = Task(gt.full_model(k), data.train_x, data.train_y, data.num_classes, measurement)
        return cls(damping=0.1).fit(task).scores(vx, vy, data.train_x, data.train_y).double().numpy()

    q = len(gt.queries)
    out = {m: gt.outputs[m][:, :, q:] for m in ("margin", "loss")}

    def scores_at(damping):
        task = Task(gt.full_model(0), data.train_x, data.train_y, data.num_classes)
        return cls(damping=damping).fit(task).scores(vx, vy, data.train_x, data.train_y).double().numpy()

    s0, s1, loss0 = scores(0), scores(1), scores(0, "loss")
    base = scipy_lds(s0, gt.masks, out["margin"].mean(0))
    single = np.mean([scipy_lds(s0, gt.masks, out["margin"][r]) for r in range(3)], axis=0)
    expected = {
        ("target replicas", "1 seed(s) per subset"): single,
        ("target replicas", "3 seed(s) per subset"): base,
        ("ensemble", "1 full model(s)"): base,
        ("ensemble", "2 full model(s)"): scipy_lds((s0 + s1) / 2, gt.masks, out["margin"].mean(0)),
        ("measurement", "margin (solver and target)"): base,
        ("measurement", "loss (solver and target)"): scipy_lds(loss0, gt.masks, out["loss"].mean(0)),
        ("damping", "λ=0.001"): scipy_lds(scores_at(1e-3), gt.masks, out["margin"].mean(0)),
        ("damping", "λ=0.1 (chosen)"): base,
        ("damping", "λ=10"): scipy_lds(scores_at(10.0), gt.masks, out["margin"].mean(0)),
    }
    rows = {(r["factor"], r["level"]): r for r in rec["rows"]}
    # levels are 1, 2, 4, ... and the total: with three replicas the "2" level averages one disjoint pair
    assert [lvl for f, lvl in rows if f == "target replicas"] == [f"{n} seed(s) per subset" for n in (1, 2, 3)]
    assert [lvl for f, lvl in rows if f == "damping"] == ["λ=0.001", "λ=0.1 (chosen)", "λ=10"]  # chosen once
    for key, per_query in expected.items():
        r = rows[key]
        assert r["lds"] == pytest.approx(np.nanmean(per_query), abs=1e-9), key
        assert r["delta"] == pytest.approx(np.nanmean(per_query - base), abs=1e-9), key
    assert rows[("ensemble", "1 full model(s)")]["delta"] == 0.0
    # the difference's error is the paired one: over the per-query differences, not from the two rows' errors
    diff = expected[("ensemble", "2 full model(s)")] - base
    assert rows[("ensemble", "2 full model(s)")]["delta_se"] == pytest.approx(diff.std(ddof=1) / np.sqrt(len(diff)))
    assert rec["split"] == "validation" and rec["queries"] == len(vy) and rec["full_models"] == 2
    assert rec["params_source"] == "given by the user"

    written = gapstudy.study_path(store, SETTING, "toy-exact")
    assert written.is_file()
    png = figures.gap_study(rec, tmp_path / f"{SETTING}_gap_toy-exact.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # every target row's ceiling is the one noise-ceiling estimator's, for that many replicas
    from benchmark.core.stats import noise_ceiling

    for n in (1, 2, 3):
        assert rows[("target replicas", f"{n} seed(s) per subset")]["ceiling"] == pytest.approx(
            noise_ceiling(out["margin"], target_replicas=n)["lds_ceiling"])
    table = tables.gap_table(rec)
    assert f"{rows[('ensemble', '2 full model(s)')]['lds']:.3f}" in table and table.count("\n| ") == len(rec["rows"]) + 1


def test_gap_study_takes_damping_from_a_fresh_run_record(toy, store):
    run = records.run(store, S, toy, tasks=["lds"], **QUIET)
    rec = gapstudy.study(store, S, toy, ensemble=1, **QUIET)
    assert rec["params"] == run["lds"]["params"] and rec["params_source"] == "chosen on validation queries"
    trials = run["lds"]["selection"]["trials"]
    assert [d["lds"] for d in rec["damping"]] == [t["validation_lds"] for t in trials]
    # the run record's trials stand in the table as rows of their own; the chosen one equals the baseline row
    grid = gapstudy.grid_rows(rec)
    assert len(grid) == len(trials)
    chosen = next(t for t in trials if t["params"] == rec["params"])
    baseline = next(r for r in rec["rows"] if r["level"] == "1 full model(s)")
    assert chosen["validation_lds"] == pytest.approx(baseline["lds"], abs=1e-12)
    with pytest.raises(ValueError, match="between 1 and 2"):
        gapstudy.study(store, S, toy, ensemble=3, **QUIET)


def test_cli_gap(toy, store, capsys):
    from benchmark import cli

    assert cli.main(["--results", str(store.root), "gap", SETTING, "--solver", "toy-exact", "--param", "damping=0.1",
                     "--ensemble", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "| ensemble | 1 full model(s) |" in out and "given by the user" in out
    assert (store.gap / f"{SETTING}_toy-exact.json").is_file()
    assert (store.figures / f"{SETTING}_gap_toy-exact.png").is_file()


def test_report_evaluates_the_validation_choice_on_the_reported_queries(toy, store):
    records.run(store, S, toy, tasks=["lds"], **QUIET)
    kw = QUIET
    rec = gapstudy.run(store, S, toy, dampings=[1e-3, 10.0], report_queries=True, **kw)
    # each factor's best validation level, combined
    best = {f: max((r for r in rec["rows"] if r["factor"] == f), key=lambda r: r["lds"])["value"]
            for f in ("ensemble", "measurement", "damping")}
    rep = rec["reported"]
    assert (rep["ensemble"], rep["measurement"], rep["params"]["damping"]) == \
        (best["ensemble"], best["measurement"], best["damping"])
    # the reported LDS, recomputed with scipy from an independent ensemble of fits
    gt = groundtruth.load(store, S)
    data = S.data()
    q = torch.from_numpy(gt.queries)
    cls = toy
    total = sum(cls(**rep["params"]).fit(Task(gt.full_model(k), data.train_x, data.train_y,
                                              data.num_classes, rep["measurement"]))
                .scores(data.test_x[q], data.test_y[q], data.train_x, data.train_y).double().numpy()
                for k in range(rep["ensemble"]))
    target = gt.outputs[rep["measurement"]][:, :, :len(gt.queries)].mean(0)
    assert rep["lds"]["mean"] == pytest.approx(np.nanmean(scipy_lds(total / rep["ensemble"], gt.masks, target)),
                                               abs=1e-9)
    assert rep["queries"] == len(gt.queries) and "reported queries" in tables.gap_table(rec)
    # `make table1` prints it under Table 1, as current
    text = tables.table1_committed(S, table1.committed(store, S, [toy]), table1.gap_reported(store, S, [toy]))
    assert "gap study's protocol" in text and f"LDS {rep['lds']['mean']:.3f} ± {rep['lds']['se']:.3f}" in text

    # asked the same way again: the stored validation study and its report are reused
    calls = {"study": 0, "report": 0}
    real_study, real_report = gapstudy.study, gapstudy.report

    def counting(name, real):
        return lambda *a, **k: calls.__setitem__(name, calls[name] + 1) or real(*a, **k)

    try:
        gapstudy.study, gapstudy.report = counting("study", real_study), counting("report", real_report)
        again = gapstudy.run(store, S, toy, dampings=[10.0, 1e-3], report_queries=True, **kw)
        assert calls == {"study": 0, "report": 0} and again["rows"] == rec["rows"] and again["reported"] == rep
        # asked otherwise (the same artifact named by its version): the study reruns, its choice is unchanged, so
        # the reported evaluation still holds, with or without --report
        again = gapstudy.run(store, S, toy, dampings=[1e-3, 10.0], version=gt.root.name, **kw)
        assert calls == {"study": 1, "report": 0} and again["reported"] == rep and again["rows"] == rec["rows"]
        # it was computed by other solver code (its fingerprint differs): no longer current, made again
        stored = gapstudy.study_path(store, SETTING, "toy-exact")
        doctored = artifacts.read_json(stored)
        doctored["reported"]["lds"]["fingerprint"]["solver"]["scores"][0] += 1.0
        artifacts.write_json(stored, doctored)
        again = gapstudy.run(store, S, toy, dampings=[1e-3, 10.0], version=gt.root.name, report_queries=True, **kw)
        assert calls == {"study": 1, "report": 1} and again["reported"]["lds"]["mean"] == rep["lds"]["mean"]
        assert not records.stale_reasons({"format": records.RUN_FORMAT, "lds": again["reported"]["lds"]}, store, S, toy)
    finally:
        gapstudy.study, gapstudy.report = real_study, real_report


def test_derived_setting_changes_only_the_recipe():
    base = settings.get(SETTING)
    d = settings.get(f"{SETTING}@epochs=1")
    assert d.recipe == dataclasses.replace(base.recipe, epochs=1) and d.name == f"{SETTING}@epochs=1"
    assert d.recipe_hash() != base.recipe_hash() and d.data() is base.data()  # same data, loaded once
    assert settings.get(f"{SETTING}@lr=0.050,epochs=1").name == f"{SETTING}@epochs=1,lr=0.05"  # canonical name
    assert f"{SETTING}@epochs=1" not in settings.available()  # studies never reach the leaderboard
    with pytest.raises(KeyError, match="FIELD one of epochs"):
        settings.get(f"{SETTING}@depth=3")
    with pytest.raises(KeyError, match="epochs needs a int"):
        settings.get(f"{SETTING}@epochs=two")


def test_study_artifacts_add_seed_policy_and_recipe_rows(toy, store, monkeypatch):
    from benchmark import cli

    gt = groundtruth.load(store, S)
    # built through the CLI, as a user would: --study (or a derived setting) writes under the study root only
    before = sorted(p.name for p in store.gt.iterdir())
    common = ["--alpha", "0.5", "--queries", str(len(gt.queries)), "--validation-queries",
              str(len(gt.validation_queries)), "--subsets", "16", "--seeds", "2", "--full-models", "1",
              "--workers", "1", "--quiet"]
    base = ["--results", str(store.root)]
    assert cli.main(base + ["gt", SETTING, "--study", "--seed-policy", "varied", *common]) == 0
    assert cli.main(base + ["gt", f"{SETTING}@epochs=1", "--seed-policy", "shared", *common]) == 0
    assert sorted(p.name for p in store.gt.iterdir()) == before  # nothing reached the benchmark's ground truth
    assert cli.main(base + ["gt", f"{SETTING}@epochs=1", "--verify", "--require-complete"]) == 0  # found where built
    assert cli.main(base + ["gt", SETTING, "--study", "--verify", "--require-complete"]) == 0
    # not comparable (more replicas than the benchmark's artifact): skipped, with the reason logged
    groundtruth.build(S.derived("lr=0.1"), dataclasses.replace(gt.protocol, seeds=4, full_models=1), store=store,
                      study=True, executor=LocalExecutor(1), progress=False, log=lambda *a: None)
    logs = []
    rec = gapstudy.study(store, S, toy, params={"damping": 0.1}, ensemble=1, device="cpu", log=logs.append)
    assert any("more replicas" in line for line in logs)

    data, q = S.data(), len(gt.queries)
    v = torch.from_numpy(gt.validation_queries)
    cls = toy

    def lds_of(art):  # an independent fit of the artifact's own first full-data model
        model = art.full_model(0)
        sc = cls(damping=0.1).fit(Task(model, data.train_x, data.train_y, data.num_classes)) \
            .scores(data.test_x[v], data.test_y[v], data.train_x, data.train_y).double().numpy()
        return scipy_lds(sc, art.masks, art.outputs["margin"][:, :, len(art.queries):].mean(0))

    matched = scipy_lds(
        cls(damping=0.1).fit(Task(gt.full_model(0), data.train_x, data.train_y, data.num_classes))
        .scores(data.test_x[v], data.test_y[v], data.train_x, data.train_y).double().numpy(),
        gt.masks[:16], gt.outputs["margin"][:2, :16, q:].mean(0))
    varied = groundtruth.load(store, S, study=True)
    derived = groundtruth.load(store, S.derived("epochs=1"), study=True)
    assert varied.protocol.seed_policy == "varied" and derived.protocol.seed_policy == "shared"
    # the varied study's full-data model is the benchmark's own (same seed): its scores are reused, not refitted
    assert gapstudy._same_weights(varied.root, gt.root) and not gapstudy._same_weights(derived.root, gt.root)
    rows = {(r["factor"], r["value"]): r for r in rec["rows"] if r["note"] == gapstudy.STUDY_NOTE}
    assert set(rows) == {("seed policy", "benchmark"), ("seed policy", "study"),
                         ("training recipe", "benchmark"), ("training recipe", "study")}
    for factor, art in (("seed policy", varied), ("training recipe", derived)):
        mine, theirs = rows[(factor, "benchmark")], rows[(factor, "study")]
        expected = lds_of(art)
        assert mine["lds"] == pytest.approx(np.nanmean(matched), abs=1e-9) and mine["delta"] == 0.0
        assert theirs["lds"] == pytest.approx(np.nanmean(expected), abs=1e-9), factor
        assert theirs["delta"] == pytest.approx(np.nanmean(expected - matched), abs=1e-9), factor
    assert "shared seeds" in rows[("seed policy", "benchmark")]["level"]
    assert "varied seeds" in rows[("seed policy", "study")]["level"]
    assert "epochs=3" in rows[("training recipe", "benchmark")]["level"]
    assert "epochs=1" in rows[("training recipe", "study")]["level"]
    assert [a["setting"] for a in rec["study_artifacts"]] == [SETTING, f"{SETTING}@epochs=1"]
    assert "†" in tables.gap_table(rec)
    # the report never swaps the reported ground truth for a study's
    assert set(gapstudy.best_protocol(rec)) == {"params", "ensemble", "measurement", "explain", "rule"}


def test_coupling_rows_and_an_uncoupled_reported_protocol(toy, store):
    """With a zoo, the study measures what sharing a seed with a target replica is worth, and the protocol it
    reports explains zoo models (independent of the target)."""
    from benchmark.groundtruth import zoo as zoo_mod

    zoo_mod.build(S, zoo_mod.ZooSpec(models=2), store=store, executor=LocalExecutor(1), progress=False,
                  log=lambda *a: None)
    zoo = zoo_mod.load(store, S, min_models=2)
    rec = gapstudy.run(store, S, toy, params={"damping": 0.1}, report_queries=True, **QUIET)
    gt = groundtruth.load(store, S)
    data, q = S.data(), len(gt.queries)
    v = torch.from_numpy(gt.validation_queries)

    def lds_of(model, replicas):
        sc = toy(damping=0.1).fit(Task(model, data.train_x, data.train_y, data.num_classes)) \
            .scores(data.test_x[v], data.test_y[v], data.train_x, data.train_y).double().numpy()
        return scipy_lds(sc, gt.masks, gt.outputs["margin"][replicas][:, :, q:].mean(0))

    rows = {(r["factor"], r["value"]): r for r in rec["rows"]}
    coupled = np.nanmean([lds_of(gt.full_model(k), [0, 1, 2]) for k in range(2)], axis=0)
    independent = np.nanmean([lds_of(zoo.model(k), [0, 1, 2]) for k in range(2)], axis=0)
    c, i = rows[("explained model's seed", "coupled")], rows[("explained model's seed", "independent")]
    assert c["lds"] == pytest.approx(np.nanmean(coupled), abs=1e-9)
    assert i["lds"] == pytest.approx(np.nanmean(independent), abs=1e-9)
    assert i["delta"] == pytest.approx(np.nanmean(independent - coupled), abs=1e-9)
    others = [[1, 2], [0, 2]]
    full_minus = np.nanmean([lds_of(gt.full_model(k), others[k]) for k in range(2)], axis=0)
    zoo_minus = np.nanmean([lds_of(zoo.model(k), others[k]) for k in range(2)], axis=0)
    assert rows[("target without the explained model's replica", "full")]["lds"] == pytest.approx(
        np.nanmean(full_minus), abs=1e-9)
    assert rows[("target without the explained model's replica", "zoo")]["delta"] == pytest.approx(
        np.nanmean(zoo_minus - full_minus), abs=1e-9)
    rep = rec["reported"]
    assert rep["explain"] == "zoo" and rep["lds"]["explained"]["source"] == "zoo"
    assert rep["lds"]["explained"]["models"] == list(range(rep["ensemble"]))
    assert rep["lds"]["ground_truth"]["full_models_used"] == 0
    assert not records.stale_reasons({"format": records.RUN_FORMAT, "lds": rep["lds"]}, store, S, toy)
