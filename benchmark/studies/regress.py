"""Floor 5: the CI regression check on attribution quality.

``<store>/baselines.json`` records, for each solver on small committed settings (``mnist-lr``,
``mnist-mlp-small``), its LDS and mislabel metrics with their standard errors, the hyper-parameters chosen on
the validation queries (by a grid search, or read from the solver's committed run record), and the exact
artifacts used. What the check can afford differs per solver (:data:`SCOPES`): CG and LiSSA solve every query
iteratively, so they are checked on fewer LDS queries and without the mislabel metrics; the file records each
solver's scope with the reason, and every check prints it. ``check`` recomputes every metric with those
parameters (no search: fast, and the comparison is like for like) and fails a solver whose metric fell below

    baseline − z · max(se, resolution)        (z = 3)

where se is the metric's standard error measured when the baseline was recorded (over queries for LDS,
binomial over flipped points for recall, Hanley-McNeil for AUC) and the resolution is the smallest step the
metric can take (1/queries, 1/flipped points), so a metric with se 0 (e.g. recall 1.0) still tolerates
float-level reordering across machines. A rise is reported, never failed. ``record`` (``tdabench regress
--update``) rewrites the file after a deliberate change; review the diff before committing it.
"""

from __future__ import annotations

import datetime as _dt
import math
import time
from dataclasses import dataclass

from ..evaluate import engine, records
from ..groundtruth import artifact as gt_artifact
from ..groundtruth import mislabel as mislabel_mod
from ..setup import settings as settings_mod
from ..setup.artifacts import code_version, environment, read_json, write_json
from ..setup.store import ResultsStore

REGRESS_SETTINGS = ("mnist-lr", "mnist-mlp-small")
MISLABEL_METRICS = ("recall_10", "recall_20", "recall_30", "recall_40", "recall_50", "auc")
Z = 3.0
# LDS on a seeded subset of the committed queries keeps the whole check within minutes on 2 CPU cores.
REGRESS_QUERIES = 500
FORMAT = 1


@dataclass(frozen=True)
class Scope:
    """What the check measures of one solver: LDS on ``lds_queries`` of the reported queries, and the mislabel
    metrics unless ``no_mislabel`` says why not."""

    lds_queries: int = REGRESS_QUERIES
    no_mislabel: str | None = None

    def to_dict(self) -> dict:
        out = {"lds_queries": self.lds_queries}
        if self.no_mislabel:
            out["not_checked"] = {"mislabel": self.no_mislabel}
        return out


# The check runs in CI, where the whole test suite must stay well under 20 minutes on 2 cores. Solvers not listed
# get the full scope. CG and LiSSA iterate over the training data for every block of queries (their leaderboard
# runs: 736 s and 467 s for 1,000 queries on mnist-lr): 50 queries each, an LDS se of about 0.01-0.02. Their
# self-influence solves one system per training point: 4,000 of them took 61 min (CG) and 30 min (LiSSA).
SCOPES = {
    "cg": Scope(50, "self-influence of the 4,000 training points takes ~1 h on 2 cores (one CG solve each)"),
    "lissa": Scope(50, "self-influence of the 4,000 training points takes ~30 min on 2 cores (one LiSSA "
                       "recursion each)"),
}


class RegressionError(RuntimeError):
    """The check cannot run as asked (no baselines, artifacts changed since they were recorded)."""


@dataclass
class Comparison:
    setting: str
    solver: str
    metric: str
    baseline: float
    se: float
    tolerance: float
    new: float | None
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None or self.new is None or not math.isfinite(self.new) \
            or self.new < self.baseline - self.tolerance

    def message(self) -> str:
        if self.error is not None:
            return f"{self.setting} / {self.solver}: {self.metric} could not be computed: {self.error}"
        verdict = "REGRESSED" if self.failed else ("improved" if self.new > self.baseline + self.tolerance else "ok")
        return (f"{self.setting} / {self.solver}: {self.metric} {verdict}: new {self.new:.4f}, baseline "
                f"{self.baseline:.4f} (allowed drop {self.tolerance:.4f} = {Z:g} x se {self.se:.4f})")


def tolerance(se: float | None, resolution: float) -> float:
    return Z * max(se or 0.0, resolution)


def _metrics_of(lds: dict | None, mis: dict | None) -> dict:
    out = {}
    if lds is not None:
        out["lds"] = {"value": lds["mean"], "se": lds["se"], "resolution": 1.0 / lds["queries"]}
    if mis is not None:
        for k in MISLABEL_METRICS:
            out[k] = {"value": mis[k], "se": mis[f"{k}_se"], "resolution": 1.0 / mis["n_flipped"]}
    return out


def _evaluate(store: ResultsStore, setting: settings_mod.Setting, cls, params: dict | None, search: bool,
              mis_art, scope: dict, *, device, log) -> tuple[dict, dict | None]:
    gt = gt_artifact.load(store, setting)  # complete ones only: CI must not run on a partial build
    lds = engine.evaluate_lds(gt, cls, params, search=search, max_queries=scope["lds_queries"], device=device,
                              log=log)
    mis = None
    if mis_art is not None and "mislabel" not in scope.get("not_checked", {}):
        mis = engine.evaluate_mislabel(mis_art, cls, lds["params"], device=device)
    return lds, mis


def _scope_of(sb: dict, tolerance_section: dict) -> dict:
    """A recorded solver's scope; files written before scopes existed checked LDS on the file-wide query count."""
    return {"lds_queries": sb.get("lds_queries", tolerance_section.get("lds_queries", REGRESS_QUERIES)),
            "not_checked": sb.get("not_checked", {})}


def params_from_record(store: ResultsStore, setting: settings_mod.Setting, cls) -> tuple[dict, str]:
    """The hyper-parameters the solver's committed run record chose on the validation queries, and where they
    came from. Refused when the record is missing or stale: its choice is not known to hold for this code."""
    rec = records.read_record(store, setting.name, cls.name)
    path = store.relative(records.run_path(store, setting.name, cls.name))
    if rec is None or "lds" not in rec:
        raise RegressionError(f"{setting.name} / {cls.name}: no run record with an LDS section at {path}; run "
                              f"`tdabench run --setting {setting.name} --solver {cls.name}` first, or record without "
                              f"--params-from-records (a grid search on the validation queries)")
    stale = records.stale_reasons(rec, store, setting, cls).get("lds")
    if stale:
        raise RegressionError(f"{setting.name} / {cls.name}: the run record {path} is stale ({'; '.join(stale)}); "
                              f"rerun it, or record without --params-from-records")
    how = rec["lds"].get("selection", {}).get("method", "unknown selection")
    return rec["lds"]["params"], f"from the run record {path} ({how}, {rec.get('created', 'undated')})"


def _artifacts(store: ResultsStore, setting: settings_mod.Setting):
    """(ground-truth reference, mislabel reference or None, the mislabel artifact or None)."""
    gt_path = gt_artifact.latest(store.gt, setting)  # complete ones only: CI must not run on a partial build
    mis_path = mislabel_mod.find(store, setting, None)
    art = mislabel_mod.open_artifact(store, mis_path, setting) if mis_path is not None else None
    return (records.gt_reference(store, gt_path), records.mislabel_reference(store, art) if art else None, art)


def record(store: ResultsStore, settings: list[settings_mod.Setting], solvers: dict, *,
           exclude: dict[str, str] | None = None, params_from_records: bool = False, scopes: dict | None = None,
           device="cpu", log=print) -> dict:
    """Measure every applicable solver of ``solvers`` ({name: class}) and write the baselines.

    Hyper-parameters are chosen by a grid search on the validation queries, or, with ``params_from_records``,
    read from each solver's committed run record (chosen there on the same validation queries; no second search).
    ``scopes`` ({name: :class:`Scope`}, default :data:`SCOPES`) narrows what is measured for a solver, and
    ``exclude`` maps solver names to the reason they are left out of the check entirely; scopes and reasons are
    kept in the file and printed by every check, so the gaps stay visible.
    """
    exclude = dict(exclude or {})
    scopes = SCOPES if scopes is None else scopes
    out = {"format": FORMAT,
           "tolerance": {"rule": "fail when new < baseline - z * max(se, resolution)", "z": Z,
                         "lds_queries": REGRESS_QUERIES},
           "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "code_version": code_version(), "environment": environment(device), "settings": {}}
    for setting in settings:
        gt_ref, mis_ref, mis_art = _artifacts(store, setting)
        entry = {"ground_truth": gt_ref, "mislabel": mis_ref, "solvers": {}, "not_applicable": {},
                 "excluded": {k: v for k, v in exclude.items() if k in solvers}}
        for name, cls in solvers.items():
            if name in exclude:
                continue
            if cls.unavailable():
                entry["not_applicable"][name] = cls.unavailable()
                continue
            n = setting.model_spec()["parameters"]
            if cls.max_params is not None and n > cls.max_params:
                entry["not_applicable"][name] = f"{n} parameters > {cls.max_params}"
                continue
            if cls.needs_trajectory:  # the check explains the ground truth's models, which keep no trajectory
                entry["not_applicable"][name] = "attributes through training: needs the zoo's trajectories"
                continue
            log(f"recording {setting.name} / {name}")
            scope = scopes.get(name, Scope()).to_dict()
            params, how = params_from_record(store, setting, cls) if params_from_records else (None, None)
            lds, mis = _evaluate(store, setting, cls, params, params is None, mis_art, scope, device=device, log=log)
            entry["solvers"][name] = {"params": lds["params"], "selection": how or lds["selection"]["method"],
                                      **scope,
                                      "fingerprint": records.solver_fingerprint(cls, lds["params"]),
                                      "metrics": _metrics_of(lds, mis),
                                      "seconds": sum(v for v in (lds["cost"]["fit_s"], lds["cost"]["score_s"],
                                                                 (mis or {}).get("cost", {}).get("fit_s"),
                                                                 (mis or {}).get("cost", {}).get("self_score_s"))
                                                     if v is not None)}
        out["settings"][setting.name] = entry
    write_json(store.baselines, records._clean(out))
    log(f"wrote {store.baselines}")
    return out


def check(store: ResultsStore, settings: list[settings_mod.Setting], solvers: dict, *, device="cpu",
          log=print) -> list[Comparison]:
    """Recompute every baseline metric of the solvers in ``solvers`` ({name: class}, every solver that exists:
    a baseline whose solver is gone fails) and compare; one Comparison per (setting, solver, metric)."""
    path = store.baselines
    if not path.is_file():
        raise RegressionError(f"{path} does not exist; record baselines with `tdabench regress --update`")
    base = read_json(path)
    if base.get("format") != FORMAT:
        raise RegressionError(f"{path} has format {base.get('format')}, this code reads {FORMAT}; rerecord it with "
                              f"`tdabench regress --update`")
    results = []
    for setting in settings:
        if setting.name not in base["settings"]:
            continue
        entry = base["settings"][setting.name]
        gt_ref, mis_ref, mis_art = _artifacts(store, setting)
        if gt_ref["root_hash"] != entry["ground_truth"].get("root_hash"):
            raise RegressionError(
                f"{setting.name}: the baselines were recorded on ground truth {entry['ground_truth']['path']} (root "
                f"hash {str(entry['ground_truth'].get('root_hash'))[:16]}…); the committed one is now {gt_ref['path']} "
                f"({gt_ref['root_hash'][:16]}…). Results are not comparable: review the change and rerecord with "
                f"`tdabench regress --update`.")
        if (entry.get("mislabel") or {}).get("root_hash") != (mis_ref or {}).get("root_hash"):
            raise RegressionError(f"{setting.name}: the mislabel artifact differs from the one the baselines were "
                                  f"recorded on; rerecord with `tdabench regress --update`.")
        for name, sb in entry["solvers"].items():
            if name not in solvers:
                results.append(Comparison(setting.name, name, "solver", math.nan, 0, 0, None,
                                          f"solver {name!r} is in {path.name} but no solver file defines it"))
                continue
            if solvers[name].unavailable():  # a peer library not installed here: say so, do not fail
                log(f"note: {setting.name} / {name} is not checked here: it {solvers[name].unavailable()}")
                continue
            scope = _scope_of(sb, base.get("tolerance", {}))
            for what, why in scope["not_checked"].items():
                log(f"note: {setting.name} / {name}: {what} is not checked: {why}")
            t0 = time.perf_counter()
            try:
                lds, mis = _evaluate(store, setting, solvers[name], sb["params"], False, mis_art, scope, device=device,
                                     log=log)
                new = _metrics_of(lds, mis)
                err = None
            except Exception as exc:  # noqa: BLE001 - a crash is a regression too; report it as one
                new, err = {}, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            log(f"checked {setting.name} / {name} with {sb['params']} (LDS on {scope['lds_queries']} queries) in "
                f"{time.perf_counter() - t0:.0f} s (recorded: {sb.get('seconds', float('nan')):.0f} s)")
            for metric, b in sb["metrics"].items():
                results.append(Comparison(setting.name, name, metric, b["value"], b["se"] or 0.0,
                                          tolerance(b["se"], b["resolution"]),
                                          new.get(metric, {}).get("value"), err))
        for name, reason in entry.get("excluded", {}).items():
            log(f"note: {setting.name} / {name} is not checked: {reason}")
        for name in solvers:
            if name not in entry["solvers"] and name not in entry.get("not_applicable", {}) \
                    and name not in entry.get("excluded", {}):
                log(f"note: {setting.name} / {name} has no baseline yet; add it with `tdabench regress --update`")
    return results


def report(results: list[Comparison], log=print) -> bool:
    """Print every comparison, failures last; True when all passed."""
    failed = [r for r in results if r.failed]
    for r in results:
        if not r.failed:
            log("  " + r.message())
    for r in failed:
        log("FAIL " + r.message())
    log(f"{len(results) - len(failed)}/{len(results)} checks passed" + (f"; {len(failed)} FAILED" if failed else ""))
    return not failed
