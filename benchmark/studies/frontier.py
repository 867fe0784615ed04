"""Floor 5: the cost–quality frontier — LDS against total compute, for the ways of spending more of it.

The leaderboard answers "which method is best at one operating point"; this study answers "what should I spend my
compute on": more explained models (ensembles of zoo models), more checkpoints of one model, a larger knob (TRAK's
projection, Arnoldi's rank, DataInf's damping), or retraining itself.

**Units.** An ensemble's (M, Q) subset predictions are the mean of its members' (:func:`engine.ensemble_predictions`),
so each member — one solver configuration × one zoo model × one checkpoint — is fitted and scored ONCE, on the
reported and the validation queries, and cached with its measured cost (fit s, score s) under
``<results>/frontier/.units/`` (ignored by git; :func:`unit_path`). Every ensemble size and checkpoint ensemble is
then an average of cached units. A unit of zoo model k is fitted with seed k, as the k-th member of
:func:`engine.fit`'s ensembles is (so TRAK's checkpoints of one model share its projection). A unit records what
produced it (the zoo model's files, the ground truth's masks and queries, the solver's behavioural probe) and is
recomputed when any of them changed; an interrupted run resumes at the first unit not on disk.

**Points.** Hyper-parameters of a family are the committed single-model record's, chosen on validation queries
(``results/runs/<setting>/<solver>.json`` ``lds.params``); a knob family varies one of them over given values, the
others from the record. For each point: reported-query LDS (mean ± se, per-query values), validation LDS, fraction of
the noise ceiling, the per-query paired difference against one EK-FAC explaining zoo model 0 (pairing checked as
:func:`records.unpaired_reasons` does), total compute seconds = Σ members' (fit + score of the reported queries) +
the training seconds of every zoo model used beyond model 0 (the zoo manifest's), and the count of trained models.

**Fits.** Per ensemble family, two saturating curves in the number of members n are fitted to the point means,
weighted by their standard errors:

- ``power``: LDS(n) = a − b·n^(−c) (a: the asymptote);
- ``reliability`` (Spearman–Brown): LDS(n) = a·sqrt(n·r / (1 + (n − 1)·r)): if each member's prediction is a
  common signal plus independent noise with inter-member correlation r, the correlation of their mean with any
  target grows exactly so, to the asymptote a.

The one with the lower AICc on the points is used (both are stored). Bootstrap over queries (the same resampled
queries for every point of the family, the curve refitted each time) gives intervals for the asymptote and for the
members — and, by the family's linear cost per member, the compute — needed to reach LDS 0.50 and 0.8 × the
noise ceiling; "not reachable" where the fitted asymptote is below the target. The interval covers the sampling
of queries, not the choice of zoo models.

The result, ``<results>/frontier/<setting>.json``, carries the references of the ground truth and of the zoo models
it used (:func:`records.gt_reference`, :meth:`Zoo.reference`) and its content hash; :func:`read` refuses a file
whose content does not match its hash and :func:`stale_reasons` says why one is no longer current.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import core
from ..core.stats import noise_ceiling
from ..evaluate import engine, fingerprint, metrics, records
from ..evaluate.cost import Cost, machine_load
from ..evaluate.engine import RunError
from ..evaluate.solver import Solver, Task
from ..groundtruth import artifact as gt_artifact
from ..groundtruth import zoo as zoo_mod
from ..groundtruth.artifact import GroundTruth
from ..setup import settings as settings_mod
from ..setup.artifacts import ArtifactError, atomic_write_bytes, code_version, environment, save_npz
from ..setup.config import stable_hash
from ..setup.store import ResultsStore
from . import datamodels

# Bump when what a unit or a point means changes: cached units and frontier files of another version are redone.
FRONTIER_VERSION = 1
ENSEMBLE_SIZES = (1, 2, 4, 8, 16, 32)
CHECKPOINT_SIZES = (1, 2, 4, 8)
TARGET_LDS = 0.50
TARGET_OF_CEILING = 0.8
REFERENCE_SOLVER = "ekfac"  # every point is paired against one EK-FAC explaining zoo model 0
KINDS = ("zoo", "ckpt", "ckpt+zoo", "knob")
DEFAULT_FAMILIES = ("ekfac", "trak", "ekfac:ckpt", "ekfac:ckpt+zoo")


class FrontierError(ArtifactError):
    """A frontier file that does not check against itself, or is not current."""


# ---------------------------------------------------------------- what to compute

@dataclass(frozen=True)
class Family:
    """One way of spending compute. ``kind``: "zoo" (ensembles of zoo models 0..n-1, final weights), "ckpt" (zoo
    model 0's epoch checkpoints as members), "ckpt+zoo" (n zoo models × ``checkpoints`` checkpoints each), "knob"
    (zoo model 0 alone at each of ``values`` of the parameter ``knob``)."""

    solver: str
    kind: str = "zoo"
    knob: str | None = None
    values: tuple = ()

    @property
    def name(self) -> str:
        if self.kind == "zoo":
            return self.solver
        if self.kind == "knob":
            return f"{self.solver}:{self.knob}"
        return f"{self.solver}:{self.kind}"

    @classmethod
    def parse(cls, text: str) -> "Family":
        """``ekfac`` | ``ekfac:ckpt`` | ``ekfac:ckpt+zoo`` | ``trak:proj_dim=256,1024`` | ``datainf:damping=1e-6``."""
        solver, _, rest = text.partition(":")
        if not solver:
            raise ValueError(f"family {text!r}: name a solver, e.g. ekfac, ekfac:ckpt, trak:proj_dim=256,1024")
        if not rest or rest == "zoo":
            return cls(solver)
        if rest in ("ckpt", "ckpt+zoo"):
            return cls(solver, rest)
        knob, eq, raw = rest.partition("=")
        if not eq or not knob or not raw:
            raise ValueError(f"family {text!r}: after the solver comes zoo, ckpt, ckpt+zoo or KNOB=v1,v2,...")
        values = tuple(engine.parse_param(f"{knob}={v}")[1] for v in raw.split(","))
        return cls(solver, "knob", knob, values)


@dataclass
class FrontierConfig:
    """What :func:`run` computes. ``members``: ensemble sizes (zoo models); ``checkpoints``: checkpoint-ensemble
    sizes; ``combined_checkpoints``: checkpoints per model in "ckpt+zoo" families."""

    families: tuple[Family, ...] = tuple(Family.parse(f) for f in DEFAULT_FAMILIES)
    members: tuple[int, ...] = ENSEMBLE_SIZES
    checkpoints: tuple[int, ...] = CHECKPOINT_SIZES
    combined_checkpoints: int = 4
    reference: str = REFERENCE_SOLVER  # the single-model row every point is paired against (explaining zoo model 0)
    device: str | None = None
    progress: bool = True
    bootstrap: int = 500
    write: bool = True
    log: object = field(default=print, repr=False)


def checkpoint_epochs(epochs: int, c: int) -> list[int]:
    """The c checkpoints of a model trained ``epochs`` epochs, evenly spaced and ending at the final model:
    ceil(E·j/c), j = 1..c (the initialisation, epoch 0, is never one)."""
    if not 1 <= c <= epochs:
        raise ValueError(f"{c} checkpoints asked for; a model trained {epochs} epochs has 1..{epochs}")
    return sorted({math.ceil(epochs * j / c) for j in range(1, c + 1)})


@dataclass(frozen=True)
class Member:
    """One unit: ``params`` of ``solver`` explaining zoo model ``k`` after epoch ``epoch``."""

    solver: str
    params_json: str
    k: int
    epoch: int

    @property
    def params(self) -> dict:
        return json.loads(self.params_json)


@dataclass
class Point:
    family: Family
    label: str
    members: list[Member]
    x_members: int  # the number the family's curve is a function of
    models: list[int]


def plan(family: Family, params: dict, epochs: int, available: int, cfg: FrontierConfig) -> list[Point]:
    """The points of ``family`` whose models the zoo holds (``available``), with their members."""
    pj = json.dumps(params, sort_keys=True)
    out = []
    if family.kind == "zoo":
        for n in cfg.members:
            if n <= available:
                out.append(Point(family, f"{n} models", [Member(family.solver, pj, k, epochs) for k in range(n)], n,
                                 list(range(n))))
    elif family.kind == "ckpt":
        for c in cfg.checkpoints:
            if c <= epochs:
                out.append(Point(family, f"{c} checkpoints", [Member(family.solver, pj, 0, e)
                                                              for e in checkpoint_epochs(epochs, c)], c, [0]))
    elif family.kind == "ckpt+zoo":
        eps = checkpoint_epochs(epochs, min(cfg.combined_checkpoints, epochs))
        for n in cfg.members:
            if n <= available:
                out.append(Point(family, f"{n} models × {len(eps)} checkpoints",
                                 [Member(family.solver, pj, k, e) for k in range(n) for e in eps], n, list(range(n))))
    elif family.kind == "knob":
        for v in family.values:
            p = json.dumps({**params, family.knob: v}, sort_keys=True)
            out.append(Point(family, f"{family.knob}={v}", [Member(family.solver, p, 0, epochs)], 1, [0]))
    else:
        raise ValueError(f"family kind {family.kind!r}; one of {KINDS}")
    return out


# ---------------------------------------------------------------- units: computed once, cached, resumable

def units_dir(store: ResultsStore, setting: settings_mod.Setting) -> Path:
    return store.root / "frontier" / ".units" / setting.name


def unit_path(store: ResultsStore, setting: settings_mod.Setting, m: Member) -> Path:
    return units_dir(store, setting) / m.solver / stable_hash(m.params_json, 12) / f"k{m.k:02d}_e{m.epoch:02d}.npz"


def gt_inputs_hash(gt: GroundTruth) -> str:
    """The ground-truth files a unit's predictions depend on: the subsets and the two query sets (not the targets)."""
    files = gt.manifest.get("files", {})
    return stable_hash({n: files.get(n) for n in ("masks.npy", "queries.npy", "validation_queries.npy")})


@dataclass
class Context:
    """What every unit of one run shares."""

    store: ResultsStore
    setting: settings_mod.Setting
    gt: GroundTruth
    zoo: zoo_mod.Zoo
    classes: dict
    device: torch.device
    measurement: str
    gt_inputs: str
    target_sha: str = ""  # of the targets every point is scored against (:func:`targets_hash`), set once per run

    def identity(self, m: Member) -> dict:
        """What a cached unit must have been made from to be reused."""
        return {"version": FRONTIER_VERSION, "solver": m.solver, "params": m.params, "k": m.k, "epoch": m.epoch,
                "seed": m.k, "measurement": self.measurement, "gt_inputs": self.gt_inputs,
                "zoo_model": self.zoo.reference([m.k])["used_files_hash"],
                "zoo": [self.zoo.manifest["version"], self.zoo.manifest["recipe_hash"]]}


def load_unit(ctx: Context, m: Member) -> tuple[dict | None, str]:
    """(the cached unit, "") when it is on disk and made from what would make it now, else (None, why not)."""
    path = unit_path(ctx.store, ctx.setting, m)
    if not path.is_file():
        return None, "not computed"
    try:
        with np.load(path) as z:
            meta = json.loads(str(z["meta"]))
            unit = {"reported": z["reported"], "validation": z["validation"], **meta["cost"], "meta": meta}
    except (OSError, ValueError, KeyError) as exc:  # truncated or damaged: recompute it
        return None, f"unreadable ({type(exc).__name__})"
    want = ctx.identity(m)
    if meta.get("identity") != want:
        diff = sorted(k for k in want if (meta.get("identity") or {}).get(k) != want[k])
        return None, f"made from other {', '.join(diff)}"
    cls = ctx.classes[m.solver]
    diff = fingerprint.compare_solver(meta.get("probe"), records.solver_fingerprint(cls, m.params), cls,
                                      {**cls.defaults, **m.params})
    if diff:
        return None, f"the solver computes something else now ({diff})"
    return unit, ""


def compute_unit(ctx: Context, m: Member, cache: core.CurvatureCache) -> dict:
    """Fit ``m``'s solver to its model, score the reported then the validation queries; write the unit atomically.
    Seeds follow :func:`engine.fit`: zoo model k is the k-th member of a prefix ensemble, so its seed is k."""
    cls = ctx.classes[m.solver]
    params = {**cls.defaults, **m.params}
    final = m.epoch == ctx.zoo.epochs
    if final:
        explained = engine.Explained.from_zoo(ctx.zoo, 1, first=m.k)
        model, trajectory = explained.models[0], explained.trajectories[0]
    else:
        if cls.needs_trajectory:
            raise RunError(f"{cls.name} attributes through the training run; a checkpoint of it has none recorded "
                           f"on its own: use {cls.name} in zoo families only")
        model, trajectory = ctx.zoo.checkpoint(m.k, m.epoch), None
    engine.check_applicable(cls, model, params)
    data = ctx.setting.data()
    tx, ty = data.train_x.to(ctx.device), data.train_y.to(ctx.device)
    q_idx, v_idx = torch.from_numpy(ctx.gt.queries), torch.from_numpy(ctx.gt.validation_queries)
    membership = torch.from_numpy(ctx.gt.masks)
    cost = Cost(ctx.device)
    task = Task(model.to(ctx.device).eval(), tx, ty, data.num_classes, ctx.measurement, ctx.device, seed=m.k,
                cache=cache, trajectory=trajectory)
    with cost.stage("fit"):
        solver = cls(**params).fit(task)
    # The reported queries first: their pass pays for the train-gradient subset sums, as a run without a search
    # does; the validation pass reuses them (not counted in the point's compute).
    reported = engine.ensemble_predictions([[solver]], data.test_x[q_idx].to(ctx.device),
                                           data.test_y[q_idx].to(ctx.device), tx, ty, membership, cost, "score")[0]
    validation = engine.ensemble_predictions([[solver]], data.test_x[v_idx].to(ctx.device),
                                             data.test_y[v_idx].to(ctx.device), tx, ty, membership, cost,
                                             "validation")[0]
    info = engine.infos([solver])
    unit_cost = {"fit_s": engine.fit_seconds(cost, info), "score_s": cost.seconds("score"),
                 "validation_score_s": cost.seconds("validation")}
    meta = {"identity": ctx.identity(m), "probe": records.solver_fingerprint(cls, m.params), "cost": unit_cost,
            "machine": machine_load(), "device": engine.device_name(ctx.device),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    save_npz(unit_path(ctx.store, ctx.setting, m), reported=reported.numpy(), validation=validation.numpy(),
             meta=np.asarray(json.dumps(records._clean(meta), sort_keys=True)))
    return {"reported": reported.numpy(), "validation": validation.numpy(), **unit_cost, "meta": meta}


def ensure_units(ctx: Context, members: list[Member], progress: bool = True, log=print) -> dict[Member, dict]:
    """Every member's unit, from the cache where current, else computed (grouped by model so that a model's
    damping-independent curvature is built once and charged to each fit, :func:`engine.fit_seconds`)."""
    from tqdm.auto import tqdm

    units, todo = {}, []
    for m in dict.fromkeys(members):
        unit, why = load_unit(ctx, m)
        if unit is None:
            if why != "not computed":
                log(f"  recomputing {m.solver} k{m.k:02d} epoch {m.epoch}: cached unit {why}")
            todo.append(m)
        else:
            units[m] = unit
    if todo:
        where = ctx.store.relative(units_dir(ctx.store, ctx.setting))
        log(f"{len(units)} unit(s) cached; computing {len(todo)} under {where}")
    todo.sort(key=lambda m: (m.k, m.epoch, m.solver, m.params_json))
    bar = tqdm(total=len(todo), desc=f"frontier {ctx.setting.name}", unit="unit", disable=not progress or not todo)
    cache, cache_key = None, None
    try:
        for m in todo:
            if (m.k, m.epoch) != cache_key:  # one model's curvature at a time in memory
                cache, cache_key = core.CurvatureCache(), (m.k, m.epoch)
            units[m] = compute_unit(ctx, m, cache)
            bar.update(1)
            bar.set_postfix(last=f"{m.solver} k{m.k:02d} e{m.epoch}")
    finally:
        bar.close()
    return units


# ---------------------------------------------------------------- points

def _per_query(predictions: np.ndarray, target: np.ndarray) -> np.ndarray:
    return metrics.lds_from_predictions(predictions, target)


def _rounded(values) -> list:
    return [None if not np.isfinite(v) else round(float(v), 6) for v in values]


def point_record(ctx: Context, point: Point, units: dict, targets: tuple, ceiling: float | None,
                 reference: dict | None, training_s: dict) -> dict:
    """A point's numbers from its members' cached units."""
    target, v_target = targets
    reported = np.mean([units[m]["reported"] for m in point.members], axis=0)
    validation = np.mean([units[m]["validation"] for m in point.members], axis=0)
    summary = metrics.lds_summary(_per_query(reported, target), ceiling)
    per_query = summary.pop("per_query")
    val = metrics.lds_summary(_per_query(validation, v_target))
    fit_s = sum(units[m]["fit_s"] or 0.0 for m in point.members)
    score_s = sum(units[m]["score_s"] or 0.0 for m in point.members)
    train_s = sum(training_s[k] for k in point.models if k != 0)  # model 0 is what a single-model row explains
    section = {"explained": {"source": "zoo", **ctx.zoo.reference(point.models)}, "target_sha256": ctx.target_sha,
               "query_columns": None, "per_query": _rounded(per_query)}
    rec = {"family": point.family.name, "solver": point.family.solver, "kind": point.family.kind,
           "label": point.label, "members": point.x_members, "models": point.models,
           "units": [[m.k, m.epoch] for m in point.members], "params": point.members[0].params,
           "lds": {k: summary[k] for k in ("mean", "se", "ci_low", "ci_high", "n", "n_undefined", "of_ceiling",
                                           "of_ceiling_se")},
           "validation_lds": val["mean"], "validation_lds_se": val["se"],
           "compute_s": fit_s + score_s + train_s, "cost": {"fit_s": fit_s, "score_s": score_s, "training_s": train_s},
           "trained_models": len(point.models), "explained": section["explained"],
           "per_query": section["per_query"]}
    if reference is not None:
        why = records.unpaired_reasons(section, reference)
        if why:
            rec["paired"] = {"unpaired_reasons": why}
        else:
            d = metrics.paired_difference(section["per_query"], reference["per_query"])
            rec["paired"] = {"against": reference["against"], "difference": d["difference"], "se": d["se"],
                             "wins": d["wins"], "n": d["n"]}
    return rec


def targets_hash(ctx: Context) -> str:
    replicas = ctx.gt.complete_replicas()
    return fingerprint.target_hash(ctx.gt.masks, ctx.gt.target(ctx.measurement, "queries", replicas),
                                   ctx.gt.target(ctx.measurement, "validation", replicas))


# ---------------------------------------------------------------- saturating curves

def power_curve(n, a, b, c):
    return a - b * np.power(n, -c)


def reliability_curve(n, a, r):
    n = np.asarray(n, dtype=np.float64)
    return a * np.sqrt(n * r / (1 + (n - 1) * r))


CURVES = {
    "power": (power_curve, ("a", "b", "c")),
    "reliability": (reliability_curve, ("a", "r")),
}


def _fit_one(name: str, n, y, se):
    """Weighted least squares of curve ``name``; (params dict, weighted RSS) or None where it does not converge."""
    from scipy.optimize import OptimizeWarning, curve_fit

    f, keys = CURVES[name]
    n, y = np.asarray(n, float), np.asarray(y, float)
    sigma = np.maximum(np.asarray(se, float), 1e-6)
    top = float(np.max(y))
    if name == "power":
        p0, bounds = (top + 0.05, max(top - float(y[0]) + 0.05, 1e-3), 0.5), ([-1, 0, 1e-3], [1.5, 5, 5])
    else:
        p0, bounds = (min(top * 1.2, 1.0), 0.5), ([0, 1e-6], [1.5, 1])
    try:
        with warnings.catch_warnings():  # the covariance is not used (intervals come from the bootstrap)
            warnings.simplefilter("ignore", OptimizeWarning)
            popt, _ = curve_fit(f, n, y, p0=p0, sigma=sigma, bounds=bounds, maxfev=20000)
    except (RuntimeError, ValueError):
        return None
    rss = float(np.sum(((y - f(n, *popt)) / sigma) ** 2))
    # a parameter pinned at its bound (e.g. the power law's a at 1.5 with c → 0: growth like log n) is no fit of a
    # saturating curve; it is kept, flagged, and never chosen over one that is not
    at_bound = [k for k, v, lo, hi in zip(keys, popt, *bounds) if min(v - lo, hi - v) <= 1e-6 * max(1.0, abs(v))]
    return dict(zip(keys, map(float, popt))), rss, at_bound


def _aicc(rss: float, n_points: int, k: int) -> float:
    aic = n_points * math.log(max(rss, 1e-300) / n_points) + 2 * k
    return aic + (2 * k * (k + 1) / (n_points - k - 1) if n_points - k - 1 > 0 else math.inf)


def members_needed(curve: str, params: dict, target: float) -> float:
    """Members n at which the fitted curve reaches ``target``: 1.0 where one already does, inf where its asymptote
    is not above the target (not reachable)."""
    a = params["a"]
    f, keys = CURVES[curve]
    if f(1.0, *[params[k] for k in keys]) >= target:
        return 1.0
    if a <= target:
        return math.inf
    if curve == "power":
        return float((params["b"] / (a - target)) ** (1 / params["c"]))
    g, r = (target / a) ** 2, params["r"]
    return float(g * (1 - r) / (r * (1 - g)))


def fit_family(points: list[dict], ceiling: float | None, n_boot: int = 500, seed: int = 0) -> dict:
    """Both curves on a family's points (x = members), the one with the lower AICc chosen, and a bootstrap over
    queries for the asymptote and the members and compute needed to reach LDS 0.50 and 0.8 × the ceiling."""
    x = np.array([p["members"] for p in points], float)
    pq = np.array([[np.nan if v is None else v for v in p["per_query"]] for p in points], float)  # (P, Q)
    compute = np.array([p["compute_s"] for p in points], float)
    if len(set(x)) < 3:
        return {"fitted": False, "why": f"{len(set(x))} distinct member counts; a curve needs at least 3"}
    # compute grows linearly in members: cost per member (fit, score, training) and the fixed part
    slope, intercept = np.polyfit(x, compute, 1) if len(set(x)) > 1 else (0.0, float(compute[0]))

    def means(cols):
        sub = pq[:, cols]
        return np.nanmean(sub, axis=1), np.nanstd(sub, axis=1, ddof=1) / np.sqrt(np.isfinite(sub).sum(1))

    y, se = means(np.arange(pq.shape[1]))
    fits = {}
    for name, (_, keys) in CURVES.items():
        got = _fit_one(name, x, y, se)
        if got is not None:
            fits[name] = {"params": got[0], "weighted_rss": got[1], "aicc": _aicc(got[1], len(x), len(keys)),
                          "at_bound": got[2]}
    if not fits:
        return {"fitted": False, "why": "neither curve converged on these points"}
    chosen = min(fits, key=lambda k: (bool(fits[k]["at_bound"]), fits[k]["aicc"]))
    targets = {"lds_0.50": TARGET_LDS}
    if ceiling:
        targets[f"of_ceiling_{TARGET_OF_CEILING}"] = TARGET_OF_CEILING * ceiling
    # six points rarely tell the two curves apart: each one's asymptote and members needed are kept, so a reader
    # sees how much the extrapolation rests on the choice (the bootstrap below covers only the chosen curve)
    for name, fit in fits.items():
        fit["asymptote"] = fit["params"]["a"]
        fit["members_needed"] = {t: (lambda n: n if math.isfinite(n) else None)(members_needed(name, fit["params"], v))
                                 for t, v in targets.items()}
    rng = np.random.default_rng(seed)
    boot = {"a": [], **{t: [] for t in targets}}
    for _ in range(n_boot):
        cols = rng.integers(0, pq.shape[1], pq.shape[1])
        yb, sb = means(cols)
        got = _fit_one(chosen, x, yb, sb)
        if got is None:
            continue
        boot["a"].append(got[0]["a"])
        for t, v in targets.items():
            boot[t].append(members_needed(chosen, got[0], v))

    def interval(vals):
        vals = np.asarray(vals, float)
        if not len(vals):
            return None
        # no interpolation between order statistics: an infinite one ("not reachable" in that share of resamples)
        # stays infinite instead of becoming NaN
        lo, hi = np.quantile(vals, [0.025, 0.975], method="inverted_cdf")
        return [float(lo), float(hi)]

    extrapolation = {}
    for t, v in targets.items():
        n_star = members_needed(chosen, fits[chosen]["params"], v)
        reps = np.asarray(boot[t], float)
        ci = interval(reps)
        reached = [i for i in np.argsort(x) if y[i] >= v]
        if reached:  # a measured point already reaches it: its members and measured compute, not the curve's
            i = reached[0]
            extrapolation[t] = {"target": v, "reachable": True, "members": float(x[i]), "members_ci": None,
                                "compute_s": float(compute[i]), "compute_s_ci": None, "unreachable_share": None,
                                "note": "reached by the measured points"}
            continue
        extrapolation[t] = {
            "target": v, "reachable": math.isfinite(n_star),
            "members": n_star if math.isfinite(n_star) else None,
            "members_ci": None if ci is None else [c if math.isfinite(c) else None for c in ci],
            "compute_s": float(intercept + slope * n_star) if math.isfinite(n_star) else None,
            "compute_s_ci": None if ci is None else [float(intercept + slope * c) if math.isfinite(c) else None
                                                     for c in ci],
            "unreachable_share": float(np.mean(~np.isfinite(reps))) if len(reps) else None,
            "note": ("not reachable: the fitted asymptote is below the target" if not math.isfinite(n_star) else
                     "extrapolated" if n_star > x.max() else "interpolated"),
        }
    a_ci = interval(boot["a"])
    return {"fitted": True, "curve": chosen,
            "choice": ("lower AICc on the point means (weighted by their se); a curve with a parameter at its bound "
                       "only where both have one"),
            "fits": fits, "asymptote": fits[chosen]["params"]["a"], "asymptote_ci": a_ci,
            "asymptote_of_ceiling": fits[chosen]["params"]["a"] / ceiling if ceiling else None,
            "compute_per_member_s": float(slope), "compute_fixed_s": float(intercept),
            "bootstrap": {"resamples": n_boot, "converged": len(boot["a"]), "over": "queries"},
            "extrapolation": extrapolation}


# ---------------------------------------------------------------- the run

def frontier_path(store: ResultsStore, setting: settings_mod.Setting) -> Path:
    return store.root / "frontier" / f"{setting.name}.json"


def family_params(store: ResultsStore, setting: settings_mod.Setting, cls: type[Solver]) -> dict:
    """The hyper-parameters the committed, current single-model record chose on validation queries."""
    params, source = records.chosen_params(store, setting, cls)
    if source != records.CHOSEN_ON_VALIDATION:
        raise RunError(f"{setting.name} / {cls.name}: no current run record to take hyper-parameters chosen on "
                       f"validation queries from ({store.relative(records.run_path(store, setting.name, cls.name))}); "
                       f"run `tdabench run --setting {setting.name} --solver {cls.name} --explain zoo` first")
    return dict(params)


def run(store: ResultsStore, setting: settings_mod.Setting, classes: dict, cfg: FrontierConfig) -> dict:
    """Compute (or reuse) every unit the families need, assemble the points, fit the curves, write the file."""
    from ..setup.training import default_device

    log = cfg.log
    device = torch.device(cfg.device or default_device())
    root = gt_artifact.current(store, setting)
    if root is None:
        raise ArtifactError(f"no ground truth for {setting.name}; build it with `tdabench gt {setting.name}`")
    gt = records.open_current(store, setting, root)
    zoo = zoo_mod.load(store, setting)
    classes = dict(classes)
    if cfg.reference not in classes:
        raise RunError(f"the frontier pairs every point against one {cfg.reference}; pass its solver class too")
    measurement = setting.measurement
    ctx = Context(store, setting, gt, zoo, classes, device, measurement, gt_inputs_hash(gt))
    ctx.target_sha = targets_hash(ctx)
    params = {name: family_params(store, setting, cls) for name, cls in classes.items()}
    families = list(cfg.families)
    for fam in families:
        if fam.solver not in classes:
            raise RunError(f"family {fam.name}: solver {fam.solver!r} was not given")
        if fam.kind != "zoo" and classes[fam.solver].needs_trajectory and fam.kind != "knob":
            raise RunError(f"family {fam.name}: {fam.solver} attributes through the training run, so its checkpoints "
                           f"are no ensemble members; use it as a zoo family")
    available = len(zoo.models)
    if zoo.models != list(range(available)):
        raise ArtifactError(f"{zoo.root} holds models {zoo.models}, not 0..{available - 1}")
    points = [pt for fam in families for pt in plan(fam, params[fam.solver], zoo.epochs, available, cfg)]
    skipped = [n for n in cfg.members if n > available]
    if skipped:
        log(f"{setting.name}: the zoo holds {available} models; ensembles of {skipped} wait for "
            f"`tdabench zoo {setting.name} --models {max(skipped)}`")
    ref_member = Member(cfg.reference, json.dumps(params[cfg.reference], sort_keys=True), 0, zoo.epochs)
    members = [ref_member] + [m for pt in points for m in pt.members]
    units = ensure_units(ctx, members, cfg.progress, log)

    replicas = gt.complete_replicas()
    targets = (gt.target(measurement, "queries", replicas), gt.target(measurement, "validation", replicas))
    ceiling = noise_ceiling(gt.outputs[measurement][replicas][:, :, :len(gt.queries)]).get("lds_ceiling")
    training_s = {m["k"]: float(m["seconds"]) for m in zoo.manifest["models"]}
    ref_point = Point(Family(cfg.reference), "reference", [ref_member], 1, [0])
    reference = point_record(ctx, ref_point, units, targets, ceiling, None, training_s)
    reference = {"against": f"{cfg.reference} zoo 0", "explained": reference["explained"],
                 "target_sha256": ctx.target_sha, "query_columns": None, "per_query": reference["per_query"]}
    recs = [point_record(ctx, pt, units, targets, ceiling, reference, training_s) for pt in points]
    fits = {}
    for fam in families:
        if fam.kind == "ckpt":
            # a c-checkpoint ensemble takes other epochs for each c (members differ in quality and are not
            # exchangeable), and one model has only E checkpoints: no saturating curve in c is extrapolated
            fits[fam.name] = {"fitted": False, "why": f"checkpoint members are not exchangeable (each size takes "
                                                      f"other epochs) and one model has {zoo.epochs} checkpoints"}
            continue
        if fam.kind == "knob":
            continue
        fam_points = [r for r in recs if r["family"] == fam.name]
        fits[fam.name] = fit_family(fam_points, ceiling, cfg.bootstrap)
    used_models = sorted({k for pt in points for k in pt.models} | {0})
    doc = {
        "format": FRONTIER_VERSION, "setting": setting.name, "measurement": measurement,
        "what": "LDS against total compute: ensembles of zoo models, checkpoint ensembles and knob values, each "
                "member fitted and scored once (hyper-parameters: the single-model record's, chosen on validation "
                "queries); paired per query against the reference: one single-model row explaining zoo model 0",
        "compute": "Σ members' fit_s + score_s (reported queries) + training seconds of the zoo models beyond model 0",
        "reference": f"{cfg.reference} zoo 0", "ceiling": ceiling,
        "targets": {"lds": TARGET_LDS, "of_ceiling": TARGET_OF_CEILING},
        "params": params, "families": [asdict(f) | {"name": f.name} for f in families],
        "ground_truth": records.gt_reference(store, gt.root, replicas, 0), "target_sha256": ctx.target_sha,
        "zoo": {"root_hash": zoo.root_hash(), **zoo.reference(used_models)},
        "fingerprints": {name: records.section_fingerprint(classes[name], p) for name, p in params.items()},
        "points": recs, "fits": fits,
        "datamodels": _datamodels_status(store, setting),
        "environment": environment(device), "code_version": code_version(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    doc = records.seal(records._clean(doc))
    if cfg.write:
        write(frontier_path(store, setting), doc)
        log(f"wrote {store.relative(frontier_path(store, setting))}")
    return doc


def write(path: Path, doc: dict) -> None:
    """Atomically, with each per-query list on one line (a readable file, a tenth of the size)."""
    lists = {}

    def mark(obj):
        if isinstance(obj, dict):
            return {k: (_stash(v) if k == "per_query" and isinstance(v, list) else mark(v)) for k, v in obj.items()}
        if isinstance(obj, list):
            return [mark(v) for v in obj]
        return obj

    def _stash(v):
        key = f"@@per_query_{len(lists)}@@"
        lists[key] = json.dumps(v, separators=(",", ":"))
        return key

    text = json.dumps(mark(doc), indent=1)
    text = re.sub(r'"(@@per_query_\d+@@)"', lambda mt: lists[mt.group(1)], text)
    atomic_write_bytes(Path(path), (text + "\n").encode())


# ---------------------------------------------------------------- reading it back

def read(store: ResultsStore, setting: settings_mod.Setting) -> dict:
    """The frontier file of ``setting``, checked against its content hash and its points' summaries against their
    per-query values. Raises :class:`FrontierError` saying what is wrong."""
    path = frontier_path(store, setting)
    if not path.is_file():
        raise FrontierError(f"no frontier for {setting.name} ({store.relative(path)}); compute it with "
                            f"`tdabench frontier {setting.name}`")
    try:
        doc = json.loads(path.read_text())
    except ValueError as exc:
        raise FrontierError(f"{store.relative(path)} is not valid JSON ({exc}); restore it from git or recompute it "
                            f"with `tdabench frontier {setting.name}`") from None
    problems = []
    if doc.get(records.CONTENT_HASH) != records.content_hash(doc):
        problems.append(f"its {records.CONTENT_HASH} does not match its content (changed after it was written)")
    for p in doc.get("points", []):
        want = metrics.lds_summary(np.array([np.nan if v is None else v for v in p["per_query"]], float),
                                   doc.get("ceiling"))
        if not records._close(p["lds"]["mean"], want["mean"], records.SUMMARY_ATOL):
            problems.append(f"point {p['family']} {p['label']}: its mean is not its per-query values' mean")
    if problems:
        raise FrontierError(f"refused {store.relative(path)}: {'; '.join(problems[:3])}; restore it from git or "
                            f"recompute it with `tdabench frontier {setting.name}`")
    return doc


def stale_reasons(doc: dict, store: ResultsStore, setting: settings_mod.Setting, classes: dict | None = None
                  ) -> list[str]:
    """Why ``doc`` no longer describes what a fresh run would compute ([] = current): its ground truth (files, target)
    and the zoo models it explained must be unchanged, and, where ``classes`` are given, the solvers must compute
    what they computed (their behavioural probes)."""
    why = [] if doc.get("format") == FRONTIER_VERSION else [
        f"frontier format {doc.get('format')} != {FRONTIER_VERSION}: recompute it (`tdabench frontier {setting.name}`)"]
    root = gt_artifact.current(store, setting)
    used = doc.get("ground_truth") or {}
    if root is None:
        why.append("its ground truth is gone")
    else:
        now = records.gt_reference(store, root, None, 0)
        if now["path"] != used.get("path"):
            why.append(f"the ground truth is now {now['path']} (frontier used {used.get('path')})")
        elif now["root_hash"] != used.get("root_hash") or now["used_files_hash"] != used.get("used_files_hash"):
            why.append("the ground-truth files changed")
        elif now["replicas"] != used.get("replicas"):
            why.append(f"the ground truth now has complete replicas {now['replicas']} (frontier used "
                       f"{used.get('replicas')})")
    zoo_used = doc.get("zoo") or {}
    try:
        zoo = zoo_mod.load(store, setting, min_models=max(zoo_used.get("models") or [0]) + 1)
        if zoo.reference(zoo_used.get("models") or [0])["used_files_hash"] != zoo_used.get("used_files_hash"):
            why.append("the zoo models it explained changed")
    except ArtifactError as exc:
        why.append(f"its explained models are no longer in the zoo: {str(exc).splitlines()[0]}")
    for name, cls in (classes or {}).items():
        rec_fp = (doc.get("fingerprints") or {}).get(name)
        if rec_fp is None:
            continue
        for w in records._fingerprint_reasons(rec_fp, cls, doc["params"].get(name)):
            why.append(f"{name}: {w}")
    return why


def _datamodels_status(store: ResultsStore, setting: settings_mod.Setting) -> str:
    path = datamodels.path_of(store, setting)
    return (f"{store.relative(path)} present: drawn as one more family where current" if path.is_file() else
            f"no {store.relative(path)} yet: the figure adds datamodels as a family once it exists")


def datamodels_points(store: ResultsStore, setting: settings_mod.Setting, log=print) -> list[dict]:
    """The datamodels family's points ({members, compute_s, lds, lds_se, per_query}) where its result file is
    intact and current (:mod:`benchmark.studies.datamodels`), else [] (saying why when the file is there)."""
    try:
        result = datamodels.read(store, setting)
    except ArtifactError as exc:
        log(f"note: datamodels left out of the frontier: {exc}")
        return []
    if result is None:
        return []
    why = datamodels.stale_reasons(result, store, setting)
    if why:
        log(f"note: datamodels left out of the frontier: {store.relative(datamodels.path_of(store, setting))} is "
            f"not current ({'; '.join(why)})")
        return []
    return result["points"]


def figure_path(store: ResultsStore, setting: settings_mod.Setting) -> Path:
    return store.figures / f"frontier_{setting.name}.png"


def summary_table(doc: dict) -> str:
    """The points and fits as a plain-text table (what the command prints)."""
    lines = [f"{doc['setting']}: noise ceiling {doc['ceiling']:.3f}" if doc.get("ceiling") else doc["setting"],
             f"{'family':<18}{'point':<28}{'LDS':>15}{'of ceil':>9}{'Δ vs 1 EK-FAC':>20}{'wins':>6}{'compute s':>11}"
             f"{'models':>7}"]
    for p in doc["points"]:
        d = p.get("paired") or {}
        delta = (f"{d['difference']:+.4f} ± {d['se']:.4f}" if "difference" in d else "unpaired")
        wins = f"{d['wins']:.2f}" if "wins" in d else ""
        lines.append(f"{p['family']:<18}{p['label']:<28}{p['lds']['mean']:>8.4f} ± {p['lds']['se']:.3f}"
                     f"{p['lds']['of_ceiling'] or float('nan'):>9.3f}{delta:>20}{wins:>6}{p['compute_s']:>11.1f}"
                     f"{p['trained_models']:>7}")
    for name, fit in (doc.get("fits") or {}).items():
        if not fit.get("fitted"):
            lines.append(f"{name}: no fit ({fit.get('why')})")
            continue
        ci = fit.get("asymptote_ci") or [float("nan")] * 2
        other = [f"{c} {f['asymptote']:.3f}" + (f" (at bound: {', '.join(f['at_bound'])})" if f["at_bound"] else "")
                 for c, f in fit["fits"].items() if c != fit["curve"]]
        parts = [f"{name}: {fit['curve']} curve, asymptote {fit['asymptote']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
                 + (f" (other curve: {', '.join(other)})" if other else "")]
        for t, e in fit["extrapolation"].items():
            if e["reachable"]:
                mci = ("" if e["members_ci"] is None else
                       " [" + ", ".join("∞" if c is None else f"{c:.3g}" for c in e["members_ci"]) + "]")
                parts.append(f"{t}: {e['members']:.3g} members{mci}, {e['compute_s']:.3g} s ({e['note']})")
            else:
                parts.append(f"{t}: not reachable (asymptote below {e['target']:.3f})")
        lines.append("; ".join(parts))
    return "\n".join(lines)
