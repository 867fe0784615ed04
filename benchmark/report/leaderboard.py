"""Floor 6: the leaderboard — one row per setting × method, from the run records (and the remove-top-k columns
from that study's stored results, :mod:`benchmark.studies.counterfactual`), never from anything else.

:func:`collect` reads every record and says, per row, where its numbers come from: a row without a record is
"not yet run" (or "n/a" when the solver declares it cannot handle the model); numbers evaluated on an
unfinished ground truth say so; a record whose numbers are no longer current (:mod:`benchmark.evaluate.records`)
keeps them only under a STALE status; a record that does not check against itself is INVALID, without a number.
:func:`write` writes ``leaderboard.csv`` and ``leaderboard.md``; :func:`check` says whether that file still holds
what the records give now (the report is built from the records, and checks the table beside it).
"""

from __future__ import annotations

import io
import math
import re
from pathlib import Path

import pandas as pd

from ..evaluate import campaign, records
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
                  "self-influence (the baselines: training loss, and the exact expectation of a random order). "
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


def to_markdown(df: pd.DataFrame) -> str:
    lines = [
        "# tdabench leaderboard",
        "",
        "Generated by `tdabench leaderboard` from the run records in `results/runs/`; never edited by hand.",
        "",
        *(f"- **{term}**: {text}" for term, text in NOTES),
        "",
    ]
    for setting, part in df.groupby("setting", sort=False):
        paper = part["paper_lds"].dropna()
        lines.append(f"## {setting}")
        lines.append("")
        gts = sorted(set(part["ground_truth"].dropna()))
        lines.append(f"Ground truth: {'; '.join(gts) or 'none'}." + (f" Paper (Table 1): LDS {paper.iloc[0]:.2f}."
                                                                        if len(paper) else ""))
        lines.append("")
        lines.append("| solver | status | LDS ± se [95% CI] | ceiling | of ceiling | explained | recall@10/20/30/40/50% | AUC | "
                     "remove-top-k drop@100 / @1000, flip@1000, min k | fit s | score s | self s | peak MB | device | "
                     "params |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for _, r in part.iterrows():
            lds = fmt_pm(r["lds"], r["lds_se"])
            if lds and r["lds_ci_low"] is not None and not pd.isna(r["lds_ci_low"]):
                lds += f" [{r['lds_ci_low']:.3f}, {r['lds_ci_high']:.3f}]"
            recalls = " / ".join(fmt_num(r[k], 2) for k in RECALL_KEYS) if r["recall_10"] is not None \
                and not pd.isna(r["recall_10"]) else ""
            lines.append("| " + " | ".join([
                r["solver"], fmt_text(r["status"]), lds, fmt_num(r["lds_ceiling"]), fmt_num(r["lds_of_ceiling"], 2),
                fmt_text(r["explained"]), recalls,
                fmt_num(r["auc"]), _rtk_cell(r), fmt_num(r["fit_s"], 1), fmt_num(r["score_s"], 1), fmt_num(r["self_score_s"], 1),
                fmt_num(r["peak_mb"], 0), fmt_text(r["device"]), fmt_text(r["params"])]) + " |")
        lines.append("")
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
