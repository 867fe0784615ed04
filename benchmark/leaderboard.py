"""Floor 6: the leaderboard — one row per setting × solver, from the run records, never from anything else.

``build()`` (``tdabench leaderboard``, ``make leaderboard``) optionally reruns what is missing or stale
(``runner.stale_reasons``), then writes ``results/leaderboard.csv``, ``results/leaderboard.md`` and the
figures ``results/figures/lds.png`` and ``results/figures/mislabel_recall.png``.

Every row says where its numbers come from. A setting × solver without a record is listed as
"not yet run" (or "n/a" when the solver declares it cannot handle the model) with empty numbers; numbers
evaluated on an unfinished ground truth say so; a stale record keeps its numbers but is marked stale.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import traceback
from pathlib import Path

import numpy as np
import pandas as pd

from . import groundtruth
from . import mislabel as mislabel_mod
from . import runner
from . import settings as settings_mod
from . import solver_api
from .artifacts import MANIFEST, read_json
from .data import DataError
from .plugins import REPO_ROOT

RESULTS = REPO_ROOT / "results"
FIGURES = RESULTS / "figures"
RECALL_KEYS = tuple(f"recall_{p}" for p in (10, 20, 30, 40, 50))
COLUMNS = ("setting", "solver", "status", "lds", "lds_se", "lds_ci_low", "lds_ci_high", "lds_ceiling",
           "lds_of_ceiling", "paper_lds", *RECALL_KEYS, "auc", "auc_se", "fit_s", "score_s", "self_score_s",
           "peak_mb", "device", "params", "ground_truth", "measurement", "queries", "record")


# ---------------------------------------------------------------- what the rows are

def leaderboard_settings(runs_root: Path = runner.RUNS_ROOT) -> list[str]:
    """Settings on real data (pinned data files, or a Table 1 row), plus any setting that has run records."""
    names = [n for n, s in settings_mod.available().items() if s.data_spec.files or s.paper_lds is not None]
    if Path(runs_root).is_dir():
        names += [p.name for p in Path(runs_root).iterdir() if p.is_dir() and any(p.glob("*.json"))]
    return sorted(set(names), key=lambda n: (n not in settings_mod.available(), n))


def leaderboard_solvers(settings: list[str], runs_root: Path = runner.RUNS_ROOT) -> list[str]:
    names = list(solver_api.available())
    for s in settings:
        d = Path(runs_root) / s
        if d.is_dir():
            names += [p.stem for p in d.glob("*.json")]
    solvers = sorted(set(names) - set(runner.BASELINES))
    return solvers + list(runner.BASELINES)


def _gt_status(setting: str, gt_root: Path) -> tuple[Path | None, str]:
    root = runner.current_gt_root(setting, gt_root)
    if root is None:
        return None, "no ground truth"
    man = read_json(root / MANIFEST)
    if man.get("complete"):
        return root, f"{man['version']} complete"
    reps = runner._complete_replicas(man)
    return root, (f"{man['version']} INCOMPLETE: {len(reps)}/{man['protocol']['seeds']} seed replicas done "
                  f"({man.get('units_done')}/{man.get('units_total')} units)")


@functools.lru_cache(maxsize=None)
def _num_params(setting: str) -> int | None:
    """The setting's parameter count, built once per process (ViT-B/16 takes seconds); None if unknowable here."""
    s = settings_mod.get(setting)
    try:
        return s.model_spec()["parameters"]
    except DataError:  # pretrained weights not here: the same architecture, randomly initialised, counts alike
        if not getattr(s.build_model, "pretrained", None):
            return None
        return sum(p.numel() for p in dataclasses.replace(s.build_model, pretrained=None)().parameters())
    except ImportError:  # timm not installed: the row says "not yet run", never guesses
        return None


def _not_applicable(setting: str, solver: str) -> str | None:
    if solver in runner.BASELINES:
        return None
    try:
        cls = solver_api.get(solver)
        s = settings_mod.get(setting)
    except (solver_api.SolverError, KeyError) as exc:
        return str(exc)
    n = _num_params(setting)
    if n is None:
        return None
    if cls.max_params is not None and n > cls.max_params:
        return f"model has {n:,} parameters; {solver} accepts up to {cls.max_params:,}"
    if cls.leaderboard_max_params is not None and n > cls.leaderboard_max_params:
        return (f"not run automatically: model has {n:,} parameters, {solver} runs here up to "
                f"{cls.leaderboard_max_params:,} (days on a CPU beyond; `tdabench run` runs it when asked)")
    return None


def _fmt_params(params) -> str:
    if not params:
        return ""
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(params.items()))


def collect(settings: list[str] | None = None, *, runs_root: Path = runner.RUNS_ROOT,
            gt_root: Path = groundtruth.GT_ROOT, mislabel_root: Path = mislabel_mod.MISLABEL_ROOT,
            failures: dict | None = None) -> tuple[pd.DataFrame, dict]:
    """The leaderboard table and the records behind it ({(setting, solver): record})."""
    settings = settings or leaderboard_settings(runs_root)
    solvers = leaderboard_solvers(settings, runs_root)
    failures = failures or {}
    rows, records = [], {}
    for setting in settings:
        known = setting in settings_mod.available()
        paper = settings_mod.get(setting).paper_lds if known else None
        gt_path, gt_text = _gt_status(setting, gt_root) if known else (None, "unknown setting")
        has_mis = runner.mislabel_available(setting, mislabel_root) if known else False
        for solver in solvers:
            rec = runner.read_record(setting, solver, runs_root)
            if rec is None and ((solver == "baseline-loss" and not has_mis)
                                or (solver == "baseline-random" and gt_path is None and not has_mis)):
                continue  # a baseline row only where there is something to be a baseline for
            row = {c: None for c in COLUMNS}
            row.update(setting=setting, solver=solver, paper_lds=paper, ground_truth=gt_text)
            if rec is None:
                na = _not_applicable(setting, solver)
                if (setting, solver) in failures:
                    row["status"] = f"failed: {failures[(setting, solver)]}"
                elif na:
                    row["status"] = f"n/a: {na}"
                elif gt_path is None and known and settings_mod.get(setting).requires:
                    row["status"] = "not yet run (no ground truth; GPU runbook: docs/large-settings.md)"
                elif gt_path is None:
                    row["status"] = "not yet run (no ground truth)"
                elif "INCOMPLETE" in gt_text:
                    row["status"] = "not yet run (ground truth incomplete)"
                else:
                    row["status"] = "not yet run"
                rows.append(row)
                continue
            records[(setting, solver)] = rec
            stale = runner.stale_reasons(rec, gt_root=gt_root, mislabel_root=mislabel_root) if known else {}
            lds, mis = rec.get("lds"), rec.get("mislabel")
            status = []
            if lds:
                used = lds["ground_truth"]
                row.update(lds=lds["mean"], lds_se=lds["se"], lds_ci_low=lds["ci_low"], lds_ci_high=lds["ci_high"],
                           lds_ceiling=lds.get("ceiling"), lds_of_ceiling=lds.get("of_ceiling"),
                           measurement=lds.get("measurement"), queries=lds.get("queries"),
                           ground_truth=f"{used['version']} " + ("complete" if used["complete"] else
                                                                 f"INCOMPLETE, replicas {used['replicas']} of "
                                                                 f"{used['replicas_total']}"))
                if not used["complete"]:
                    status.append(f"LDS on an incomplete ground truth ({len(used['replicas'])}/"
                                  f"{used['replicas_total']} seed replicas)")
            if mis:
                row.update({k: mis.get(k) for k in RECALL_KEYS}, auc=mis.get("auc"), auc_se=mis.get("auc_se"))
            if not known:
                status.append("setting no longer registered: its record cannot be checked for staleness")
            if (setting, solver) in failures:
                status.append(f"last rerun failed: {failures[(setting, solver)]}")
            by_reason: dict[str, list[str]] = {}
            for section, why in stale.items():
                by_reason.setdefault("; ".join(why), []).append(section)
            for why, sections in by_reason.items():
                status.append(f"STALE ({', '.join(sections)}): {why}")
            if not lds and solver != "baseline-loss":
                status.append("LDS not yet run")
            if not mis and has_mis:
                status.append("mislabel not yet run")
            cost = rec.get("cost", {})
            row.update(status="; ".join(status) or "ok", fit_s=cost.get("fit_s"), score_s=cost.get("score_s"),
                       self_score_s=cost.get("self_score_s"), peak_mb=cost.get("peak_mb"), device=rec.get("device"),
                       params=_fmt_params(rec.get("params")),
                       record=runner._rel(runner.run_path(setting, solver, runs_root)))
            rows.append(row)
    return pd.DataFrame(rows, columns=list(COLUMNS)), records


# ---------------------------------------------------------------- rerunning what is stale

def update(settings: list[str] | None = None, solvers: list[str] | None = None, *, include_incomplete: bool = False,
           device=None, runs_root: Path = runner.RUNS_ROOT, gt_root: Path = groundtruth.GT_ROOT,
           mislabel_root: Path = mislabel_mod.MISLABEL_ROOT, dry_run: bool = False, log=print) -> tuple[list, dict]:
    """Run every setting × solver whose record is missing or stale, where it can run.

    A missing record is filled only when the setting's ground truth is complete (``include_incomplete``
    also evaluates on the complete replicas of an unfinished build); a stale record is always rerun.
    Failures are collected, not raised, so one broken solver does not hide the others.
    """
    settings = settings or leaderboard_settings(runs_root)
    # The baselines always stand beside the solvers asked for.
    solvers = [*solvers, *(b for b in runner.BASELINES if b not in solvers)] if solvers \
        else leaderboard_solvers(settings, runs_root)
    done, failures = [], {}
    for setting in settings:
        if setting not in settings_mod.available():
            continue
        gt_path = runner.current_gt_root(setting, gt_root)
        gt_complete = gt_path is not None and read_json(gt_path / MANIFEST).get("complete")
        has_mislabel = runner.mislabel_available(setting, mislabel_root)
        for solver in solvers:
            if _not_applicable(setting, solver):
                continue
            rec = runner.read_record(setting, solver, runs_root)
            tasks = []
            # A stale record is rerun even on an unfinished ground truth: someone asked for it once.
            can_lds = (solver != "baseline-loss" and gt_path is not None
                       and bool(gt_complete or include_incomplete or rec))
            if rec is None:
                tasks = (["lds"] if can_lds else []) + (["mislabel"] if has_mislabel else [])
                why = "no record"
            else:
                stale = runner.stale_reasons(rec, gt_root=gt_root, mislabel_root=mislabel_root)
                tasks = [t for t in stale if (t == "lds" and can_lds) or (t == "mislabel" and has_mislabel)]
                if has_mislabel and "mislabel" not in rec:
                    tasks.append("mislabel")
                if "lds" not in rec and can_lds and gt_complete:
                    tasks.append("lds")
                why = "; ".join(f"{k}: {', '.join(v)}" for k, v in stale.items()) or "missing sections"
            if not tasks:
                continue
            log(f"{'would run' if dry_run else 'running'} {setting} / {solver} [{', '.join(tasks)}] ({why})")
            if dry_run:
                done.append((setting, solver, tasks))
                continue
            try:
                runner.run(setting, solver, tasks=tasks, device=device, runs_root=runs_root, gt_root=gt_root,
                           mislabel_root=mislabel_root, log=log)
                done.append((setting, solver, tasks))
            except Exception as exc:  # noqa: BLE001 - report and carry on with the other rows
                msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                failures[(setting, solver)] = msg
                log(f"FAILED {setting} / {solver}: {msg}")
                log(traceback.format_exc(limit=3))
    return done, failures


# ---------------------------------------------------------------- writing

def _num(v, digits=3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    return f"{v:.{digits}f}"


def _pm(v, se, digits=3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    return f"{v:.{digits}f} ± {se:.{digits}f}" if se is not None and math.isfinite(se) else f"{v:.{digits}f}"


def _text(v) -> str:
    return "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else str(v)


def to_markdown(df: pd.DataFrame) -> str:
    lines = [
        "# tdabench leaderboard",
        "",
        "Generated by `tdabench leaderboard` from the run records in `results/runs/`; never edited by hand.",
        "",
        "- **LDS**: mean over the reported test queries of the Spearman correlation, across the ground truth's "
        "random 50% subsets, between Σ_{i∈S} τᵢ and the measured output (correct-class margin unless noted) "
        "averaged over the seed replicas; ± standard error over queries, [95% bootstrap interval]. Hyper-parameters "
        "were chosen on separate validation queries.",
        "- **ceiling**: the LDS a perfect attribution is expected to reach against this noisy ground truth "
        "(√ of the Spearman–Brown reliability of the replica average); **of ceiling** = LDS / ceiling.",
        "- **recall@k%**: share of the flipped labels (10% of the training set, seeded) found in the top k% by "
        "self-influence (the baselines: training loss, and the exact expectation of a random order). **AUC** is the "
        "ROC AUC of that ranking (0.5 random, 1 perfect).",
        "- **cost**: wall-clock seconds for fitting the curvature, scoring the queries (all train points), and "
        "self-influence; peak memory is the process resident set on CPU (including data and the torch runtime) "
        "or the allocator's peak on a GPU. Timings on a machine busy with other work are slower; each record "
        "stores the load average.",
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
        lines.append("| solver | status | LDS ± se [95% CI] | ceiling | of ceiling | recall@10/20/30/40/50% | AUC | "
                     "fit s | score s | self s | peak MB | device | params |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for _, r in part.iterrows():
            lds = _pm(r["lds"], r["lds_se"])
            if lds and r["lds_ci_low"] is not None and not pd.isna(r["lds_ci_low"]):
                lds += f" [{r['lds_ci_low']:.3f}, {r['lds_ci_high']:.3f}]"
            recalls = " / ".join(_num(r[k], 2) for k in RECALL_KEYS) if r["recall_10"] is not None \
                and not pd.isna(r["recall_10"]) else ""
            lines.append("| " + " | ".join([
                r["solver"], _text(r["status"]), lds, _num(r["lds_ceiling"]), _num(r["lds_of_ceiling"], 2), recalls,
                _num(r["auc"]), _num(r["fit_s"], 1), _num(r["score_s"], 1), _num(r["self_score_s"], 1),
                _num(r["peak_mb"], 0), _text(r["device"]), _text(r["params"])]) + " |")
        lines.append("")
    return "\n".join(lines)


def figures(df: pd.DataFrame, records: dict, out_dir: Path = FIGURES, log=print) -> list[Path]:
    """LDS with 95% intervals, the noise ceiling and the paper's value; recall vs fraction inspected."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    # One colour per solver across both figures.
    names = sorted(set(df["solver"]) - set(runner.BASELINES))
    cb = sns.color_palette("colorblind", 10)
    order = [0, 1, 2, 4, 9, 5, 3, 8, 6, 7]  # colorblind-safe; similar hues (orange/vermillion, pinks) kept apart
    palette = {n: cb[order[i % len(order)]] for i, n in enumerate(names)}
    palette.update({"baseline-random": (0.6, 0.6, 0.6), "baseline-loss": (0.1, 0.1, 0.1)})

    lds = df[df["lds"].notna()]
    if len(lds):
        settings = list(dict.fromkeys(lds["setting"]))
        fig, axes = plt.subplots(1, len(settings), figsize=(1.2 + 2.2 * max(3, lds.groupby("setting").size().max())
                                                            * len(settings) / 2, 4.2), squeeze=False, sharey=True)
        for ax, setting in zip(axes[0], settings):
            part = lds[lds["setting"] == setting].reset_index(drop=True)
            x = np.arange(len(part))
            ax.bar(x, part["lds"], color=[palette[s] for s in part["solver"]], width=0.7)
            err = np.vstack([part["lds"] - part["lds_ci_low"], part["lds_ci_high"] - part["lds"]])
            ax.errorbar(x, part["lds"], yerr=err, fmt="none", ecolor="black", capsize=4, lw=1.2)
            ceil = part["lds_ceiling"].dropna()
            if len(ceil):
                ax.axhline(ceil.iloc[0], color="grey", ls=":", lw=1.5, label=f"noise ceiling {ceil.iloc[0]:.2f}")
            paper = part["paper_lds"].dropna()
            if len(paper):
                ax.axhline(paper.iloc[0], color="crimson", ls="--", lw=1.5, label=f"paper {paper.iloc[0]:.2f}")
            labels = [s + ("*" if "incomplete" in (st or "").lower() else "")
                      + (" (stale)" if "STALE" in (st or "") else "") for s, st in zip(part["solver"], part["status"])]
            ax.set_xticks(x, labels, rotation=30, ha="right")
            ax.set_title(setting + ("\n* incomplete ground truth" if any("*" in lab for lab in labels) else ""))
            ax.legend(loc="upper right", fontsize=8, frameon=True)
        axes[0][0].set_ylabel("LDS (mean over queries, 95% CI)")
        ymax = np.nanmax(np.concatenate([lds["lds_ci_high"].to_numpy(float), lds["paper_lds"].to_numpy(float),
                                         lds["lds_ceiling"].to_numpy(float)]))
        ymin = min(0.0, float(np.nanmin(lds["lds_ci_low"].to_numpy(float))))
        axes[0][0].set_ylim(ymin - 0.02, min(1.0, ymax + 0.08))
        fig.tight_layout()
        path = out_dir / "lds.png"
        fig.savefig(path, dpi=130)
        plt.close(fig)
        written.append(path)
    else:
        log("no LDS figure: no run has an LDS yet")

    mis = [(k, r["mislabel"]) for k, r in records.items() if r.get("mislabel")]
    if mis:
        settings = list(dict.fromkeys(k[0] for k, _ in mis))
        fig, axes = plt.subplots(1, len(settings), figsize=(5.2 * len(settings), 4.2), squeeze=False, sharey=True)
        for ax, setting in zip(axes[0], settings):
            items = [(k[1], m) for k, m in mis if k[0] == setting]
            for solver, m in items:
                f = np.asarray(m["recall_curve"]["fractions"])
                r = np.asarray(m["recall_curve"]["recall"])
                keep = f <= 0.5 + 1e-9
                style = {"baseline-random": dict(color="grey", ls=":", label="random order"),
                         "baseline-loss": dict(color="black", ls="--", label="training loss")}.get(
                    solver, dict(color=palette.get(solver), ls="-", label=f"{solver} self-influence"))
                ax.plot(100 * f[keep], r[keep], lw=1.8, **style)
                ax.plot([10, 20, 30, 40, 50], [m[k] for k in RECALL_KEYS], "o", ms=4, color=style["color"])
            spec = items[0][1]["artifact"]["spec"]
            p = spec["fraction"]
            ax.plot([0, 100 * p, 50], [0, 1, 1], color="lightgrey", lw=1, zorder=0, label="perfect ranking")
            ax.set_title(f"{setting}: {p:.0%} labels flipped")
            ax.set_xlabel("training data inspected (%)")
            ax.set_xlim(0, 50)
            ax.set_ylim(0, 1.02)
            ax.legend(loc="lower right", fontsize=8)
        axes[0][0].set_ylabel("flipped labels found (recall)")
        fig.tight_layout()
        path = out_dir / "mislabel_recall.png"
        fig.savefig(path, dpi=130)
        plt.close(fig)
        written.append(path)
    else:
        log("no mislabel figure: no run has mislabel results yet")
    return written


def build(*, rerun: bool = True, include_incomplete: bool = False, settings: list[str] | None = None,
          solvers: list[str] | None = None, device=None, results: Path = RESULTS,
          gt_root: Path = groundtruth.GT_ROOT, mislabel_root: Path = mislabel_mod.MISLABEL_ROOT,
          make_figures: bool = True, log=print) -> pd.DataFrame:
    """Rerun what is stale (``rerun``), then write the CSV, the Markdown table and the figures."""
    results = Path(results)
    runs_root = results / "runs"
    failures = {}
    if rerun:
        _, failures = update(settings, solvers, include_incomplete=include_incomplete, device=device,
                             runs_root=runs_root, gt_root=gt_root, mislabel_root=mislabel_root, log=log)
    df, records = collect(settings, runs_root=runs_root, gt_root=gt_root, mislabel_root=mislabel_root,
                          failures=failures)
    if solvers:
        df = df[df["solver"].isin(list(solvers) + list(runner.BASELINES))]
    results.mkdir(parents=True, exist_ok=True)
    df.to_csv(results / "leaderboard.csv", index=False, float_format="%.6g")
    (results / "leaderboard.md").write_text(to_markdown(df) + "\n")
    log(f"wrote {results / 'leaderboard.csv'} and {results / 'leaderboard.md'} ({len(df)} rows)")
    if make_figures:
        for p in figures(df, records, results / "figures", log=log):
            log(f"wrote {p}")
    return df


# ---------------------------------------------------------------- the user's printed comparisons

# Reference measurements quoted beside our numbers (sources in ../shared/DESIGN.md): a peer Kronfluence 1.0.1
# EK-FAC on the same MNIST CNN recipe, 10% labels flipped, one model.
PEER_MISLABEL = {"mnist-cnn": {"source": "peer Kronfluence 1.0.1 EK-FAC, DESIGN.md", "ekfac": {"recall_10": 0.91},
                               "baseline-loss": {"recall_10": 0.99}}}


def ensure_record(setting: str, solver: str, tasks: list[str], *, force: bool = False, log=print, **kw) -> dict:
    """A record holding fresh ``tasks`` sections: reuse the stored one when fresh, else run."""
    gt_root = kw.get("gt_root", groundtruth.GT_ROOT)
    mislabel_root = kw.get("mislabel_root", mislabel_mod.MISLABEL_ROOT)
    runs_root = kw.get("runs_root", runner.RUNS_ROOT)
    rec = runner.read_record(setting, solver, runs_root)
    if rec is not None and not force:
        stale = runner.stale_reasons(rec, gt_root=gt_root, mislabel_root=mislabel_root)
        todo = [t for t in tasks if t not in rec or t in stale]
        if not todo:
            path = runner._rel(runner.run_path(setting, solver, runs_root))
            log(f"{setting} / {solver}: using the fresh run record {path} (created {rec.get('created')}; "
                f"--force recomputes)")
            return rec
        tasks = todo
    return runner.run(setting, solver, tasks=tasks, log=log, **kw)


def table1(setting: str, solvers: list[str], *, force: bool = False, log=print, **kw) -> str:
    """Run (or reuse fresh records of) ``solvers`` on ``setting`` and format the Table 1 comparison, with
    the gap study's reported protocol where one exists (``gap_root``: where to look, default results/gap)."""
    gap_root = kw.pop("gap_root", None)
    gt_root = kw.get("gt_root", groundtruth.GT_ROOT)
    s = settings_mod.get(setting)
    root, gt_text = _gt_status(setting, gt_root)
    if root is None:
        raise FileNotFoundError(f"no ground truth for {setting!r}; build it with `tdabench gt {setting}`")
    log(f"ground truth {runner._rel(root)}: {gt_text}")
    rows = []
    for name in solvers:
        rec = ensure_record(setting, name, ["lds"], force=force, log=log, **kw)
        rows.append((name, rec))
    lines = [f"Table 1, {setting} ({s.description}):",
             f"{'solver':14s} {'LDS ± se':>16s} {'95% CI':>17s} {'noise ceiling':>13s} {'of ceiling':>10s} "
             f"{'paper':>6s}  params"]
    notes = set()
    for name, rec in rows:
        lds = rec["lds"]
        used = lds["ground_truth"]
        mark = "" if used["complete"] else "*"
        if mark:
            notes.add(f"* evaluated on an INCOMPLETE ground truth: seed replicas {used['replicas']} of "
                      f"{used['replicas_total']} ({used['units_done']}/{used['units_total']} units); the paper "
                      f"comparison is provisional and the ceiling is that of {len(used['replicas'])} replica(s)")
        ceiling = "n/a (1 seed)" if lds.get("ceiling") is None else f"{lds['ceiling']:.3f}"
        frac = "" if lds.get("of_ceiling") is None else f"{lds['of_ceiling']:.2f}"
        paper = "—" if s.paper_lds is None else f"{s.paper_lds:.2f}"
        lines.append(f"{name + mark:14s} {lds['mean']:>8.3f} ± {lds['se']:.3f} [{lds['ci_low']:.3f}, "
                     f"{lds['ci_high']:.3f}] {ceiling:>13s} {frac:>10s} {paper:>6s}  {_fmt_params(lds['params'])}")
    lines += sorted(notes)
    lines.append(f"LDS: Spearman over {rows[0][1]['lds']['subsets']} subsets, mean over {rows[0][1]['lds']['queries']} "
                 f"queries, measurement {rows[0][1]['lds']['measurement']}; hyper-parameters chosen on validation "
                 f"queries.")
    lines += _gap_lines(setting, solvers, root, gap_root)
    return "\n".join(lines)


def _gap_lines(setting: str, solvers: list[str], root: Path, gap_root: Path | None = None) -> list[str]:
    """The gap study's protocol (chosen on validation queries) on the reported queries, where one was made on
    this ground-truth artifact (``tdabench gap --report``)."""
    from . import gapstudy

    out = []
    for name in solvers:
        path = gapstudy.study_path(setting, name, gap_root or gapstudy.GAP_ROOT)
        if not path.is_file():
            continue
        rec = read_json(path)
        rep = rec.get("reported")
        if not rep or rec["ground_truth"]["manifest_sha256"] != runner.gt_reference(root)["manifest_sha256"]:
            continue
        lds = rep["lds"]
        out.append(f"{name} with the gap study's protocol ({runner._rel(path)}; chosen on validation queries): "
                   f"ensemble of {rep['ensemble']} model(s), measurement {rep['measurement']}, "
                   f"{_fmt_params(rep['params'])}: LDS {lds['mean']:.3f} ± {lds['se']:.3f} [{lds['ci_low']:.3f}, "
                   f"{lds['ci_high']:.3f}]" + ("" if lds.get("of_ceiling") is None else f", {lds['of_ceiling']:.2f} of "
                                               f"the ceiling"))
    return out


def mislabel_table(setting: str, solvers: list[str], *, spec: mislabel_mod.Spec | None = None, build: bool = True,
                   force: bool = False, device=None, log=print, **kw) -> str:
    """Build the corrupted-label artifact if needed, rank by self-influence and by the baselines, and format
    recall at 10-50% inspected and AUC, saying plainly which ranking wins."""
    mislabel_root = kw.get("mislabel_root", mislabel_mod.MISLABEL_ROOT)
    spec = spec or runner.MISLABEL_SPEC
    if mislabel_mod.find(setting, spec, mislabel_root) is None:
        if not build:
            raise FileNotFoundError(f"no mislabel artifact for {setting!r} with {spec}; build it with "
                                    f"`tdabench mislabel {setting} --build`")
        mislabel_mod.build(setting, spec, root=mislabel_root, device=device, log=log)
    path = mislabel_mod.find(setting, spec, mislabel_root)
    man = read_json(path / MANIFEST)
    rows = []
    for name in list(solvers) + list(runner.BASELINES):
        if spec == runner.MISLABEL_SPEC:  # the leaderboard's corruption: recorded in the run records
            rec = ensure_record(setting, name, ["mislabel"], force=force, device=device, log=log, **kw)
            rows.append((name, rec["mislabel"]))
        else:  # a study (other seed, epochs, ...): printed, not mixed into the leaderboard
            params = None
            if name not in runner.BASELINES:
                params, _ = runner.chosen_params(setting, name, kw.get("runs_root", runner.RUNS_ROOT),
                                          kw.get("gt_root", groundtruth.GT_ROOT))
            rows.append((name, runner.evaluate_mislabel(setting, name, params, device=device, spec=spec,
                                                        mislabel_root=mislabel_root)))
    m0 = man["models"][0]
    lines = [f"Mislabel detection, {setting}: {man['corruption']['flipped']} of {rows[0][1]['n']} training labels "
             f"flipped (seed {spec.seed}); artifact {runner._rel(path)}; corrupted-label model test accuracy "
             f"{m0['test_accuracy']:.4f}, it fits {m0['flipped_fit_to_noisy_label']:.1%} of the flipped labels",
             f"{'ranking':26s} " + " ".join(f"{'@' + str(p) + '%':>13s}" for p in (10, 20, 30, 40, 50))
             + f" {'AUC':>13s}"]
    for name, m in rows:
        label = {"baseline-random": "random order (expected)", "baseline-loss": "training loss"}.get(
            name, f"{name} self-influence")
        cells = [f"{m[k]:.3f} ± {m[k + '_se']:.3f}" for k in RECALL_KEYS] + [f"{m['auc']:.3f} ± {m['auc_se']:.3f}"]
        lines.append(f"{label:26s} " + " ".join(f"{c:>13s}" for c in cells))
    loss = dict(rows)["baseline-loss"]
    for name, m in rows:
        if name in runner.BASELINES:
            continue
        diff = m["recall_10"] - loss["recall_10"]
        se = math.hypot(m["recall_10_se"], loss["recall_10_se"])
        verdict = ("self-influence wins" if diff > 2 * se else "training loss wins" if diff < -2 * se
                   else "no clear winner (within 2 se)")
        lines.append(f"{name}: recall@10% {m['recall_10']:.3f} vs training loss {loss['recall_10']:.3f} -> {verdict}; "
                     f"AUC {m['auc']:.3f} vs {loss['auc']:.3f}")
    peer = PEER_MISLABEL.get(setting)
    if peer:
        lines.append(f"reference ({peer['source']}): recall@10% EK-FAC {peer['ekfac']['recall_10']:.2f}, "
                     f"training loss {peer['baseline-loss']['recall_10']:.2f}")
    return "\n".join(lines)
