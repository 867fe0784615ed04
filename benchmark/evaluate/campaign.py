"""Floor 4: keeping the run records current — which setting × method rows exist, which cannot run, and
rerunning the ones that are missing or stale.
"""

from __future__ import annotations

import dataclasses
import traceback

from ..groundtruth import artifact as gt_artifact
from ..groundtruth import zoo as zoo_mod
from ..setup import settings as settings_mod
from ..setup.artifacts import MANIFEST, read_json
from ..setup.data import DataError
from ..setup.store import ResultsStore
from . import records
from .engine import BASELINES, LOSS, RANDOM, Baseline
from .solver import Solver

_PARAMS: dict[str, int | None] = {}


def leaderboard_settings() -> list[settings_mod.Setting]:
    """Settings on real data (pinned data files, or a Table 1 row)."""
    return [s for s in settings_mod.available().values() if s.data_spec.files or s.paper_lds is not None]


def leaderboard_methods(solvers: dict[str, type[Solver]]) -> list:
    """Every solver (by name), then the baselines."""
    return [solvers[n] for n in sorted(solvers)] + list(BASELINES.values())


def num_params(setting: settings_mod.Setting) -> int | None:
    """The setting's parameter count, built once per process (ViT-B/16 takes seconds); None if unknowable here."""
    if setting.name not in _PARAMS:
        try:
            _PARAMS[setting.name] = setting.model_spec()["parameters"]
        except DataError:  # pretrained weights not here: the same architecture, randomly initialised, counts alike
            build = setting.build_model
            _PARAMS[setting.name] = (sum(p.numel() for p in dataclasses.replace(build, pretrained=None)().parameters())
                                     if getattr(build, "pretrained", None) else None)
        except ImportError:  # timm not installed: the row says "not yet run", never guesses
            _PARAMS[setting.name] = None
    return _PARAMS[setting.name]


def ensembles(method) -> tuple[int, ...]:
    """The ensemble sizes ``method`` has leaderboard rows for (1: the single-model row)."""
    return (1,) if isinstance(method, Baseline) else tuple(method.leaderboard_ensembles)


def ensemble_not_applicable(store: ResultsStore, setting: settings_mod.Setting, n: int) -> str | None:
    """Why an ensemble row of ``n`` models cannot run on ``setting``, or None. Ensembles explain the zoo: the
    ground truth's own full-data models each share a seed with one target replica (coupled)."""
    if n > 1 and not zoo_mod.exists(store, setting, min_models=n):
        return (f"an ensemble of {n} explains {n} zoo models; train them with `tdabench zoo {setting.name} "
                f"--models {n}`")
    return None


def _ensemble_kwargs(store: ResultsStore, setting: settings_mod.Setting, method, n: int) -> dict | None:
    """How an ensemble row runs: n zoo models with the parameters the single-model row chose on validation queries
    (a grid search would cost n fits per trial); None while that row has no fresh choice."""
    try:
        params, source = records.chosen_params(store, setting, method)
    except records.RecordError:  # the single-model row is refused: update() says so on that row
        return None
    if source != records.CHOSEN_ON_VALIDATION:
        return None
    return dict(ensemble=n, explain="zoo", params=params, search=False,
                params_source=f"{source} by the single-model {method.name} row")


def kept_options(method, record: dict | None) -> dict:
    """Options a row was run with that its grid does not search and that differ from the solver's defaults (e.g.
    Arnoldi's ``precision=float32`` on the CNNs, fixed with ``tdabench run --param``): a rerun keeps them, so it
    recomputes the row it replaces rather than a costlier or different one."""
    if isinstance(method, Baseline):
        return {}
    params = ((record or {}).get("lds") or {}).get("params") or {}
    return {k: v for k, v in params.items()
            if k not in method.parameters and k in method.defaults and v != method.defaults[k]}


def default_explain(store: ResultsStore, setting: settings_mod.Setting, method, record: dict | None) -> str:
    """Where a run's explained model comes from: as in its record, so a rerun stays paired with what it replaces;
    for a new row the zoo — seeded apart from every ground-truth model, the uncoupled protocol of Table 1 — where
    the setting has one (solvers that attribute through training need it), else the ground truth's own model."""
    if isinstance(method, Baseline):
        return "ground truth"
    lds = (record or {}).get("lds")
    if lds:
        return "zoo" if (lds.get("explained") or {}).get("source") == "zoo" else "ground truth"
    return "zoo" if method.needs_trajectory or zoo_mod.exists(store, setting) else "ground truth"


def not_applicable(setting: settings_mod.Setting, method) -> str | None:
    """Why ``method`` gets no row of numbers on ``setting`` (a declared limit), or None."""
    if isinstance(method, Baseline):
        return None
    missing = method.unavailable()
    if missing:
        return missing
    n = num_params(setting)
    if n is None:
        return None
    if method.max_params is not None and n > method.max_params:
        return f"model has {n:,} parameters; {method.name} accepts up to {method.max_params:,}"
    if method.leaderboard_max_params is not None and n > method.leaderboard_max_params:
        return (f"not run automatically: model has {n:,} parameters, {method.name} runs here up to "
                f"{method.leaderboard_max_params:,} (days on a CPU beyond; `tdabench run` runs it when asked)")
    return None


def gt_status(store: ResultsStore, setting: settings_mod.Setting):
    """(artifact folder or None, a line saying what state it is in)."""
    root = gt_artifact.current(store, setting)
    if root is None:
        return None, "no ground truth"
    man = read_json(root / MANIFEST)
    if man.get("complete"):
        return root, f"{man['version']} complete"
    reps = records._complete_replicas(man)
    return root, (f"{man['version']} INCOMPLETE: {len(reps)}/{man['protocol']['seeds']} seed replicas done "
                  f"({man.get('units_done')}/{man.get('units_total')} units)")


def update(store: ResultsStore, settings: list[settings_mod.Setting], methods: list, *,
           include_incomplete: bool = False, device=None, dry_run: bool = False, log=print) -> tuple[list, dict]:
    """Run every setting × method whose record is missing or stale, where it can run.

    A missing record is filled only when the setting's ground truth is complete (``include_incomplete``
    also evaluates on the complete replicas of an unfinished build); a stale record is always rerun.
    Failures are collected, not raised, so one broken solver does not hide the others. The baselines always
    stand beside the solvers asked for.
    """
    methods = list(methods) + [b for b in BASELINES.values() if b not in methods]
    done, failures = [], {}
    for setting in settings:
        gt_path = gt_artifact.current(store, setting)
        gt_complete = gt_path is not None and read_json(gt_path / MANIFEST).get("complete")
        mislabel_there = records.mislabel_available(store, setting)
        for method, n in ((m, n) for m in methods for n in ensembles(m)):
            if not_applicable(setting, method) or ensemble_not_applicable(store, setting, n):
                continue
            row = records.row_name(method.name, n)
            has_mislabel = mislabel_there and not records.mislabel_not_applicable(method, n)
            try:
                rec = records.read_record(store, setting.name, method.name, n)
            except records.RecordError as exc:  # refused: neither used nor silently rerun over; the row says why
                failures[(setting.name, row)] = str(exc)
                log(f"skipping {setting.name} / {row}: {exc}")
                continue
            # A stale record is rerun even on an unfinished ground truth: someone asked for it once.
            can_lds = method is not LOSS and gt_path is not None and bool(gt_complete or include_incomplete or rec)
            if rec is None:
                tasks = (["lds"] if can_lds else []) + (["mislabel"] if has_mislabel else [])
                why = "no record"
            else:
                stale = records.stale_reasons(rec, store, setting, method)
                tasks = [t for t in stale if (t == "lds" and can_lds) or (t == "mislabel" and has_mislabel)]
                if has_mislabel and "mislabel" not in rec:
                    tasks.append("mislabel")
                if "lds" not in rec and can_lds and gt_complete:
                    tasks.append("lds")
                why = "; ".join(f"{k}: {', '.join(v)}" for k, v in stale.items()) or "missing sections"
            kw = {}
            if n > 1 and can_lds:
                kw = _ensemble_kwargs(store, setting, method, n)
                if kw is None and dry_run and (setting.name, method.name) in {d[:2] for d in done}:
                    if rec is not None and not tasks:  # fresh: the rerun depends on what the single row chooses
                        log(f"would rerun {setting.name} / {row} [lds] only if the single-model {method.name} row, "
                            f"about to choose its parameters again, chooses others than its record's "
                            f"{(rec.get('lds') or {}).get('params')}")
                        continue
                    log(f"would run {setting.name} / {row} [lds] ({'no record' if rec is None else why}) with the "
                        f"parameters the single-model row is about to choose")
                    done.append((setting.name, row, ["lds"]))
                    continue
                if kw is None:
                    failures[(setting.name, row)] = (f"waits for the single-model {method.name} row to choose its "
                                                     f"parameters on validation queries")
                    log(f"skipping {setting.name} / {row}: {failures[(setting.name, row)]}")
                    continue
                if rec is not None and (rec.get("lds") or {}).get("params") != kw["params"] and "lds" not in tasks:
                    tasks.append("lds")
                    why = f"the single-model {method.name} row now chooses other parameters"
            if not tasks:
                continue
            kept = kept_options(method, rec) if n == 1 else {}
            if kept:
                kw["params"] = kept
                why += f"; keeping its options {kept}"
            log(f"{'would run' if dry_run else 'running'} {setting.name} / {row} [{', '.join(tasks)}] ({why})")
            if dry_run:
                done.append((setting.name, row, tasks))
                continue
            kw.setdefault("explain", default_explain(store, setting, method, rec))
            try:
                records.run(store, setting, method, tasks=tasks, device=device, log=log, **kw)
                done.append((setting.name, row, tasks))
            except Exception as exc:  # noqa: BLE001 - report and carry on with the other rows
                msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                failures[(setting.name, row)] = msg
                log(f"FAILED {setting.name} / {row}: {msg}")
                log(traceback.format_exc(limit=3))
    return done, failures


def ensure_record(store: ResultsStore, setting: settings_mod.Setting, method, tasks: list[str], *,
                  force: bool = False, log=print, **kw) -> dict:
    """A record holding fresh ``tasks`` sections: the stored one when fresh (saying so), else a new run."""
    rec = records.read_record(store, setting.name, method.name)
    if rec is not None and not force:
        stale = records.stale_reasons(rec, store, setting, method)
        todo = [t for t in tasks if t not in rec or t in stale]
        if not todo:
            path = store.relative(records.run_path(store, setting.name, method.name))
            log(f"{setting.name} / {method.name}: using the fresh run record {path} (created {rec.get('created')}; "
                f"its fingerprint and artifacts match the code and files now; --force recomputes)")
            return rec
        for t in todo:
            if t in stale:
                log(f"{setting.name} / {method.name}: the stored {t} section is stale ({'; '.join(stale[t])}); "
                    f"recomputing")
        tasks = todo
    return records.run(store, setting, method, tasks=tasks, log=log, **kw)


__all__ = ["leaderboard_settings", "leaderboard_methods", "not_applicable", "gt_status", "update", "ensure_record",
           "RANDOM", "LOSS"]
