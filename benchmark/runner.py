"""Floor 6: run one solver on one setting and record everything needed to trust and reproduce the numbers.

``run(setting, solver)`` writes ``results/runs/<setting>/<solver>.json`` with two sections:

- ``lds``: hyper-parameters chosen by grid search over the solver's ``parameters`` on the ground truth's
  *validation* queries (highest mean validation LDS; the reported queries are never looked at), then the
  LDS on the reported queries with its uncertainty and the noise ceiling; the ground-truth artifact it used
  (version, manifest sha256, the seed replicas used: all of them, or only the complete ones of an
  unfinished build, flagged).
- ``mislabel``: self-influence on the corrupted-label model of ``benchmark.mislabel`` with the parameters
  chosen for LDS (tuning them on the flipped labels would tune on the reported number), recall at 10-50%
  inspected and ROC AUC, beside the random and training-loss baselines.

Both carry cost (wall-clock per stage, peak memory, device, machine load) and the solver's code fingerprint.
A record is *stale* when its solver file or the shared solver code changed, or when the artifact it used is
no longer the one the benchmark would use (``stale_reasons``); the leaderboard reruns stale records.
"""

from __future__ import annotations

import datetime as _dt
import inspect
import itertools
import json
import math
from pathlib import Path

import numpy as np
import torch

from . import curvature, groundtruth, metrics
from . import mislabel as mislabel_mod
from . import settings as settings_mod
from . import solver_api
from .artifacts import MANIFEST, ArtifactError, code_version, environment, read_json, write_json
from .config import Protocol, stable_hash
from .data import DataError, sha256_file
from .plugins import REPO_ROOT
from .stats import noise_ceiling

RUNS_ROOT = REPO_ROOT / "results" / "runs"
# Bump when what a record's numbers mean changes (metric definitions, selection rule): all records go stale.
RUN_FORMAT = 1
# Code every solver's scores depend on besides its own file.
SHARED_SOLVER_CODE = ("benchmark/solver_api.py", "benchmark/curvature.py", "benchmark/models.py")
BASELINES = ("baseline-random", "baseline-loss")
# The corruption the leaderboard reports (10% flipped, seed 0, one model); other specs are studies.
MISLABEL_SPEC = mislabel_mod.Spec()
TASKS = ("lds", "mislabel")


class RunError(RuntimeError):
    """A run cannot be done as asked (no ground truth, solver not applicable, bad parameters)."""


# ---------------------------------------------------------------- fingerprints

def _rel(path: Path) -> str:
    path = Path(path).resolve()
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def solver_code(name: str) -> dict:
    """Where a solver's code lives and the sha256 of everything its scores depend on."""
    if name in BASELINES:
        return {"file": "benchmark/runner.py", "hash": f"builtin:{name}"}
    cls = solver_api.get(name)
    path = Path(inspect.getfile(cls))
    shared = {p: sha256_file(REPO_ROOT / p) for p in SHARED_SOLVER_CODE if (REPO_ROOT / p).is_file()}
    file_sha = sha256_file(path)
    return {"file": _rel(path), "sha256": file_sha, "shared_code": shared,
            "hash": stable_hash({"file": file_sha, "shared": shared})}


def _complete_replicas(man: dict) -> list[int]:
    protocol = Protocol(**man["protocol"])
    listed = set(man.get("files", {}))
    return [r for r in range(protocol.seeds)
            if all(f"units/r{r:02d}_s{j:04d}.npz" in listed for j in range(protocol.subsets))]


def gt_reference(root: Path, replicas: list[int] | None = None, full_models: int = 1) -> dict:
    """Identity of a ground-truth artifact *as used*: which version, which replicas, and a hash over the
    sha256 of exactly the files the evaluation read (so a build that progresses elsewhere does not make
    a record stale, but new complete replicas or changed files do)."""
    root = Path(root)
    man = read_json(root / MANIFEST)
    replicas = _complete_replicas(man) if replicas is None else list(replicas)
    files = man.get("files", {})
    protocol = Protocol(**man["protocol"])
    used = ["masks.npy", "queries.npy", "validation_queries.npy"]
    used += [f"units/r{r:02d}_s{j:04d}.npz" for r in replicas for j in range(protocol.subsets)]
    for k in range(full_models):
        used += [f"full/full_k{k:02d}.npz", f"full/full_k{k:02d}.safetensors"]
    missing = [u for u in used if u not in files]
    return {
        "path": _rel(root), "setting": man["setting"], "version": man["version"], "complete": bool(man.get("complete")),
        "manifest_sha256": sha256_file(root / MANIFEST), "recipe_hash": man["recipe_hash"],
        "replicas": replicas, "replicas_total": protocol.seeds, "units_done": man.get("units_done"),
        "units_total": man.get("units_total"), "full_models_used": full_models,
        "used_files_hash": stable_hash({u: files.get(u) for u in used}),
        "missing_files": missing,
    }


def mislabel_reference(root: Path) -> dict:
    man = read_json(Path(root) / MANIFEST)
    return {"path": _rel(root), "setting": man["setting"], "version": man["version"],
            "manifest_sha256": sha256_file(Path(root) / MANIFEST), "spec": man["spec"],
            "recipe_hash": man["recipe_hash"], "models": man.get("models")}


def current_gt_root(setting: str, gt_root: Path = groundtruth.GT_ROOT) -> Path | None:
    """The artifact the benchmark uses now: the newest complete version, else the newest unfinished one
    (evaluated on its complete replicas, flagged), else None."""
    try:
        return groundtruth.latest(setting, gt_root)
    except ArtifactError:
        pass
    try:
        return groundtruth.latest(setting, gt_root, allow_incomplete=True)
    except ArtifactError:
        return None


# ---------------------------------------------------------------- parameters

def parse_param(text: str) -> tuple[str, object]:
    """``"damping=1e-3"`` -> ("damping", 0.001); values are read as JSON when they parse, else kept as text."""
    if "=" not in text:
        raise ValueError(f"parameter {text!r} must look like name=value")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), json.loads(raw)
    except json.JSONDecodeError:
        return key.strip(), raw


def param_grid(cls, fixed: dict | None = None, grid: dict | None = None) -> list[dict]:
    """Every combination of the solver's declared grid (or ``grid``), minus the parameters fixed by the user."""
    fixed = dict(fixed or {})
    space = dict(cls.parameters if grid is None else grid)
    unknown = (set(space) | set(fixed)) - cls.accepted()
    if unknown:
        raise RunError(f"solver {cls.name!r} has no parameter(s) {sorted(unknown)}; it takes {sorted(cls.accepted())}")
    keys = sorted(k for k in space if k not in fixed)
    for k in keys:
        if not isinstance(space[k], (list, tuple)) or not space[k]:
            raise RunError(f"solver {cls.name!r}: the grid for {k!r} must be a non-empty list, got {space[k]!r}")
    return [{**cls.defaults, **dict(zip(keys, combo)), **fixed}
            for combo in itertools.product(*(space[k] for k in keys))]


def check_applicable(cls, model: torch.nn.Module, params: dict | None = None) -> None:
    """Refuse up front what a solver declares it cannot do (e.g. a dense solver on a large model), counting
    the parameters it would attribute through (``last_blocks`` narrows them)."""
    k = (params or {}).get("last_blocks")
    if k is None:
        n = sum(p.numel() for p in model.parameters())
    else:
        names = set(curvature.last_blocks_parameters(model, k)[0])
        n = sum(p.numel() for name, p in model.named_parameters() if name in names)
    if cls.max_params is not None and n > cls.max_params:
        where = f"its last {k} block(s) and head have" if k is not None else "this model has"
        raise RunError(f"solver {cls.name!r} accepts models up to {cls.max_params:,} parameters; {where} "
                       f"{n:,}. Use it on a smaller setting (e.g. mnist-lr, mnist-mlp-small)"
                       + (" or fewer blocks." if k is not None else "."))


# ---------------------------------------------------------------- fitting and scoring

def _fit(cls, params: dict, models: list, train_x, train_y, num_classes: int, measurement: str,
         device: torch.device, cost: metrics.Cost, stage: str) -> list:
    fitted = []
    for k, model in enumerate(models):
        task = solver_api.Task(model.to(device).eval(), train_x, train_y, num_classes, measurement, device, seed=k)
        with cost.stage(stage):
            fitted.append(cls(**params).fit(task))
    return fitted


def _scores(fitted: list, qx, qy, tx, ty, cost: metrics.Cost, stage: str) -> torch.Tensor:
    """(Q, N) scores, averaged over an ensemble of explained models."""
    return _ensemble_scores([fitted], qx, qy, tx, ty, cost, stage)[0]


def _scores_many(candidates: list[list], qx, qy, tx, ty, cost: metrics.Cost, stage: str) -> list[torch.Tensor]:
    """Ensemble-averaged (Q, N) scores of several configurations, each a list of solvers fitted to an ensemble
    of models: for every ensemble member, one shared pass of train gradients (solver_api.scores_many) per
    distinct model among the configurations (the gap study mixes the benchmark's model with a study's)."""
    return _ensemble_scores(candidates, qx, qy, tx, ty, cost, stage)


def _shared_passes(solvers: list, qx, qy, tx, ty) -> list[torch.Tensor]:
    """solver_api.scores_many on each group of ``solvers`` fitted to the same model, in the input order."""
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(solvers):
        groups.setdefault(id(getattr(s.task, "model", None)), []).append(i)  # unfitted: scores_many says so
    outs = [None] * len(solvers)
    for idx in groups.values():
        for i, out in zip(idx, solver_api.scores_many([solvers[i] for i in idx], qx, qy, tx, ty)):
            outs[i] = out
    return outs


def _ensemble_scores(candidates: list[list], qx, qy, tx, ty, cost: metrics.Cost, stage: str) -> list[torch.Tensor]:
    # the one implementation behind _scores and _scores_many; they stay two names so that a test can tell a
    # single configuration's scoring from a grid's shared pass
    if not candidates:
        return []
    totals = [None] * len(candidates)
    for k in range(len(candidates[0])):
        with cost.stage(stage):  # entered once per model; the stage accumulates
            outs = _shared_passes([c[k] for c in candidates], qx, qy, tx, ty)
        for i, out in enumerate(outs):
            out = out.detach().to("cpu", torch.float64)
            if out.shape != (len(qy), len(ty)):
                raise RunError(f"solver {type(candidates[i][k]).name!r} returned scores of shape {tuple(out.shape)}, "
                               f"expected (queries, train) = {(len(qy), len(ty))}")
            totals[i] = out if totals[i] is None else totals[i] + out
    return [t / len(candidates[0]) for t in totals]


def _self_scores(fitted: list, tx, ty, cost: metrics.Cost, stage: str) -> torch.Tensor:
    total = None
    for s in fitted:
        with cost.stage(stage):
            out = s.self_scores(tx, ty).detach().to("cpu", torch.float64).reshape(-1)
        if out.shape != (len(ty),):
            raise RunError(f"solver {type(s).name!r} returned self-scores of shape {tuple(out.shape)}, "
                           f"expected ({len(ty)},)")
        total = out if total is None else total + out
    return total / len(fitted)


def _info(fitted: list) -> list:
    out = []
    for s in fitted:
        try:
            out.append(s.info())
        except Exception as exc:  # noqa: BLE001 - diagnostics must not sink a finished run
            out.append({"error": f"{type(exc).__name__}: {exc}"})
    return out


def _fit_seconds(cost: metrics.Cost, infos: list) -> float | None:
    """Fit time as if nothing had been cached: solvers memoise damping-independent curvature across fits
    (``curvature.CACHE``) and report its build time as ``shared_seconds`` with ``cache_hit``; a fit that reused
    it is charged that build time, so every configuration reports the cost of fitting it alone."""
    measured = cost.seconds("fit")
    if measured is None:
        return None
    return measured + sum(float(i.get("shared_seconds") or 0.0) for i in infos if i.get("cache_hit"))


def _log_scope(fitted, queries: int, train: int, log) -> None:
    """Say what influence goes through (parameters held constant) and what scoring will cost in passes."""
    info = fitted.info()
    if info.get("attributed_params") is not None and info["attributed_params"] < info.get("total_params", 0):
        held = "; ".join(f"{why}: {len(names)} tensors" for why, names in info.get("excluded", {}).items())
        blocks = f"last {info['last_blocks']} of {info['of_blocks']} blocks" if info.get("last_blocks") else ""
        log(f"  influence through {info['attributed_params']:,} of {info['total_params']:,} parameters"
            + "".join(f" ({part})" for part in (blocks, held) if part))
    qc, _ = fitted.chunk_sizes()
    passes = math.ceil(queries / qc)
    log(f"  scoring {queries:,} queries in {passes} block(s), one pass over {train:,} training examples each "
        f"(more memory, fewer passes: TDABENCH_SCORE_MEMORY_MB, now {solver_api.score_memory_budget_mb():g})")


def _device_name(device: torch.device) -> str:
    return environment(device)["device"]


# ---------------------------------------------------------------- the two evaluations

def evaluate_lds(setting: str, solver: str, params: dict | None = None, *, search: bool = True,
                 grid: dict | None = None, search_queries: int | None = None, ensemble: int = 1,
                 measurement: str | None = None, version: str | None = None, device=None,
                 max_queries: int | None = None, gt_root: Path = groundtruth.GT_ROOT, log=print) -> dict:
    """The ``lds`` section of a run record (see the module docstring).

    ``max_queries`` reports on a seeded subset of the reported queries (the CI regression check uses it to
    stay fast); the record says so.
    """
    from .training import default_device

    s = settings_mod.get(setting)
    cls = solver_api.get(solver)
    device = torch.device(device or default_device())
    measurement = measurement or s.measurement
    root = (Path(gt_root) / setting / version) if version else current_gt_root(setting, gt_root)
    if root is None:
        raise ArtifactError(f"no ground truth for {setting!r} under {Path(gt_root) / setting}; build it with "
                            f"`tdabench gt {setting}`")
    gt = groundtruth.GroundTruth.open(root, s, allow_incomplete=True)
    replicas = gt.complete_replicas()
    if not replicas:
        raise ArtifactError(f"{root}: no seed replica is complete yet ({gt.manifest['units_done']}/"
                            f"{gt.manifest['units_total']} units); wait for `tdabench gt {setting}` to finish one")
    if not gt.manifest.get("complete"):
        log(f"note: {root} is incomplete; evaluating on its complete replicas {replicas} of {gt.protocol.seeds} "
            f"(labelled as such in the record)")
    if ensemble > gt.protocol.full_models:
        raise RunError(f"ensemble of {ensemble} models asked for; {root} holds {gt.protocol.full_models}")
    models = [gt.full_model(s, k) for k in range(ensemble)]
    check_applicable(cls, models[0], params)
    data = s.data()
    tx, ty = data.train_x.to(device), data.train_y.to(device)
    q_cols = np.arange(len(gt.queries))
    if max_queries is not None and max_queries < len(q_cols):
        q_cols = np.sort(np.random.default_rng(0).choice(len(q_cols), max_queries, replace=False))
    q_idx, v_idx = torch.from_numpy(gt.queries[q_cols]), torch.from_numpy(gt.validation_queries)
    qx, qy = data.test_x[q_idx].to(device), data.test_y[q_idx].to(device)
    target = gt.target(measurement, "queries", replicas)[:, q_cols]
    cost = metrics.Cost(device)
    fixed = dict(params or {})

    candidates = param_grid(cls, fixed, grid) if search else [{**cls.defaults, **fixed}]
    selection = {"searched": bool(search and len(candidates) > 1)}
    best = None
    if selection["searched"]:
        if len(v_idx) == 0:
            raise RunError(f"{root} has no validation queries to choose {solver}'s hyper-parameters on; pass them "
                           f"with --param or use --no-search")
        cols = np.arange(len(v_idx))
        if search_queries is not None and search_queries < len(cols):
            cols = np.sort(np.random.default_rng(0).choice(len(cols), search_queries, replace=False))
        vx, vy = data.test_x[v_idx[cols]].to(device), data.test_y[v_idx[cols]].to(device)
        v_target = gt.target(measurement, "validation", replicas)[:, cols]
        trials, fits = [], []
        for cand in candidates:
            trial_cost = metrics.Cost(device)
            try:
                fits.append((cand, _fit(cls, cand, models, tx, ty, data.num_classes, measurement, device,
                                        trial_cost, "fit"), trial_cost))
            except (solver_api.SolverError, ValueError, torch.linalg.LinAlgError) as exc:
                trials.append({"params": cand, "validation_lds": None, "error": f"{type(exc).__name__}: {exc}"})
        # Every configuration's validation scores from one pass of train gradients (the dominant cost).
        shared_cost = metrics.Cost(device)
        try:
            val_scores = _scores_many([f for _, f, _ in fits], vx, vy, tx, ty, shared_cost, "score")
        except (solver_api.SolverError, ValueError, torch.linalg.LinAlgError):
            val_scores = None  # one configuration failed while scoring: score them one by one to find it
        for i, (cand, fitted, trial_cost) in enumerate(fits):
            try:
                if val_scores is None:
                    scores_i = _scores(fitted, vx, vy, tx, ty, trial_cost, "score")
                    score_s = trial_cost.seconds("score")
                else:
                    scores_i, score_s = val_scores[i], shared_cost.seconds("score") / len(fits)
                val = metrics.lds(scores_i, gt.masks, v_target)
                trial = {"params": cand, "validation_lds": val["mean"], "validation_lds_se": val["se"],
                         "fit_s": _fit_seconds(trial_cost, _info(fitted)), "fit_measured_s": trial_cost.seconds("fit"),
                         "score_s": score_s, "fit_peak_mb": trial_cost.peak_mb("fit")}
            except (solver_api.SolverError, ValueError, torch.linalg.LinAlgError) as exc:
                fitted, trial = None, {"params": cand, "validation_lds": None, "error": f"{type(exc).__name__}: {exc}"}
            trials.append(trial)
            ok = trial.get("validation_lds") is not None and math.isfinite(trial["validation_lds"])
            if ok and (best is None or trial["validation_lds"] > best[0]["validation_lds"]):
                best = (trial, fitted, trial_cost)  # keep the fitted solver: no second fit for the winner
        trials.sort(key=lambda t: candidates.index(t["params"]))
        for trial in trials:
            ok = trial.get("validation_lds") is not None and math.isfinite(trial["validation_lds"])
            log(f"  {solver} {trial['params']}: validation LDS "
                + (f"{trial['validation_lds']:.4f} ± {trial['validation_lds_se']:.4f}" if ok
                   else f"failed ({trial.get('error', 'undefined')})"))
        if best is None:
            raise RunError(f"every configuration of {solver} failed on the validation queries: "
                           + "; ".join(f"{t['params']}: {t.get('error')}" for t in trials))
        selection.update(method="grid search: highest mean LDS on the validation queries", metric="validation LDS",
                         validation_queries=int(len(cols)), trials=trials,
                         validation_scoring=("one shared pass of train gradients for all configurations (each "
                                             "trial's score_s is its share)" if val_scores is not None
                                             else "one pass per configuration"),
                         search_s=float(sum((t.get("fit_measured_s") or 0) + (t.get("score_s") or 0) for t in trials)))
        chosen, fitted = best[0]["params"], best[1]
        cost.stages["fit"] = dict(best[2].stages["fit"])
        # The winner may have reused curvature an earlier trial built: its memory peak counts too.
        cost.stages["fit"]["peak_mb"] = max(t.get("fit_peak_mb") or 0.0 for t in trials)
    else:
        chosen = candidates[0]
        selection["method"] = "given by the user" if fixed else "solver defaults (no search)"
        fitted = _fit(cls, chosen, models, tx, ty, data.num_classes, measurement, device, cost, "fit")
    _log_scope(fitted[0], len(qy), len(ty), log)
    scores = _scores(fitted, qx, qy, tx, ty, cost, "score")
    info = _info(fitted)
    del fitted
    ceiling_info = noise_ceiling(gt.outputs[measurement][replicas][:, :, q_cols])
    result = metrics.lds(scores, gt.masks, target, ceiling_info.get("lds_ceiling"))
    per_query = result.pop("per_query")
    return {
        **result,
        "per_query": [None if not np.isfinite(v) else round(float(v), 6) for v in per_query],
        "measurement": measurement, "queries": int(len(q_cols)), "queries_available": int(len(gt.queries)),
        "subsets": int(gt.masks.shape[0]),
        "ensemble": ensemble, "params": chosen, "selection": selection,
        "noise_ceiling": ceiling_info,
        "ground_truth": gt_reference(root, replicas, ensemble),
        "solver_info": info,
        "cost": {"fit_s": _fit_seconds(cost, info), "fit_measured_s": cost.seconds("fit"),
                 "score_s": cost.seconds("score"), "peak_mb": cost.peak_mb("fit", "score"), "stages": cost.to_dict(),
                 "search_s": selection.get("search_s"), "machine": metrics.machine_load()},
    }


def evaluate_mislabel(setting: str, solver: str, params: dict | None = None, *, device=None,
                      spec: mislabel_mod.Spec | None = None, mislabel_root: Path = mislabel_mod.MISLABEL_ROOT,
                      seed: int = 0) -> dict:
    """The ``mislabel`` section: rank the corrupted training set by self-influence (largest first)."""
    from .training import default_device, evaluate

    s = settings_mod.get(setting)
    device = torch.device(device or default_device())
    art = mislabel_mod.load(setting, spec or MISLABEL_SPEC, mislabel_root)
    data = s.data()
    tx, ty = data.train_x.to(device), art.labels.to(device)
    k_models = art.manifest["spec"]["full_models"]
    models = [art.model(s, k) for k in range(k_models)]
    cost = metrics.Cost(device)
    if solver == "baseline-random":
        section = metrics.random_baseline(len(ty), len(art.flipped))
        section["definition"] = "expected recall of a uniformly random inspection order (exact)"
    elif solver == "baseline-loss":
        with cost.stage("score"):
            loss = torch.stack([evaluate(m.to(device), tx, ty)["loss"].double() for m in models]).mean(0)
        section = metrics.mislabel(loss, art.flipped, seed)
        section["definition"] = "training loss under the corrupted labels, largest first"
    else:
        cls = solver_api.get(solver)
        check_applicable(cls, models[0], params)
        chosen = {**cls.defaults, **(params or {})}
        fitted = _fit(cls, chosen, models, tx, ty, data.num_classes, "loss", device, cost, "fit")
        self_inf = _self_scores(fitted, tx, ty, cost, "self_score")
        section = metrics.mislabel(self_inf, art.flipped, seed)
        section["definition"] = ("self-influence ∇L(zᵢ)ᵀ(G+λI)⁻¹∇L(zᵢ) on the corrupted-label model, "
                                 "largest first")
        section["params"] = chosen
        section["solver_info"] = _info(fitted)
    section["artifact"] = mislabel_reference(art.root)
    section["cost"] = {"fit_s": _fit_seconds(cost, section.get("solver_info", [])),
                       "fit_measured_s": cost.seconds("fit"),
                       "self_score_s": cost.seconds("self_score", "score"), "peak_mb": cost.peak_mb(),
                       "stages": cost.to_dict(), "machine": metrics.machine_load()}
    return section


# ---------------------------------------------------------------- records

def run_path(setting: str, solver: str, runs_root: Path = RUNS_ROOT) -> Path:
    return Path(runs_root) / setting / f"{solver}.json"


def _clean(obj):
    """JSON without NaN/inf (null instead) and with plain Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def read_record(setting: str, solver: str, runs_root: Path = RUNS_ROOT) -> dict | None:
    path = run_path(setting, solver, runs_root)
    return read_json(path) if path.is_file() else None


def mislabel_available(setting: str, mislabel_root: Path = mislabel_mod.MISLABEL_ROOT) -> bool:
    try:
        return mislabel_mod.find(setting, MISLABEL_SPEC, mislabel_root) is not None
    except (KeyError, DataError, ImportError):  # unknown setting; its weights or timm are not here
        return False


def stale_reasons(record: dict, *, gt_root: Path = groundtruth.GT_ROOT,
                  mislabel_root: Path = mislabel_mod.MISLABEL_ROOT) -> dict[str, list[str]]:
    """Why each section of a record no longer describes what a fresh run would compute ({} = fresh)."""
    reasons: dict[str, list[str]] = {}
    common = []
    if record.get("format") != RUN_FORMAT:
        common.append(f"record format {record.get('format')} != {RUN_FORMAT}")
    try:
        code = solver_code(record["solver"])
        if code["hash"] != record.get("solver_code", {}).get("hash"):
            common.append(f"solver code changed ({code['file']} or shared solver code)")
    except solver_api.SolverError as exc:
        common.append(str(exc))
    setting = record["setting"]
    if "lds" in record:
        why = list(common)
        used = record["lds"]["ground_truth"]
        root = current_gt_root(setting, gt_root)
        if root is None:
            why.append("its ground truth is gone")
        else:
            now = gt_reference(root, None, used.get("full_models_used", 1))
            if now["path"] != used["path"]:
                why.append(f"ground truth is now {now['path']} (record used {used['path']})")
            elif now["complete"] != used["complete"] or now["replicas"] != used["replicas"]:
                why.append(f"ground truth now has complete replicas {now['replicas']} (record used {used['replicas']})")
            elif now["used_files_hash"] != used["used_files_hash"]:
                why.append("ground-truth files changed")
        if why:
            reasons["lds"] = why
    if "mislabel" in record:
        why = list(common)
        path = mislabel_mod.find(setting, MISLABEL_SPEC, mislabel_root)
        used = record["mislabel"]["artifact"]
        if path is None:
            why.append("its mislabel artifact is gone")
        elif _rel(path) != used["path"] or sha256_file(path / MANIFEST) != used["manifest_sha256"]:
            why.append(f"mislabel artifact is now {_rel(path)}")
        if why:
            reasons["mislabel"] = why
    return reasons


def chosen_params(setting: str, solver: str, runs_root: Path = RUNS_ROOT,
                  gt_root: Path = groundtruth.GT_ROOT) -> tuple[dict, str]:
    """Hyper-parameters chosen on validation queries in a fresh run record, else the solver's defaults."""
    rec = read_record(setting, solver, runs_root)
    if rec and "lds" in rec and "lds" not in stale_reasons(rec, gt_root=gt_root):
        return rec["lds"]["params"], "chosen on validation queries"
    return dict(solver_api.get(solver).defaults), "solver defaults (no fresh run record)"


def _summary_cost(record: dict) -> dict:
    lds, mis = record.get("lds", {}), record.get("mislabel", {})
    peaks = [c.get("cost", {}).get("peak_mb") for c in (lds, mis)]
    peaks = [p for p in peaks if p is not None]
    return {"fit_s": lds.get("cost", {}).get("fit_s", mis.get("cost", {}).get("fit_s")),
            "score_s": lds.get("cost", {}).get("score_s"),
            "self_score_s": mis.get("cost", {}).get("self_score_s"),
            "peak_mb": max(peaks) if peaks else None}


def run(setting: str, solver: str, params: dict | None = None, *, tasks=None, search: bool = True,
        grid: dict | None = None, search_queries: int | None = None, ensemble: int = 1,
        measurement: str | None = None, version: str | None = None, device=None,
        gt_root: Path = groundtruth.GT_ROOT, mislabel_root: Path = mislabel_mod.MISLABEL_ROOT,
        runs_root: Path = RUNS_ROOT, write: bool = True, log=print) -> dict:
    """Evaluate ``solver`` on ``setting`` and write ``results/runs/<setting>/<solver>.json``.

    ``tasks``: any of "lds", "mislabel"; default: LDS, plus mislabel when its artifact exists. Sections not
    rerun are kept from the previous record while they are still fresh.
    """
    from .training import default_device

    device = torch.device(device or default_device())
    if tasks is None:
        tasks = [] if solver == "baseline-loss" else ["lds"]  # training loss ranks train points; no LDS
        if mislabel_available(setting, mislabel_root):
            tasks.append("mislabel")
    tasks = list(tasks)
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise RunError(f"unknown task(s) {bad}; choose from {TASKS}")
    if not tasks:
        raise RunError(f"nothing to run for {solver} on {setting}: it needs the mislabel artifact; build it with "
                       f"`tdabench mislabel {setting} --build`")
    old = read_record(setting, solver, runs_root)
    record = {"format": RUN_FORMAT, "setting": setting, "solver": solver, "solver_code": solver_code(solver)}
    if "lds" in tasks:
        if solver == "baseline-loss":
            raise RunError("the training-loss baseline ranks training points; it has no LDS")
        if solver == "baseline-random":
            record["lds"] = evaluate_random_lds(setting, version=version, gt_root=gt_root)
        else:
            log(f"{setting} / {solver}: LDS" + (" (grid search on validation queries)" if search else ""))
            record["lds"] = evaluate_lds(setting, solver, params, search=search, grid=grid,
                                         search_queries=search_queries, ensemble=ensemble, measurement=measurement,
                                         version=version, device=device, gt_root=gt_root, log=log)
    # Self-influence uses the parameters chosen for LDS: a mislabel section made with others (e.g. the
    # defaults, before the ground truth existed) is redone once LDS has chosen.
    if ("lds" in record and "mislabel" not in tasks and solver not in BASELINES and old and "mislabel" in old
            and old["mislabel"].get("params") != {**solver_api.get(solver).defaults, **record["lds"]["params"]}
            and mislabel_available(setting, mislabel_root)):
        log(f"{setting} / {solver}: redoing mislabel detection with the parameters LDS chose")
        tasks.append("mislabel")
    if "mislabel" in tasks:
        if "lds" in record:
            mis_params, source = record["lds"].get("params"), "chosen for LDS on validation queries (this run)"
        elif old and "lds" in old and "lds" not in stale_reasons(old, gt_root=gt_root, mislabel_root=mislabel_root):
            mis_params = old["lds"].get("params")
            source = f"chosen for LDS on validation queries ({old.get('created')})"
        else:
            mis_params, source = params, "given by the user" if params else "solver defaults"
        if mis_params and params:
            mis_params = {**mis_params, **params}
        log(f"{setting} / {solver}: mislabel detection (self-influence on the corrupted-label model)")
        record["mislabel"] = evaluate_mislabel(setting, solver, mis_params, device=device, mislabel_root=mislabel_root)
        if solver not in BASELINES:
            record["mislabel"]["params_source"] = source
    if old is not None and old.get("solver_code", {}).get("hash") == record["solver_code"]["hash"]:
        still_fresh = stale_reasons(old, gt_root=gt_root, mislabel_root=mislabel_root)
        for section in TASKS:
            if section not in record and section in old and section not in still_fresh:
                record[section] = old[section]
    record.update({
        "params": record.get("lds", {}).get("params", record.get("mislabel", {}).get("params")),
        "device": _device_name(device),
        "environment": environment(device),
        "machine_load": metrics.machine_load(),
        "code_version": code_version(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    })
    record["cost"] = _summary_cost(record)
    record = _clean(record)
    if write:
        write_json(run_path(setting, solver, runs_root), record)
    return record


def evaluate_random_lds(setting: str, *, version: str | None = None, gt_root: Path = groundtruth.GT_ROOT,
                        seed: int = 0) -> dict:
    """LDS of i.i.d. Gaussian scores: the floor an attribution must beat (expected 0)."""
    s = settings_mod.get(setting)
    root = (Path(gt_root) / setting / version) if version else current_gt_root(setting, gt_root)
    if root is None:
        raise ArtifactError(f"no ground truth for {setting!r}; build it with `tdabench gt {setting}`")
    gt = groundtruth.GroundTruth.open(root, s, allow_incomplete=True)
    replicas = gt.complete_replicas()
    if not replicas:
        raise ArtifactError(f"{root}: no seed replica is complete yet")
    target = gt.target(s.measurement, "queries", replicas)
    rng = np.random.default_rng(seed)
    per_query = []
    for start in range(0, len(gt.queries), 256):  # chunks: 2000 x 60000 random scores would be ~1 GB
        stop = min(start + 256, len(gt.queries))
        block = rng.standard_normal((stop - start, gt.masks.shape[1]), dtype=np.float32)
        per_query.append(metrics.lds_per_query(block, gt.masks, target[:, start:stop]))
    ceiling = noise_ceiling(gt.outputs[s.measurement][replicas][:, :, :len(gt.queries)])
    result = metrics.lds_summary(np.concatenate(per_query), ceiling.get("lds_ceiling"))
    result.pop("per_query")
    return {**result, "measurement": s.measurement, "queries": int(len(gt.queries)),
            "definition": f"i.i.d. standard normal scores (seed {seed})", "noise_ceiling": ceiling,
            "ground_truth": gt_reference(root, replicas, 1), "cost": {}}
