"""Floor 5: how far each solver's scores are from exact unrolled differentiation (`tdabench unroll-error`).

On a setting small enough for the exact reference (solvers/unrolled.py: the reverse-mode adjoint of the replayed
SGD run), on the zoo's model k — whose trajectory SOURCE and the reference both use — the reference scores τ* and
each solver's τ on the same reported queries:

* ``pearson`` / ``spearman``: per query, over the training set, mean ± s.e. over queries (what a ranking feels);
* ``rel_error`` ‖τ − τ*‖/‖τ*‖ per query, and ``slope`` ⟨τ, τ*⟩/⟨τ, τ⟩ per query (τ* ≈ slope·τ: the scale);
* ``seconds``: the solver's fit and scores of these queries, damping-independent work included;
* ``scale``: the median |τ| (the reference's too): where the linearised SGD recursion is unstable (early
  training at a large learning rate, a batch Hessian past the stability edge) the exact first-order response
  grows exponentially with the steps it crosses, and the reference is no longer a scale any solver could match.

``reference_epochs=k`` differentiates through the last k epochs only (the perturbation starts there; every
solver is still the one that attributes through all of training): the ``reference`` column names the window,
and each (setting, reference) keeps its own rows.

Rows: every solver asked for with the parameters chosen on validation queries in its fresh run record (else its
defaults), and for SOURCE also each segment count of its grid and one segment per epoch, at the chosen damping,
and the other gradient estimator — the approximation error as the stationarity assumption is relaxed.
Results go to ``results/unroll_error.csv`` (rows of other settings are kept).
"""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import torch

from ..core.stats import mean_se, spearman_rows
from ..evaluate import records
from ..evaluate.engine import Explained
from ..evaluate.solver import Solver, Task
from ..groundtruth import artifact as gt_artifact
from ..groundtruth import zoo as zoo_mod
from ..setup import settings as settings_mod
from ..setup.artifacts import atomic_write_bytes
from ..setup.store import ResultsStore

SETTINGS = ("mnist-lr", "mnist-mlp-small")


def csv_path(store: ResultsStore):
    return store.root / "unroll_error.csv"


def variants(cls: type[Solver], chosen: dict, epochs: int) -> list[tuple[str, dict]]:
    """(label, parameters) rows for one solver: its chosen configuration, and for a segmented solver every
    segment count of its grid plus one segment per epoch, and each gradient estimator."""
    rows = [(f"{cls.name} (chosen)", chosen)]
    if "segments" in cls.defaults:
        for L in sorted({*cls.parameters.get("segments", []), epochs}):
            if L <= epochs and L != chosen.get("segments"):
                rows.append((f"{cls.name} L={L}", {**chosen, "segments": L}))
        for g in ("end", "mean"):
            if g != chosen.get("gradients"):
                rows.append((f"{cls.name} (chosen, gradients={g})", {**chosen, "gradients": g}))
    return rows


def _agreement(tau: np.ndarray, ref: np.ndarray) -> dict:
    pearson = np.array([np.corrcoef(t, r)[0, 1] for t, r in zip(tau, ref)])
    slope = (tau * ref).sum(1) / (tau * tau).sum(1)
    rel = np.linalg.norm(tau - ref, axis=1) / np.linalg.norm(ref, axis=1)
    out = {"scale": float(np.median(np.abs(tau)))}
    for name, values in (("pearson", pearson), ("spearman", spearman_rows(tau, ref)), ("rel_error", rel),
                         ("slope", slope)):
        out[name], out[f"{name}_se"] = mean_se(values)
    return out


def run(store: ResultsStore, setting: settings_mod.Setting, reference: type[Solver], solvers: list[type[Solver]],
        queries: int = 200, model: int = 0, reference_epochs: int | None = None, device=None,
        log=print) -> pd.DataFrame:
    """Rows of agreement with ``reference`` (the unrolled solver, through the last ``reference_epochs`` epochs or
    all of training) for ``solvers`` on one setting; also written to :func:`csv_path`, replacing that setting's
    earlier rows with the same reference window."""
    device = torch.device(device or "cpu")
    zoo = zoo_mod.load(store, setting, min_models=model + 1)
    explained = Explained.from_zoo(zoo, 1, first=model)
    data = setting.data()
    gt = gt_artifact.load(store, setting)
    cols = np.sort(np.random.default_rng(0).choice(len(gt.queries), min(queries, len(gt.queries)), replace=False))
    q = torch.from_numpy(gt.queries[cols])
    qx, qy = data.test_x[q].to(device), data.test_y[q].to(device)
    tx, ty = data.train_x.to(device), data.train_y.to(device)

    def task():
        return Task(explained.models[0].to(device), tx, ty, data.num_classes, setting.measurement, device,
                    seed=model, trajectory=explained.trajectories[0])

    def timed(cls, params, t):
        t0 = time.perf_counter()
        s = cls(**params).fit(t)
        scores = s.scores(qx, qy, tx, ty).double().cpu().numpy()
        seconds = time.perf_counter() - t0 - s._built_seconds + s._shared_seconds
        return scores, seconds, s

    epochs = explained.trajectories[0].epochs
    if reference_epochs is not None and not 1 <= reference_epochs <= epochs:
        raise ValueError(f"reference_epochs must be between 1 and the run's {epochs} epochs, not {reference_epochs}")
    whole = reference_epochs in (None, epochs)
    window = f"all {epochs} epochs" if whole else f"last {reference_epochs} of {epochs} epochs"
    ref_params = {**reference.defaults, "epochs": reference_epochs}
    base = {"setting": setting.name, "reference": f"{reference.name}, {window}", "model": f"zoo k{model:02d}",
            "queries": len(cols), "train": len(ty)}
    ref, ref_s, ref_solver = timed(reference, ref_params, task())
    log(f"{setting.name}: unrolled reference ({window}) for {len(cols)} queries in {ref_s:.0f} s "
        f"({ref_solver.info().get('steps_unrolled')} steps), median |τ| {np.median(np.abs(ref)):.3g}")
    rows = [{**base, "solver": reference.name, "params": json.dumps(ref_params), "seconds": ref_s,
             **_agreement(ref, ref)}]
    for cls in solvers:
        chosen, source = records.chosen_params(store, setting, cls)
        shared = task()  # one task per solver: its variants share damping-independent work through its cache
        for label, params in variants(cls, {**cls.defaults, **chosen}, epochs):
            tau, seconds, _ = timed(cls, params, shared)
            row = {**base, "solver": label, "params": json.dumps(params, sort_keys=True), "params_from": source,
                   "seconds": seconds, **_agreement(tau, ref)}
            log(f"{setting.name} / {label}: Pearson {row['pearson']:.3f} ± {row['pearson_se']:.3f}, Spearman "
                f"{row['spearman']:.3f}, rel. error {row['rel_error']:.3f}, slope {row['slope']:.3f} ({seconds:.0f} s)")
            rows.append(row)
    df = pd.DataFrame(rows)
    path = csv_path(store)
    if path.is_file():
        old = pd.read_csv(path)
        # rows written before the reference column existed all differentiated through the whole run
        full = f"{reference.name}, all {epochs} epochs"
        here = old["setting"] == setting.name
        ref_col = old["reference"] if "reference" in old else pd.Series(None, index=old.index, dtype=object)
        old["reference"] = ref_col.where(~here | ref_col.notna(), full)
        same = here & (old["reference"] == base["reference"])
        df = pd.concat([old[~same], df], ignore_index=True)
    atomic_write_bytes(path, df.to_csv(index=False).encode())
    return df
