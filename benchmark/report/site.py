"""Floor 6: the report — a static site under ``<store>/report/`` that opens from disk, without a server or a network.

- ``index.html``: the headline first — Table 1 beside the paper (our EK-FAC row and each setting's best row, with
  their paired difference), every method on every setting in one matrix, which method wins where (generated from
  the records), LDS against cost — then per setting the leaderboard as a table sortable by any column, each row's
  status as a short code with its full text on hover, the rows without a record in one line; settings without any
  result are one line, not a page;
- ``<setting>.html`` (a setting with results, a ground truth or a study to show): the ground truth (protocol, version, pinned root hash, noise ceiling), Table 1 beside the
  paper, the gap study, the mislabel recall curves, the IHVP error where it was measured, and a gallery: for each
  query of the qualitative study, the training images each solver blames most, side by side (the paper's Fig. 1);
- ``img/``: the figures and thumbnails the pages show;
- ``data/``: every table's data as CSV and JSON, linked under the table (a leaderboard table's: its rows of
  ``leaderboard.csv``, every digit);
- ``palette.json``: each solver's colour slot, which the next build keeps (a new solver takes a free one).

Everything is read from the results on disk — the leaderboard rows :func:`leaderboard.collect` gives from the run
records, each checked now (``tdabench report`` then checks ``leaderboard.csv`` against them, so the report says what
``leaderboard.md`` says), ground-truth manifests, ``index.json``, the gap and IHVP-error studies, the qualitative
study — and the settings' data (the thumbnails; where it is not here, the gallery of the site being replaced is kept
if it still shows what would be drawn); nothing is computed. Plain HTML with inline CSS and an inline script that
sorts the tables; no external script, font or stylesheet. The folder is written beside the old one and swapped in
whole.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import re
import shutil
from pathlib import Path

import pandas as pd

from ..evaluate import COMMON_OPTIONS, records
from ..groundtruth import artifact as gt_artifact
from ..groundtruth import index
from ..setup import settings as settings_mod
from ..setup.artifacts import MANIFEST, ArtifactError, read_json, temp_dir_beside, write_json
from ..setup.data import DataError
from ..setup.store import ResultsStore
from ..studies import frontier, ihvp_error, qualitative, table1
from . import browser, figures, tables
from . import leaderboard as lb
from .leaderboard import CODES, COLUMNS, NOTES, fmt_num, fmt_params, fmt_pm, fmt_text

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;margin:0 auto;
  max-width:1720px;padding:0 1.2rem 3rem;color:#1b1f24;line-height:1.4;font-size:15px}
h1{font-size:1.6rem;margin:1.2rem 0 .3rem}h2{font-size:1.25rem;margin:2rem 0 .4rem;border-bottom:1px solid #d0d7de}
h3{font-size:1.05rem;margin:1.4rem 0 .3rem}a{color:#0550ae}code{font-size:.9em;background:#f3f4f6;padding:0 .2em}
.lead{color:#444;max-width:75rem}.muted{color:#666;font-size:.88em}
nav.settings{display:flex;flex-wrap:wrap;gap:.4rem .9rem;margin:.6rem 0}
nav.settings a{border:1px solid #d0d7de;border-radius:6px;padding:.2rem .6rem;text-decoration:none}
nav.settings a.pending{color:#888;border-style:dashed}
.wrap{overflow-x:auto}.pair{display:flex;flex-wrap:wrap;gap:1rem;align-items:flex-start}
.pair>figure{flex:0 0 auto;margin:0}.pair>div{flex:1 1 760px;max-width:900px}
table{border-collapse:collapse;font-size:.84rem;margin:.4rem 0}
th,td{border:1px solid #d0d7de;padding:.2rem .45rem;text-align:left;vertical-align:top}
th{background:#f6f8fa;white-space:nowrap}td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.sortable th{cursor:pointer;user-select:none}table.sortable th:hover{background:#eaeef2}
table.sortable th::after{content:" \\2195";color:#aaa;font-size:.8em}
table.sortable th[aria-sort=ascending]::after{content:" \\25B2";color:#1b1f24}
table.sortable th[aria-sort=descending]::after{content:" \\25BC";color:#1b1f24}
tr.stale td,td.stale,.stale-key{background:#fff5d6}tr.best td,td.best,.best-key{background:#e6f4ea}
td.st{white-space:nowrap;font-size:.85em}td.st[title]{cursor:help}td.dev{white-space:nowrap}
td.params{min-width:12rem;max-width:24rem;font-size:.85em}
td.na::before{content:"n/a";color:#888}td.nr::before{content:"\\2013";color:#888}
.dl{font-size:.8em;color:#666;margin:0 0 .8rem}.dl a{margin-left:.3em}.absent{font-size:.85em;color:#555}
.figs{display:flex;flex-wrap:wrap;gap:1rem}.figs>figure{margin:0}
ul.wins li{margin:.25rem 0}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:.15rem 1rem;margin:.4rem 0}dl.facts dt{font-weight:600}
dl.facts dd{margin:0}dl.notes dt{font-weight:600;margin-top:.3rem}dl.notes dd{margin:0 0 0 1.2rem;color:#333}
img.fig{max-width:100%;height:auto;border:1px solid #eee}
.query{border:1px solid #d0d7de;border-radius:8px;padding:.5rem .7rem;margin:.9rem 0}
.query>.head{display:flex;gap:.8rem;align-items:center;margin-bottom:.3rem}.query>.head img{margin:0}
table.gallery td,table.gallery th{border:none;padding:.15rem .25rem;text-align:center;vertical-align:top}
table.gallery td.who{text-align:left;font-size:.85em;width:11rem;max-width:11rem;overflow-wrap:anywhere}
table.gallery th.pos{color:#1a7f37}table.gallery th.neg{color:#c62828}table.gallery td.gap{width:.8rem}
.thumb{margin:0;font-size:.72em;line-height:1.15;white-space:nowrap}
.thumb img,.head img{image-rendering:pixelated;display:block;margin:0 auto 1px;border:3px solid transparent}
.thumb.pos img{border-color:#1a7f37}.thumb.neg img{border-color:#c62828}.thumb.off{color:#c62828;font-weight:600}
.warn{background:#fff5d6;border-left:4px solid #d4a72c;padding:.3rem .6rem}
"""

# Sorting: numbers are read from the start of a cell ("0.288 ± 0.003" sorts as 0.288, "−0.01" as −0.01); a
# column where every non-empty cell starts with a number sorts numerically, any other as text; empty cells go
# last in either direction. Numeric columns sort high-to-low on the first click.
SORT_JS = r"""
(function () {
  var NUM = /^[-+]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?/i;
  function key(td) {
    var t = td.textContent.replace(/\u2212/g, "-").trim();
    if (t === "") return null;
    var m = NUM.exec(t);
    return m ? parseFloat(m[0]) : t.toLowerCase();
  }
  function sortBy(th) {
    var row = th.parentNode, table = row.closest("table"), body = table.tBodies[0], col = th.cellIndex;
    var rows = Array.prototype.slice.call(body.rows);
    var keys = rows.map(function (r) { return key(r.cells[col]); });
    var numeric = keys.every(function (k) { return k === null || typeof k === "number"; });
    var now = th.getAttribute("aria-sort");
    var dir = now === "descending" ? "ascending" : now === "ascending" ? "descending"
            : numeric ? "descending" : "ascending";
    var sign = dir === "ascending" ? 1 : -1;
    var order = rows.map(function (r, i) { return i; });
    order.sort(function (a, b) {
      var x = keys[a], y = keys[b];
      if (x === null || y === null) return (x === null) - (y === null) || a - b;
      if (!numeric) { x = String(x); y = String(y); }
      return (x < y ? -1 : x > y ? 1 : 0) * sign || a - b;
    });
    Array.prototype.forEach.call(row.cells, function (c) { c.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", dir);
    order.forEach(function (i) { body.appendChild(rows[i]); });
  }
  document.querySelectorAll("table.sortable th").forEach(function (th) {
    th.tabIndex = 0;
    th.title = "sort by this column";
    th.addEventListener("click", function () { sortBy(th); });
    th.addEventListener("keydown", function (e) { if (e.key === "Enter") sortBy(th); });
  });
})();
"""

# The ceiling is the setting's (in the line above the table); intervals and hyper-parameters are in Table 1 on the
# setting's page, recall at 20-50% in its mislabel curves: the table fits a 1,400-pixel screen.
LEADERBOARD_HEAD = ("solver", "status", "LDS ± se", "of ceiling", "explained", "recall@10%", "AUC", "fit s", "score s",
                    "self s", "peak MB", "device")


def e(value) -> str:
    return html.escape(fmt_text(value))


def _md(text: str) -> str:
    """The little Markdown the shared notes and the gap table use (**bold**, `code`) as HTML."""
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def _page(title: str, body: str) -> str:
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body>\n{body}\n"
            f"<script>{SORT_JS}</script>\n</body></html>\n")


def _td(c) -> str:
    """A cell: HTML, or (HTML, td class) or (HTML, td class, hover text)."""
    if not isinstance(c, tuple):
        return f"<td>{c}</td>"
    title = f' title="{html.escape(c[2], quote=True)}"' if len(c) > 2 and c[2] else ""
    return f'<td class="{c[1]}"{title}>{c[0]}</td>'


def _table(head, rows, *, cls: str = "", row_cls=None, head_html: bool = False) -> str:
    """``rows``: lists of cells (:func:`_td`); ``head``: text, or HTML with ``head_html``."""
    out = [f'<div class="wrap"><table class="{cls}"><thead><tr>'
           + "".join(f"<th>{h if head_html else html.escape(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for i, row in enumerate(rows):
        rc = (row_cls or [""] * len(rows))[i]
        cells = "".join(map(_td, row))
        out.append(f'<tr class="{rc}">{cells}</tr>' if rc else f"<tr>{cells}</tr>")
    return "\n".join(out) + "</tbody></table></div>"


def _text(cell) -> str:
    """What a cell shows, as plain text (its data in a download)."""
    cell = cell[0] if isinstance(cell, tuple) else cell
    return html.unescape(re.sub(r"<[^>]+>", "", str(cell)))


def _plain(v):
    """A value as JSON holds it: NaN is null, an infinity its text (JSON has neither)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def _status_cell(status) -> tuple:
    """The status as its short code, the full text on hover."""
    return e(lb.status_code(status)), "st", fmt_text(status)


def _img(src: str, alt: str, cls: str = "fig", **attrs) -> str:
    extra = "".join(f' {k}="{v}"' for k, v in attrs.items())
    return f'<img class="{cls}" src="{html.escape(src)}" alt="{html.escape(alt)}"{extra}>'


# Codes whose rows are marked (yellow): their numbers are not current, or not shown.
PROBLEMS = ("INVALID", "FAILED", "UNPINNED", "STALE", "UNCHECKED", "INCOMPLETE")


def _row_class(status) -> str:
    return "stale" if lb.status_code(status) in PROBLEMS else ""


def _by_lds(part: pd.DataFrame) -> pd.DataFrame:
    """Rows by LDS, highest first; rows without one last, in their order."""
    keys = [-float(v) if v is not None and not pd.isna(v) else math.inf for v in part["lds"]]
    return part.iloc[sorted(range(len(part)), key=keys.__getitem__)]


def leaderboard_rows(part: pd.DataFrame) -> tuple[list, list]:
    """One setting's leaderboard rows with a record, by LDS: (cells, row classes); the best row is marked, and (†)
    the rows not compared with it (:func:`leaderboard.coupled`)."""
    best, dag = lb.best_row(part), lb.coupled(part)
    rows, classes = [], []
    for i, r in _by_lds(part[~part["status"].map(lb.status_code).isin(lb.ABSENT)]).iterrows():
        lds = e(fmt_pm(r["lds"], r["lds_se"])) + "†" * bool(dag[i])
        rows.append([f"<b>{e(r['solver'])}</b>", _status_cell(r["status"]), (lds, "n"),
                     (e(fmt_num(r["lds_of_ceiling"], 2)), "n"), e(r["explained"]), (e(fmt_num(r["recall_10"], 2)), "n"),
                     (e(fmt_num(r["auc"])), "n"), (e(fmt_num(r["fit_s"], 1)), "n"), (e(fmt_num(r["score_s"], 1)), "n"),
                     (e(fmt_num(r["self_score_s"], 1)), "n"), (e(fmt_num(r["peak_mb"], 0)), "n"),
                     (e(r["device"]), "dev")])
        classes.append(_row_class(r["status"]) or ("best" if r["solver"] == best else ""))
    return rows, classes


class _Site:
    """One build: the output folder, the settings by name, and the solver colours shared by every figure;
    ``previous``: the site being replaced, whose output is kept where its input is missing here."""

    def __init__(self, store: ResultsStore, out: Path, settings: list, df: pd.DataFrame, found: dict, methods: list,
                 previous: Path | None = None, log=print):
        self.store, self.out, self.df, self.found, self.methods = store, out, df, found, methods
        self.previous, self.log = previous, log
        self.settings = {s.name: s for s in settings}
        # each solver keeps the colour the site being replaced gave it: adding one redraws no other setting's figure
        self.palette = figures.solver_palette(df["solver"], keep=_kept_slots(previous))
        self.names = lb.setting_order(df["setting"])
        self.pages: set[str] = set()  # the settings with a page of their own (build fills it)

    def img(self, *parts: str) -> tuple[Path, str]:
        """(file to write, its address from the pages)."""
        rel = "/".join(("img",) + parts)
        return self.out / rel, rel

    def table(self, stem: str, head, rows, *, data=None, **kw) -> str:
        """:func:`_table` with links to its data, written as ``data/<stem>.csv`` and ``.json`` beside the pages:
        ``data`` = (columns, rows of values) where the table shows values rounded or combined, else the cells'
        text."""
        columns, values = data if data is not None else (
            [_text(h) for h in head], [[_text(c) for c in row] for row in rows])
        folder = self.out / "data"
        folder.mkdir(parents=True, exist_ok=True)
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([["" if v is None else v for v in row] for row in values])
        (folder / f"{stem}.csv").write_text(buf.getvalue())
        records = [{c: _plain(v) for c, v in zip(columns, row)} for row in values]
        (folder / f"{stem}.json").write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n")
        return (_table(head, rows, **kw) + f'<p class="dl">data: <a href="data/{stem}.csv" download>CSV</a>'
                f'<a href="data/{stem}.json" download>JSON</a></p>')

    def part(self, name: str) -> pd.DataFrame:
        return self.df[self.df["setting"] == name]

    # ------------------------------------------------------------------------------------------ index
    def index(self) -> str:
        shown = [n for n in self.names if not lb.pending(self.part(n))]
        waiting = [n for n in self.names if n not in shown]
        links = "".join(f'<a href="{html.escape(n)}.html">{html.escape(n)}</a>' for n in self.names if n in self.pages)
        body = ["<h1>tdabench results</h1>",
                '<p class="lead">Influence-function solvers for training-data attribution, compared on the linear '
                "datamodeling score (LDS) against a retraining ground truth, on mislabel detection, and on cost. "
                "Built by <code>tdabench report</code> from the committed results (the run records, checked now, "
                "which the leaderboard table <code>results/leaderboard.csv</code> matches; the ground truths and the "
                "studies) and rebuilt whenever the leaderboard is. Every number here is read from them. Each "
                "setting's page has its ground truth, Table 1 beside the paper, the gap study, mislabel curves, IHVP "
                'error and the training images each solver blames. <a href="#notes">What the columns and status '
                "codes mean</a>.</p>",
                f'<nav class="settings">{links}</nav>' if links else "",
                self._paper_table(), '<h2 id="matrix">Every method on every setting</h2>']
        if shown:
            body.append('<p class="muted">LDS ± se (of the noise ceiling) on the reported queries; each setting\'s '
                        'best current row in <span class="best-key">green</span>, rows whose numbers are not current '
                        'in <span class="stale-key">yellow</span> with their status; † explains the ground truth\'s '
                        "own model (coupled to its target), so it is not compared. Click a header to sort.</p>")
            body.append(self._matrix(shown))
        if waiting:
            body.append(f"<p>{self._waiting(waiting)}</p>")
        if shown:
            body += ['<h2 id="wins">Which method wins where</h2>', self._wins(shown),
                     '<h2 id="cost">LDS against cost</h2><p class="muted">Each row\'s LDS (95% CI) against its fit + '
                     "score seconds (log scale; rows run on different machines differ in speed as well), with the "
                     "noise ceiling and the paper's value.</p>",
                     '<div class="figs">' + "".join(self._lds_cost(n, self.part(n), 560) for n in shown) + "</div>"]
            fronts = [f for f in (self._frontier(n) for n in self.names) if f]
            if fronts:
                body += ['<h2 id="frontier">The cost–quality frontier</h2><p class="muted">What more compute buys: '
                         "LDS against total compute (fit + score + training the extra models) and against trained "
                         "models, for ensembles of zoo models, one model's checkpoints, both, and datamodels; "
                         "dashed: the fitted saturating curve, extrapolated (<code>tdabench frontier</code>).</p>",
                         *fronts]
        for name in shown:
            part = self.part(name)
            body.append(f'<h2 id="{html.escape(name)}"><a href="{html.escape(name)}.html">{html.escape(name)}</a></h2>')
            body.append(f"<p>{self._summary(name, part)}</p>")
            body.append(self._leaderboard(name, part, notes=False))
        body.append('<h2 id="notes">What the columns mean</h2><dl class="notes">'
                    + "".join(f"<dt>{_md(t)}</dt><dd>{_md(x)}</dd>" for t, x in NOTES) + "</dl>"
                    + '<h3 id="codes">Status codes</h3><dl class="notes">'
                    + "".join(f"<dt>{e(c)}</dt><dd>{_md(x)}</dd>" for c, x in CODES) + "</dl>")
        return _page("tdabench results", "\n".join(b for b in body if b))

    def _link(self, name: str) -> str:
        return (f'<a href="{html.escape(name)}.html">{html.escape(name)}</a>' if name in self.pages
                else f"<code>{html.escape(name)}</code>")

    def _waiting(self, names: list[str]) -> str:
        """The settings without a result, in one line, grouped by why."""
        by_reason: dict[str, list[str]] = {}
        for name in names:
            s = self.settings.get(name)
            paper = "" if s is None or s.paper_lds is None else f" (paper {s.paper_lds:.2f})"
            by_reason.setdefault(lb.pending_reason(self.part(name)), []).append(self._link(name) + e(paper))
        return "<b>No results yet</b>: " + "; ".join(f"{', '.join(v)} — {e(k)}" for k, v in by_reason.items()) + "."

    def _matrix(self, names: list[str]) -> str:
        parts = {n: self.part(n).set_index("solver", drop=False) for n in names}
        best = {n: lb.best_row(p) for n, p in parts.items()}
        dag = {n: lb.coupled(p) for n, p in parts.items()}
        head = ["solver"] + [f"{html.escape(n)}<br><span class=muted>ceiling {e(lb.ceilings(parts[n]))}</span>"
                             for n in names]
        rows, classes, values = [], [], []
        for solver in lb.matrix_rows(self.df, names):
            cells = [f"<b>{e(solver)}</b>"]
            for n in names:
                if solver not in parts[n].index:
                    cells.append(("", "n"))
                    continue
                r = parts[n].loc[solver]
                code = lb.status_code(r["status"])
                values.append([solver, n, r["lds"], r["lds_se"], r["lds_of_ceiling"], r["lds_ceiling"], code,
                               solver == best[n], bool(dag[n][solver]), r["status"]])
                if r["lds"] is None:
                    cls = {"n/a": "n na", "not run": "n nr"}.get(code, "n")
                    cells.append(("" if cls != "n" or code in lb.CURRENT else e(code), cls, fmt_text(r["status"])))
                    continue
                text = e(fmt_pm(r["lds"], r["lds_se"]))
                text = (f"<b>{text}</b>" if solver == best[n] else text) + "†" * bool(dag[n][solver])
                text += f" <span class=muted>({e(fmt_num(r['lds_of_ceiling'], 2))})</span>"
                if code not in lb.CURRENT:
                    text += f" {e(code)}"
                cells.append((text, "n" + (" stale" if code in PROBLEMS else " best" * (solver == best[n])),
                              fmt_text(r["status"]) if code != "ok" else ""))
            rows.append(cells)
            classes.append("")
        columns = ["solver", "setting", "lds", "lds_se", "lds_of_ceiling", "lds_ceiling", "status_code", "best",
                   "coupled", "status"]
        return self.table("matrix", head, rows, cls="sortable matrix", row_cls=classes, head_html=True,
                          data=(columns, values))

    def _paper_table(self) -> str:
        """Table 1 beside the paper: each setting with a paper value, our row of the paper's method and the
        setting's best row, with their paired difference."""
        names = [n for n in self.names if (s := self.settings.get(n)) is not None and s.paper_lds is not None]
        if not names:
            return ""
        rows, values = [], []
        for name in names:
            part = self.part(name).set_index("solver", drop=False)
            paper = self.settings[name].paper_lds
            if lb.pending(part):
                why = lb.pending_reason(part)
                rows.append([f"<b>{self._link(name)}</b>", (e(f"{paper:.2f}"), "n"), ("", "n"), ("", "n"),
                             e(f"no results yet: {why}"), ("", "n"), ("", "n"), ("", "n")])
                values.append([name, paper, None, None, None, None, None, None, None, None, why])
                continue
            ours = part.loc[lb.PAPER_METHOD] if lb.PAPER_METHOD in part.index else None
            best = lb.best_row(part)
            diff = lb.paired(self.found, name, best) if best and best != lb.PAPER_METHOD else None
            b = part.loc[best] if best else None
            rows.append([f"<b>{self._link(name)}</b>", (e(f"{paper:.2f}"), "n"),
                         (e(fmt_pm(ours["lds"], ours["lds_se"])) if ours is not None else "", "n",
                          fmt_text(ours["status"]) if ours is not None else ""),
                         (e(fmt_num(ours["lds_of_ceiling"], 2)) if ours is not None else "", "n"),
                         f"<b>{e(best)}</b>" if best else "",
                         (e(fmt_pm(b["lds"], b["lds_se"])) if b is not None else "", "n"),
                         (e(lb.fmt_difference(diff)) if diff else "", "n"),
                         (e(lb.ceilings(part)), "n")])
            values.append([name, paper, *(None if ours is None else ours[c] for c in ("lds", "lds_se",
                                                                                     "lds_of_ceiling")),
                           best, None if b is None else b["lds"], None if diff is None else diff["difference"],
                           None if diff is None else diff["se"], lb.ceilings(part), ""])
        head = ("setting", "paper", f"our {lb.PAPER_METHOD}", "of ceiling", "best row", "its LDS",
                f"best − {lb.PAPER_METHOD} (paired)", "noise ceiling")
        columns = ["setting", "paper_lds", f"{lb.PAPER_METHOD}_lds", f"{lb.PAPER_METHOD}_lds_se",
                   f"{lb.PAPER_METHOD}_of_ceiling", "best", "best_lds", f"best_minus_{lb.PAPER_METHOD}",
                   f"best_minus_{lb.PAPER_METHOD}_se", "lds_ceiling", "note"]
        return ('<h2 id="table1">Table 1 beside the paper</h2><p class="muted">The paper\'s LDS (Zhu &amp; '
                f"Cangelosi, 2025, Table 1, EK-FAC) beside our <code>{e(lb.PAPER_METHOD)}</code> row (one model, "
                "hyper-parameters chosen on validation queries) and the setting's best current row; their difference "
                f"is paired query by query (<code>tdabench compare SETTING {e(lb.PAPER_METHOD)} ROW</code>).</p>"
                + self.table("table1-paper", head, rows, data=(columns, values)))

    def _wins(self, names: list[str]) -> str:
        """Which method wins where, per setting, from the records: the best row and its paired difference from the
        paper's method, and the best single model where that is another row."""
        items = []
        for name in names:
            part = self.part(name).set_index("solver", drop=False)
            best, single = lb.best_row(part), lb.best_row(part, single=True)
            if best is None:
                continue
            text = [f"<code>{e(best)}</code> is best, {self._lds(part.loc[best])}" + self._vs(name, best)]
            if single and single != best:
                text.append(f"among single models <code>{e(single)}</code> leads, {self._lds(part.loc[single])}"
                            + self._vs(name, single))
            items.append(f'<li><a href="#{html.escape(name)}"><b>{html.escape(name)}</b></a>: {"; ".join(text)}.</li>')
        return ('<ul class="wins">' + "".join(items) + "</ul>" if items else "") + (
            '<p class="muted">Among each setting\'s current rows that explain zoo models (rows explaining the ground '
            "truth's own model are not compared); differences paired over the same queries and target, as "
            f"<code>tdabench compare SETTING {e(lb.PAPER_METHOD)} ROW</code> prints them; ensembles "
            "(<code>-ens8</code>) average 8 explained models at 8 times the cost.</p>")

    @staticmethod
    def _lds(r) -> str:
        return e(f"{fmt_pm(r['lds'], r['lds_se'])} ({fmt_num(r['lds_of_ceiling'], 2)} of the ceiling)")

    def _vs(self, name: str, row: str) -> str:
        if row == lb.PAPER_METHOD:
            return ""
        d = lb.paired(self.found, name, row)
        if d is None:
            return ""
        return e(f", {lb.fmt_difference(d)} over ") + f"<code>{e(lb.PAPER_METHOD)}</code>" + e(
            f" (higher on {d['wins']:.0%} of {d['n']} queries)")

    def _leaderboard(self, name: str, part: pd.DataFrame, notes: bool = True) -> str:
        """The setting's leaderboard table, the rows without a record in one line, and (``notes``) the full status
        of every row not plainly ok."""
        rows, classes = leaderboard_rows(part)
        data = (list(COLUMNS), [[r[c] for c in COLUMNS] for _, r in part.iterrows()])
        out = [self.table(f"{name}-leaderboard", LEADERBOARD_HEAD, rows, cls="sortable leaderboard",
                          row_cls=classes, data=data) if rows else ""]
        absent = lb.absent_groups(part)
        if absent:
            out.append('<p class="absent">Not in the table — ' + ". ".join(
                f"<b>{e(code)}</b>: " + "; ".join(e(", ".join(names) + (f" ({why})" if why else ""))
                                              for names, why in items) for code, items in absent) + ".</p>")
        if notes:
            odd = [(r["solver"], r["status"]) for _, r in _by_lds(part).iterrows()
                   if lb.status_code(r["status"]) not in ("ok", *lb.ABSENT)]
            if odd:
                out.append('<ul class="absent">' + "".join(f"<li><b>{e(n)}</b>: {e(s)}</li>" for n, s in odd)
                           + "</ul>")
        return "\n".join(o for o in out if o)

    def _summary(self, name: str, part: pd.DataFrame) -> str:
        s = self.settings.get(name)
        gts = "; ".join(sorted({str(g) for g in part["ground_truth"] if g})) or "none"
        ceilings = lb.ceilings(part)
        ceiling = f" Noise ceiling: LDS {ceilings}." if ceilings else ""
        paper = "" if s is None or s.paper_lds is None else f" Paper (Table 1): LDS {s.paper_lds:.2f}."
        return (f"{e(s.description if s else 'no longer a registered setting')}. Ground truth: {e(gts)}."
                f"{e(ceiling)}{e(paper)}")

    def _lds_cost(self, name: str, part: pd.DataFrame, width: int = 440) -> str:
        if not part["lds"].notna().any():
            return ""
        path, rel = self.img(name, "lds_cost.png")
        if not path.is_file():  # the index and the setting's page show the same figure
            figures.lds_vs_cost(part, self.palette, path)
        return f"<figure>{_img(rel, name + ': LDS against cost', width=width)}</figure>"

    def _frontier(self, name: str) -> str:
        """The setting's frontier figure and its fits, drawn from results/frontier/<setting>.json where that file
        is intact and current; one line saying why where it is not; nothing where there is none."""
        setting = self.settings.get(name)
        if setting is None or not frontier.frontier_path(self.store, setting).is_file():
            return ""
        try:
            doc = frontier.read(self.store, setting)
        except frontier.FrontierError as exc:
            return f"<p>{html.escape(name)}: {html.escape(str(exc))}</p>"
        classes = {m.name: m for m in self.methods if m.name in (doc.get("params") or {})}
        why = frontier.stale_reasons(doc, self.store, setting, classes)
        if why:
            return (f"<p>{html.escape(name)}: the frontier is not current ({html.escape('; '.join(why))}); "
                    f"recompute it with <code>tdabench frontier {html.escape(name)}</code>.</p>")
        path, rel = self.img(name, "frontier.png")
        if not path.is_file():  # the index and the setting's page show the same figure
            figures.frontier(doc, path, frontier.datamodels_points(self.store, setting))
        fits = "".join(f"<li>{html.escape(line)}</li>" for line in frontier.summary_table(doc).splitlines()
                       if line.split(":")[0] in (doc.get("fits") or {}))
        return (f"<figure>{_img(rel, name + ': the cost-quality frontier', style='width:100%')}</figure>"
                f'<ul class="muted">{fits}</ul>')

    # ------------------------------------------------------------------------------------------ setting pages
    def setting_page(self, name: str) -> str | None:
        """The setting's page; None where it would show nothing but rows without a record (no ground truth, no
        study): the index says that in one line instead."""
        part = self.part(name)
        setting = self.settings.get(name)
        sections = []
        if setting is not None:
            sections = [self._table1(setting, part), self._gap(setting), self._mislabel(name), self._ihvp(name),
                        self._gallery(setting)]
            has_gt = gt_artifact.current(self.store, setting) is not None
        else:
            has_gt = False
        if lb.pending(part) and not has_gt and not any(sections):
            return None
        body = ['<p><a href="index.html">← all settings</a></p>', f"<h1>{html.escape(name)}</h1>",
                f'<p class="lead">{self._summary(name, part)}</p>',
                "<h2>Leaderboard</h2>", self._leaderboard(name, part), self._lds_cost(name, part)]
        front = self._frontier(name)
        if front:
            body += ["<h2>The cost–quality frontier</h2>", front]
        if setting is not None:
            body += [self._ground_truth(setting), *sections]
        return _page(f"tdabench: {name}", "\n".join(b for b in body if b))

    def _ground_truth(self, setting) -> str:
        root = gt_artifact.current(self.store, setting)
        if root is None:
            how = ("docs/large-settings.md (GPU runbook)" if setting.requires else f"`tdabench gt {setting.name}`")
            return f"<h2>Ground truth</h2><p>None yet: build it with {_md(how)}.</p>"
        man = read_json(root / MANIFEST)
        pin = index.pinned(self.store, root)
        p = man["protocol"]
        facts = [("artifact", f"<code>{e(self.store.relative(root))}</code> ({e(man['version'])}, "
                              + ("complete" if man.get("complete") else
                                 f"INCOMPLETE: {e(man.get('units_done'))}/{e(man.get('units_total'))} units") + ")"),
                 ("root hash", f"<code>{e(pin)}</code> (pinned in <code>results/index.json</code>)" if pin else
                  "not pinned in <code>results/index.json</code>"),
                 ("protocol", e(f"{p['subsets']} random subsets of {p['alpha']:.0%} of the training set × {p['seeds']} "
                                f"seed replicas ({p['seed_policy']} seeds); {p['queries']} reported and "
                                f"{p['validation_queries']} validation test queries; {p['full_models']} full-data "
                                f"models; measurement {man.get('measurement', setting.measurement)}")),
                 ("built", e(f"{man.get('created')} → {man.get('completed') or 'not finished'}, code "
                             f"{man.get('code_version')}; {man.get('environment', {}).get('device', '')}"))]
        ceiling = (man.get("noise_ceiling") or {}).get(man.get("measurement", setting.measurement))
        if ceiling:
            facts.append(("noise ceiling", e(f"LDS {fmt_pm(ceiling.get('lds_ceiling'), ceiling.get('lds_ceiling_se'))}"
                                             f" (reliability of the {ceiling.get('target_replicas')}-replica target "
                                             f"{fmt_num(ceiling.get('reliability'))}; one seed against another: "
                                             f"{fmt_num(ceiling.get('pairwise_single_seed'))}; "
                                             f"{ceiling.get('estimator')})")))
        summary = man.get("summary") or {}
        if summary.get("full_model_test_accuracy"):
            facts.append(("full-data models", e("test accuracy " + ", ".join(
                f"{a:.4f}" for a in summary["full_model_test_accuracy"]))))
        if summary.get("mean_seconds_per_subset_model") is not None:
            facts.append(("training cost", e(f"{summary['mean_seconds_per_subset_model']:.1f} s per subset model")))
        return ("<h2>Ground truth</h2><dl class=facts>" + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts)
                + "</dl>")

    def _table1(self, setting, part: pd.DataFrame) -> str:
        rows, classes = [], []
        for _, r in _by_lds(part[part["lds"].notna()]).iterrows():
            ci = f"{r['lds_ci_low']:.3f} – {r['lds_ci_high']:.3f}"
            rows.append([e(r["solver"]), (e(fmt_pm(r["lds"], r["lds_se"])), "n"), (e(ci), "n"),
                         (e(fmt_num(r["lds_of_ceiling"], 2)), "n"),
                         (e(fmt_num(setting.paper_lds, 2)), "n"), (e(r["params"]), "params"),
                         _status_cell(r["status"])])
            classes.append(_row_class(r["status"]))
        for g in table1.gap_reported(self.store, setting, self.methods):
            rep, lds = g["reported"], g["reported"]["lds"]
            stale = "; ".join(w for v in g["stale"].values() for w in v)
            rows.append([e(f"{g['name']}, gap study's protocol (ensemble of {rep['ensemble']}, {rep['measurement']})"),
                         (e(fmt_pm(lds["mean"], lds["se"])), "n"),
                         (e(f"{lds['ci_low']:.3f} – {lds['ci_high']:.3f}"), "n"),
                         (e(fmt_num(lds.get("of_ceiling"), 2)), "n"), (e(fmt_num(setting.paper_lds, 2)), "n"),
                         (e(fmt_params(rep["params"])), "params"),
                         ("STALE", "st", f"STALE: {stale}") if stale else ("ok", "st", f"ok ({g['path']})")])
            classes.append("stale" if stale else "")
        if not rows:
            return ""
        return ("<h2>Table 1 beside the paper</h2><p class=muted>LDS on the reported queries, hyper-parameters chosen "
                "on validation queries; the gap study's rows use the protocol it chose on validation (more "
                "models, another measurement) — see below.</p>"
                + self.table(f"{setting.name}-table1", ("method", "LDS ± se", "95% CI", "of ceiling", "paper",
                                                        "params", "status"), rows, cls="sortable", row_cls=classes))

    def _gap(self, setting) -> str:
        out = []
        for path in sorted(self.store.gap.glob(f"{setting.name}_*.json")) if self.store.gap.is_dir() else []:
            rec = read_json(path)
            if rec.get("setting") != setting.name:
                continue  # another setting whose name starts the same way
            fig, rel = self.img(setting.name, f"gap_{rec['solver']}.png")
            figures.gap_study(rec, fig, setting.paper_lds)
            block = self._markdown_block(tables.gap_table(rec), f"{setting.name}-gap-{rec['solver']}")
            out.append(f"<h3>{e(rec['solver'])} <span class=muted>({e(self.store.relative(path))}, "
                       f"{e(rec.get('created'))})</span></h3><div class=pair><div>{block}</div>"
                       f"<figure>{_img(rel, 'gap study ' + rec['solver'], width=620)}</figure></div>")
        if not out:
            return ""
        return ("<h2>Gap study: what moves LDS</h2><p class=muted>Each factor varied alone from the baseline on the "
                "validation queries (<code>tdabench gap</code>).</p>" + "".join(out))

    def _markdown_block(self, text: str, stem: str) -> str:
        """A Markdown table with lines around it (what :func:`tables.gap_table` writes) as HTML, its data beside
        it as ``data/<stem>.csv`` / ``.json`` (more than one table: ``<stem>-2``, …)."""
        out, table, n = [], [], 0
        for line in text.splitlines() + [""]:
            if line.startswith("|"):
                cells = [c.strip() for c in line.strip().strip("|").split("|")]
                if not all(set(c) <= set("-: ") for c in cells):
                    table.append(cells)
                continue
            if table:
                n += 1
                out.append(self.table(stem if n == 1 else f"{stem}-{n}", table[0],
                                      [[(_md(c), "n" if NUMERIC_CELL.fullmatch(c) else "") for c in r]
                                       for r in table[1:]]))
                table = []
            if line.strip():
                out.append(f"<p>{_md(line)}</p>")
        return "\n".join(out)

    def _mislabel_items(self, name: str) -> list:
        return [(solver, rec["mislabel"]) for (s, solver), rec in self.found.items()
                if s == name and rec.get("mislabel")]

    def _mislabel_figure(self, name: str) -> str:
        items = self._mislabel_items(name)
        if not items:
            return ""
        path, rel = self.img(name, "mislabel_recall.png")
        if not path.is_file():
            figures.mislabel_recall(name, items, self.palette, path)
        return f"<figure>{_img(rel, name + ': mislabel recall', width=440)}</figure>"

    def _mislabel(self, name: str) -> str:
        items = self._mislabel_items(name)
        if not items:
            return ""
        art = items[0][1]["artifact"]
        model = (art.get("models") or [{}])[0]
        facts = (f"Artifact <code>{e(art['path'])}</code>: {e(items[0][1].get('n_flipped'))} of "
                 f"{e(items[0][1].get('n'))} training labels flipped (seed {e(art['spec']['seed'])}); the "
                 f"corrupted-label model fits {e(fmt_num(model.get('train_accuracy_noisy_labels')))} of the noisy "
                 f"labels and has test accuracy {e(fmt_num(model.get('test_accuracy'), 4))}.")
        return (f"<h2>Mislabel detection</h2><p>{facts} Rankings: self-influence ∇L(zᵢ)ᵀ(G+λI)⁻¹∇L(zᵢ) per solver, "
                f"the training loss, and a random order.</p>{self._mislabel_figure(name)}")

    def _ihvp(self, name: str) -> str:
        csv, lissa_csv = ihvp_error.csv_paths(self.store)
        if not csv.is_file():
            return ""
        df = pd.read_csv(csv)
        df = df[df["setting"] == name]
        if df.empty:
            return ""
        lissa = pd.read_csv(lissa_csv) if lissa_csv.is_file() else pd.DataFrame(columns=["setting", "damping"])
        fig, rel = self.img(name, "ihvp_error.png")
        figures.ihvp_error(df, lissa[lissa["setting"] == name], fig)
        dampings = sorted(df["damping"].unique())
        head = ("solver", *[f"λ={d:g}" for d in dampings])
        err, agree = [], []
        for solver, s in df.groupby("solver", sort=False):
            by = {d: r for d, r in zip(s["damping"], s.itertuples())}
            err.append([e(solver)] + [(e(f"{by[d].rel_error:.2g} ± {by[d].rel_error_se:.1g}") if d in by else "", "n")
                                      for d in dampings])
            agree.append([e(solver)] + [(e(f"{by[d].score_spearman:.3f}") if d in by else "", "n") for d in dampings])
        return (f"<h2>IHVP error</h2><p class=muted>Against the exact damped inverse on {e(df['queries'].iloc[0])} "
                f"test-query gradients, {e(df['train_size'].iloc[0])} training points, {e(df['parameters'].iloc[0])} "
                f"parameters (<code>{e(self.store.relative(csv))}</code>).</p>"
                "<h3>relative error ‖r − r*‖ / ‖r*‖ (± se)</h3>" + self.table(f"{name}-ihvp-error", head, err)
                + "<h3>Spearman of the influence scores with the exact inverse's</h3>"
                + self.table(f"{name}-ihvp-spearman", head, agree)
                + f"<figure>{_img(rel, f'{name}: IHVP error', style='width:100%')}</figure>")

    def _gallery(self, setting) -> str:
        order = [n for n in self.df[self.df["setting"] == setting.name]["solver"]]
        items = [qualitative.read(self.store, setting.name, n) for n in order]
        items = [i["influential"] for i in items if i and i.get("influential")]
        if not items:
            return ""
        head = (f"{GALLERY_HEAD}<p class=muted>For each query (a reported test "
                f"point of the qualitative study, <code>tdabench figures {e(setting.name)}</code>): the training "
                "images with the largest positive (green: up-weighting them raises the query's "
                f"{e(items[0]['measurement'])}) and negative (red) scores τ under each solver, explaining "
                f"{e(items[0]['explained'])}. A label in red differs from the query's.</p>")
        try:
            data, missing = setting.data(), None
        except DataError as exc:  # drawn without labels or images, to see whether the site's gallery still holds
            data, missing = None, exc
        root = gt_artifact.current(self.store, setting)
        pin = index.pinned(self.store, root) if root is not None else None
        notes = []
        for item in items:
            rec = self.found.get((setting.name, item["solver"])) or {}
            chosen = (rec.get("lds") or {}).get("params")
            if item.get("ground_truth_root_hash") not in (None, pin):
                notes.append(f"{item['solver']} explains another ground truth's model than the current one")
            # with the solver's defaults filled in on both sides: a default recorded since is not another choice
            full = self._defaults(item["solver"])
            if chosen is not None and {**full, **chosen} != {**full, **item["params"]}:
                notes.append(f"{item['solver']} used {fmt_params(item['params'])}, its run record now chooses "
                             f"{fmt_params(chosen)}")
        out = [head] + [f"{OLDER}{e('; '.join(notes))}.</p>"] * bool(notes)
        queries = list(dict.fromkeys(q["index"] for item in items for q in item["queries"]))
        top = max(len(q["positive"]) for item in items for q in item["queries"])
        for qi in queries:
            first = next(q for item in items for q in item["queries"] if q["index"] == qi)
            label = _label(data, first["label"])
            src = self._thumb(setting.name, "test", qi, None if data is None else data.test_x[qi])
            pic = _img(src, f"test point {qi}", "", height=84)
            out.append(f'<div class="query"><div class="head">{pic}'
                       f"<div><b>query: test #{qi}</b>, label {e(label)}</div></div>"
                       f'<table class="gallery"><tr><th></th><th class="pos" colspan="{top}">most helpful</th>'
                       f'<th></th><th class="neg" colspan="{top}">most harmful</th></tr>')
            for item in items:
                q = next((q for q in item["queries"] if q["index"] == qi), None)
                who = f"<b>{e(item['solver'])}</b><br><span class=muted>{e(fmt_params(item['params']))}</span>"
                if q is None:
                    out.append(f'<tr><td class="who">{who}</td><td colspan="{2 * top + 1}" class="muted">not drawn '
                               "for this query</td></tr>")
                    continue
                cells = [self._train_cell(setting.name, data, p, "pos", first["label"]) for p in q["positive"]]
                cells += ['<td class="gap"></td>']
                cells += [self._train_cell(setting.name, data, p, "neg", first["label"]) for p in q["negative"]]
                out.append(f'<tr><td class="who">{who}</td>{"".join(cells)}</tr>')
            out.append("</table></div>")
        gallery = "\n".join(out)
        return gallery if missing is None else self._kept_gallery(setting.name, gallery, head, missing)

    def _defaults(self, row: str) -> dict:
        """Every option of the row's solver at its default ({} where no solver of this build defines it)."""
        method = next((m for m in self.methods if m.name == records.parse_row_name(row)[0]), None)
        defaults = getattr(method, "defaults", None)
        return {**COMMON_OPTIONS, **defaults} if isinstance(defaults, dict) else {}

    def _kept_gallery(self, name: str, unlabelled: str, head: str, missing: DataError) -> str:
        """Without the data here, the gallery of the site being replaced, with its images, where it shows what
        would be drawn now (``unlabelled``: drawn without labels and images); else a note. Either way one line.
        The note on older choices is the records', not the data's: it is compared apart and always the new one."""
        why = str(missing).splitlines()[0]
        page = self.previous / f"{name}.html" if self.previous is not None else None
        old = _gallery_section(page.read_text()) if page is not None and page.is_file() else None
        srcs = list(dict.fromkeys(html.unescape(s) for s in re.findall(r'src="(img/[^"]+)"', old or "")))
        if (old is not None and _OLDER.sub("", _unlabel(old)) == _OLDER.sub("", unlabelled)
                and all((self.previous / s).is_file() for s in srcs)):
            for src in srcs:
                (self.out / src).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(self.previous / src, self.out / src)
            self.log(f"{name}.html: its gallery and {len(srcs)} images kept as they were, the data to draw them is "
                     f"not here ({why})")
            note = _OLDER.search(unlabelled)
            return _OLDER.sub("", old).replace(head, head + (note.group(0) if note else ""), 1)
        self.log(f"{name}.html: no gallery images, the data to draw them is not here ({why})")
        return head + f"<p class=warn>Images unavailable here: {e(why)}</p>"

    def _thumb(self, name: str, split: str, i: int, img) -> str:
        """The thumbnail's address, drawn from ``img`` unless there (or ``img`` is None: no data here)."""
        path, rel = self.img(name, f"{split}-{i}.png")
        if img is not None and not path.is_file():
            figures.thumbnail(img, path)
        return rel

    def _train_cell(self, name: str, data, p: dict, kind: str, query_label: int) -> str:
        src = self._thumb(name, "train", p["index"], None if data is None else data.train_x[p["index"]])
        off = " off" if p["label"] != query_label else ""
        pic = _img(src, f"training point {p['index']}", "", height=56)
        return (f'<td><figure class="thumb {kind}{off}">{pic}'
                f"#{p['index']} y={e(_label(data, p['label']))}<br>τ={p['score']:+.3g}</figure></td>")


PALETTE = "palette.json"  # {solver: colour slot} of the figures, read back by the next build


def _kept_slots(previous: Path | None) -> dict | None:
    """The colour slots of the site being replaced; None (slots in name order) where it has none readable."""
    if previous is None or not (previous / PALETTE).is_file():
        return None
    try:
        slots = read_json(previous / PALETTE)
    except ArtifactError:  # damaged: colours in name order, as on a first build
        return None
    return slots if isinstance(slots, dict) else None


GALLERY_HEAD = "<h2>Which training images each solver blames</h2>"
OLDER = "<p class=warn>Drawn from older choices: "  # the gallery's note, from the records (see _gallery)
_OLDER = re.compile("\n" + re.escape(OLDER) + r"[^<]*</p>")
# A label where the data is not here to name it, and the two places a gallery shows labels (_gallery, _train_cell).
LABEL_SLOT = "…"
_LABELS = (re.compile(r"(</b>, label )[^<]*(</div>)"), re.compile(r"( y=)[^<]*(<br>τ=)"))


def _label(data, y: int) -> str:
    return LABEL_SLOT if data is None else figures.label_name(data, y)


def _unlabel(gallery: str) -> str:
    """A gallery's HTML with every label replaced by :data:`LABEL_SLOT`, as it is drawn without the data."""
    for pattern in _LABELS:
        gallery = pattern.sub(rf"\g<1>{LABEL_SLOT}\g<2>", gallery)
    return gallery


def _gallery_section(page: str) -> str | None:
    """The gallery of a setting's page: the last section, from its heading to the script (see setting_page)."""
    start, end = page.find(GALLERY_HEAD), page.rfind("\n<script>")
    return page[start:end] if 0 <= start < end else None


NUMERIC_CELL = re.compile(r"[-+−]?[\d.]+(e[-+]?\d+)?( ± [\d.]+)?†?")


def build(store: ResultsStore, settings: list[settings_mod.Setting], df: pd.DataFrame, found: dict, methods: list, *,
          out: Path | None = None, keep_from: Path | None = None, screenshot: bool = True, log=print) -> Path:
    """Write the site into ``out`` (default ``<store>/report/``; replaced whole) and return its ``index.html``.
    ``df`` and ``found``: the leaderboard (:func:`leaderboard.collect`); ``methods``: the solvers whose gap-study
    rows are checked for staleness. Where a setting's data is not here, its gallery and images are kept from
    ``keep_from`` (default: the site being replaced) if they still show what would be drawn, and the log says so.
    With a headless Chromium on the machine, it also takes ``screenshot.png`` of the index; without one the
    previous screenshot is kept, and the log says so."""
    final = Path(out) if out is not None else store.report
    previous = Path(keep_from) if keep_from is not None else final
    df = df.astype(object).where(df.notna(), None)  # an empty cell is None, whether NaN in a float column or not
    tmp = temp_dir_beside(final)
    try:
        site = _Site(store, tmp, settings, df, found, methods, previous if previous.is_dir() else None, log)
        with figures.house_style():
            pages = {name: site.setting_page(name) for name in site.names}  # first: the index links the pages
            site.pages = {name for name, page in pages.items() if page is not None}
            for name in site.pages:
                (tmp / f"{name}.html").write_text(pages[name])
            (tmp / "index.html").write_text(site.index())
        write_json(tmp / PALETTE, site.palette.slots)
        why = "not asked for"
        if screenshot:
            try:
                browser.screenshot(tmp / "index.html", tmp / "screenshot.png")
            except browser.BrowserError as exc:  # the pages are written; only the picture of one is missing
                why = str(exc)
        old_shot = final / "screenshot.png"
        if not (tmp / "screenshot.png").is_file() and old_shot.is_file():
            shutil.copy2(old_shot, tmp / "screenshot.png")
            log(f"{old_shot} kept as it was: {why}")
        _swap(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {store.relative(final / 'index.html')}, {len(site.pages)} setting pages, their images and data")
    return final / "index.html"


def _swap(new: Path, final: Path) -> None:
    """Put the freshly written folder in place of the old one; a reader never sees half a site."""
    new.chmod(0o755)
    old = None
    if final.exists():
        old = temp_dir_beside(final)
        old.rmdir()
        final.rename(old)
    new.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
