"""Floor 5: the paper's qualitative evidence as data — which training images each solver blames.

- :func:`influential` (the paper's Fig. 1 and appendix Figs. 4-7): for each chosen query, a solver's most
  positively and most negatively influential training points, with their scores τ and labels.
- :func:`self_influence` (Fig. 2): the top-k self-influence training points of the *uncorrupted* training set,
  with their labels and what the explained model predicts.

Both explain the ground truth's full-data model 0 with the hyper-parameters chosen on validation queries for
LDS (from the solver's run record when it is fresh), else the solver's defaults, and say which. The results go
to ``<store>/qualitative/<setting>/<solver>.json``; figures and the report's gallery draw from that file.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import numpy as np
import torch

from ..evaluate import engine, records
from ..evaluate.solver import Task
from ..groundtruth import artifact as gt_artifact
from ..groundtruth.artifact import GroundTruth
from ..setup import settings as settings_mod
from ..setup.artifacts import ArtifactError, read_json, write_json
from ..setup.store import ResultsStore


def explained(store: ResultsStore, setting: settings_mod.Setting) -> GroundTruth:
    root = gt_artifact.current(store, setting)
    if root is None:
        raise ArtifactError(f"no ground truth for {setting.name!r}: its full-data model is what the figures explain; "
                            f"build it with `tdabench gt {setting.name}`")
    return GroundTruth.open(root, setting, allow_incomplete=True, store=store)


def pick_queries(gt: GroundTruth, n: int, seed: int = 0) -> np.ndarray:
    """A seeded choice of reported test queries (test-set indices)."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(gt.queries, size=min(n, len(gt.queries)), replace=False))


def path(store: ResultsStore, setting_name: str, solver_name: str) -> Path:
    return store.qualitative / setting_name / f"{solver_name}.json"


def read(store: ResultsStore, setting_name: str, solver_name: str) -> dict | None:
    p = path(store, setting_name, solver_name)
    return read_json(p) if p.is_file() else None


def _points(idx, tau, labels) -> list[dict]:
    return [{"index": int(i), "label": int(labels[i]), "score": float(tau[i])} for i in idx]


def influential(store: ResultsStore, setting: settings_mod.Setting, cls, queries: list[int] | None = None, *,
                n_queries: int = 6, top: int = 8, device=None, log=print) -> dict:
    """The ``top`` most helpful and most harmful training points of each query (test-set indices)."""
    from ..setup.training import default_device

    device = torch.device(device or default_device())
    gt = explained(store, setting)
    model = gt.full_model(0)
    data = setting.data()
    q_idx = np.asarray(queries if queries is not None else pick_queries(gt, n_queries), dtype=np.int64)
    qx, qy = data.test_x[q_idx].to(device), data.test_y[q_idx].to(device)
    tx, ty = data.train_x.to(device), data.train_y.to(device)
    params, source = records.chosen_params(store, setting, cls)
    engine.check_applicable(cls, model, params)
    log(f"qualitative: {setting.name} / {cls.name} {params} ({source}): scores for {len(q_idx)} queries")
    solver = cls(**params).fit(Task(model.to(device), tx, ty, data.num_classes, setting.measurement, device))
    scores = solver.scores(qx, qy, tx, ty).detach().cpu().double().numpy()
    labels = data.train_y.numpy()
    out = []
    for row, q in zip(scores, q_idx):
        order = np.argsort(-row, kind="stable")
        out.append({"index": int(q), "label": int(data.test_y[q]), "positive": _points(order[:top], row, labels),
                    "negative": _points(order[::-1][:top], row, labels)})
    return {"setting": setting.name, "solver": cls.name, "params": params, "params_source": source,
            "measurement": setting.measurement, "explained": f"{store.relative(gt.root)}, full-data model 0",
            "ground_truth_root_hash": gt.root_hash(), "queries": out}


def self_influence(store: ResultsStore, setting: settings_mod.Setting, cls, *, top: int = 20, device=None,
                   log=print) -> dict:
    """The ``top`` training points of the uncorrupted training set by self-influence, with labels and the
    explained model's predictions."""
    from ..setup.training import default_device

    device = torch.device(device or default_device())
    gt = explained(store, setting)
    model = gt.full_model(0)
    data = setting.data()
    tx, ty = data.train_x.to(device), data.train_y.to(device)
    params, source = records.chosen_params(store, setting, cls)
    engine.check_applicable(cls, model, params)
    log(f"qualitative: {setting.name} / {cls.name} {params} ({source}): self-influence of {len(ty)} training points")
    fitted = cls(**params).fit(Task(model.to(device), tx, ty, data.num_classes, "loss", device))
    values = fitted.self_scores(tx, ty).detach().cpu().double().numpy()
    order = np.argsort(-values, kind="stable")[:top]
    with torch.no_grad():
        pred = model.to(device)(tx[torch.from_numpy(order)]).argmax(-1).cpu().tolist()
    return {"setting": setting.name, "solver": cls.name, "params": params, "params_source": source,
            "explained": f"{store.relative(gt.root)}, full-data model 0",
            "top": [{"rank": r + 1, "index": int(i), "label": int(data.train_y[i]), "predicted": int(p),
                     "score": float(values[i])} for r, (i, p) in enumerate(zip(order, pred))]}


def save(store: ResultsStore, setting: settings_mod.Setting, cls, influence: dict | None = None,
         selfs: dict | None = None) -> Path:
    """Write (or update) ``<store>/qualitative/<setting>/<solver>.json``."""
    p = path(store, setting.name, cls.name)
    current = read_json(p) if p.is_file() else {}
    if influence is not None:
        current["influential"] = influence
    if selfs is not None:
        current["self_influence"] = selfs
    current["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    write_json(p, records._clean(current))
    return p
