"""Floor 6: the CI regression check on attribution quality.

``results/baselines.json`` records, for each solver on small committed settings (``mnist-lr``,
``mnist-mlp-small``), its LDS and mislabel metrics with their standard errors, the hyper-parameters chosen on
the validation queries, and the exact artifacts used. ``check`` recomputes every metric with those
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
from pathlib import Path

from . import groundtruth
from . import mislabel as mislabel_mod
from . import runner
from . import settings as settings_mod
from . import solver_api
from .artifacts import code_version, environment, read_json, write_json
from .plugins import REPO_ROOT

BASELINES_FILE = REPO_ROOT / "results" / "baselines.json"
REGRESS_SETTINGS = ("mnist-lr", "mnist-mlp-small")
MISLABEL_METRICS = ("recall_10", "recall_20", "recall_30", "recall_40", "recall_50", "auc")
Z = 3.0
# LDS on a seeded subset of the committed queries keeps the whole check within minutes on 2 CPU cores.
REGRESS_QUERIES = 500
FORMAT = 1


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


def _evaluate(setting: str, solver: str, params: dict | None, search: bool, with_mislabel: bool, *,
              gt_root: Path, mislabel_root: Path, device, log) -> tuple[dict, dict | None]:
    lds = runner.evaluate_lds(setting, solver, params, search=search, max_queries=REGRESS_QUERIES, device=device,
                              gt_root=gt_root, log=log)
    mis = None
    if with_mislabel:
        mis = runner.evaluate_mislabel(setting, solver, lds["params"], device=device, mislabel_root=mislabel_root)
    return lds, mis


def _artifacts(setting: str, gt_root: Path, mislabel_root: Path) -> tuple[dict, dict | None]:
    gt_path = groundtruth.latest(setting, gt_root)  # complete ones only: CI must not run on a partial build
    mis_path = mislabel_mod.find(setting, None, mislabel_root)
    return (runner.gt_reference(gt_path),
            runner.mislabel_reference(mis_path) if mis_path is not None else None)


def record(settings=REGRESS_SETTINGS, solvers: list[str] | None = None, *, path: Path = BASELINES_FILE,
           exclude: dict[str, str] | None = None, gt_root: Path = groundtruth.GT_ROOT,
           mislabel_root: Path = mislabel_mod.MISLABEL_ROOT, device="cpu", log=print) -> dict:
    """Measure every applicable solver (hyper-parameters chosen on validation queries) and write the baselines.

    ``exclude`` maps solver names to the reason they are left out of the check (e.g. too slow for the CI
    budget); the reason is kept in the file and printed by every check, so the gap stays visible.
    """
    exclude = dict(exclude or {})
    out = {"format": FORMAT,
           "tolerance": {"rule": "fail when new < baseline - z * max(se, resolution)", "z": Z,
                         "lds_queries": REGRESS_QUERIES},
           "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "code_version": code_version(), "environment": environment(device), "settings": {}}
    for setting in settings:
        gt_ref, mis_ref = _artifacts(setting, gt_root, mislabel_root)
        entry = {"ground_truth": gt_ref, "mislabel": mis_ref, "solvers": {}, "not_applicable": {},
                 "excluded": {k: v for k, v in exclude.items() if not solvers or k in solvers}}
        names = [n for n in (solvers or list(solver_api.available())) if n not in exclude]
        for name in names:
            cls = solver_api.get(name)
            n = settings_mod.get(setting).model_spec()["parameters"]
            if cls.max_params is not None and n > cls.max_params:
                entry["not_applicable"][name] = f"{n} parameters > {cls.max_params}"
                continue
            log(f"recording {setting} / {name}")
            lds, mis = _evaluate(setting, name, None, True, mis_ref is not None, gt_root=gt_root,
                                 mislabel_root=mislabel_root, device=device, log=log)
            entry["solvers"][name] = {"params": lds["params"], "selection": lds["selection"]["method"],
                                      "solver_code": runner.solver_code(name)["hash"],
                                      "metrics": _metrics_of(lds, mis),
                                      "seconds": sum(v for v in (lds["cost"]["fit_s"], lds["cost"]["score_s"],
                                                                 (mis or {}).get("cost", {}).get("fit_s"),
                                                                 (mis or {}).get("cost", {}).get("self_score_s"))
                                                     if v is not None)}
        out["settings"][setting] = entry
    write_json(Path(path), runner._clean(out))
    log(f"wrote {path}")
    return out


def check(*, path: Path = BASELINES_FILE, settings=None, solvers: list[str] | None = None,
          gt_root: Path = groundtruth.GT_ROOT, mislabel_root: Path = mislabel_mod.MISLABEL_ROOT, device="cpu",
          log=print) -> list[Comparison]:
    """Recompute every baseline metric and compare; returns one Comparison per (setting, solver, metric)."""
    path = Path(path)
    if not path.is_file():
        raise RegressionError(f"{path} does not exist; record baselines with `tdabench regress --update`")
    base = read_json(path)
    if base.get("format") != FORMAT:
        raise RegressionError(f"{path} has format {base.get('format')}, this code reads {FORMAT}; rerecord it with "
                              f"`tdabench regress --update`")
    results = []
    available = solver_api.available()
    for setting, entry in base["settings"].items():
        if settings and setting not in settings:
            continue
        gt_ref, mis_ref = _artifacts(setting, gt_root, mislabel_root)
        if gt_ref["used_files_hash"] != entry["ground_truth"]["used_files_hash"] \
                or gt_ref["version"] != entry["ground_truth"]["version"]:
            raise RegressionError(
                f"{setting}: the baselines were recorded on ground truth {entry['ground_truth']['path']} "
                f"({entry['ground_truth']['used_files_hash']}); the committed one is now {gt_ref['path']} "
                f"({gt_ref['used_files_hash']}). Results are not comparable: review the change and rerecord with "
                f"`tdabench regress --update`.")
        if (entry.get("mislabel") or {}).get("manifest_sha256") != (mis_ref or {}).get("manifest_sha256"):
            raise RegressionError(f"{setting}: the mislabel artifact differs from the one the baselines were recorded "
                                  f"on; rerecord with `tdabench regress --update`.")
        for name, sb in entry["solvers"].items():
            if solvers and name not in solvers:
                continue
            if name not in available:
                results.append(Comparison(setting, name, "solver", math.nan, 0, 0, None,
                                          f"solver {name!r} is in {path.name} but no solver file defines it"))
                continue
            t0 = time.perf_counter()
            try:
                lds, mis = _evaluate(setting, name, sb["params"], False, mis_ref is not None, gt_root=gt_root,
                                     mislabel_root=mislabel_root, device=device, log=log)
                new = _metrics_of(lds, mis)
                err = None
            except Exception as exc:  # noqa: BLE001 - a crash is a regression too; report it as one
                new, err = {}, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            log(f"checked {setting} / {name} with {sb['params']} in {time.perf_counter() - t0:.0f} s "
                f"(recorded: {sb.get('seconds', float('nan')):.0f} s)")
            for metric, b in sb["metrics"].items():
                results.append(Comparison(setting, name, metric, b["value"], b["se"] or 0.0,
                                          tolerance(b["se"], b["resolution"]),
                                          new.get(metric, {}).get("value"), err))
        for name, reason in entry.get("excluded", {}).items():
            log(f"note: {setting} / {name} is not checked: {reason}")
        for name in available:
            if name not in entry["solvers"] and name not in entry.get("not_applicable", {}) \
                    and name not in entry.get("excluded", {}) and (not solvers or name in solvers):
                log(f"note: {setting} / {name} has no baseline yet; add it with `tdabench regress --update`")
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


