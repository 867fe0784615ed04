"""Floor 6: the leaderboard — one row per setting × method, from the run records (and the remove-top-k columns
from that study's stored results, :mod:`benchmark.studies.counterfactual`), never from anything else.

:func:`collect` reads every record and says, per row, where its numbers come from: a row without a record is
"not yet run" (or "n/a" when the solver declares it cannot handle the model); numbers evaluated on an
unfinished ground truth say so; a record whose numbers are no longer current (:mod:`benchmark.evaluate.records`)
keeps them only under a STALE status; a record that does not check against itself is INVALID, without a number.
:func:`write` writes ``leaderboard.csv`` (every row, every digit, each full status) and ``leaderboard.md`` (read in a
minute: the solvers × settings matrix, then a compact table per setting in reading order, statuses as short codes,
rows without a record in one line); :func:`check` says whether the CSV still holds what the records give now (the
report is built from the records, and checks the table beside it).
"""

from __future__ import annotations

import io
import math
import re
from pathlib import Path

import pandas as pd

from ..evaluate import campaign, external, metrics, records
from ..evaluate.engine import BASELINES, LOSS, RANDOM
from ..setup import settings as settings_mod
from ..setup.artifacts import atomic_write_bytes
from ..setup.store import ResultsStore
from ..studies import counterfactual

RECALL_KEYS = tuple(f"recall_{p}" for p in (10, 20, 30, 40, 50))
# Remove-top-k (benchmark.studies.counterfactual): mean margin drop removing the top 100 / 1000, flip rate at 1000,
# median smallest k of the grid that flips a query.
RTK_KEYS = (*(f"rtk_drop_{k}" for k in counterfactual.LEADERBOARD_K), f"rtk_flip_{counterfactual.LEADERBOARD_K[-1]}",
            "rtk_min_k")
COLUMNS = ("setting", "solver", "status", "lds", "lds_se", "lds_ci_low", "lds_ci_high", "lds_ceiling",
           "lds_of_ceiling", "explained", "paper_lds", *RECALL_KEYS, "auc", "auc_se", *RTK_KEYS, "fit_s", "score_s",
           "self_score_s", "peak_mb", "device", "params", "ground_truth", "measurement", "queries", "record")


# What each column means: the Markdown table's preamble and the report's glossary.
NOTES = (
    ("LDS", "mean over the reported test queries of the Spearman correlation, across the ground truth's random 50% "
            "subsets, between Σ_{i∈S} τᵢ and the measured output (correct-class margin unless noted) averaged over "
            "the seed replicas; ± standard error over queries, [95% bootstrap interval]. Hyper-parameters were chosen "
            "on separate validation queries."),
    ("ceiling", "the LDS a perfect attribution is expected to reach against this noisy ground truth (√ of the "
                "Spearman–Brown reliability of the replica average); **of ceiling** = LDS / ceiling."),
    ("explained", "the model whose predictions are attributed: **gt** = the ground truth's own full-data model (its "
                  "seed also trained one of the target's replicas: coupled to the target), **zoo** = a model from "
                  "`results/models/` seeded apart from every ground-truth model (uncoupled); an ensemble lists "
                  "several (a row `<solver>-ens<n>` averages n zoo models). Paired differences between rows: "
                  "`tdabench compare SETTING ROW …` (gt rows and zoo rows are not paired)."),
    ("recall@k%", "share of the flipped labels (10% of the training set, seeded) found in the top k% by "
                  "self-influence (the baselines: training loss, and the exact expectation of a random order); the "
                  "tables show k = 10, `leaderboard.csv` and each setting's page k = 10 … 50; n/a: the method has "
                  "no self-influence for that model (an ensemble row, a method that attributes through training). "
                  "**AUC** is the ROC AUC of that ranking (0.5 random, 1 perfect)."),
    ("remove-top-k", "(`tdabench counterfactual`): retrain without the solver's k most positively influential "
                     "training points for a query (seed-matched, several seeds; `results/counterfactual/`): the mean "
                     "margin drop at k = 100 / 1000, the share of predictions that flip at k = 1000, and the median "
                     "smallest k of the grid that flips one (∞: most never flip). The random baseline removes k "
                     "random points."),
    ("cost", "wall-clock seconds for fitting the curvature, scoring the queries (all train points), and "
             "self-influence; peak memory is the process resident set on CPU (including data and the torch runtime) "
             "or the allocator's peak on a GPU. Timings on a machine busy with other work are slower; each record "
             "stores the load average."),
)


def fmt_params(params) -> str:
    if not params:
        return ""
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(params.items()))


def _orphans(store: ResultsStore, known: set[str]) -> list[str]:
    """Settings with run records that no dataset file registers any more."""
    if not store.runs.is_dir():
        return []
    return sorted(p.name for p in store.runs.iterdir() if p.is_dir() and p.name not in known and any(p.glob("*.json")))


def collect(store: ResultsStore, settings: list[settings_mod.Setting], methods: list, *,
            failures: dict | None = None, progress: bool | None = None) -> tuple[pd.DataFrame, dict]:
    """The leaderboard table and the records behind it ({(setting, method): record}). Methods with records
    but no solver file any more are listed too (their records cannot be checked). Every record is checked now
    (:func:`records.stale_reasons`: the fingerprint probes take about a second per solver), with a progress line
    on a terminal (``progress=None``) or always (True) or never (False)."""
    from tqdm.auto import tqdm

    failures = failures or {}
    names = [records.row_name(m.name, n) for m in methods for n in campaign.ensembles(m)]
    for s in settings:
        d = store.runs / s.name
        if d.is_dir():
            names += [p.stem for p in sorted(d.glob("*.json")) if p.stem not in names]
    by_name = {m.name: m for m in methods}
    ordered = sorted(n for n in names if n not in BASELINES) + [b for b in BASELINES]
    rows, found = [], {}
    bar = tqdm(total=len(settings) * len(ordered), desc="checking run records", unit="row", leave=False,
               disable=None if progress is None else not progress)
    for setting in settings:
        gt_path, gt_text = campaign.gt_status(store, setting)
        has_mis = records.mislabel_available(store, setting)
        rtk = counterfactual.leaderboard_columns(store, setting.name)
        for name in ordered:
            bar.update()
            base, ensemble = records.parse_row_name(name)
            method = by_name.get(base)
            try:
                rec = records.read_record(store, setting.name, base, ensemble)
            except records.RecordError as exc:  # refused: the row says so, without a number
                path = records.run_path(store, setting.name, base, ensemble)
                row = {c: None for c in COLUMNS}
                # the path as the tables show it everywhere: relative to the results root, not this machine's
                row.update(setting=setting.name, solver=name, paper_lds=setting.paper_lds, ground_truth=gt_text,
                           status=f"INVALID, not shown: {str(exc).replace(str(path), store.relative(path))}",
                           record=store.relative(path))
                rows.append(row)
                continue
            if rec is None and ((method is LOSS and not has_mis) or (method is RANDOM and gt_path is None
                                                                     and not has_mis)):
                continue  # a baseline row only where there is something to be a baseline for
            row = {c: None for c in COLUMNS}
            row.update(setting=setting.name, solver=name, paper_lds=setting.paper_lds, ground_truth=gt_text)
            row.update({k: v for k, v in rtk.get(name, {}).items() if k in RTK_KEYS})
            if rec is None:
                if method is None:
                    continue
                na = campaign.not_applicable(setting, method)
                short = campaign.ensemble_not_applicable(store, setting, ensemble)
                if (setting.name, name) in failures:
                    row["status"] = f"failed: {failures[(setting.name, name)]}"
                elif na:
                    row["status"] = f"n/a: {na}"
                elif gt_path is None and setting.requires:
                    row["status"] = "not yet run (no ground truth; GPU runbook: docs/large-settings.md)"
                elif gt_path is None:
                    row["status"] = "not yet run (no ground truth)"
                elif "INCOMPLETE" in gt_text:
                    row["status"] = "not yet run (ground truth incomplete)"
                elif short:
                    row["status"] = f"not yet run ({short})"
                else:
                    row["status"] = "not yet run"
                rows.append(row)
                continue
            if method is None and external.is_external(rec):  # `tdabench evaluate --scores`: no solver file
                method = external.method_of(rec)
            found[(setting.name, name)] = rec
            rows.append(_row(store, setting, method, rec, row, has_mis, failures, rtk.get(name), ensemble))
    bar.close()
    for orphan in _orphans(store, {s.name for s in settings_mod.available().values()}):
        for p in sorted((store.runs / orphan).glob("*.json")):
            row = {c: None for c in COLUMNS}
            row.update(setting=orphan, solver=p.stem, ground_truth="unknown setting",
                       status="setting no longer registered: its record cannot be checked, its numbers are not shown")
            rows.append(row)
    return pd.DataFrame(rows, columns=list(COLUMNS)), found


def _row(store, setting, method, rec, row, has_mis, failures, rtk=None, ensemble: int = 1) -> dict:
    stale = records.stale_reasons(rec, store, setting, method) if method is not None else {}
    lds, mis = rec.get("lds"), rec.get("mislabel")
    status = []
    if method is None:
        status.append("no solver file defines it any more: its record cannot be checked")
    if external.is_external(rec):
        scores = rec["external"]["scores"]
        status.append(f"external scores ({scores['file']}, sha256 {scores['sha256'][:12]}…)")
    elif recorded := records.recorded_with(rec, method):  # a peer adapter whose library is not installed here
        status.append(recorded)
    if lds:
        used = lds["ground_truth"]
        row.update(lds=lds["mean"], lds_se=lds["se"], lds_ci_low=lds["ci_low"], lds_ci_high=lds["ci_high"],
                   lds_ceiling=lds.get("ceiling"), lds_of_ceiling=lds.get("of_ceiling"),
                   measurement=lds.get("measurement"), queries=lds.get("queries"),
                   explained=None if method is RANDOM else records.explained_label(lds),
                   ground_truth=f"{used['version']} " + ("complete" if used["complete"] else
                                                         f"INCOMPLETE, replicas {used['replicas']} of "
                                                         f"{used['replicas_total']}"))
        if lds.get("mean") is None:
            status.append(f"LDS undefined: {lds.get('undefined', 'no query has a defined correlation')}")
        if not used["complete"]:
            status.append(f"LDS on an incomplete ground truth ({len(used['replicas'])}/"
                          f"{used['replicas_total']} seed replicas)")
    if mis:
        row.update({k: mis.get(k) for k in RECALL_KEYS}, auc=mis.get("auc"), auc_se=mis.get("auc_se"))
    if (setting.name, row["solver"]) in failures:
        status.append(f"last rerun failed: {failures[(setting.name, row['solver'])]}")
    by_reason: dict[str, list[str]] = {}
    for section, why in stale.items():
        by_reason.setdefault("; ".join(why), []).append(section)
    for why, sections in by_reason.items():
        status.append(f"STALE ({', '.join(sections)}): {why}")
    if rtk and lds and method is not RANDOM and rtk["rtk_params"] != lds.get("params"):  # random: its own seed
        status.append(f"remove-top-k used other parameters ({fmt_params(rtk['rtk_params'])}): rerun `tdabench "
                      f"counterfactual {setting.name}`")
    if not lds and method is not LOSS:
        status.append("LDS not yet run")
    if not mis and has_mis:
        na = records.mislabel_not_applicable(method, ensemble) if method is not None else None
        if external.is_external(rec):
            na = "no self-influence scores were submitted (`tdabench evaluate --self-scores`)"
        status.append(f"mislabel n/a: {na}" if na else "mislabel not yet run")
    cost = rec.get("cost", {})
    row.update(status="; ".join(status) or "ok", fit_s=cost.get("fit_s"), score_s=cost.get("score_s"),
               self_score_s=cost.get("self_score_s"), peak_mb=cost.get("peak_mb"), device=rec.get("device"),
               params=fmt_params(rec.get("params")),
               record=store.relative(records.run_path(store, setting.name, rec["solver"], ensemble)))
    return row


def fmt_num(v, digits=3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    return f"{v:.{digits}f}"


def fmt_pm(v, se, digits=3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    return f"{v:.{digits}f} ± {se:.{digits}f}" if se is not None and math.isfinite(se) else f"{v:.{digits}f}"


def fmt_text(v) -> str:
    return "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else str(v)


def _rtk_cell(r) -> str:
    if all(r[k] is None or pd.isna(r[k]) for k in RTK_KEYS):
        return ""
    big = counterfactual.LEADERBOARD_K[-1]
    min_k = r["rtk_min_k"]
    min_k = "" if min_k is None or pd.isna(min_k) else ("∞" if math.isinf(min_k) else f"{min_k:g}")
    return (" / ".join(fmt_num(r[f"rtk_drop_{k}"], 2) for k in counterfactual.LEADERBOARD_K)
            + f", {fmt_num(r[f'rtk_flip_{big}'], 2)}, {min_k}")


# ------------------------------------------------------------------------------------------ reading order

# Table 1's two settings first, then the two small settings where every method runs, then the rest by name.
HEADLINE = ("mnist-cnn", "fmnist-cnn", "mnist-mlp-small", "mnist-lr")
PAPER_METHOD = "ekfac"  # the method of the paper's Table 1: the reference every "which wins" difference is from


def setting_order(names) -> list[str]:
    """Settings in reading order: :data:`HEADLINE` first, then the others by name."""
    names = list(dict.fromkeys(names))
    return [n for n in HEADLINE if n in names] + sorted(n for n in names if n not in HEADLINE)


# A row's status as a short code, worst first; the full text is in leaderboard.csv (and on the report, on hover).
CODES = (
    ("INVALID", "the record does not check against itself (edited by hand, truncated): no number is shown"),
    ("FAILED", "the last rerun failed; numbers, if any, are those of the record from before"),
    ("UNPINNED", "a finished ground truth or mislabel artifact whose root hash `results/index.json` does not pin: "
                 "nothing derived from it is trusted"),
    ("STALE", "the record no longer describes what a fresh run computes (the solver or metric code, or the ground "
              "truth, changed; why: the notes under the table)"),
    ("UNCHECKED", "no solver file or setting defines the row any more: its record cannot be checked"),
    ("INCOMPLETE", "scored on an unfinished ground truth"),
    ("ok*", "current, with a note under the table (a part not run yet, an undefined LDS, remove-top-k from other "
            "parameters)"),
    ("ok", "current: what a fresh run computes now"),
    ("n/a", "the solver cannot run on this model (why: the line under the table)"),
    ("not run", "no record yet (why: the line under the table)"),
)
CURRENT = ("ok", "ok*")  # the codes whose numbers are current
ABSENT = ("n/a", "not run")  # the codes of rows without a record: collapsed into one line per setting
# The part of a status that is no problem: the method has no self-influence there (always the last part, see _row).
_MISLABEL_NA = re.compile(r"(?:^|; )mislabel n/a: .*$")


def status_code(status) -> str:
    """The short code (:data:`CODES`) of a row's status as :func:`collect` writes it."""
    s = fmt_text(status)
    if s == "ok":
        return "ok"
    if s.startswith("INVALID"):
        return "INVALID"
    if s.startswith("failed: ") or "last rerun failed: " in s:
        return "FAILED"
    if "UNPINNED" in s:
        return "UNPINNED"
    if "STALE" in s:
        return "STALE"
    if s.startswith("setting no longer registered") or "no solver file defines it" in s:
        return "UNCHECKED"
    if s.startswith("n/a: "):
        return "n/a"
    if s.startswith("not yet run"):
        return "not run"
    if "incomplete ground truth" in s:
        return "INCOMPLETE"
    return "ok*" if _MISLABEL_NA.sub("", s) else "ok"


def mislabel_na(status) -> bool:
    """Whether the row's method has no self-influence on this model (the recall cells are then n/a, not missing)."""
    return bool(_MISLABEL_NA.search(fmt_text(status)))


def absent_reason(name: str, status: str) -> str:
    """Why a row without a record is absent, without its code, and with its own solver's name said as "it" (so
    that rows absent for one reason share one line)."""
    text = status[len("n/a: "):] if status.startswith("n/a: ") else re.sub(r"^not yet run ?\(?(.*?)\)?$", r"\1",
                                                                          status)
    base = records.parse_row_name(name)[0]
    return re.sub(rf"(?<![\w-]){re.escape(base)}(?![\w-])", "it", text)


def _num(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def _codes(part: pd.DataFrame) -> pd.Series:
    return part["status"].map(status_code)


def pending(part: pd.DataFrame) -> bool:
    """A setting none of whose rows has a record (every row n/a or not run): one line, no table."""
    return bool(_codes(part).isin(ABSENT).all())


def coupled(part: pd.DataFrame) -> pd.Series:
    """Rows explaining the ground truth's own model (coupled to the target) in a setting whose other rows explain
    zoo models: their LDS is not comparable with the others' (marked †, never the best)."""
    explained = part["explained"].map(fmt_text)
    return explained.str.startswith("gt") & explained.str.startswith("zoo").any()


def best_row(part: pd.DataFrame, single: bool = False) -> str | None:
    """The row with the highest LDS among the setting's current, comparable method rows (``single``: among the
    single-model rows only); None where there is none."""
    ok = part["lds"].map(_num) & _codes(part).isin(CURRENT) & ~part["solver"].isin(BASELINES) & ~coupled(part)
    if single:
        ok &= part["solver"].map(lambda n: records.parse_row_name(n)[1] == 1)
    cand = part[ok]
    return None if cand.empty else cand.loc[cand["lds"].astype(float).idxmax(), "solver"]


def ceilings(part: pd.DataFrame) -> str:
    """The setting's noise ceiling(s) as its rows give them ("" where none has an LDS)."""
    return "/".join(dict.fromkeys(fmt_num(c) for c in part["lds_ceiling"] if _num(c)))


def paired(found: dict, setting: str, row: str, ref: str | None = None) -> dict | None:
    """``row`` − ``ref`` (default :data:`PAPER_METHOD`) paired query by query, from the records :func:`collect`
    read: what `tdabench compare SETTING REF ROW` prints (:func:`records.compare_rows`). None where either has no
    LDS or the two are not paired (:func:`records.unpaired_reasons`)."""
    a, b = ((found.get((setting, r)) or {}).get("lds") or {} for r in (row, ref or PAPER_METHOD))
    if a.get("mean") is None or b.get("mean") is None or records.unpaired_reasons(a, b):
        return None
    return metrics.paired_difference(a["per_query"], b["per_query"])


def fmt_difference(d: dict) -> str:
    """A paired difference (:func:`paired`) ± its standard error, to the digits its error needs (as `tdabench
    compare` shows it: 0.0004 ± 0.0003 is not 0.000 ± 0.000)."""
    digits = 3 if d["se"] >= 0.001 else 4
    return f"{d['difference']:+.{digits}f} ± {d['se']:.{digits}f}"


def pending_reason(part: pd.DataFrame) -> str:
    """Why a pending setting (:func:`pending`) has no rows: the most common reason of its rows not yet run."""
    reasons = [absent_reason(n, s) for n, s in zip(part["solver"], part["status"]) if s.startswith("not yet run")]
    gts = "; ".join(sorted({fmt_text(g) for g in part["ground_truth"] if fmt_text(g)})) or "no ground truth"
    if not reasons:  # every row n/a
        return "; ".join([gts] * ("no ground truth" in gts) + ["no solver applies"])
    top = max(dict.fromkeys(reasons), key=reasons.count)
    return top or f"nothing run yet (ground truth {gts})"


def matrix_rows(df: pd.DataFrame, names: list[str]) -> list[str]:
    """The rows of the solvers × settings matrix: every row with an LDS in one of ``names``, by its LDS on the first
    of them, then (rows without one there) on the next, and so on."""
    lds = {(s, n): v for s, n, v in zip(df["setting"], df["solver"], df["lds"]) if _num(v) and s in names}
    rows = list(dict.fromkeys(n for s, n in lds))
    return sorted(rows, key=lambda n: tuple(-lds.get((s, n), -math.inf) for s in names))


def _cell_md(r, best: bool, dagger: bool) -> str:
    code = status_code(r["status"])
    if not _num(r["lds"]):
        return {"n/a": "n/a", "not run": "–"}.get(code, code if code not in CURRENT else "")
    lds = fmt_pm(r["lds"], r["lds_se"])
    return (f"**{lds}**" if best else lds) + f" ({fmt_num(r['lds_of_ceiling'], 2)})" + "†" * dagger + (
        "" if code in CURRENT else f" {code}")


def _matrix_md(df: pd.DataFrame, names: list[str]) -> list[str]:
    parts = {s: df[df["setting"] == s].set_index("solver", drop=False) for s in names}
    best = {s: best_row(p) for s, p in parts.items()}
    dag = {s: coupled(p) for s, p in parts.items()}
    head = [f"`{s}` (ceiling {ceilings(parts[s])})" for s in names]
    lines = ["| solver | " + " | ".join(head) + " |", "|---" * (len(names) + 1) + "|"]
    for name in matrix_rows(df, names):
        cells = [_cell_md(parts[s].loc[name], best[s] == name, bool(dag[s][name])) if name in parts[s].index else ""
                 for s in names]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    papers = [parts[s]["paper_lds"].dropna() for s in names]
    if any(len(p) for p in papers):
        lines.append(f"| *paper (Table 1, {PAPER_METHOD})* | "
                     + " | ".join(f"*{p.iloc[0]:.2f}*" if len(p) else "" for p in papers) + " |")
    return lines


def _pending_line(df: pd.DataFrame, names: list[str]) -> str:
    by_reason: dict[str, list[str]] = {}
    for s in names:
        part = df[df["setting"] == s]
        paper = part["paper_lds"].dropna()
        by_reason.setdefault(pending_reason(part), []).append(f"`{s}`" + (f" (paper {paper.iloc[0]:.2f})"
                                                                              if len(paper) else ""))
    return "No results yet: " + "; ".join(f"{', '.join(v)} — {k}" for k, v in by_reason.items()) + "."


def absent_groups(part: pd.DataFrame) -> list[tuple[str, list[tuple[list[str], str]]]]:
    """The rows of a setting without a record, for one line: [(code, [(row names, why)])], grouped by code and
    reason (:func:`absent_reason`)."""
    groups: dict[tuple, list[str]] = {}
    for name, status in zip(part["solver"], part["status"]):
        code = status_code(status)
        if code in ABSENT:
            groups.setdefault((code, absent_reason(name, status)), []).append(name)
    return [(code, [(names, why) for (c, why), names in groups.items() if c == code])
            for code in ABSENT if any(c == code for c, _ in groups)]


SECTION_COLUMNS = ("solver", "status", "LDS ± se [95% CI]", "of ceiling", "explained", "recall@10%", "AUC",
                   "remove-top-k drop@100 / @1000, flip@1000, min k", "fit s", "score s", "self s", "peak MB",
                   "device", "params")


def _section_md(setting: str, part: pd.DataFrame) -> list[str]:
    codes = _codes(part)
    shown = part[~codes.isin(ABSENT)].copy()
    shown = shown.iloc[sorted(range(len(shown)), key=lambda i: -float(shown["lds"].iloc[i])
                              if _num(shown["lds"].iloc[i]) else math.inf)]
    best, dag = best_row(part), coupled(shown)
    devices = sorted({fmt_text(d) for d in shown["device"] if fmt_text(d)})
    rows = []
    for (_, r), is_gt in zip(shown.iterrows(), dag):
        lds = fmt_pm(r["lds"], r["lds_se"])
        if lds and _num(r["lds_ci_low"]):
            lds += f" [{r['lds_ci_low']:.3f}, {r['lds_ci_high']:.3f}]"
        if lds and r["solver"] == best:
            lds = f"**{lds}**"
        recall = fmt_num(r["recall_10"], 2) or ("n/a" if mislabel_na(r["status"]) else "")
        rows.append([f"**{r['solver']}**" if r["solver"] == best else r["solver"], status_code(r["status"]),
                     lds + "†" * bool(is_gt), fmt_num(r["lds_of_ceiling"], 2), fmt_text(r["explained"]), recall,
                     fmt_num(r["auc"]), _rtk_cell(r), fmt_num(r["fit_s"], 1), fmt_num(r["score_s"], 1),
                     fmt_num(r["self_score_s"], 1), fmt_num(r["peak_mb"], 0), fmt_text(r["device"]),
                     fmt_text(r["params"])])
    # a column no row fills is left out, and so is the device where every row ran on the same one
    keep = [i for i, c in enumerate(SECTION_COLUMNS) if i < 2 or any(row[i] for row in rows)]
    if len(devices) <= 1:
        keep = [i for i in keep if SECTION_COLUMNS[i] != "device"]
    paper = part["paper_lds"].dropna()
    gts = "; ".join(sorted({fmt_text(g) for g in part["ground_truth"] if fmt_text(g)})) or "none"
    facts = [f"Ground truth {gts}"] + [f"noise ceiling {c}" for c in [ceilings(part)] if c]
    facts += [f"paper (Table 1) {p:.2f}" for p in paper.iloc[:1]]
    lines = [f"## {setting}", "", "; ".join(facts) + "." + (f" Every row ran on {devices[0]}." if len(devices) == 1
                                                              else ""), ""]
    lines.append("| " + " | ".join(SECTION_COLUMNS[i] for i in keep) + " |")
    lines.append("|---" * len(keep) + "|")
    lines += ["| " + " | ".join(row[i] for i in keep) + " |" for row in rows]
    if dag.any():
        lines += ["", "† explains the ground truth's own full-data model (coupled to the target), not a zoo model "
                      "as the other rows do: not compared with them."]
    absent = ". ".join(f"**{code}**: " + "; ".join(", ".join(names) + (f" ({why})" if why else "")
                                                 for names, why in items) for code, items in absent_groups(part))
    lines += ["", f"Not in the table — {absent}."] * bool(absent)
    notes = [f"- {r['solver']}: {r['status']}" for _, r in shown.iterrows() if status_code(r["status"]) != "ok"]
    lines += ["", *notes] * bool(notes)
    return lines + [""]


def to_markdown(df: pd.DataFrame) -> str:
    """``leaderboard.md``: the solvers × settings matrix, then one compact table per setting in reading order
    (:func:`setting_order`), each row's status as a code (:data:`CODES`), rows without a record in one line."""
    order = setting_order(df["setting"])
    shown = [s for s in order if not pending(df[df["setting"] == s])]
    waiting = [s for s in order if s not in shown]
    lines = [
        "# tdabench leaderboard",
        "",
        "Generated by `tdabench leaderboard` from the run records in `results/runs/`; never edited by hand. Every "
        "digit and each row's full status: `leaderboard.csv`; the columns and status codes: "
        "[at the end](#what-the-columns-mean).",
        "",
    ]
    if shown:
        lines += [f"LDS ± se (of the noise ceiling) on each setting's reported queries; **bold**: the best current "
                  f"row of the setting; † not comparable (it explains the ground truth's own model); –: not run "
                  f"yet.", "", *_matrix_md(df, shown), ""]
    if waiting:
        lines += [_pending_line(df, waiting), ""]
    lines += ["Status codes: " + ", ".join(f"**{c}**" for c, _ in CODES) + " (what each means: at the end).", ""]
    for s in shown:
        lines += _section_md(s, df[df["setting"] == s])
    lines += ["## What the columns mean", "", *(f"- **{term}**: {text}" for term, text in NOTES), "",
              "Status codes:", "", *(f"- **{c}**: {text}" for c, text in CODES), ""]
    return "\n".join(lines)


REWRITE = "rewrite it from the run records with `tdabench leaderboard --no-rerun`"


class TableError(ValueError):
    """``leaderboard.csv`` that cannot be read, or that does not say what the run records say now."""


def csv_text(df: pd.DataFrame) -> str:
    """The table as ``leaderboard.csv`` holds it: every digit, so the site and the Markdown round the same numbers."""
    return df.to_csv(index=False)


def write(store: ResultsStore, df: pd.DataFrame, log=print) -> tuple[Path, Path]:
    """``leaderboard.csv`` and ``leaderboard.md`` in the store's root, each written whole or not at all."""
    store.root.mkdir(parents=True, exist_ok=True)
    csv, md = store.root / "leaderboard.csv", store.root / "leaderboard.md"
    atomic_write_bytes(csv, csv_text(df).encode())
    atomic_write_bytes(md, (to_markdown(df) + "\n").encode())
    log(f"wrote {csv} and {md} ({len(df)} rows)")
    return csv, md


def read(store: ResultsStore) -> pd.DataFrame:
    """``leaderboard.csv`` as :func:`write` wrote it, every cell as its text ("" where empty); a missing file is a
    FileNotFoundError and one that is not such a table a :class:`TableError`, each naming the file and the fix."""
    csv = store.root / "leaderboard.csv"
    if not csv.is_file():
        raise FileNotFoundError(f"{csv} does not exist: write the leaderboard first (`tdabench leaderboard "
                                f"--no-rerun` rewrites it from the run records without rerunning anything)")
    try:
        table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except ValueError as exc:  # pandas' ParserError and EmptyDataError, UnicodeDecodeError
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TableError(f"{csv} is not a leaderboard table ({why}): {REWRITE}") from None
    if list(table.columns) != list(COLUMNS):
        missing, unknown = sorted(set(COLUMNS) - set(table.columns)), sorted(set(table.columns) - set(COLUMNS))
        raise TableError(f"{csv} does not have the leaderboard's columns (missing {_some(missing)}, unknown "
                         f"{_some(unknown)}; written by other code or damaged): {REWRITE}")
    return table.fillna("")  # a row cut short has no cells where its fields are missing


# A rerun's failure as _row notes it, up to the next part of the status (the order _row writes them in).
_RERUN_FAILED = re.compile(r"(?:^|; )last rerun failed: (.*?)(?=; (?:STALE \(|remove-top-k used|LDS not yet run|"
                           r"mislabel )|$)")


def noted_failures(table: pd.DataFrame) -> dict:
    """The failed reruns a table read by :func:`read` notes ({(setting, row): message}): what `tdabench
    leaderboard` passed to :func:`collect`, which the records alone cannot tell, so a report says them too."""
    out = {}
    for setting, solver, status in table[["setting", "solver", "status"]].itertuples(index=False):
        if status.startswith("failed: "):
            out[(setting, solver)] = status[len("failed: "):]
        elif found := _RERUN_FAILED.search(status):
            out[(setting, solver)] = found.group(1)
    return out


def _short(text: str, n: int = 80) -> str:
    return repr(text if len(text) <= n else text[:n] + "…")


def _some(names: list[str]) -> str:
    """A few names, for a message that stays one readable line."""
    more = f", … {len(names) - 3} more" if len(names) > 3 else ""
    return f"[{', '.join(_short(n, 40) for n in names[:3])}{more}]"


def differences(table: pd.DataFrame, df: pd.DataFrame) -> str | None:
    """How ``table`` (:func:`read`) differs from ``df`` (:func:`collect`) as :func:`write` would write it, in a few
    words; None when they agree cell for cell."""
    want = pd.read_csv(io.StringIO(csv_text(df)), dtype=str, keep_default_na=False).fillna("")
    have_keys, want_keys = list(zip(table["setting"], table["solver"])), list(zip(want["setting"], want["solver"]))
    have_rows = dict(zip(have_keys, table.to_dict("records")))
    parts = []
    missing = [k for k in want_keys if k not in have_rows]
    if missing:
        parts.append(f"{len(missing)} of the {len(want_keys)} rows the records give are missing (first: "
                     f"{' / '.join(missing[0])})")
    wanted = set(want_keys)
    extra = [k for k in have_keys if k not in wanted]
    if extra:
        parts.append(f"{len(extra)} rows the records do not give (first: {' / '.join(extra[0])})")
    changed = []
    for key, row in zip(want_keys, want.to_dict("records")):
        old = have_rows.get(key)
        if old is not None and old != row:
            col = next(c for c in COLUMNS if old[c] != row[c])
            changed.append(f"{' / '.join(key)}: {col} {_short(old[col])} where the records give {_short(row[col])}")
    if changed:
        parts.append(f"{len(changed)} rows differ (first: {changed[0]})")
    if not parts and have_keys != want_keys:
        parts.append("its rows are in another order")
    return "; ".join(parts) or None


def check(store: ResultsStore, df: pd.DataFrame, table: pd.DataFrame | None = None) -> None:
    """Raise a :class:`TableError` unless ``leaderboard.csv`` holds exactly what :func:`write` writes for ``df``
    (``table``: the file as :func:`read` gave it, if already read)."""
    csv = store.root / "leaderboard.csv"
    if csv.is_file() and csv.read_bytes() == csv_text(df).encode():
        return
    why = differences(read(store) if table is None else table, df)
    raise TableError(f"{csv} does not say what the run records say ({why or 'it is written differently'}): "
                     f"{REWRITE}")
