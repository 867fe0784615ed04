"""Floor 4: the scoring engine — fit a solver to explained models, choose its hyper-parameters on validation
queries, score the reported queries, and compute the metrics with their cost.

- :func:`evaluate_lds`: hyper-parameters chosen by grid search over the solver's ``parameters`` on the ground
  truth's *validation* queries (highest mean validation LDS; the reported queries are never looked at), then
  the LDS on the reported queries with its uncertainty and the noise ceiling. LDS needs only the subset sums
  of the scores, Σ_{i∈S} τ(q, i), which are linear in the train gradients: the gradients are summed per subset
  in one pass over the training set and serve every configuration and both query sets.
- :func:`evaluate_mislabel`: self-influence on the corrupted-label models with the parameters chosen for LDS
  (tuning them on the flipped labels would tune on the reported number), recall at 10-50% inspected and ROC
  AUC, beside the random and training-loss baselines.

Everything here takes objects — a :class:`GroundTruth`, a solver class, a :class:`MislabelArtifact` — and
returns plain dictionaries; run records (:mod:`.records`) are written by the caller.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass

import numpy as np
import torch

from .. import core
from ..core.stats import noise_ceiling
from ..groundtruth.artifact import GroundTruth
from ..groundtruth.mislabel import MislabelArtifact
from ..setup.artifacts import ArtifactError, environment
from . import metrics
from .cost import Cost, machine_load
from .solver import Solver, SolverContractError, SolverError, Task

# Bump when what an evaluation's numbers mean changes (selection rule, averaging): every record goes stale.
ENGINE_VERSION = 2


class RunError(RuntimeError):
    """A run cannot be done as asked (no ground truth, solver not applicable, bad parameters)."""


@dataclass(frozen=True)
class Baseline:
    """A reference ranking that is not a solver: random scores, or the training loss."""

    name: str
    description: str


RANDOM = Baseline("baseline-random", "i.i.d. random scores (LDS) / the expectation of a random inspection order")
LOSS = Baseline("baseline-loss", "training loss under the corrupted labels, largest first (mislabel detection)")
BASELINES = {b.name: b for b in (RANDOM, LOSS)}


@dataclass
class Explained:
    """The models an evaluation explains, and where they come from (recorded with the numbers).

    - ``ground truth``: the artifact's full-data models. Under the shared seed policy model k shares its
      initialisation and data-order seed with target replica k, so it is coupled to a quarter of a 4-seed target.
    - ``zoo``: models from the explained-model zoo, whose seeds no replica uses, with their training trajectories
      (for solvers that attribute through training).
    """

    source: str
    models: list
    reference: dict
    trajectories: list | None = None

    @classmethod
    def from_ground_truth(cls, gt: GroundTruth, n: int = 1) -> "Explained":
        if not 1 <= n <= gt.protocol.full_models:
            raise RunError(f"ensemble of {n} models asked for; {gt.root} holds {gt.protocol.full_models} full-data "
                           f"model(s) (more come from the zoo: --explain zoo)")
        return cls("ground truth", [gt.full_model(k) for k in range(n)],
                   {"source": "ground truth", "models": list(range(n)),
                    "note": "full-data model k shares its seed with target replica k (shared seed policy)"})

    @classmethod
    def from_zoo(cls, zoo, n: int = 1, first: int = 0) -> "Explained":
        from .solver import Trajectory

        chosen = list(range(first, first + n))
        missing = [k for k in chosen if k not in zoo.models]
        if missing:
            raise RunError(f"{zoo.root} holds models {zoo.models}; models {missing} were asked for: train them with "
                           f"`tdabench zoo {zoo.setting.name} --models {first + n}`")
        seeds = {m["k"]: m["seed"] for m in zoo.manifest["models"]}
        trajectories = [Trajectory(zoo.epochs, (lambda e, k=k: zoo.checkpoint(k, e)), zoo.learning_rates(k),
                                   zoo.setting.recipe, seeds[k]) for k in chosen]
        return cls("zoo", [zoo.model(k) for k in chosen], {"source": "zoo", "root_hash": zoo.root_hash(),
                                                         **zoo.reference(chosen)}, trajectories)

    @property
    def ground_truth_models(self) -> int:
        """How many of the ground truth's full-data models were read (none when they come from the zoo)."""
        return len(self.models) if self.source == "ground truth" else 0


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


def param_grid(cls: type[Solver], fixed: dict | None = None, grid: dict | None = None) -> list[dict]:
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


def check_applicable(cls: type[Solver], model: torch.nn.Module, params: dict | None = None) -> None:
    """Refuse up front what a solver declares it cannot do (e.g. a dense solver on a large model), counting
    the parameters it would attribute through (``last_blocks`` narrows them), and a solver whose optional package
    is not installed."""
    if cls.unavailable():
        raise RunError(f"solver {cls.name!r} {cls.unavailable()}")
    k = (params or {}).get("last_blocks")
    if k is None:
        n = sum(p.numel() for p in model.parameters())
    else:
        names = set(core.last_blocks_parameters(model, k)[0])
        n = sum(p.numel() for name, p in model.named_parameters() if name in names)
    if cls.max_params is not None and n > cls.max_params:
        where = f"its last {k} block(s) and head have" if k is not None else "this model has"
        raise RunError(f"solver {cls.name!r} accepts models up to {cls.max_params:,} parameters; {where} "
                       f"{n:,}. Use it on a smaller setting (e.g. mnist-lr, mnist-mlp-small)"
                       + (" or fewer blocks." if k is not None else "."))


# ---------------------------------------------------------------- fitting and scoring

def fit(cls: type[Solver], params: dict, models: list, train_x, train_y, num_classes: int, measurement: str,
        device: torch.device, cost: Cost, stage: str, cache: core.CurvatureCache,
        trajectories: list | None = None) -> list[Solver]:
    """One fitted solver per explained model (an ensemble), all sharing the run's curvature cache."""
    fitted = []
    for k, model in enumerate(models):
        task = Task(model.to(device).eval(), train_x, train_y, num_classes, measurement, device, seed=k, cache=cache,
                    trajectory=None if trajectories is None else trajectories[k])
        with cost.stage(stage):
            fitted.append(cls(**params).fit(task))
    return fitted


def ensemble_predictions(candidates: list[list[Solver]], qx, qy, tx, ty, membership: torch.Tensor, cost: Cost,
                         stage: str) -> list[torch.Tensor]:
    """Ensemble-averaged (M, Q) subset predictions Σ_{i∈Sₘ} τ(q, i) of one or more configurations, each a list of
    solvers fitted to the ensemble's models (:func:`benchmark.evaluate.solver.subset_predictions`): the train
    gradients of each distinct model are summed per subset once per run, whatever the number of configurations
    and query sets (a grid search's configurations share them; the gap study mixes models)."""
    from .solver import subset_predictions

    if not candidates:
        return []
    totals = [None] * len(candidates)
    for k in range(len(candidates[0])):
        with cost.stage(stage):  # entered once per model; the stage accumulates
            outs = subset_predictions([c[k] for c in candidates], qx, qy, tx, ty, membership)
        for i, out in enumerate(outs):
            out = out.detach().to("cpu", torch.float64)
            if out.shape != (len(membership), len(qy)):
                raise RunError(f"solver {type(candidates[i][k]).name!r} gave subset predictions of shape "
                               f"{tuple(out.shape)}, expected (subsets, queries) = {(len(membership), len(qy))}")
            totals[i] = out if totals[i] is None else totals[i] + out
    return [t / len(candidates[0]) for t in totals]


def self_scores(fitted: list[Solver], tx, ty, cost: Cost, stage: str) -> torch.Tensor:
    total = None
    for s in fitted:
        with cost.stage(stage):
            out = s.self_scores(tx, ty).detach().to("cpu", torch.float64).reshape(-1)
        if out.shape != (len(ty),):
            raise RunError(f"solver {type(s).name!r} returned self-scores of shape {tuple(out.shape)}, "
                           f"expected ({len(ty)},)")
        total = out if total is None else total + out
    return total / len(fitted)


def infos(fitted: list[Solver]) -> list:
    out = []
    for s in fitted:
        try:
            out.append(s.info())
        except Exception as exc:  # noqa: BLE001 - diagnostics must not sink a finished run
            out.append({"error": f"{type(exc).__name__}: {exc}"})
    return out


def fit_seconds(cost: Cost, info: list) -> float | None:
    """Fit time as if nothing had been cached: solvers memoise damping-independent curvature across fits
    (the run's curvature cache) and report its build time as ``shared_seconds`` with ``cache_hit``; a fit that
    reused it is charged that build time, so every configuration reports the cost of fitting it alone. A fit that
    built part of what it used (``built_seconds``: SOURCE builds one curvature per checkpoint and may find some
    cached) is charged the rest."""
    measured = cost.seconds("fit")
    if measured is None:
        return None
    return measured + sum(_reused_seconds(i) for i in info)


def _reused_seconds(info: dict) -> float:
    shared = float(info.get("shared_seconds") or 0.0)
    if "built_seconds" in info:
        return max(0.0, shared - float(info["built_seconds"] or 0.0))
    return shared if info.get("cache_hit") else 0.0


def _budget_mb(method) -> float | None:
    """The memory budget a solver's score blocks were sized from (recorded with its cost); None for a baseline."""
    return method.budget_mb() if isinstance(method, type) and issubclass(method, Solver) else None


def _log_scope(fitted: Solver, queries: int, train: int, log) -> None:
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
        f"(more memory, fewer passes: TDABENCH_SCORE_MEMORY_MB, now {fitted.budget_mb():g})")


def device_name(device: torch.device) -> str:
    return environment(device)["device"]


# ---------------------------------------------------------------- the evaluations

def evaluate_lds(gt: GroundTruth, cls: type[Solver], params: dict | None = None, *, search: bool = True,
                 grid: dict | None = None, search_queries: int | None = None, ensemble: int = 1,
                 explained: Explained | None = None, measurement: str | None = None, device=None,
                 max_queries: int | None = None, log=print) -> dict:
    """LDS of ``cls`` explaining ``explained`` (default: the ground truth's first ``ensemble`` full-data models).

    ``max_queries`` reports on a seeded subset of the reported queries (the CI regression check uses it to
    stay fast); the section says so. Returns the ``lds`` section of a run record (without the references to
    artifacts, which :mod:`.records` adds) and, under ``"target"``, the target it was scored against.
    """
    from ..setup.training import default_device

    setting = gt.setting
    device = torch.device(device or default_device())
    measurement = measurement or setting.measurement
    replicas = gt.complete_replicas()
    if not replicas:
        raise ArtifactError(f"{gt.root}: no seed replica is complete yet ({gt.manifest['units_done']}/"
                            f"{gt.manifest['units_total']} units); wait for `tdabench gt {setting.name}` to finish one")
    if not gt.manifest.get("complete"):
        log(f"note: {gt.root} is incomplete; evaluating on its complete replicas {replicas} of {gt.protocol.seeds} "
            f"(labelled as such in the record)")
    explained = explained or Explained.from_ground_truth(gt, ensemble)
    models, trajectories = explained.models, explained.trajectories
    check_applicable(cls, models[0], params)
    if cls.needs_trajectory and trajectories is None:
        raise RunError(f"solver {cls.name!r} attributes through the training run: it explains models with a known "
                       f"trajectory, the zoo's (`--explain zoo`); the {explained.source}'s models keep none")
    data = setting.data()
    tx, ty = data.train_x.to(device), data.train_y.to(device)
    q_cols = np.arange(len(gt.queries))
    if max_queries is not None and max_queries < len(q_cols):
        q_cols = np.sort(np.random.default_rng(0).choice(len(q_cols), max_queries, replace=False))
    q_idx, v_idx = torch.from_numpy(gt.queries[q_cols]), torch.from_numpy(gt.validation_queries)
    qx, qy = data.test_x[q_idx].to(device), data.test_y[q_idx].to(device)
    target = gt.target(measurement, "queries", replicas)[:, q_cols]
    cost = Cost(device)
    cache = core.CurvatureCache()
    membership = torch.from_numpy(gt.masks)
    fixed = dict(params or {})

    candidates = param_grid(cls, fixed, grid) if search else [{**cls.defaults, **fixed}]
    selection = {"searched": bool(search and len(candidates) > 1)}
    if selection["searched"]:
        if len(v_idx) == 0:
            raise RunError(f"{gt.root} has no validation queries to choose {cls.name}'s hyper-parameters on; pass "
                           f"them with --param or use --no-search")
        cols = np.arange(len(v_idx))
        if search_queries is not None and search_queries < len(cols):
            cols = np.sort(np.random.default_rng(0).choice(len(cols), search_queries, replace=False))
        vx, vy = data.test_x[v_idx[cols]].to(device), data.test_y[v_idx[cols]].to(device)
        v_target = gt.target(measurement, "validation", replicas)[:, cols]
        chosen, fitted, fit_cost, trials = _grid_search(cls, candidates, (models, trajectories), tx, ty,
                                                        data.num_classes, measurement, device, cache, membership, vx,
                                                        vy, v_target, log)
        selection.update(method="grid search: highest mean LDS on the validation queries", metric="validation LDS",
                         validation_queries=int(len(cols)), trials=trials["trials"],
                         validation_scoring=trials["scoring"],
                         search_s=float(sum((t.get("fit_measured_s") or 0) + (t.get("score_s") or 0)
                                            for t in trials["trials"])))
        cost.stages["fit"] = dict(fit_cost.stages["fit"])
        # The winner may have reused curvature an earlier trial built: its memory peak counts too.
        cost.stages["fit"]["peak_mb"] = max(t.get("fit_peak_mb") or 0.0 for t in trials["trials"])
    else:
        chosen = candidates[0]
        selection["method"] = "given by the user" if fixed else "solver defaults (no search)"
        fitted = fit(cls, chosen, models, tx, ty, data.num_classes, measurement, device, cost, "fit", cache,
                     trajectories)
    _log_scope(fitted[0], len(qy), len(ty), log)
    predictions = ensemble_predictions([fitted], qx, qy, tx, ty, membership, cost, "score")[0]
    info = infos(fitted)
    del fitted
    ceiling_info = noise_ceiling(gt.outputs[measurement][replicas][:, :, q_cols])
    result = metrics.lds_summary(metrics.lds_from_predictions(predictions, target), ceiling_info.get("lds_ceiling"))
    per_query = result.pop("per_query")
    return {
        **result,
        "per_query": [None if not np.isfinite(v) else round(float(v), 6) for v in per_query],
        "measurement": measurement, "queries": int(len(q_cols)), "queries_available": int(len(gt.queries)),
        "query_columns": None if len(q_cols) == len(gt.queries) else [int(c) for c in q_cols],
        "subsets": int(gt.masks.shape[0]), "replicas": replicas,
        "ensemble": len(models), "explained": explained.reference, "params": chosen, "selection": selection,
        "noise_ceiling": ceiling_info,
        "solver_info": info,
        "cost": {"fit_s": fit_seconds(cost, info), "fit_measured_s": cost.seconds("fit"),
                 "score_s": cost.seconds("score"), "peak_mb": cost.peak_mb("fit", "score"), "stages": cost.to_dict(),
                 "search_s": selection.get("search_s"), "machine": machine_load(),
                 "memory_budget_mb": _budget_mb(cls)},
    }


def _grid_search(cls, candidates, explained, tx, ty, num_classes, measurement, device, cache, membership, vx, vy,
                 v_target, log) -> tuple:
    """Fit every configuration, score them all on the validation queries from one pass of train gradients
    (shared with the reported queries later), and keep the one with the highest mean validation LDS (its fitted
    solvers too: no second fit)."""
    models, trajectories = explained
    trials, fits, best = [], [], None
    for cand in candidates:
        trial_cost = Cost(device)
        try:
            fits.append((cand, fit(cls, cand, models, tx, ty, num_classes, measurement, device, trial_cost, "fit",
                                   cache, trajectories), trial_cost))
        except SolverContractError:  # a bug in the solver file fails every configuration alike: stop at it
            raise
        except (SolverError, ValueError, torch.linalg.LinAlgError) as exc:
            trials.append({"params": cand, "validation_lds": None, "error": f"{type(exc).__name__}: {exc}"})
    shared_cost = Cost(device)
    try:
        val_preds = ensemble_predictions([f for _, f, _ in fits], vx, vy, tx, ty, membership, shared_cost, "score")
    except SolverContractError:
        raise
    except (SolverError, ValueError, torch.linalg.LinAlgError):
        val_preds = None  # one configuration failed while scoring: score them one by one to find it
    for i, (cand, fitted, trial_cost) in enumerate(fits):
        try:
            if val_preds is None:
                pred_i = ensemble_predictions([fitted], vx, vy, tx, ty, membership, trial_cost, "score")[0]
                score_s = trial_cost.seconds("score")
            else:
                pred_i, score_s = val_preds[i], shared_cost.seconds("score") / len(fits)
            val = metrics.lds_summary(metrics.lds_from_predictions(pred_i, v_target))
            trial = {"params": cand, "validation_lds": val["mean"], "validation_lds_se": val["se"],
                     "fit_s": fit_seconds(trial_cost, infos(fitted)), "fit_measured_s": trial_cost.seconds("fit"),
                     "score_s": score_s, "fit_peak_mb": trial_cost.peak_mb("fit")}
        except SolverContractError:
            raise
        except (SolverError, ValueError, torch.linalg.LinAlgError) as exc:
            fitted, trial = None, {"params": cand, "validation_lds": None, "error": f"{type(exc).__name__}: {exc}"}
        trials.append(trial)
        ok = trial.get("validation_lds") is not None and math.isfinite(trial["validation_lds"])
        if ok and (best is None or trial["validation_lds"] > best[0]["validation_lds"]):
            best = (trial, fitted, trial_cost)
    trials.sort(key=lambda t: candidates.index(t["params"]))
    for trial in trials:
        ok = trial.get("validation_lds") is not None and math.isfinite(trial["validation_lds"])
        log(f"  {cls.name} {trial['params']}: validation LDS "
            + (f"{trial['validation_lds']:.4f} ± {trial['validation_lds_se']:.4f}" if ok
               else f"failed ({trial.get('error', 'undefined: constant scores')})"))
    if best is None:
        raise RunError(f"every configuration of {cls.name} failed on the validation queries: "
                       + "; ".join(f"{t['params']}: {t.get('error', 'LDS undefined (constant scores)')}"
                                   for t in trials))
    scoring = ("one shared pass of train gradients for all configurations (each trial's score_s is its share)"
               if val_preds is not None else "one configuration at a time")
    return best[0]["params"], best[1], best[2], {"trials": trials, "scoring": scoring}


def evaluate_random_lds(gt: GroundTruth, seed: int = 0) -> dict:
    """LDS of i.i.d. Gaussian scores: the floor an attribution must beat (expected 0)."""
    setting = gt.setting
    replicas = gt.complete_replicas()
    if not replicas:
        raise ArtifactError(f"{gt.root}: no seed replica is complete yet")
    target = gt.target(setting.measurement, "queries", replicas)
    rng = np.random.default_rng(seed)
    per_query = []
    for start in range(0, len(gt.queries), 256):  # chunks: 2000 x 60000 random scores would be ~1 GB
        stop = min(start + 256, len(gt.queries))
        block = rng.standard_normal((stop - start, gt.masks.shape[1]), dtype=np.float32)
        per_query.append(metrics.lds_per_query(block, gt.masks, target[:, start:stop]))
    ceiling = noise_ceiling(gt.outputs[setting.measurement][replicas][:, :, :len(gt.queries)])
    result = metrics.lds_summary(np.concatenate(per_query), ceiling.get("lds_ceiling"))
    result.pop("per_query")
    return {**result, "measurement": setting.measurement, "queries": int(len(gt.queries)), "query_columns": None,
            "replicas": replicas, "ensemble": 1, "definition": f"i.i.d. standard normal scores (seed {seed})",
            "noise_ceiling": ceiling, "cost": {}}


def evaluate_mislabel(art: MislabelArtifact, method, params: dict | None = None, *, device=None,
                      seed: int = 0) -> dict:
    """The ``mislabel`` section: rank the corrupted training set by self-influence (largest first), or by a
    baseline's order."""
    from ..setup.training import default_device, evaluate

    device = torch.device(device or default_device())
    data = art.setting.data()
    tx, ty = data.train_x.to(device), art.labels.to(device)
    models = [art.model(k) for k in range(art.manifest["spec"]["full_models"])]
    cost = Cost(device)
    if method is RANDOM:
        section = metrics.random_baseline(len(ty), len(art.flipped))
        section["definition"] = "expected recall of a uniformly random inspection order (exact)"
    elif method is LOSS:
        with cost.stage("score"):
            loss = torch.stack([evaluate(m.to(device), tx, ty)["loss"].double() for m in models]).mean(0)
        section = metrics.mislabel(loss, art.flipped, seed)
        section["definition"] = "training loss under the corrupted labels, largest first"
    else:
        check_applicable(method, models[0], params)
        if method.needs_trajectory:
            raise RunError(f"solver {method.name!r} attributes through the training run; the corrupted-label models "
                           f"keep no trajectory, so it has no mislabel detection")
        chosen = {**method.defaults, **(params or {})}
        fitted = fit(method, chosen, models, tx, ty, data.num_classes, "loss", device, cost, "fit",
                     core.CurvatureCache())
        section = metrics.mislabel(self_scores(fitted, tx, ty, cost, "self_score"), art.flipped, seed)
        section["definition"] = "self-influence ∇L(zᵢ)ᵀ(G+λI)⁻¹∇L(zᵢ) on the corrupted-label model, largest first"
        section["params"] = chosen
        section["solver_info"] = infos(fitted)
    section["cost"] = {"fit_s": fit_seconds(cost, section.get("solver_info", [])),
                       "fit_measured_s": cost.seconds("fit"),
                       "self_score_s": cost.seconds("self_score", "score"), "peak_mb": cost.peak_mb(),
                       "stages": cost.to_dict(), "machine": machine_load(), "memory_budget_mb": _budget_mb(method)}
    return section
