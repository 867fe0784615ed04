"""CI regression on attribution quality (`tdabench regress`).

- The check itself: a solver that keeps its quality passes; a deliberately broken one (same name, anti-
  correlated scores) fails with a message naming solver, metric, baseline and new value.
- The committed benchmark: every solver in ``results/baselines.json`` still reaches its recorded LDS and
  mislabel recall on the committed small ground truths (``mnist-lr``, ``mnist-mlp-small``).
"""

import pytest
from eval_helpers import synthetic_gt, synthetic_mislabel, write_solver

from benchmark import regress, runner
from benchmark.artifacts import read_json

SETTING = "synthetic-mlp"


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
    roots = dict(gt_root=synthetic_gt(), mislabel_root=synthetic_mislabel(), device="cpu", log=lambda *a: None)
    path = tmp_path / "baselines.json"
    good = tmp_path / "good"
    write_solver(good, "toy-exact")
    monkeypatch.setenv("TDABENCH_SOLVERS_PATH", str(good))
    regress.record([SETTING], ["toy-exact"], path=path, **roots)
    base = read_json(path)["settings"][SETTING]["solvers"]["toy-exact"]
    assert set(base["metrics"]) == {"lds", *regress.MISLABEL_METRICS}
    assert base["params"] in [{"damping": d} for d in (1e-3, 1e-1, 10.0)]

    results = regress.check(path=path, **roots)
    assert results and regress.report(results, log=lambda *a: None)

    broken = tmp_path / "broken"
    write_solver(broken, "toy-exact", sign=-1)  # same name: a regression introduced into the solver
    monkeypatch.setenv("TDABENCH_SOLVERS_PATH", str(broken))
    results = regress.check(path=path, **roots)
    lines = []
    assert not regress.report(results, log=lines.append)
    failed = {r.metric for r in results if r.failed}
    assert "lds" in failed and "recall_10" in failed
    fail_lines = [line for line in lines if line.startswith("FAIL")]
    lds_line = next(line for line in fail_lines if " lds " in line)
    assert "toy-exact" in lds_line and f"baseline {base['metrics']['lds']['value']:.4f}" in lds_line
    assert "new -" in lds_line  # anti-correlated: a negative LDS


def test_check_refuses_a_changed_ground_truth(tmp_path, monkeypatch):
    import shutil

    from benchmark import groundtruth
    from benchmark.artifacts import MANIFEST, write_json

    gt_root = tmp_path / "gt"
    shutil.copytree(synthetic_gt(), gt_root)
    roots = dict(gt_root=gt_root, mislabel_root=synthetic_mislabel(), device="cpu", log=lambda *a: None)
    folder = tmp_path / "good"
    write_solver(folder, "toy-exact")
    monkeypatch.setenv("TDABENCH_SOLVERS_PATH", str(folder))
    path = tmp_path / "baselines.json"
    regress.record([SETTING], ["toy-exact"], path=path, **roots)
    root = groundtruth.latest(SETTING, gt_root)
    dst = root.with_name("v99")
    shutil.copytree(root, dst)
    man = read_json(dst / MANIFEST)
    man["version"] = "v99"
    write_json(dst / MANIFEST, man)
    with pytest.raises(regress.RegressionError, match="not comparable"):
        regress.check(path=path, **roots)


def _committed_benchmark_ready() -> str | None:
    if not regress.BASELINES_FILE.is_file():
        return f"{regress.BASELINES_FILE} not committed yet (record it with `tdabench regress --update`)"
    for setting in read_json(regress.BASELINES_FILE)["settings"]:
        if runner.current_gt_root(setting) is None:
            return f"no committed ground truth for {setting}"
    return None


@pytest.mark.skipif(_committed_benchmark_ready() is not None, reason=str(_committed_benchmark_ready()))
def test_committed_solvers_hold_their_baselines():
    lines = []
    results = regress.check(log=lines.append)
    ok = regress.report(results, log=lines.append)
    assert ok, "attribution quality regressed:\n" + "\n".join(line for line in lines if line.startswith("FAIL"))
