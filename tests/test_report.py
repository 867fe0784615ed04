"""The results site (``tdabench report``): built from a small synthetic store in seconds, checked as files (every page
linked, every image there, nothing fetched from elsewhere) and in a headless Chromium driven from its command line
(no console errors, every image decodes, clicking a header sorts the rows with empty cells last). The browser
checks are shown to fail on a site with a missing image and on one whose sorting is broken. The committed report
is checked the same way."""

import html
import json
import re
import shutil
from pathlib import Path

import pytest
from eval_helpers import require_real_data, synthetic_store, write_solver

from benchmark.evaluate import campaign, registry
from benchmark.evaluate.engine import LOSS, RANDOM
from benchmark.report import browser, leaderboard, site
from benchmark.setup import settings
from benchmark.setup.store import REPO_ROOT, ResultsStore
from benchmark.studies import gap, ihvp_error, qualitative

S = settings.get("synthetic-mlp")
CNN = settings.get("mnist-cnn")  # no ground truth in the synthetic store: a page of not-yet-run rows
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
        df, found = leaderboard.read(store)
        index = site.build(store, [S, CNN], df, found, methods, screenshot=False, **QUIET)
    return store, index


# ---------------------------------------------------------------------------------------------- files


def _srcs(page: Path) -> list[str]:
    return re.findall(r'<img [^>]*src="([^"]+)"', page.read_text())


def _pages(index: Path) -> list[Path]:
    return [index.parent / h for h in re.findall(r'href="([^"#/:]+\.html)"', index.read_text())]


def file_problems(index: Path, settings_names) -> list[str]:
    """What is wrong with the site as files: a setting without a page linked from the index, an image a page names
    that is not there or is no PNG, a reference to anything outside the folder."""
    problems = []
    linked = {p.name for p in _pages(index)}
    for name in settings_names:
        if f"{name}.html" not in linked:
            problems.append(f"{name}.html is not linked from the index")
    for page in [index] + [index.parent / n for n in sorted(linked)]:
        if not page.is_file():
            problems.append(f"{page.name} is linked but missing")
            continue
        text = page.read_text()
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
    row = next(r for r in re.findall(r"<tr[^>]*>(.*?)</tr>", text, re.S) if "<b>toy-exact</b>" in r)
    cells = dict(zip(site.LEADERBOARD_HEAD, re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)))
    assert cells["score s"] == leaderboard.fmt_num(rec["cost"]["score_s"], 1)  # rounded as in leaderboard.md
    assert cells["LDS ± se"] == leaderboard.fmt_pm(rec["lds"]["mean"], rec["lds"]["se"])
    assert cells["status"] == "ok" and cells["device"] == rec["device"]
    md = (store.root / "leaderboard.md").read_text()
    assert leaderboard.fmt_pm(rec["lds"]["mean"], rec["lds"]["se"]) in md
    # a not-yet-run setting is listed with its reason, greyed
    assert 'class="pending"' in (index.parent / f"{CNN.name}.html").read_text()
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
    (copy / f"{CNN.name}.html").unlink()
    assert f"{CNN.name}.html is linked but missing" in file_problems(copy / "index.html", [S.name, CNN.name])


def test_report_command(built, tmp_path, capsys):
    from benchmark import cli

    store, _ = built
    copy = ResultsStore(shutil.copytree(store.root, tmp_path / "results"))
    (copy.report / "index.html").unlink()
    assert cli.main(["--results", str(copy.root), "report"]) == 0
    assert (copy.report / "index.html").is_file() and (copy.report / f"{CNN.name}.html").is_file()
    if browser.find():  # a picture of the index, at the size the README shows
        from PIL import Image

        assert Image.open(copy.report / "screenshot.png").size == (1600, 1500)
    (copy.root / "leaderboard.csv").unlink()
    assert cli.main(["--results", str(copy.root), "report"]) == 2
    assert "tdabench leaderboard --no-rerun" in capsys.readouterr().err


def test_without_a_browser_the_old_screenshot_is_kept(built, tmp_path, monkeypatch):
    store, _ = built
    copy = ResultsStore(shutil.copytree(store.root, tmp_path / "results"))
    shot = copy.report / "screenshot.png"
    shot.write_bytes(b"\x89PNG\r\n\x1a\n an older picture")
    monkeypatch.setattr(browser, "find", lambda: None)
    said = []
    df, found = leaderboard.read(copy)
    site.build(copy, [S, CNN], df, found, [], log=said.append)
    assert shot.read_bytes() == b"\x89PNG\r\n\x1a\n an older picture"
    assert any("kept as it was" in m and browser.MISSING in m for m in said)


# ---------------------------------------------------------------------------------------------- in the browser

# Runs before the page's own script: records errors, then on load checks every image and clicks every sortable
# column header twice, recording the rows after each click; the result goes into the DOM as JSON.
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
  var out = {errors: __errors, images: [], tables: []};
  Array.prototype.forEach.call(document.images, function (im) {
    out.images.push({src: im.getAttribute("src"), ok: im.complete && im.naturalWidth > 0});
  });
  document.querySelectorAll("table.sortable").forEach(function (t) {
    var rows = function () { return Array.prototype.map.call(t.tBodies[0].rows, function (r) {
      return Array.prototype.map.call(r.cells, function (c) { return c.textContent; }); }); };
    var tab = {before: rows(), clicks: []};
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


def in_browser(page: Path) -> dict:
    """Load a copy of ``page`` (same folder, so its images resolve) with the harness, in headless Chromium."""
    probe = page.with_name(f".probe-{page.name}")
    probe.write_text(page.read_text().replace("<head>", "<head>" + HARNESS, 1))
    try:
        dom = browser.dump_dom(probe)
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
        problems += [f"{page.name}: {p}" for p in sort_problems(result)]
    return problems


@needs_browser
def test_site_in_headless_chromium(built):
    _, index = built
    result = in_browser(index)
    assert result["tables"] and len(result["images"]) >= 1
    # the check has teeth: clicking reorders rows, and the LDS column has an empty cell (the loss baseline's)
    table = result["tables"][0]
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


def _committed_settings() -> list[str]:
    import pandas as pd

    return list(dict.fromkeys(pd.read_csv(REPO_ROOT / "results" / "leaderboard.csv")["setting"]))


def test_committed_report_files():
    if not (COMMITTED / "index.html").is_file():
        pytest.skip("no committed report (results/report/): `make report` writes it")
    assert file_problems(COMMITTED / "index.html", _committed_settings()) == []
    assert (COMMITTED / "screenshot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_committed_report_is_current(tmp_path):
    """The committed site is what the committed results give now (`make report` rewrites it when not)."""
    if not (COMMITTED / "index.html").is_file():
        pytest.skip("no committed report (results/report/): `make report` writes it")
    require_real_data(settings.get("mnist-lr"))  # the gallery's labels and thumbnails come from the data
    store = ResultsStore(COMMITTED.parent)
    df, found = leaderboard.read(store)
    fresh = site.build(store, campaign.leaderboard_settings(), df, found,
                       campaign.leaderboard_methods(registry.available()), out=tmp_path / "report", screenshot=False,
                       **QUIET).parent
    for page in sorted(COMMITTED.glob("*.html")):
        assert (fresh / page.name).read_text() == page.read_text(), f"{page} is not current: run `make report`"
    files = lambda root: sorted(str(p.relative_to(root)) for p in root.rglob("*.png") if p.name != "screenshot.png")
    assert files(fresh) == files(COMMITTED), "the committed report's images differ: run `make report`"


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
