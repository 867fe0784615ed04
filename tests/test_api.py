"""tdabench from your own code (issue 33, items 3 and 4): ``tdabench.load`` (a :class:`Bench`) and external scores
(``tdabench evaluate SETTING --scores FILE``). The numbers an external path gives must be the engine's, query by query:
on a small synthetic ground truth here, and on the committed mnist-lr EK-FAC row where MNIST is available."""

import os
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from eval_helpers import require_real_data, synthetic_store

import tdabench
from benchmark.cli import main
from benchmark.evaluate import external, metrics, records, registry
from benchmark.evaluate.engine import RunError
from benchmark.evaluate.external import Bench, ScoresError
from benchmark.setup import settings
from benchmark.setup.artifacts import sha256_file
from benchmark.setup.store import REPO_ROOT, ResultsStore

S = settings.get("synthetic-mlp")
QUIET = dict(device="cpu", log=lambda *a: None)
MISLABEL_NUMBERS = ("n", "n_flipped", "recall_10", "recall_20", "recall_30", "recall_40", "recall_50", "auc",
                    "auc_se", "recall_curve", "recall_curve_area")


@pytest.fixture
def store(tmp_path):
    return synthetic_store(tmp_path)


@pytest.fixture
def bench(store):
    return Bench.load(store, S, resolve=registry.resolve, device="cpu")


def _cli(store, *args):
    return main(["--results", str(store.root), "evaluate", S.name, *map(str, args)])


# ---------------------------------------------------------------- the README's example

EXAMPLE = REPO_ROOT / "examples" / "api_example.py"


def _readme_blocks():
    readme = (REPO_ROOT / "README.md").read_text()
    found = re.search(r"<!-- example: examples/api_example\.py -->\n```python\n(.*?)```\n\n```text\n(.*?)```", readme,
                      re.S)
    assert found, "README.md has no example block marked <!-- example: examples/api_example.py -->"
    return found.group(1), found.group(2).splitlines()


def test_the_readme_shows_the_example_file_verbatim():
    code, _ = _readme_blocks()
    assert code == EXAMPLE.read_text()


@pytest.mark.slow
def test_the_example_runs_and_prints_the_committed_ekfac_row():
    require_real_data(settings.get("mnist-lr"))
    committed = records.read_record(ResultsStore(REPO_ROOT / "results"), "mnist-lr", "ekfac")["lds"]
    env = {k: v for k, v in os.environ.items() if k != "TDABENCH_RESULTS"}  # the committed results, read only
    out = subprocess.run([sys.executable, str(EXAMPLE)], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    _, shown = _readme_blocks()
    for line in shown:  # the output README shows is what the example prints
        assert line in out.stdout.splitlines(), (line, out.stdout)
    assert f"LDS {committed['mean']:.4f} ± {committed['se']:.4f}" in shown[0]


# ---------------------------------------------------------------- the two query splits stay apart

def test_validation_and_reported_queries_are_apart_and_each_evaluation_takes_only_its_own(bench):
    gt, v, r = bench.ground_truth, bench.queries.validation, bench.queries.reported
    assert (v.split, r.split) == ("validation", "reported") and v is not r
    np.testing.assert_array_equal(r.indices, gt.queries)
    np.testing.assert_array_equal(v.indices, gt.validation_queries)
    assert not set(v.indices) & set(r.indices)
    data = S.data()
    assert torch.equal(r.x, data.test_x[torch.from_numpy(gt.queries)]) and torch.equal(v.y, data.test_y[v.indices])
    n, q, nv = len(bench.train), len(r), len(v)
    assert (n, q, nv) == (256, 20, 12)
    rng = np.random.default_rng(0)
    rep, val = rng.normal(size=(q, n)), rng.normal(size=(nv, n))
    assert bench.evaluate(rep).split == "reported" and bench.evaluate_validation(val).split == "validation"
    refused = [
        (bench.evaluate, val, r"\(12, 256\), which is the validation queries' .*bench\.evaluate_validation"),
        (bench.evaluate_validation, rep, r"\(20, 256\), which is the reported queries' .*bench\.evaluate\b"),
        (bench.evaluate, rep.T, r"transpose of the expected \(Q, N\) = \(20, 256\).*scores\.T"),
        (bench.evaluate, val.T, r"transpose of the validation queries' matrix \(12, 256\)"),
        (bench.evaluate, rep[:-1], r"got shape \(19, 256\), expected \(Q, N\) = \(20, 256\): one row per reported "
                                   r"query in the order of bench\.queries\.reported\.indices"),
        (bench.evaluate, rep[0], r"a vector of shape \(256,\).*self-influence"),
        (bench.evaluate, rep[None], r"3-D array"),
        (bench.evaluate, rep > 0, r"dtype bool are not real numbers"),
    ]
    for evaluate, scores, message in refused:
        with pytest.raises(ScoresError, match=message):
            evaluate(scores)
    bad = rep.copy()
    bad[3, 7], bad[5, 0] = np.nan, np.inf
    with pytest.raises(ScoresError, match=r"2 non-finite values \(NaN or inf\) in 2 queries \(first: row 3\)"):
        bench.evaluate(torch.from_numpy(bad))
    with pytest.raises(RunError, match="validation result is for tuning"):
        bench.compare(bench.evaluate_validation(val), "identity")


def test_an_evaluation_is_the_metric_on_the_ground_truths_target(bench):
    gt = bench.ground_truth
    scores = np.random.default_rng(1).normal(size=(len(bench.queries.reported), len(bench.train))).astype(np.float32)
    got = bench.evaluate(torch.from_numpy(scores))
    replicas = gt.complete_replicas()
    want = metrics.lds(scores, gt.masks, gt.target(S.measurement, "queries", replicas),
                       gt.manifest["noise_ceiling"][S.measurement]["lds_ceiling"])
    assert got.mean == want["mean"] and got.ci == (want["ci_low"], want["ci_high"]) and got.ceiling == want["ceiling"]
    np.testing.assert_array_equal(got.per_query, np.round(want["per_query"], 6))
    val = bench.evaluate_validation(scores[:len(bench.queries.validation)])
    assert val.mean == metrics.lds(scores[:12], gt.masks, gt.target(S.measurement, "validation", replicas))["mean"]


# ---------------------------------------------------------------- the same numbers as the engine's rows

def test_scores_computed_here_reproduce_the_engines_row_query_by_query(store, bench):
    identity = registry.get("identity")
    row = records.run(store, S, identity, **QUIET)
    result = bench.evaluate(bench.solver_scores(identity, bench.queries.reported))
    assert result.section["per_query"] == row["lds"]["per_query"]
    assert result.mean == pytest.approx(row["lds"]["mean"], abs=1e-12)
    comparison = bench.compare(result, "identity")
    assert comparison.unpaired_reasons == [] and comparison.stale == []
    assert comparison.paired["max_abs"] == 0 and "identical on all 20 paired queries" in str(comparison)
    mislabel = bench.evaluate_mislabel(bench.mislabel.self_scores(identity))
    assert {k: mislabel.section[k] for k in MISLABEL_NUMBERS} == {k: row["mislabel"][k] for k in MISLABEL_NUMBERS}
    assert "training-loss order" in str(mislabel) and "random order" in str(mislabel)
    with pytest.raises(ScoresError, match=r"shape \(256, 1\), expected a vector \(256,\); pass scores\.ravel\(\)"):
        bench.evaluate_mislabel(np.ones((256, 1)))
    with pytest.raises(ScoresError, match=r"1 non-finite values .* in 1 training points \(first: row 9\)"):
        bench.evaluate_mislabel(np.where(np.arange(256) == 9, np.nan, 1.0))


def test_a_solver_defined_in_a_script_runs_through_the_engine(store, bench):
    class LocalDot(tdabench.Solver):  # no file anywhere: a class of this test function
        name = "local-dot"

        def ihvp(self, vectors):
            return vectors

    run = bench.run(LocalDot, log=lambda *a: None)
    assert run.path is None and not records.run_path(store, S.name, "local-dot").exists()
    identity = records.run(store, S, registry.get("identity"), **QUIET)  # the same method, from its solver file
    assert run.lds.section["per_query"] == identity["lds"]["per_query"]
    assert run.mislabel.section["recall_curve"] == identity["mislabel"]["recall_curve"]
    written = bench.run(LocalDot, write=True, log=lambda *a: None)
    assert records.read_record(store, S.name, "local-dot")["lds"]["per_query"] == identity["lds"]["per_query"]
    assert written.path == records.run_path(store, S.name, "local-dot")

    class Clash(LocalDot):
        name = "identity"

    with pytest.raises(RunError, match="'identity' is already the name of a registered solver"):
        bench.run(Clash)

    class Nameless(tdabench.Solver):
        pass

    with pytest.raises(RunError, match="Nameless has no name"):
        bench.run(Nameless)


def test_a_solver_class_defined_in_main_runs(store):
    script = textwrap.dedent(f"""
        import tdabench

        class MainDot(tdabench.Solver):
            name = "main-dot"

            def ihvp(self, vectors):
                return vectors

        bench = tdabench.load("{S.name}", results={str(store.root)!r}, device="cpu")
        run = bench.run(MainDot, log=lambda *a: None)
        assert MainDot.__module__ == "__main__"
        print(run.lds.mean)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TDABENCH_PROGRESS": "0"})
    assert out.returncode == 0, out.stderr[-2000:]
    identity = records.run(store, S, registry.get("identity"), tasks=["lds"], **QUIET)
    assert float(out.stdout.split()[-1]) == pytest.approx(identity["lds"]["mean"], abs=1e-12)


# ---------------------------------------------------------------- external scores from the command line

def test_a_score_file_becomes_a_sealed_external_record_with_the_engines_numbers(store, bench, tmp_path, capsys):
    from safetensors.torch import save_file

    identity = registry.get("identity")
    row = records.run(store, S, identity, **QUIET)
    scores = bench.solver_scores(identity, bench.queries.reported)
    self_scores = bench.mislabel.self_scores(identity)
    files = {"npy": tmp_path / "s.npy", "pt": tmp_path / "s.pt", "safetensors": tmp_path / "s.safetensors"}
    np.save(files["npy"], scores)
    torch.save(torch.from_numpy(scores), files["pt"])
    save_file({"scores": torch.from_numpy(scores), "other": torch.zeros(2)}, str(files["safetensors"]))
    for path in files.values():
        assert np.array_equal(external.load_scores(path).array, scores)
    np.save(tmp_path / "self.npy", self_scores)

    assert _cli(store, "--scores", files["pt"], "--self-scores", tmp_path / "self.npy", "--name", "my-method") == 0
    out = capsys.readouterr().out
    assert "20 reported queries: LDS" in out and "wrote" in out and "external scores" in out
    rec = records.read_record(store, S.name, "my-method")  # sealed: it checks against itself
    assert external.is_external(rec) and rec["solver"] == "my-method"
    assert rec["external"]["scores"] == {"file": "s.pt", "sha256": sha256_file(files["pt"]), "format": "pt",
                                         "shape": [20, 256], "dtype": "float32"}
    assert rec["lds"]["per_query"] == row["lds"]["per_query"]
    assert rec["lds"]["mean"] == pytest.approx(row["lds"]["mean"], abs=1e-12)
    assert rec["lds"]["target_sha256"] == row["lds"]["target_sha256"]
    assert {k: rec["mislabel"][k] for k in MISLABEL_NUMBERS} == {k: row["mislabel"][k] for k in MISLABEL_NUMBERS}
    method = external.method_of(rec)
    assert method.description == "external scores" and records.stale_reasons(rec, store, S, method) == {}
    comparison = bench.compare(bench.evaluate(scores), "my-method")
    assert comparison.paired["max_abs"] == 0 and comparison.stale == []
    # `tdabench compare` takes the external row like any other: paired with the identity row, not stale
    capsys.readouterr()
    assert main(["--results", str(store.root), "compare", S.name, "identity", "my-method"]) == 0
    table = capsys.readouterr().out
    assert "my-method" in table and "STALE" not in table
    # ...and the leaderboard lists it as a current row of external scores, checked, not "no solver file"
    from benchmark.report import leaderboard

    df, _ = leaderboard.collect(store, [S], [identity], progress=False)
    mine = df[df["solver"] == "my-method"].iloc[0]
    assert "external scores (s.pt" in mine["status"] and leaderboard.status_code(mine["status"]) in ("ok", "ok*")
    assert mine["lds"] == rec["lds"]["mean"]

    # --validation scores the validation queries and writes nothing
    np.save(tmp_path / "v.npy", bench.solver_scores(identity, bench.queries.validation))
    before = sorted(store.runs.rglob("*.json"))
    assert _cli(store, "--scores", tmp_path / "v.npy", "--validation") == 0
    assert "12 VALIDATION queries" in capsys.readouterr().out and sorted(store.runs.rglob("*.json")) == before


def _write(path, obj):
    if path.suffix == ".pt":
        torch.save(obj, path)
    elif path.suffix == ".npy" and isinstance(obj, np.ndarray):
        np.save(path, obj, allow_pickle=True)
    else:
        path.write_text(str(obj))
    return path


REFUSED = [  # (file name, content, extra arguments, what the one line must say)
    ("t.npy", lambda s: s.T, (), r"the transpose of the expected \(Q, N\) = \(20, 256\)"),
    ("nan.npy", lambda s: np.where(np.arange(256) == 5, np.nan, s), (), r"non-finite values \(NaN or inf\) in 20 "),
    ("short.npy", lambda s: s[:19], (), r"got shape \(19, 256\), expected \(Q, N\) = \(20, 256\)"),
    ("val.npy", lambda s: s[:12], (), r"which is the validation queries' .*--validation"),
    ("rep.npy", lambda s: s, ("--validation",), r"which is the reported queries'"),
    ("s.csv", lambda s: "1,2,3", (), r"a \.csv file; give the scores as \.npy .*\.pt .*\.safetensors"),
    ("text.npy", lambda s: "not numpy", (), r"is not a npy file holding a score array"),
    ("obj.npy", lambda s: np.array([{"a": 1}], dtype=object), (), r"is not a npy file holding a score array"),
    ("two.pt", lambda s: {"a": torch.zeros(2), "b": torch.ones(2)}, (), r"holds 2 entries \(a, b\); save the score "),
    ("list.pt", lambda s: [1, 2], (), r"holds a list, not a tensor"),
]


@pytest.mark.parametrize("name,content,extra,message", REFUSED, ids=[r[0] for r in REFUSED])
def test_the_command_refuses_what_is_not_the_reported_score_matrix_in_one_line(store, tmp_path, capsys, name,
                                                                               content, extra, message):
    scores = np.random.default_rng(2).normal(size=(20, 256)).astype(np.float32)
    path = _write(tmp_path / name, content(scores))
    args = ["--scores", path, *extra] + ([] if "--validation" in extra else ["--name", "mine"])
    assert _cli(store, *args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err), err
    assert not records.run_path(store, S.name, "mine").exists()


@pytest.mark.parametrize("args,message", [
    (("--name", "identity"), "'identity' is the name of a registered solver"),
    (("--name", "baseline-random"), "is the name of a baseline"),
    (("--name", "x-ens8"), "ends like an ensemble row"),
    (("--name", "../up"), "use 1-64 letters, digits"),
    ((), "--name NAME is required"),
    (("--validation", "--self-scores", "s.npy"), "mislabel detection has no validation split"),
])
def test_the_command_refuses_names_that_are_not_an_external_row(store, tmp_path, capsys, args, message):
    np.save(tmp_path / "s.npy", np.zeros((20, 256), np.float32))
    assert _cli(store, "--scores", tmp_path / "s.npy", *args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


# ---------------------------------------------------------------- the committed EK-FAC row of mnist-lr

@pytest.mark.slow
def test_the_committed_ekfac_row_of_mnist_lr_reproduces_from_a_score_file(tmp_path, capsys):
    """EK-FAC's scores, recomputed through the engine with the row's recorded parameters on its explained model (zoo
    model 0) and written to files, give the committed row's per-query LDS and mislabel numbers exactly."""
    setting = settings.get("mnist-lr")
    require_real_data(setting)
    committed_store = ResultsStore(REPO_ROOT / "results")
    committed = records.read_record(committed_store, setting.name, "ekfac")
    root = tmp_path / "results"  # a copy: the record written here never touches the committed results
    for part in ("gt/mnist-lr", "models/mnist-lr", "mislabel/mnist-lr"):
        shutil.copytree(committed_store.root / part, root / part)
    shutil.copy(committed_store.index, root / "index.json")
    (root / "runs/mnist-lr").mkdir(parents=True)
    shutil.copy(records.run_path(committed_store, setting.name, "ekfac"), root / "runs/mnist-lr/ekfac.json")
    store = ResultsStore(root)
    bench = Bench.load(store, setting, resolve=registry.resolve, device="cpu")
    # the same zoo model, file for file (the zoo's root hash moves as the zoo grows; its models never change)
    without_root = lambda ref: {k: v for k, v in ref.items() if k != "root_hash"}
    assert without_root(bench.explained.reference) == without_root(committed["lds"]["explained"])
    ekfac = registry.get("ekfac")
    np.save(tmp_path / "ekfac.npy", bench.solver_scores(ekfac, bench.queries.reported, committed["lds"]["params"]))
    np.save(tmp_path / "self.npy", bench.mislabel.self_scores(ekfac, committed["mislabel"]["params"]))

    assert main(["--results", str(root), "evaluate", setting.name, "--scores", str(tmp_path / "ekfac.npy"),
                 "--self-scores", str(tmp_path / "self.npy"), "--name", "ekfac-external"]) == 0
    rec = records.read_record(store, setting.name, "ekfac-external")
    assert rec["lds"]["per_query"] == committed["lds"]["per_query"]
    for key in ("mean", "se", "ci_low", "ci_high", "ceiling", "of_ceiling", "target_sha256"):
        assert rec["lds"][key] == committed["lds"][key], key
    assert {k: rec["mislabel"][k] for k in MISLABEL_NUMBERS} == {k: committed["mislabel"][k] for k in MISLABEL_NUMBERS}
    assert records.stale_reasons(rec, store, setting, external.method_of(rec)) == {}
    comparison = bench.compare(bench.evaluate(np.load(tmp_path / "ekfac.npy")), "ekfac")
    assert comparison.stale == [] and comparison.paired["max_abs"] == 0
