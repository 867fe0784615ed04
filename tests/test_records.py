"""Run records check against themselves before any use: a record whose summary numbers are not what its own
per-query values (or recall curve) give, whose content hash does not match, or that is not valid JSON is refused
with one line by every command that reads it, and shown as INVALID, without a number, by those that list rows.
`compare` marks stale rows as table1 and the leaderboard do."""

import dataclasses
import json
from pathlib import Path

import pytest
from eval_helpers import synthetic_store, write_solver

from benchmark import cli
from benchmark.cli import resolve
from benchmark.evaluate import campaign, records, registry
from benchmark.evaluate.engine import BASELINES, RANDOM
from benchmark.report import leaderboard
from benchmark.setup import settings
from benchmark.setup.artifacts import write_json
from benchmark.setup.store import ResultsStore

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


@pytest.fixture
def fresh(toy, store):
    """A toy-exact record with an LDS and a mislabel section, and the random baseline's, as `tdabench run` writes."""
    records.run(store, S, registry.get("toy-exact"), search=False, **QUIET)
    records.run(store, S, RANDOM, **QUIET)
    return store


def _edit(store, change, row="toy-exact", reseal=False):
    path = records.run_path(store, SETTING, row)
    rec = json.loads(path.read_text())
    change(rec)
    write_json(path, records.seal(rec) if reseal else rec)
    return path


def _cli(store, capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(["--results", str(store.root), *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_committed_records_all_check():
    store = ResultsStore.default()
    paths = sorted(store.runs.glob("*/*.json"))
    assert len(paths) >= 59
    for path in paths:
        rec = records.read_record(store, path.parent.name, *records.parse_row_name(path.stem))
        assert rec[records.CONTENT_HASH] == records.content_hash(rec)
        assert records.record_problems(rec) == []


def test_a_fresh_record_checks_and_carries_its_content_hash_last(fresh):
    rec = records.read_record(fresh, SETTING, "toy-exact")
    assert "lds" in rec and "mislabel" in rec and list(rec)[-1] == records.CONTENT_HASH
    body = {k: v for k, v in rec.items() if k != records.CONTENT_HASH}
    assert rec[records.CONTENT_HASH] == records.content_hash(body) == records.content_hash(rec)
    assert records.read_record(fresh, SETTING, RANDOM.name)["mislabel"]["auc"] == 0.5
    # the hash is over the canonical JSON: key order does not change it, a value does
    assert records.content_hash(dict(reversed(list(body.items())))) == rec[records.CONTENT_HASH]
    assert records.content_hash({**body, "created": "another day"}) != rec[records.CONTENT_HASH]


def _mean(rec):
    rec["lds"]["mean"] += 0.2


def _per_query(rec):
    rec["lds"]["per_query"][0] = -rec["lds"]["per_query"][0] if rec["lds"]["per_query"][0] else 0.9


def _tiny(rec):  # below every summary's tolerance: only the content hash sees it
    rec["lds"]["per_query"][0] += 1e-7 if rec["lds"]["per_query"][0] < 0.5 else -1e-7


TAMPERED = {
    "edited mean": (_mean, "lds.mean is"),
    "edited per-query value": (_per_query, "per-query values give"),
    "edited per-query value below the tolerance": (_tiny, "does not match its content"),
    "deleted field": (lambda rec: rec["lds"].pop("se"), "lds has no se"),
    "deleted field the numbers do not use": (lambda rec: rec.pop("created"), "does not match its content"),
    "no content hash": (lambda rec: rec.pop(records.CONTENT_HASH), "has no content hash"),
    "truncated file": (None, "is not valid JSON"),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_a_damaged_record_is_refused_with_one_line_by_read_record_table1_and_compare(fresh, capsys, case):
    change, says = TAMPERED[case]
    path = records.run_path(fresh, SETTING, "toy-exact")
    if change is None:
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
    else:
        _edit(fresh, change)
    with pytest.raises(records.RecordError, match="refused run record") as caught:
        records.read_record(fresh, SETTING, "toy-exact")
    assert says in str(caught.value) and path.name in str(caught.value) and "\n" not in str(caught.value)
    for argv in (["table1", SETTING, "--solver", "toy-exact"], ["compare", SETTING, "toy-exact", RANDOM.name],
                 ["compare", SETTING, RANDOM.name, "toy-exact"]):
        code, out, err = _cli(fresh, capsys, *argv)
        assert code == 2 and out == "" and err.count("\n") == 1, (argv, out, err)
        assert err.startswith("tdabench: error: refused run record") and says in err


@pytest.mark.parametrize("change, says", [
    (lambda rec: rec["lds"].update(ci_high=rec["lds"]["ci_high"] + 0.01), "lds.ci_high is"),
    (lambda rec: rec["lds"].update(se=rec["lds"]["se"] * 2), "lds.se is"),
    (lambda rec: rec["lds"].update(of_ceiling=0.99), "lds.of_ceiling is"),
    (lambda rec: rec["lds"]["per_query"].append(0.5), "lds.queries is"),
    (lambda rec: rec["mislabel"].update(recall_10=rec["mislabel"]["recall_10"] + 0.05), "mislabel.recall_10 is"),
    (lambda rec: rec["mislabel"]["recall_curve"]["recall"].__setitem__(10, 1.5), "recall_curve is not a recall curve"),
    (lambda rec: rec["mislabel"].update(recall_curve_area=0.5), "mislabel.recall_curve_area is"),
    (lambda rec: rec["mislabel"].update(auc=rec["mislabel"]["auc"] - 0.1), "mislabel.auc is"),
    (lambda rec: rec["mislabel"].update(auc_se=rec["mislabel"]["auc_se"] + 0.01), "mislabel.auc_se is"),
    (lambda rec: rec.update(solver="other"), "is the record of row 'other', not 'toy-exact'"),
])
def test_numbers_that_do_not_follow_from_the_record_are_refused_even_with_a_matching_hash(fresh, change, says):
    """Someone who recomputes the hash after editing a number is refused all the same: the summary is checked
    against the per-query values and the recall curve it came from (the bootstrap interval too: same seed)."""
    _edit(fresh, change, reseal=True)
    with pytest.raises(records.RecordError, match=says):
        records.read_record(fresh, SETTING, "toy-exact")


def test_the_random_baselines_numbers_are_its_exact_expectation(fresh):
    _edit(fresh, lambda rec: rec["mislabel"].update(recall_20=0.25), row=RANDOM.name, reseal=True)
    with pytest.raises(records.RecordError, match="mislabel.recall_20 is not the random order's expectation"):
        records.read_record(fresh, SETTING, RANDOM.name)
    _edit(fresh, lambda rec: rec["lds"].update(of_ceiling=0.5), row=RANDOM.name, reseal=True)
    with pytest.raises(records.RecordError, match="lds.of_ceiling"):
        records.read_record(fresh, SETTING, RANDOM.name)


def test_rows_lists_show_a_refused_record_as_invalid_without_a_number_and_carry_on(fresh):
    cls = registry.get("toy-exact")
    path = _edit(fresh, _mean)
    before = path.read_bytes()
    logged = []
    done, failures = campaign.update(fresh, [S], [cls], log=logged.append, device="cpu")
    assert "refused run record" in failures[(SETTING, "toy-exact")]
    assert path.read_bytes() == before  # neither used nor rerun over
    assert any(line.startswith(f"skipping {SETTING} / toy-exact: refused run record") for line in logged)
    df, found = leaderboard.collect(fresh, [S], [cls, *BASELINES.values()], failures=failures)
    rows = df.set_index("solver")
    assert rows.loc["toy-exact", "status"].startswith("INVALID, not shown: refused run record")
    assert rows.loc["toy-exact", ["lds", "lds_se", "recall_10", "auc"]].isna().all()
    assert (SETTING, "toy-exact") not in found
    assert rows.loc[RANDOM.name, "status"] == "ok" and abs(rows.loc[RANDOM.name, "lds"]) < 1
    # `tdabench run` is how a refused record is replaced
    lines = []
    records.run(fresh, S, cls, search=False, device="cpu", log=lines.append)
    assert any("replacing a refused record" in line for line in lines)
    assert records.read_record(fresh, SETTING, "toy-exact")["lds"]["mean"] is not None


def test_compare_marks_a_stale_row_and_says_why(fresh, capsys, monkeypatch):
    code, out, _ = _cli(fresh, capsys, "compare", SETTING, "toy-exact", RANDOM.name)
    assert code == 0 and "STALE" not in out
    # the setting's training recipe changed since the records were made: both rows are stale
    changed = dataclasses.replace(S, recipe=dataclasses.replace(S.recipe, lr=S.recipe.lr * 2))
    monkeypatch.setattr(resolve, "setting", lambda name: changed)
    code, out, _ = _cli(fresh, capsys, "compare", SETTING, "toy-exact", RANDOM.name)
    assert code == 0
    lines = out.splitlines()
    assert any(line.startswith("toy-exact STALE ") for line in lines)
    why = [line for line in lines if line.startswith("  toy-exact is STALE, its numbers are not current: ")]
    assert len(why) == 1 and "training recipe changed" in why[0]
    assert any(line.startswith(f"  {RANDOM.name} is STALE") for line in lines)
    # the same rule as table1's
    items = records.compare_rows(fresh, changed, ["toy-exact"], {"toy-exact": registry.get("toy-exact")})
    rec = records.read_record(fresh, SETTING, "toy-exact")
    assert items[0]["stale"] == records.stale_reasons(rec, fresh, changed, registry.get("toy-exact"))["lds"]


def test_a_refusal_names_the_file_as_typed_from_the_current_folder(fresh, monkeypatch, tmp_path):
    path = _edit(fresh, _mean)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(records.RecordError) as caught:
        records.read_record(fresh, SETTING, "toy-exact")
    assert f"refused run record {path.resolve().relative_to(Path(tmp_path).resolve())}:" in str(caught.value)


def test_a_peer_row_without_its_library_here_is_recorded_not_stale(monkeypatch):
    """Where the peers extra is missing, a Kronfluence row's solver probe cannot be re-checked: the record says which
    library version made it and is not STALE for that (its ground truth, target and metric code are still checked)."""
    store = ResultsStore.default()
    setting = settings.get("mnist-lr")
    cls = registry.get("kronfluence-ekfac")
    rec = records.read_record(store, setting.name, cls.name)
    monkeypatch.setattr(cls, "unavailable", classmethod(lambda c: "needs kronfluence: pip install -e '.[peers]'"))
    assert records.stale_reasons(rec, store, setting, cls) == {}
    said = records.recorded_with(rec, cls)
    assert said.startswith("recorded with kronfluence 1.0.1;") and "pip install" in said
    monkeypatch.undo()
    # as installed here: a note exactly where the library is missing (with the extra, the row is checked as usual)
    assert (records.recorded_with(rec, cls) is None) == (cls.unavailable() is None)
