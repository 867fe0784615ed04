"""CI regression on attribution quality (`tdabench regress`).

- The check itself: a solver that keeps its quality passes; a deliberately broken one (same name, anti-
  correlated scores) fails with a message naming solver, metric, baseline and new value.
- The committed benchmark: every solver in ``results/baselines.json`` still reaches its recorded LDS and
  mislabel recall on the committed small ground truths (``mnist-lr``, ``mnist-mlp-small``).
"""

import pytest
from eval_helpers import synthetic_store, write_solver

from benchmark.evaluate import registry
from benchmark.groundtruth import artifact as gt_artifact
from benchmark.setup import settings
from benchmark.setup.artifacts import MANIFEST, read_json, write_json
from benchmark.setup.store import ResultsStore
from benchmark.studies import regress

SETTING = "synthetic-mlp"
S = settings.get(SETTING)
QUIET = dict(device="cpu", log=lambda *a: None)


def test_tolerance_follows_the_standard_error():
    c = regress.Comparison("s", "x", "lds", baseline=0.40, se=0.01, tolerance=regress.tolerance(0.01, 0.001),
                           new=0.375)
    assert c.tolerance == pytest.approx(0.03) and not c.failed  # a 2.5-se drop is noise
    c.new = 0.365
    assert c.failed
    msg = c.message()
    assert "x" in msg and "lds" in msg and "0.4000" in msg and "0.3650" in msg and "REGRESSED" in msg
    # se 0 (recall already 1.0): one flipped point's worth of reordering is still tolerated, two are not
    assert regress.tolerance(0.0, 1 / 26) == pytest.approx(3 / 26)


def test_broken_solver_fails_the_check(tmp_path, monkeypatch):
    store = synthetic_store(tmp_path)
    good = tmp_path / "good"
    write_solver(good, "toy-exact")
    monkeypatch.setenv("TDABENCH_SOLVERS_PATH", str(good))
    regress.record(store, [S], {"toy-exact": registry.get("toy-exact")}, **QUIET)
    base = read_json(store.baselines)["settings"][SETTING]["solvers"]["toy-exact"]
    assert set(base["metrics"]) == {"lds", *regress.MISLABEL_METRICS}
    assert base["params"] in [{"damping": d} for d in (1e-3, 1e-1, 10.0)]

    results = regress.check(store, [S], {"toy-exact": registry.get("toy-exact")}, **QUIET)
    assert results and regress.report(results, log=lambda *a: None)

    broken = tmp_path / "broken"
    write_solver(broken, "toy-exact", sign=-1)  # same name: a regression introduced into the solver
    monkeypatch.setenv("TDABENCH_SOLVERS_PATH", str(broken))
    results = regress.check(store, [S], {"toy-exact": registry.get("toy-exact")}, **QUIET)
    lines = []
    assert not regress.report(results, log=lines.append)
    failed = {r.metric for r in results if r.failed}
    assert "lds" in failed and "recall_10" in failed
    fail_lines = [line for line in lines if line.startswith("FAIL")]
    lds_line = next(line for line in fail_lines if " lds " in line)
    assert "toy-exact" in lds_line and f"baseline {base['metrics']['lds']['value']:.4f}" in lds_line
    assert "new -" in lds_line  # anti-correlated: a negative LDS
    # a baseline whose solver file is gone fails too
    results = regress.check(store, [S], {}, **QUIET)
    assert any(r.failed and "no solver file defines it" in r.message() for r in results)


def test_params_from_run_records_and_narrowed_scopes(tmp_path, monkeypatch):
    """Baselines can take a solver's hyper-parameters from its run record (no second grid search), and a solver
    too slow for the CI budget is checked on fewer LDS queries without mislabel metrics: the file says so, and
    every check prints why."""
    from benchmark.evaluate import records

    store = synthetic_store(tmp_path)
    folder = tmp_path / "good"
    write_solver(folder, "toy-exact")
    monkeypatch.setenv("TDABENCH_SOLVERS_PATH", str(folder))
    cls = registry.get("toy-exact")
    with pytest.raises(regress.RegressionError, match="no run record"):
        regress.record(store, [S], {"toy-exact": cls}, params_from_records=True, **QUIET)
    records.run(store, S, cls, {"damping": 10.0}, search=False, tasks=["lds"], device="cpu", log=lambda *a: None)
    slow = regress.Scope(lds_queries=8, no_mislabel="too slow for CI (test)")
    regress.record(store, [S], {"toy-exact": cls}, params_from_records=True, scopes={"toy-exact": slow}, **QUIET)
    base = read_json(store.baselines)["settings"][SETTING]["solvers"]["toy-exact"]
    assert base["params"] == {"damping": 10.0}  # the record's, not a fresh search's
    assert "runs/synthetic-mlp/toy-exact.json" in base["selection"]
    assert base["lds_queries"] == 8 and base["not_checked"] == {"mislabel": "too slow for CI (test)"}
    assert set(base["metrics"]) == {"lds"} and base["metrics"]["lds"]["resolution"] == pytest.approx(1 / 8)
    lines = []
    results = regress.check(store, [S], {"toy-exact": cls}, device="cpu", log=lines.append)
    assert [r.metric for r in results] == ["lds"] and regress.report(results, log=lambda *a: None)
    assert results[0].new == pytest.approx(base["metrics"]["lds"]["value"], abs=1e-12)  # the same 8 queries
    assert any("toy-exact: mislabel is not checked: too slow for CI (test)" in line for line in lines)
    assert any("LDS on 8 queries" in line for line in lines)


def test_check_refuses_a_changed_ground_truth(tmp_path, monkeypatch):
    import shutil

    import numpy as np

    from benchmark.setup.artifacts import file_hashes

    store = synthetic_store(tmp_path)
    folder = tmp_path / "good"
    write_solver(folder, "toy-exact")
    monkeypatch.setenv("TDABENCH_SOLVERS_PATH", str(folder))
    regress.record(store, [S], {"toy-exact": registry.get("toy-exact")}, **QUIET)
    # a newer version whose units were trained again (other outputs): another root hash, not comparable
    root = gt_artifact.latest(store.gt, S)
    other = root.with_name("v2")
    shutil.copytree(root, other)
    man = read_json(other / MANIFEST)
    man["version"] = "v2"
    unit = other / "units" / "r00_s0000.npz"
    with np.load(unit) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["outputs"][0] += 0.1
    np.savez(unit, **arrays)
    man["files"].update(file_hashes(other, ["units/r00_s0000.npz"]))
    write_json(other / MANIFEST, man)
    with pytest.raises(regress.RegressionError, match="not comparable"):
        regress.check(store, [S], {"toy-exact": registry.get("toy-exact")}, **QUIET)


def _committed_benchmark_ready() -> str | None:
    store = ResultsStore.default()
    if not store.baselines.is_file():
        return f"{store.baselines} not committed yet (record it with `tdabench regress --update`)"
    for name in read_json(store.baselines)["settings"]:
        if gt_artifact.current(store, settings.get(name)) is None:
            return f"no committed ground truth for {name}"
    return None


@pytest.mark.skipif(_committed_benchmark_ready() is not None, reason=str(_committed_benchmark_ready()))
def test_committed_solvers_hold_their_baselines():
    from eval_helpers import require_real_data

    store = ResultsStore.default()
    chosen = [settings.get(n) for n in regress.REGRESS_SETTINGS]
    for s in chosen:
        require_real_data(s)
    lines = []
    results = regress.check(store, chosen, registry.available(), log=lines.append)
    ok = regress.report(results, log=lines.append)
    assert ok, "attribution quality regressed:\n" + "\n".join(line for line in lines if line.startswith("FAIL"))
