"""Floor 5: remove-top-k (TRAK's brittleness test, Ilyas et al.) — delete the training points a solver blames
for a query's margin, retrain, and see whether the margin really falls and the prediction flips.

For a fixed seeded sample of reported queries that the explained model (the ground truth's full-data model 0)
classifies correctly, each solver scores every training point on the query's margin with the hyper-parameters
chosen for LDS on validation queries (``records.chosen_params``); its k most positively influential points
(largest τ: up-weighting them raises the margin) are removed for every k of a grid, and the model is retrained
with the explained model's recipe, seeds 0..S-1 (seed 0 is the explained model's own;
:mod:`benchmark.groundtruth.retrain`). The baseline removes k random points (nested, one permutation per query).

Per (query, k, seed j) the *margin drop* is margin(full-data model j) − margin(retrained model j), seed-matched,
and the prediction *flips* when the full-data model j classifies the query correctly and the retrained one does
not. Per solver: mean drop vs k, flip rate vs k, and the smallest k of the grid that flips each (query, seed).

Results: ``<store>/counterfactual/<setting>_remove_top_k.csv`` (one row per method, query, k, seed),
``..._summary.csv`` (per method and k; the leaderboard's columns come from it) and ``....json`` (what was run).
"""

from __future__ import annotations

import datetime as _dt
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..core.stats import mean_se
from ..evaluate import engine, records
from ..evaluate.engine import RANDOM
from ..evaluate.solver import Task, scores_many
from ..groundtruth import retrain
from ..setup import settings as settings_mod
from ..setup.artifacts import write_json
from ..setup.store import ResultsStore
from . import qualitative

K_GRID = (10, 30, 100, 300, 1000)
QUERY_SEED = 0
RANDOM_SEED = 0
# The leaderboard's columns: margin drop at k = 100 and 1000, flip rate at 1000, median smallest flipping k.
LEADERBOARD_K = (100, 1000)


def paths(store: ResultsStore, setting_name: str) -> dict[str, Path]:
    stem = store.counterfactual / f"{setting_name}_remove_top_k"
    return {"rows": stem.with_suffix(".csv"), "summary": Path(f"{stem}_summary.csv"), "meta": stem.with_suffix(".json")}


def pick_queries(queries: np.ndarray, correct: np.ndarray, n: int, seed: int = QUERY_SEED) -> np.ndarray:
    """The first ``n`` of a seeded permutation of the reported queries the explained model classifies correctly
    (a flip is then defined), as test-set indices."""
    order = np.random.default_rng(seed).permutation(len(queries))
    chosen = [int(queries[i]) for i in order if correct[i]][:n]
    if len(chosen) < n:
        raise ValueError(f"only {len(chosen)} reported queries are classified correctly; asked for {n}")
    return np.asarray(chosen, dtype=np.int64)


def tag(method: str, params: dict, query: int, k: int) -> str:
    """The plan's name for 'method's top k for this query' (the parameters are part of it: other parameters,
    another question)."""
    return f"top-k|{method}|{json.dumps(params, sort_keys=True)}|query={query}|k={k}"


def random_sets(n: int, queries: np.ndarray, ks: list[int], seed: int = RANDOM_SEED) -> dict[tuple[int, int], np.ndarray]:
    """k random training points per query, nested over k (the first k of one seeded permutation per query)."""
    out = {}
    for q in queries:
        perm = np.random.default_rng([seed, int(q)]).permutation(n)
        out.update({(int(q), k): perm[:k] for k in ks})
    return out


def run(store: ResultsStore, setting: settings_mod.Setting, methods: list, *, queries: int = 20,
        ks: tuple[int, ...] = K_GRID, seeds: int = 3, executor=None, device=None, units_per_job: int = 1,
        max_units: int | None = None, progress: bool = True, log=print) -> dict:
    """Plan (scores only for what the artifact's plan lacks), retrain what is missing, and tabulate. Returns
    ``{"rows", "summary", "meta"}`` (two DataFrames and a dict); :func:`write` saves them."""
    from ..setup.training import default_device, evaluate

    device = torch.device(device or default_device())
    ks = sorted(set(int(k) for k in ks))
    gt = qualitative.explained(store, setting)
    data = setting.data()
    n = len(data.train_y)
    if not ks or ks[0] < 1 or ks[-1] >= n:
        raise ValueError(f"every k must be in 1..{n - 1} ({setting.name} has {n} training points), got {ks}")
    model = gt.full_model(0).to(device)
    ev = evaluate(model, data.test_x[gt.queries].to(device), data.test_y[gt.queries].to(device))
    q_idx = pick_queries(gt.queries, ev["correct"].numpy(), queries)
    art = retrain.prepare(setting, retrain.clean_base(store, gt, seeds), q_idx, store=store,
                          family=store.counterfactual, log=log)
    plan, wanted, grids = art.plan, {}, {}
    tx, ty = data.train_x.to(device), data.train_y.to(device)
    qx, qy = data.test_x[q_idx].to(device), data.test_y[q_idx].to(device)
    fitted = []
    for cls in methods:
        params, source = records.chosen_params(store, setting, cls)
        tags = {(int(q), k): tag(cls.name, params, int(q), k) for q in q_idx for k in ks}
        grids[cls.name] = {"params": params, "params_source": source, "tags": tags}
        if all(t in plan for t in tags.values()):
            continue
        engine.check_applicable(cls, model, params)
        log(f"remove-top-k: {setting.name} / {cls.name} {params} ({source}): fit on the explained model")
        t0 = time.perf_counter()
        fitted.append(cls(**params).fit(Task(model, tx, ty, data.num_classes, setting.measurement, device)))
        grids[cls.name]["fit_s"] = time.perf_counter() - t0
    if fitted:  # solvers with the same train features share the pass over the training set (the dominant cost)
        log(f"remove-top-k: {setting.name}: scores of {len(q_idx)} queries by {', '.join(s.name for s in fitted)}")
        t0 = time.perf_counter()
        for solver, scores in zip(fitted, scores_many(fitted, qx, qy, tx, ty)):
            grids[solver.name]["score_s"] = time.perf_counter() - t0
            for row, q in zip(scores.detach().double().cpu().numpy(), q_idx):
                order = np.argsort(-row, kind="stable")
                wanted.update({grids[solver.name]["tags"][int(q), k]: retrain.Experiment("remove", order[:k])
                               for k in ks})
    rand = random_sets(n, q_idx, ks)
    tags = {key: tag(RANDOM.name, {"seed": RANDOM_SEED}, *key) for key in rand}
    grids[RANDOM.name] = {"params": {"seed": RANDOM_SEED}, "params_source": "k random points", "tags": tags}
    wanted.update({t: retrain.Experiment("remove", rand[key]) for key, t in tags.items() if t not in plan})
    t0 = time.perf_counter()
    art = retrain.build(art, wanted, store=store, executor=executor, device=str(device), units_per_job=units_per_job,
                        max_units=max_units, progress=progress, log=log)
    wall = time.perf_counter() - t0
    ref = art.plan[retrain.REFERENCE]
    reproduction = None
    if art.done(ref, 0):  # the reference at seed 0 retrains the explained model: how closely, on these queries
        at = {int(q): i for i, q in enumerate(gt.queries)}
        explained = ev["margin"].numpy()[[at[int(q)] for q in q_idx]]
        reproduction = float(np.abs(art.unit(ref, 0)["margins"] - explained).max())
    rows = table(art, grids, q_idx, ks)
    meta = {"setting": setting.name, "explained": f"{store.relative(gt.root)}, full-data model 0",
            "ground_truth_root_hash": gt.root_hash(), "queries": [int(q) for q in q_idx], "ks": ks,
            "seeds": art.seeds, "artifact": {**art.reference(), "path": store.relative(art.root)},
            "reference_reproduction_max_abs_margin": reproduction, "retrain_wall_s": wall,
            "methods": {m: {k: v for k, v in g.items() if k != "tags"} for m, g in grids.items()},
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    return {"rows": rows, "summary": summarize(rows, ks, meta), "meta": meta}


def table(art: retrain.Retrained, grids: dict, q_idx: np.ndarray, ks: list[int]) -> pd.DataFrame:
    """One row per (method, query, k, seed) whose retrained model and reference are both done."""
    plan, ref = art.plan, art.plan[retrain.REFERENCE]
    position = {int(q): i for i, q in enumerate(art.evaluation)}
    out = []
    for j, seed in enumerate(art.seeds):
        if not art.done(ref, j):
            continue
        full = art.unit(ref, j)
        for method, grid in grids.items():
            for (q, k), t in grid["tags"].items():
                exp = plan.get(t)
                if exp is None or not art.done(exp, j):
                    continue
                u, i = art.unit(exp, j), position[q]
                out.append({"method": method, "query": q, "k": k, "seed_index": j, "seed": seed, "experiment": exp,
                            "margin_full": float(full["margins"][i]), "margin_retrained": float(u["margins"][i]),
                            "drop": float(full["margins"][i] - u["margins"][i]),
                            "correct_full": bool(full["correct"][i]), "correct_retrained": bool(u["correct"][i]),
                            "flipped": bool(full["correct"][i] and not u["correct"][i]),
                            "retrain_s": float(u["seconds"])})
    return pd.DataFrame(out, columns=["method", "query", "k", "seed_index", "seed", "experiment", "margin_full",
                                      "margin_retrained", "drop", "correct_full", "correct_retrained", "flipped",
                                      "retrain_s"])


def smallest_flipping_k(rows: pd.DataFrame, ks: list[int]) -> pd.DataFrame:
    """Per (method, query, seed) with every k retrained: the smallest k of the grid whose retrained model no
    longer classifies the query correctly (inf: none does), for pairs the full-data model gets right."""
    out = []
    for (method, q, j), part in rows[rows["correct_full"]].groupby(["method", "query", "seed_index"]):
        if sorted(part["k"]) != ks:
            continue
        flipped = part.sort_values("k")
        hit = flipped[flipped["flipped"]]
        out.append({"method": method, "query": q, "seed_index": j,
                    "min_k": float(hit["k"].iloc[0]) if len(hit) else float("inf")})
    return pd.DataFrame(out, columns=["method", "query", "seed_index", "min_k"])


def summarize(rows: pd.DataFrame, ks: list[int], meta: dict) -> pd.DataFrame:
    """Per (method, k): mean margin drop ± se over (query, seed), flip rate among pairs the full-data model gets
    right, and per method the median smallest flipping k (inf when most pairs never flip)."""
    mins = smallest_flipping_k(rows, ks)
    out = []
    for (method, k), part in rows.groupby(["method", "k"], sort=False):
        drop, se = mean_se(part["drop"].to_numpy())
        eligible = part[part["correct_full"]]
        m = mins[mins["method"] == method]["min_k"]
        g = meta["methods"][method]
        out.append({"setting": meta["setting"], "method": method, "k": int(k), "pairs": len(part),
                    "queries": part["query"].nunique(), "seeds": part["seed_index"].nunique(),
                    "drop_mean": drop, "drop_se": se,
                    "flip_rate": float(eligible["flipped"].mean()) if len(eligible) else float("nan"),
                    "flip_pairs": len(eligible), "min_k_median": float(np.median(m)) if len(m) else float("nan"),
                    "params": json.dumps(g["params"], sort_keys=True), "params_source": g["params_source"],
                    "artifact": meta["artifact"]["path"], "root_hash": meta["artifact"]["root_hash"],
                    "complete": meta["artifact"]["complete"]})
    return pd.DataFrame(out)


def save(store: ResultsStore, paths: dict[str, Path], result: dict) -> dict[str, Path]:
    """Write a study's ``{"rows", "summary", "meta"}`` to its ``paths`` (two CSVs and a JSON)."""
    store.check_writable(paths["rows"].parent)
    result["rows"].to_csv(paths["rows"], index=False, float_format="%.6g")
    result["summary"].to_csv(paths["summary"], index=False, float_format="%.6g")
    write_json(paths["meta"], records._clean(result["meta"]))
    return paths


def write(store: ResultsStore, result: dict) -> dict[str, Path]:
    return save(store, paths(store, result["meta"]["setting"]), result)


def leaderboard_columns(store: ResultsStore, setting_name: str) -> dict[str, dict]:
    """{method: {rtk_drop_100, rtk_drop_1000, rtk_flip_1000, rtk_min_k, rtk_params}} from the stored summary
    (k values the setting's grid lacks stay None)."""
    p = paths(store, setting_name)["summary"]
    if not p.is_file():
        return {}
    summary = pd.read_csv(p)
    out = {}
    for method, part in summary.groupby("method"):
        by_k = part.set_index("k")
        row = {f"rtk_drop_{k}": float(by_k.loc[k, "drop_mean"]) if k in by_k.index else None for k in LEADERBOARD_K}
        big = LEADERBOARD_K[-1]
        row[f"rtk_flip_{big}"] = float(by_k.loc[big, "flip_rate"]) if big in by_k.index else None
        row["rtk_min_k"] = float(part["min_k_median"].iloc[0])
        row["rtk_params"] = json.loads(part["params"].iloc[0])
        out[method] = row
    return out
