"""The results site (``tdabench report``): built from a small synthetic store in seconds, checked as files (every
setting a page or a line of the index, every image there, every table's data beside it, nothing fetched from
elsewhere) and in a headless Chromium driven from its command line (no console errors, every image decodes, clicking
a header sorts the rows with empty cells last, no table wider than a 1,400-pixel screen). The browser checks are
shown to fail on a site with a missing image, one whose sorting is broken and one with a table too wide. The index
opens on the headline, its differences those `tdabench compare` prints; `leaderboard.md` opens on the matrix. Its rows come from the
run records checked now, never from leaderboard.csv, which is checked against them (stale, cut, garbled: one line);
a scoped `leaderboard` where a setting's data is missing changes only what shows the new rows. The committed report
is checked the same way."""

import csv
import dataclasses
import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from eval_helpers import require_every_solver, require_real_data, synthetic_store, write_solver

from benchmark.cli import report
from benchmark.evaluate import campaign, records, registry
from benchmark.evaluate.engine import LOSS, RANDOM
from benchmark.report import browser, leaderboard, site
from benchmark.setup import settings
from benchmark.setup.store import REPO_ROOT, ResultsStore
from benchmark.studies import gap, ihvp_error, qualitative

S = settings.get("synthetic-mlp")
CNN = settings.get("mnist-cnn")  # no ground truth in the synthetic store: one line of the index, no page
QUIET = dict(log=lambda *a: None)
COMMITTED = REPO_ROOT / "results" / "report"

needs_browser = pytest.mark.skipif(browser.find() is None, reason=f"{browser.MISSING}; CI installs it (.ci/run)")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A synthetic store with every kind of result the site shows (run records and baselines, the leaderboard
    table, the qualitative study, a gap study with its reported row, IHVP error), and the site built from it."""
    tmp = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        write_solver(tmp / "solvers")
        mp.setenv("TDABENCH_SOLVERS_PATH", str(tmp / "solvers"))
        store = synthetic_store(tmp)
        toy = registry.get("toy-exact")
        methods = [toy, RANDOM, LOSS]
        campaign.update(store, [S], methods, device="cpu", **QUIET)
        df, _ = leaderboard.collect(store, [S, CNN], methods)
        leaderboard.write(store, df, **QUIET)
        qualitative.save(store, S, toy, qualitative.influential(store, S, toy, n_queries=2, top=3, device="cpu",
                                                                  **QUIET))
        gap.run(store, S, toy, ensemble=1, report_queries=True, device="cpu", **QUIET)
        ihvp_error.run(store, [S], {"exact": registry.get("exact"), "identity": registry.get("identity")},
                       dampings=[0.1], queries=4, **QUIET)
        df, found = leaderboard.collect(store, [S, CNN], methods)
        index = site.build(store, [S, CNN], df, found, methods, screenshot=False, **QUIET)
    return store, index


@pytest.fixture()
def scoped(monkeypatch, tmp_path):
    """`tdabench report` and `leaderboard` over the rows the `built` store has (the real lists hold no synthetic
    setting, and every real solver): settings S and CNN, the toy solvers of a folder of this test, the baselines."""
    folder = tmp_path / "solvers"
    write_solver(folder)
    monkeypatch.setenv("TDABENCH_SOLVERS_PATH", str(folder))
    monkeypatch.setattr(campaign, "leaderboard_settings", lambda: [S, CNN])
    monkeypatch.setattr(campaign, "leaderboard_methods", lambda solvers: [
        *(solvers[n] for n in sorted(solvers) if n.startswith("toy-")), RANDOM, LOSS])
    return folder


# ---------------------------------------------------------------------------------------------- files


def _srcs(page: Path) -> list[str]:
    return re.findall(r'<img [^>]*src="([^"]+)"', page.read_text())


def _pages(index: Path) -> list[Path]:
    return [index.parent / h for h in re.findall(r'href="([^"#/:]+\.html)"', index.read_text())]


def file_problems(index: Path, settings_names) -> list[str]:
    """What is wrong with the site as files: a setting neither linked as a page from the index nor named in its line
    of settings without results, an image a page names that is not there or is no PNG, a table without its data
    (CSV and JSON) beside it, data that does not read, a reference to anything outside the folder."""
    problems = []
    linked = {p.name for p in _pages(index)}
    for name in settings_names:
        if f"{name}.html" not in linked and f"<code>{name}</code>" not in index.read_text():
            problems.append(f"{name} is neither a page linked from the index nor named in it")
    for page in [index] + [index.parent / n for n in sorted(linked)]:
        if not page.is_file():
            problems.append(f"{page.name} is linked but missing")
            continue
        text = page.read_text()
        tables, links = text.count('<div class="wrap"><table'), re.findall(r'<p class="dl">.*?</p>', text)
        if tables != len(links):
            problems.append(f"{page.name}: {tables} tables but {len(links)} data links")
        for href in re.findall(r'href="(data/[^"]+)"', text):
            f = page.parent / html.unescape(href)
            try:
                ok = (json.loads(f.read_text()) is not None if f.suffix == ".json"
                      else len(list(csv.reader(f.read_text().splitlines()))) >= 1)
            except (OSError, ValueError):
                ok = False
            if not ok:
                problems.append(f"{page.name}: data {href} is missing or does not read")
        problems += [f"{page.name} reaches outside: {m}" for m in re.findall(r'(?:src|href)="((?:https?:)?//[^"]*)"',
                                                                               text)]
        problems += [f"{page.name} loads a script file" for _ in re.findall(r"<script[^>]+src=", text)]
        for src in _srcs(page):
            f = page.parent / html.unescape(src)
            if not f.is_file() or f.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
                problems.append(f"{page.name}: image {src} is missing or not a PNG")
    return problems


def test_site_pages_numbers_and_images(built):
    store, index = built
    assert file_problems(index, [S.name, CNN.name]) == []
    text = index.read_text()
    rec = json.loads((store.runs / S.name / "toy-exact.json").read_text())
    # the leaderboard's numbers, as leaderboard.md gives them
    assert leaderboard.fmt_pm(rec["lds"]["mean"], rec["lds"]["se"]) in text
    assert leaderboard.fmt_num(rec["mislabel"]["recall_10"], 2) in text
    _, cells = _leaderboard_row(index, "toy-exact")
    assert cells["score s"] == leaderboard.fmt_num(rec["cost"]["score_s"], 1)  # rounded as in leaderboard.md
    assert cells["LDS ± se"] == leaderboard.fmt_pm(rec["lds"]["mean"], rec["lds"]["se"])
    assert cells["status"] == cells["code"] == "ok" and cells["device"] == rec["device"]
    md = (store.root / "leaderboard.md").read_text()
    assert leaderboard.fmt_pm(rec["lds"]["mean"], rec["lds"]["se"]) in md
    # the table's data beside it: its rows of leaderboard.csv, every digit
    table = list(csv.DictReader((store.root / "leaderboard.csv").read_text().splitlines()))
    data = list(csv.DictReader((index.parent / "data" / f"{S.name}-leaderboard.csv").read_text().splitlines()))
    assert data == [r for r in table if r["setting"] == S.name]
    assert json.loads((index.parent / "data" / f"{S.name}-leaderboard.json").read_text())[0].keys() == table[0].keys()
    # a setting without a result is one line of the index, with its reason, and no page
    assert not (index.parent / f"{CNN.name}.html").exists()
    line = re.search(r"<b>No results yet</b>: (.*?)</p>", text).group(1)
    assert f"<code>{CNN.name}</code> (paper 0.50) — no ground truth" in line
    page = (index.parent / f"{S.name}.html").read_text()
    # the ground truth's pinned root hash, the gap study's rows and its reported protocol, IHVP error
    man = json.loads((store.gt / S.name / "v1" / "manifest.json").read_text())
    pin = json.loads(store.index.read_text())["artifacts"][f"gt/{S.name}/v1"]["root_hash"]
    assert pin in page and f"{man['protocol']['subsets']} random subsets" in page
    assert f"{rec['lds']['ci_low']:.3f} – {rec['lds']['ci_high']:.3f}" in page  # Table 1
    study = json.loads(gap.study_path(store, S.name, "toy-exact").read_text())
    assert f"{study['rows'][0]['lds']:.3f} ± {study['rows'][0]['lds_se']:.3f}" in page
    assert "gap study&#x27;s protocol" in page and "IHVP error" in page
    # the gallery: the query and every blamed training image with its score, as thumbnails of the real images
    inf = qualitative.read(store, S.name, "toy-exact")["influential"]
    for q in inf["queries"]:
        assert f"img/{S.name}/test-{q['index']}.png" in page
        for p in q["positive"] + q["negative"]:
            assert f"img/{S.name}/train-{p['index']}.png" in page and f"τ={p['score']:+.3g}" in page
    from PIL import Image

    thumb = Image.open(index.parent / "img" / S.name / f"train-{inf['queries'][0]['positive'][0]['index']}.png")
    assert thumb.size == tuple(S.data().train_x.shape[-2:])


def test_a_missing_image_is_found_by_the_file_check(built, tmp_path):
    _, index = built
    copy = shutil.copytree(index.parent, tmp_path / "site")
    victim = copy / _srcs(copy / f"{S.name}.html")[-1]
    victim.unlink()
    assert any(victim.name in p for p in file_problems(copy / "index.html", [S.name, CNN.name]))
    (copy / f"{S.name}.html").unlink()
    assert f"{S.name}.html is linked but missing" in file_problems(copy / "index.html", [S.name, CNN.name])
    (copy / "data" / f"{S.name}-leaderboard.json").write_text("{cut")
    assert f"index.html: data data/{S.name}-leaderboard.json is missing or does not read" in file_problems(
        copy / "index.html", [S.name, CNN.name])


def test_report_command(built, scoped, tmp_path, capsys):
    from benchmark import cli

    store, _ = built
    copy = ResultsStore(shutil.copytree(store.root, tmp_path / "results"))
    (copy.report / "index.html").unlink()
    assert cli.main(["--results", str(copy.root), "report"]) == 0
    assert (copy.report / "index.html").is_file() and (copy.report / f"{S.name}.html").is_file()
    assert f"Files to commit (files written or changed under {copy.root}):" in capsys.readouterr().out
    if browser.find():  # a picture of the index, at the size the README shows
        from PIL import Image

        assert Image.open(copy.report / "screenshot.png").size == (1600, 1500)
    (copy.root / "leaderboard.csv").unlink()
    (copy.report / "index.html").unlink()
    assert cli.main(["--results", str(copy.root), "report"]) == 2
    assert "tdabench leaderboard --no-rerun" in capsys.readouterr().err
    assert (copy.report / "index.html").is_file()  # the site comes from the records, not from the table


def test_without_a_browser_the_old_screenshot_is_kept(built, scoped, tmp_path, monkeypatch):
    store, _ = built
    copy = ResultsStore(shutil.copytree(store.root, tmp_path / "results"))
    shot = copy.report / "screenshot.png"
    shot.write_bytes(b"\x89PNG\r\n\x1a\n an older picture")
    monkeypatch.setattr(browser, "find", lambda: None)
    said = []
    report.write_report(copy, log=said.append)
    assert shot.read_bytes() == b"\x89PNG\r\n\x1a\n an older picture"
    assert any("kept as it was" in m and browser.MISSING in m for m in said)


def _leaderboard_row(page: Path, solver: str) -> tuple[str, dict]:
    """(row class, {column: cell text}) of ``solver``'s row in the first leaderboard table of ``page``; "status" is
    the full status (the cell's hover text), "code" what the cell shows."""
    text = page.read_text()
    table = text[text.index('class="sortable leaderboard"'):]
    table = table[:table.index("</table>")]
    cls, cells = next((c, r) for c, r in re.findall(r'<tr(?: class="([^"]*)")?>(.*?)</tr>', table, re.S)
                      if f"<b>{solver}</b>" in r)
    tds = re.findall(r'<td([^>]*)>(.*?)</td>', cells, re.S)
    out = dict(zip(site.LEADERBOARD_HEAD, (html.unescape(re.sub(r"<[^>]+>", "", v)) for _, v in tds)))
    status_attrs = tds[site.LEADERBOARD_HEAD.index("status")][0]
    title = re.search(r'title="([^"]*)"', status_attrs)
    out["code"], out["status"] = out["status"], html.unescape(title.group(1)) if title else out["status"]
    return cls, out


def test_report_checks_each_row_now_not_the_table(built, scoped, tmp_path, capsys):
    """After a code edit the record no longer describes, the report shows the row STALE although leaderboard.csv
    still says ok, and says in one line that the table is out of date (exit 2, the site written);
    `leaderboard --no-rerun` rewrites the table, and the report is then content."""
    from benchmark import cli

    store, _ = built
    copy = ResultsStore(shutil.copytree(store.root, tmp_path / "results"))
    page = copy.report / f"{S.name}.html"
    assert _leaderboard_row(page, "toy-exact")[1]["status"] == "ok"
    write_solver(scoped, sign=-1)  # the solver's code now computes something else
    capsys.readouterr()
    assert cli.main(["--results", str(copy.root), "report"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(copy.root / "leaderboard.csv") in err, err
    assert f"{S.name} / toy-exact: status 'ok' where the records give 'STALE (" in err
    assert err.endswith("rewrite it from the run records with `tdabench leaderboard --no-rerun`")
    cls, cells = _leaderboard_row(page, "toy-exact")
    assert cls == "stale" and cells["status"].startswith("STALE (") and "computes something else now" in cells["status"]
    assert cli.main(["--results", str(copy.root), "leaderboard", "--no-rerun", "--no-figures"]) == 0
    assert cli.main(["--results", str(copy.root), "report"]) == 0
    assert _leaderboard_row(page, "toy-exact")[1]["status"] == cells["status"]


def test_an_invalid_record_is_a_row_without_a_number(built, scoped, tmp_path):
    """A record edited by hand (records.read_record refuses it) is an INVALID row: no number, in the tables and on
    the site, marked like a stale one, and its status names the file as the tables name files (not this machine's
    path)."""
    store, _ = built
    copy = ResultsStore(shutil.copytree(store.root, tmp_path / "results"))
    path = copy.runs / S.name / "toy-exact.json"
    rec = json.loads(path.read_text())
    rec["lds"]["mean"] += 0.1
    path.write_text(json.dumps(rec))
    df, found = leaderboard.collect(copy, [S, CNN], campaign.leaderboard_methods(registry.available()))
    row = df[(df["setting"] == S.name) & (df["solver"] == "toy-exact")].iloc[0]
    assert row["status"].startswith(f"INVALID, not shown: refused run record runs/{S.name}/toy-exact.json: ")
    assert str(copy.root) not in row["status"] and row["record"] == f"runs/{S.name}/toy-exact.json"
    assert row[["lds", "lds_se", "recall_10", "auc", "fit_s", "peak_mb"]].isna().all()
    assert (S.name, "toy-exact") not in found and (S.name, "baseline-random") in found
    index = site.build(copy, [S, CNN], df, found, [], screenshot=False, **QUIET)
    cls, cells = _leaderboard_row(index.parent / f"{S.name}.html", "toy-exact")
    assert cls == "stale" and cells["status"] == row["status"]
    assert cells["LDS ± se"] == cells["recall@10%"] == cells["fit s"] == ""


def test_the_failed_reruns_a_table_notes_stay_on_the_site(built, scoped, tmp_path, capsys):
    """What `leaderboard` notes of a rerun that failed is the one thing the records cannot tell: the report reads it
    back from the table (a message with "; " in it too), shows it, and finds the table current."""
    from benchmark import cli

    store, _ = built
    copy = ResultsStore(shutil.copytree(store.root, tmp_path / "results"))
    methods = campaign.leaderboard_methods(registry.available())
    failures = {(S.name, "toy-exact"): "RunError: it broke; twice", (CNN.name, "toy-exact"): "SolverError: no"}
    df, _ = leaderboard.collect(copy, [S, CNN], methods, failures=failures)
    leaderboard.write(copy, df, **QUIET)
    assert leaderboard.noted_failures(leaderboard.read(copy)) == failures
    assert cli.main(["--results", str(copy.root), "report"]) == 0, capsys.readouterr().err
    status = _leaderboard_row(copy.report / f"{S.name}.html", "toy-exact")[1]["status"]
    assert status == "last rerun failed: RunError: it broke; twice"
    assert _leaderboard_row(copy.report / f"{CNN.name}.html", "toy-exact")[1]["status"] == "failed: SolverError: no"


def _cut_in_a_number(text: str) -> str:
    """The table cut inside the first row's LDS (its fourth field), as an interrupted copy leaves it."""
    header, first = text.splitlines(keepends=True)[:2]
    fields = first.split(",")
    assert re.fullmatch(r"0\.\d{4,}", fields[3]), fields[3]
    return header + ",".join(fields[:3]) + "," + fields[3][:3]


@pytest.mark.parametrize("damage,says", [
    (lambda text: "".join(text.splitlines(keepends=True)[:2]),  # cut at a row's end
     f"rows the records give are missing (first: {S.name} / baseline-random)"),
    (_cut_in_a_number, f"rows differ (first: {S.name} / toy-exact: lds '0."),
    (lambda text: text + "x," * 40 + "\n", "is not a leaderboard table (Error tokenizing data"),
    (lambda text: b"\x89PNG\r\n\x1a\n" + text.encode(), "is not a leaderboard table ('utf-8' codec can't decode"),
    (lambda text: text.replace("lds_se", "lds_stderr"), "does not have the leaderboard's columns (missing ['lds_se'], "
                                                        "unknown ['lds_stderr']"),
], ids=["rows-cut", "number-cut", "garbage-line", "binary", "columns"])
def test_a_damaged_table_is_one_line_and_the_site_comes_from_the_records(built, scoped, tmp_path, capsys, damage,
                                                                        says):
    """leaderboard.csv cut short, cut inside a number, not a CSV at all, or with other columns: the site is whole
    (every setting's page, the numbers from the records) and the command fails with one line naming the file,
    what is wrong and the fix."""
    from benchmark import cli

    store, _ = built
    copy = ResultsStore(shutil.copytree(store.root, tmp_path / "results"))
    csv = copy.root / "leaderboard.csv"
    damaged = damage(csv.read_text())
    csv.write_bytes(damaged if isinstance(damaged, bytes) else damaged.encode())
    shutil.rmtree(copy.report)
    capsys.readouterr()
    assert cli.main(["--results", str(copy.root), "report"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(csv) in err and says in err, err
    assert err.endswith("rewrite it from the run records with `tdabench leaderboard --no-rerun`")
    rec = json.loads((copy.runs / S.name / "toy-exact.json").read_text())
    assert _leaderboard_row(copy.report / f"{S.name}.html", "toy-exact")[1]["LDS ± se"] == leaderboard.fmt_pm(
        rec["lds"]["mean"], rec["lds"]["se"])
    assert _leaderboard_row(copy.report / f"{S.name}.html", "baseline-loss")[1]["status"] == "ok"
    assert file_problems(copy.report / "index.html", [S.name, CNN.name]) == []


def test_a_scoped_leaderboard_changes_only_what_shows_its_rows(built, scoped, tmp_path, monkeypatch, capsys):
    """README's "Add a solver" where a setting's data is not here: `leaderboard --setting S --solver NEW` leaves every
    file byte-identical but the new record, the tables and figures, and the pages (and their tables' data) that list
    the new rows; the page of the setting without its data changes by its line of rows without a record only (the
    new solver is n/a there), its gallery and images kept, and one line says so.
    Without a site to keep them from, the page says what was tried to get the data."""
    from benchmark import cli
    from benchmark.setup.data import DataError

    lr = settings.get("mnist-lr")
    require_real_data(lr)  # the site being replaced is drawn from the data
    store, _ = built
    copy = ResultsStore(shutil.copytree(store.root, tmp_path / "results"))
    monkeypatch.setattr(campaign, "leaderboard_settings", lambda: [S, lr])
    inf = qualitative.read(copy, S.name, "toy-exact")["influential"]
    qualitative.save(copy, lr, registry.get("toy-exact"), dict(inf, setting=lr.name))  # a gallery of MNIST images
    assert cli.main(["--results", str(copy.root), "leaderboard", "--no-rerun"]) == 0
    files = lambda: {str(p.relative_to(copy.root)): p.read_bytes() for p in copy.root.rglob("*") if p.is_file()}
    before = files()
    assert sum(k.startswith(f"report/img/{lr.name}/train-") for k in before) >= 6

    empty = tmp_path / "no-data"
    empty.mkdir()
    monkeypatch.setenv("TDABENCH_DATA", str(empty))  # MNIST is not here now, for certain
    monkeypatch.setenv("TDABENCH_OFFLINE", "1")
    monkeypatch.setattr(settings, "_DATA_CACHE", {})
    with pytest.raises(DataError):
        lr.data()
    write_solver(scoped, name="toy-two")  # the contributor's new solver
    capsys.readouterr()
    assert cli.main(["--results", str(copy.root), "leaderboard", "--setting", S.name, "--solver", "toy-two"]) == 0
    said = capsys.readouterr().out.splitlines()
    after = files()
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    shows_rows = {f"runs/{S.name}/toy-two.json", "leaderboard.csv", "leaderboard.md", "report/index.html",
                  f"report/{S.name}.html", f"report/{lr.name}.html", f"report/img/{S.name}/lds_cost.png",
                  f"report/img/{S.name}/mislabel_recall.png", f"report/{site.PALETTE}",  # toy-two's colour
                  "report/screenshot.png",  # of the index's top: the matrix, where the new row is
                  *(f"report/data/{stem}.{ext}" for stem in ("matrix", f"{S.name}-leaderboard", f"{S.name}-table1",
                                                             f"{lr.name}-leaderboard") for ext in ("csv", "json"))}
    assert f"runs/{S.name}/toy-two.json" in changed
    assert sorted(k for k in changed if k not in shows_rows and not k.startswith("figures/")) == []
    absent = re.compile(r'<p class="absent">Not in the table — .*?</p>')
    page, old = after[f"report/{lr.name}.html"].decode(), before[f"report/{lr.name}.html"].decode()
    assert "toy-two" in absent.search(page).group(0) and "toy-two" not in absent.sub("", page)
    assert absent.sub("", page) == absent.sub("", old)
    kept = [line for line in said if line.startswith(f"{lr.name}.html")]
    assert len(kept) == 1 and "gallery and" in kept[0] and "kept as they were" in kept[0], said

    index = report.write_report(copy, out=tmp_path / "elsewhere", keep_from=tmp_path / "nothing", screenshot=False,
                                **QUIET)
    page = (index.parent / f"{lr.name}.html").read_text()
    assert f"Images unavailable here: cannot obtain dataset &#x27;mnist&#x27;; tried: cache {empty / 'mnist'}" in page
    assert not list((index.parent / "img").glob(f"{lr.name}/train-*"))


def test_adding_a_solver_recolours_no_figure(built, tmp_path, monkeypatch):
    """A solver added later (one that sorts first, with no numbers yet, as a new solver file gives) takes a free
    colour: every figure of the site it replaces stays byte-identical. In name order every colour would move."""
    from benchmark.report import figures

    store, _ = built
    copy = ResultsStore(shutil.copytree(store.root, tmp_path / "results"))
    write_solver(tmp_path / "solvers")
    write_solver(tmp_path / "solvers", name="toy-aaa")
    monkeypatch.setenv("TDABENCH_SOLVERS_PATH", str(tmp_path / "solvers"))
    figs = lambda: {p.name: p.read_bytes() for p in (copy.report / "img" / S.name).glob("*.png")
                    if not p.name.startswith(("train-", "test-"))}
    drawn = []
    for names in (["toy-exact"], ["toy-aaa", "toy-exact"]):
        df, found = leaderboard.collect(copy, [S, CNN], [*map(registry.get, names), RANDOM, LOSS])
        site.build(copy, [S, CNN], df, found, [], screenshot=False, **QUIET)
        drawn.append(figs())
    assert {"lds_cost.png", "mislabel_recall.png"} <= set(drawn[0]) and drawn[1] == drawn[0]
    assert json.loads((copy.report / site.PALETTE).read_text()) == {"toy-aaa": 1, "toy-exact": 0}
    assert figures.solver_palette(["toy-aaa", "toy-exact"])["toy-exact"] != figures.solver_palette(["toy-exact"])[
        "toy-exact"]


# ---------------------------------------------------------------------------------------------- read in a minute


def test_settings_in_reading_order_and_statuses_as_codes():
    assert leaderboard.setting_order(["zoo", "mnist-lr", "fmnist-cnn", "aaa", "mnist-cnn", "mnist-mlp-small"]) == [
        "mnist-cnn", "fmnist-cnn", "mnist-mlp-small", "mnist-lr", "aaa", "zoo"]
    # statuses as collect writes them (leaderboard._row), each to its code
    for status, code in [
        ("ok", "ok"),
        ("INVALID, not shown: refused run record runs/x/y.json: its content hash does not match", "INVALID"),
        ("failed: SolverError: no", "FAILED"),
        ("last rerun failed: RunError: it broke; twice; mislabel n/a: no self-influence", "FAILED"),
        ("STALE (lds): UNPINNED: gt/x/v1 is finished but index.json pins no root hash for it", "UNPINNED"),
        ("STALE (lds, mislabel): the solver computes something else now (probe: scores)", "STALE"),
        ("no solver file defines it any more: its record cannot be checked", "UNCHECKED"),
        ("LDS on an incomplete ground truth (2/4 seed replicas)", "INCOMPLETE"),
        ("mislabel not yet run", "ok*"),
        ("mislabel n/a: an ensemble row: self-influence ranks the one corrupted-label model's training set; so", "ok"),
        ("n/a: model has 46,730 parameters; exact accepts up to 12,000", "n/a"),
        ("not yet run (no ground truth; GPU runbook: docs/large-settings.md)", "not run"),
    ]:
        assert leaderboard.status_code(status) == code, status
    assert {c for c, _ in leaderboard.CODES} >= {"ok", "ok*", "STALE", "INVALID", "UNPINNED", "n/a", "not run"}
    # rows absent for the same reason share it, each solver's own name said as "it"
    assert leaderboard.absent_reason("exact", "n/a: model has 46,730 parameters; exact accepts up to 12,000") == \
        leaderboard.absent_reason("unrolled", "n/a: model has 46,730 parameters; unrolled accepts up to 12,000")


def test_leaderboard_md_opens_on_the_matrix(built, scoped, tmp_path):
    """leaderboard.md: the solvers × settings matrix first (best row bold, the ceiling in the header), the settings
    without results in one line, then per setting a compact table whose rows without a record are one line, statuses
    as codes, and the glossary at the end."""
    store, _ = built
    copy = ResultsStore(shutil.copytree(store.root, tmp_path / "results"))
    identity = registry.get("identity")  # applies to S, never run there: a row without a record
    df, _ = leaderboard.collect(copy, [S, CNN], [registry.get("toy-exact"), identity, RANDOM, LOSS])
    md = leaderboard.to_markdown(df)
    rec = json.loads((copy.runs / S.name / "toy-exact.json").read_text())
    lines = md.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("|"))
    assert lines[first] == f"| solver | `{S.name}` (ceiling {rec['lds']['ceiling']:.3f}) |"
    assert lines[first + 2] == (f"| toy-exact | **{leaderboard.fmt_pm(rec['lds']['mean'], rec['lds']['se'])}** "
                                f"({rec['lds']['of_ceiling']:.2f}) |")
    assert f"No results yet: `{CNN.name}` (paper 0.50) — no ground truth." in lines
    section = md[md.index(f"## {S.name}"):md.index("## What the columns mean")]
    assert "| identity |" not in section and "Not in the table — **not run**: identity." in section
    row = next(line for line in section.splitlines() if line.startswith("| **toy-exact** |"))
    assert row.split(" | ")[1] == "ok" and "device" not in section.splitlines()[4]  # one device: said above
    assert f"Every row ran on {rec['device']}." in section
    assert md.index("## What the columns mean") > md.index(f"## {S.name}") and "- **STALE**: " in md


def test_index_opens_on_the_headline(built, scoped, tmp_path, monkeypatch):
    """The index: Table 1 beside the paper, the matrix, which method wins where, LDS against cost, then the
    settings; its differences are those `tdabench compare` prints from the records, and its tables' data is beside
    it. The synthetic store has no EK-FAC row: a worse toy solver stands in as the reference, and S is given a
    paper value."""
    store, _ = built
    copy = ResultsStore(shutil.copytree(store.root, tmp_path / "results"))
    write_solver(scoped, name="toy-two", sign=-1)
    toy, ref = registry.get("toy-exact"), registry.get("toy-two")
    campaign.update(copy, [S], [ref], device="cpu", **QUIET)
    monkeypatch.setattr(leaderboard, "PAPER_METHOD", ref.name)
    methods = [toy, ref, RANDOM, LOSS]
    df, found = leaderboard.collect(copy, [S, CNN], methods)
    index = site.build(copy, [dataclasses.replace(S, paper_lds=0.5), CNN], df, found, methods, screenshot=False,
                       **QUIET)
    text = index.read_text()
    where = [text.index(f'id="{x}"') for x in ("table1", "matrix", "wins", "cost", S.name, "notes")]
    assert where == sorted(where)
    want = records.compare_rows(copy, S, [ref.name, toy.name], {ref.name: ref, toy.name: toy})[1]
    assert want["paired"] and not want["stale"]
    diff = leaderboard.fmt_difference({"difference": want["difference"], "se": want["difference_se"]})
    wins = text[text.index('id="wins"'):text.index('id="cost"')]
    assert (f"<code>toy-exact</code> is best, {leaderboard.fmt_pm(want['lds'], want['se'])}" in wins
            and f"{diff} over <code>{ref.name}</code> (higher on {want['wins']:.0%} of {want['n']} queries)"
            in html.unescape(wins))
    paper = json.loads((index.parent / "data" / "table1-paper.json").read_text())
    assert [r["setting"] for r in paper] == [CNN.name, S.name]  # reading order: the headline settings first
    assert paper[1]["best"] == toy.name and paper[1][f"best_minus_{ref.name}"] == want["difference"]
    assert paper[1]["paper_lds"] == 0.5 and paper[0]["note"] == "no ground truth; no solver applies"
    matrix = json.loads((index.parent / "data" / "matrix.json").read_text())
    assert [(r["solver"], r["best"]) for r in matrix] == [(toy.name, True), (RANDOM.name, False), (ref.name, False)]
    assert f'<td class="n best"><b>{leaderboard.fmt_pm(want["lds"], want["se"])}</b>' in text
    assert file_problems(index, [S.name, CNN.name]) == []


def test_gallery_compares_choices_with_the_defaults_filled_in(built, scoped, tmp_path, monkeypatch):
    """A gallery drawn with the same choices as the run record, one side recording a default the other leaves out,
    says nothing about older choices; another value says so. Where the data is not here, a gallery is kept with its
    images when only that note changed, and shows the note as the records give it now."""
    from benchmark.setup.data import DataError

    store, _ = built
    copy = ResultsStore(shutil.copytree(store.root, tmp_path / "results"))
    toy = registry.get("toy-exact")
    methods = [toy, RANDOM, LOSS]
    item = qualitative.read(copy, S.name, toy.name)["influential"]
    chosen = json.loads((copy.runs / S.name / "toy-exact.json").read_text())["lds"]["params"]
    assert item["params"] == chosen and "last_blocks" not in chosen

    def page(params, known=methods):  # known: the solvers whose defaults the build knows
        qualitative.save(copy, S, toy, dict(item, params=params))
        df, found = leaderboard.collect(copy, [S, CNN], methods)
        index = site.build(copy, [S, CNN], df, found, known, screenshot=False, **QUIET)
        return (index.parent / f"{S.name}.html").read_text()

    same = {**chosen, "last_blocks": None}  # a default recorded on one side only
    assert "Drawn from older choices" not in page(same)
    other = {**chosen, "damping": 10.0 if chosen["damping"] != 10.0 else 1e-3}
    assert f"Drawn from older choices: toy-exact used {leaderboard.fmt_params(other)}, its run record now" in page(
        other)

    def no_data(self):
        raise DataError(f"cannot obtain dataset {self.name!r} here")

    assert "Drawn from older choices: toy-exact used" in page(same, known=[])  # compared as they were written
    monkeypatch.setattr(settings.Setting, "data", no_data)
    kept = page(same)
    assert "Drawn from older choices" not in kept and "Images unavailable" not in kept
    srcs = re.findall(r'src="(img/[^"]+/train-[^"]+)"', kept)
    assert srcs and all((copy.report / src).is_file() for src in srcs)


def test_leaderboard_ends_with_the_files_to_commit(built, scoped, tmp_path, capsys):
    """In a git clone, `leaderboard` ends by listing what `git status` says differs in the results folder (the
    report as one entry) and the `git add` line to commit it: the list docs/writing-a-solver.md says to commit."""
    from benchmark import cli

    git = shutil.which("git")
    if git is None:
        pytest.skip("git is not installed")
    store, _ = built
    clone = tmp_path / "clone"
    shutil.copytree(store.root, clone / "results")
    run = lambda *a: subprocess.run([git, "-C", str(clone), *a], check=True, capture_output=True, text=True).stdout
    run("init", "-q")
    run("add", "-A")
    run("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "results")
    write_solver(scoped, name="toy-two")
    capsys.readouterr()
    root = str(clone / "results")
    assert cli.main(["--results", root, "leaderboard", "--setting", S.name, "--solver", "toy-two", "--no-figures"]) == 0
    out = capsys.readouterr().out
    said = out[out.index("Files to commit (git status of results/):"):].splitlines()
    status = [line[3:] for line in run("status", "--porcelain", "--untracked-files=all").splitlines()]
    report_files = [s for s in status if s.startswith("results/report/")]
    assert report_files and f"results/runs/{S.name}/toy-two.json" in status and "results/leaderboard.md" in status
    listed = [line.split(None, 1)[1] for line in said[1:-1]]
    assert listed == sorted([s for s in status if s not in report_files]
                            + [f"results/report/ ({len(report_files)} files)"])
    assert said[-1] == "Commit them with the solver file: git add -A -- " + " ".join(
        p.split(" (")[0] for p in listed)
    guide = (REPO_ROOT / "docs" / "writing-a-solver.md").read_text()
    assert "Files to commit" in guide  # the docs name what the command prints


# ---------------------------------------------------------------------------------------------- in the browser

# Runs before the page's own script: records errors, then on load checks every image, measures every table against
# the window's width, and clicks every sortable column header twice, recording the rows after each click; the
# result goes into the DOM as JSON.
HARNESS = r"""<script>
window.__errors = [];
window.addEventListener("error", function (e) {
  __errors.push(e.message || ("failed to load " + (e.target && (e.target.src || e.target.href))));
}, true);
(function () { var orig = console.error;
  console.error = function () {
    __errors.push(Array.prototype.join.call(arguments, " "));
    orig.apply(console, arguments);
  };
})();
window.addEventListener("load", function () {
  var out = {errors: __errors, images: [], tables: [], wide: [], width: document.documentElement.clientWidth};
  Array.prototype.forEach.call(document.images, function (im) {
    out.images.push({src: im.getAttribute("src"), ok: im.complete && im.naturalWidth > 0});
  });
  Array.prototype.forEach.call(document.querySelectorAll("table"), function (t, i) {
    var box = t.getBoundingClientRect();
    if (box.right > out.width + 0.5) {
      var head = t.tHead ? Array.prototype.map.call(t.tHead.rows[0].cells, function (c) {
        return c.textContent.trim(); }).join(" ").slice(0, 60) : t.className;
      out.wide.push({table: i, head: head, right: Math.round(box.right)});
    }
  });
  document.querySelectorAll("table.sortable").forEach(function (t) {
    var rows = function () { return Array.prototype.map.call(t.tBodies[0].rows, function (r) {
      return Array.prototype.map.call(r.cells, function (c) { return c.textContent; }); }); };
    var tab = {cls: t.className, before: rows(), clicks: []};
    Array.prototype.forEach.call(t.tHead.rows[0].cells, function (th, col) {
      for (var k = 0; k < 2; k++) {
        th.click();
        tab.clicks.push({col: col, dir: th.getAttribute("aria-sort"), rows: rows()});
      }
    });
    out.tables.push(tab);
  });
  var pre = document.createElement("pre");
  pre.id = "tdabench-test";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""

NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?", re.I)


SCREEN = (1400, 900)  # the screen every table must fit (width, height in pixels)


def in_browser(page: Path) -> dict:
    """Load a copy of ``page`` (same folder, so its images resolve) with the harness, in headless Chromium, in a
    window of :data:`SCREEN`."""
    probe = page.with_name(f".probe-{page.name}")
    probe.write_text(page.read_text().replace("<head>", "<head>" + HARNESS, 1))
    try:
        dom = browser.dump_dom(probe, window=SCREEN)
    finally:
        probe.unlink()
    found = re.search(r'<pre id="tdabench-test">(.*?)</pre>', dom, re.S)
    assert found, f"the harness wrote no result into {page.name}'s DOM"
    return json.loads(html.unescape(found.group(1)))


def _key(text: str):
    text = text.replace("\u2212", "-").strip()
    m = NUMBER.match(text)
    return None if text == "" else float(m.group(0)) if m else text.lower()


def sort_problems(result: dict) -> list[str]:
    """Every click must leave the same rows, ordered by that column in the direction the header says (numbers as
    numbers, "0.3 ± 0.1" as 0.3), empty cells last, and a second click must reverse the direction."""
    problems = []
    for t, tab in enumerate(result["tables"]):
        before = sorted(map(tuple, tab["before"]))
        for k, click in enumerate(tab["clicks"]):
            where = f"table {t}, column {click['col']}, click {k % 2 + 1}"
            if sorted(map(tuple, click["rows"])) != before:
                problems.append(f"{where}: the rows changed, not only their order")
            if click["dir"] not in ("ascending", "descending"):
                problems.append(f"{where}: the header shows no sort direction")
                continue
            if k % 2 and click["dir"] == tab["clicks"][k - 1]["dir"]:
                problems.append(f"{where}: a second click does not reverse the order")
            keys = [_key(r[click["col"]]) for r in click["rows"]]
            filled = [x for x in keys if x is not None]
            if None in keys and any(x is not None for x in keys[keys.index(None):]):
                problems.append(f"{where}: an empty cell sorts before a filled one")
            if not all(isinstance(x, float) for x in filled):
                filled = [str(x) for x in filled]
            want = sorted(filled, reverse=click["dir"] == "descending")
            if filled != want:
                problems.append(f"{where}: not in {click['dir']} order: {filled}")
    return problems


def browser_problems(index: Path) -> list[str]:
    problems = []
    for page in [index] + sorted(set(_pages(index))):
        result = in_browser(page)
        problems += [f"{page.name}: console error: {m}" for m in result["errors"]]
        problems += [f"{page.name}: image {i['src']} did not load or decode" for i in result["images"] if not i["ok"]]
        if not result["images"] and page == index:
            problems.append("index.html shows no image")
        if result["width"] != SCREEN[0]:
            problems.append(f"{page.name}: laid out {result['width']} pixels wide, not {SCREEN[0]}")
        problems += [f"{page.name}: table {w['table']} ({w['head']}) ends at {w['right']} pixels, wider than the "
                     f"{SCREEN[0]}-pixel screen" for w in result["wide"]]
        problems += [f"{page.name}: {p}" for p in sort_problems(result)]
    return problems


@needs_browser
def test_site_in_headless_chromium(built):
    _, index = built
    result = in_browser(index)
    assert result["tables"] and len(result["images"]) >= 1
    # the check has teeth: clicking reorders rows, and the LDS column has an empty cell (the loss baseline's)
    table = next(t for t in result["tables"] if "leaderboard" in t["cls"])
    assert any(c["rows"] != table["before"] for c in table["clicks"])
    assert "" in [r[2].strip() for r in table["before"]]
    assert browser_problems(index) == []


@needs_browser
def test_browser_check_fails_on_a_missing_image_or_a_broken_sort(built, tmp_path):
    _, index = built
    copy = shutil.copytree(index.parent, tmp_path / "site")
    gone = _srcs(copy / f"{S.name}.html")[-1]
    (copy / gone).unlink()
    assert f"{S.name}.html: image {gone} did not load or decode" in browser_problems(copy / "index.html")

    page = copy / "index.html"
    good = page.read_text()
    page.write_text(good.replace(site.SORT_JS, ""))  # headers that do nothing
    assert any("shows no sort direction" in p for p in sort_problems(in_browser(page)))
    assert good.count("(x === null) - (y === null)") == 1
    page.write_text(good.replace("(x === null) - (y === null)", "(y === null) - (x === null)"))  # empties first
    assert any("an empty cell sorts before a filled one" in p for p in sort_problems(in_browser(page)))

    # a status that is not a short code (one long line, as the tables had before): too wide for the screen
    cell = '<td class="st" title="ok">ok</td>'
    assert cell in good
    page.write_text(good.replace(cell, f'<td class="st">{"a long status sentence " * 12}</td>', 1))
    wide = [p for p in browser_problems(page) if "wider than the 1400-pixel screen" in p]
    assert len(wide) == 1 and wide[0].startswith("index.html: table ") and "(solver status LDS ± se" in wide[0], wide


def _committed_settings() -> list[str]:
    import pandas as pd

    return list(dict.fromkeys(pd.read_csv(REPO_ROOT / "results" / "leaderboard.csv")["setting"]))


def test_committed_report_files():
    if not (COMMITTED / "index.html").is_file():
        pytest.skip("no committed report (results/report/): `make report` writes it")
    assert file_problems(COMMITTED / "index.html", _committed_settings()) == []
    assert (COMMITTED / "screenshot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_committed_report_is_current(tmp_path):
    """The committed site is what `tdabench report` gives from the committed results now, run records checked now
    and the leaderboard table checked against them (`make leaderboard` / `make report` rewrite them when not).
    Where a setting's data is not here, its gallery is checked without labels and pixels (the committed one is kept
    only if it shows what would be drawn), and the test then skips saying so: CI has the data and checks it all."""
    if not (COMMITTED / "index.html").is_file():
        pytest.skip("no committed report (results/report/): `make report` writes it")
    require_every_solver()  # the peer rows' statuses depend on whether their libraries are here
    store = ResultsStore(COMMITTED.parent)
    fresh = report.write_report(store, out=tmp_path / "report", keep_from=COMMITTED, screenshot=False,
                                **QUIET).parent
    for page in sorted(COMMITTED.glob("*.html")):
        assert (fresh / page.name).read_text() == page.read_text(), f"{page} is not current: run `make report`"
    files = lambda root: sorted(str(p.relative_to(root)) for p in root.rglob("*.png") if p.name != "screenshot.png")
    assert files(fresh) == files(COMMITTED), "the committed report's images differ: run `make report`"
    data = lambda root: {p.name: p.read_bytes() for p in (root / "data").glob("*")} if (root / "data").is_dir() else {}
    assert data(fresh) == data(COMMITTED), "the committed report's table data differ: run `make report`"
    # the galleries' labels and thumbnails come from the data
    drawn = sorted({p.parent.name for p in store.qualitative.glob("*/*.json")} & set(settings.available()))
    if drawn:
        require_real_data(*map(settings.get, drawn))


@needs_browser
def test_committed_report_in_headless_chromium(tmp_path):
    if not (COMMITTED / "index.html").is_file():
        pytest.skip("no committed report (results/report/): `make report` writes it")
    copy = shutil.copytree(COMMITTED, tmp_path / "report")
    assert browser_problems(copy / "index.html") == []


def test_lds_vs_cost_names_every_point_without_overlap(tmp_path):
    """Crowded points (equal cost, near-equal LDS, as K-FAC and EK-FAC on mnist-lr) still get every name, and no
    name's box covers another name or a point; every solver has its own colour-and-marker pair."""
    import pandas as pd

    from benchmark.report import figures

    names = [f"solver{i:02d}" for i in range(14)]
    rows = [dict(setting="toy", solver=n, status="ok", lds=0.60 + 0.004 * (i % 4), lds_ci_low=0.59, lds_ci_high=0.62,
                 fit_s=1.0 + 0.01 * i, score_s=0.2, lds_ceiling=0.9, paper_lds=None) for i, n in enumerate(names)]
    part = pd.DataFrame(rows[:4] + [dict(rows[4], lds=0.2, lds_ci_low=0.19, lds_ci_high=0.21, fit_s=30.0)])
    palette = figures.solver_palette(names)
    markers = figures.solver_markers(palette)
    assert len({(tuple(palette[n]), markers[n]) for n in names}) == len(names)

    captured = {}
    real_save = figures._save

    def keep(fig, out, *a, **k):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        ax = fig.axes[0]
        captured["labels"] = [(t.get_text(), t.get_window_extent(renderer)) for t in ax.texts]
        captured["points"] = [ax.transData.transform((r.fit_s + r.score_s, r.lds)) for r in part.itertuples()]
        return real_save(fig, out, *a, **k)

    with figures.house_style(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(figures, "_save", keep)
        figures.lds_vs_cost(part, palette, tmp_path / "c.png")
    labels = captured["labels"]
    assert sorted(t for t, _ in labels) == sorted(part["solver"])
    for i, (_, a) in enumerate(labels):
        for _, b in labels[i + 1:]:
            assert not a.overlaps(b)
        for px, py in captured["points"]:
            assert not a.contains(px, py)
