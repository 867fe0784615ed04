"""Floor 5: how close is each solver's inverse-curvature product to the exact one? (`make ihvp-error`)

On the settings small enough for a dense Gauss-Newton matrix (mnist-lr, mnist-mlp-small), for every solver and
damping λ, against the exact damped inverse r* = (G + λI)⁻¹ v (float64 Cholesky) on real query gradients
v = ∇f(z_q) (f = the correct-class margin, test points):

* ``rel_error`` ‖r − r*‖/‖r*‖ and ``cosine`` cos(r, r*), mean ± standard error over queries;
* ``score_spearman``: Spearman, over the training set, between the solver's scores −rᵀ∇L(zᵢ) and the exact
  ones, mean ± s.e. over queries (what attribution rankings feel);
* ``bound_rel``: the paper's §6 bound divided by ‖r*‖ — for LiSSA (§6.1) α‖M‖^{J+1}/(1 − ‖M‖)‖v‖ with
  ‖M‖ = ‖I − α(G + λI)‖ from G's exact spectrum; for K-FAC/EK-FAC (§6.2) ‖(Λ_true + λ)⁻¹ − (Λ̂ + λ)⁻¹‖‖v‖
  pairing both spectra in sorted order (the bound assumes Λ̂ and G share eigenvectors, which they do not);
* ``offdiag_mass`` = 1 − ‖Λ̂‖²/‖G‖²_F. For EK-FAC with every label (Λ̂ = diag of G's layer blocks in the
  Kronecker eigenbasis) it is the share of G that no diagonal in that basis holds — why the §6.2 "bound"
  can be exceeded; for the other variants only the relative gap in squared Frobenius norm;
* cost: ``seconds`` = fit + IHVP of the queries, counting damping-independent work (dense G, Kronecker
  factors) even when it was reused from the cache across the damping grid.

LiSSA's error against its depth J, beside the §6.1 bound, goes to ``results/ihvp_error_lissa.csv``.
The explained model is the ground truth's full-data model 0 when a complete artifact exists, else a model
trained with the setting's recipe and seed 0 (the ``model`` column says which).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from .. import core
from ..core.stats import mean_se, spearman_rows
from ..evaluate.solver import DAMPING_GRID, SolverError, Task
from ..groundtruth import artifact as gt_artifact
from ..setup import settings as settings_mod
from ..setup.artifacts import ArtifactError
from ..setup.store import ResultsStore

SETTINGS = ("mnist-lr", "mnist-mlp-small")
LISSA_DEPTHS = (1, 3, 10, 30, 100, 300, 1000)

# Rows: (label, solver, fixed parameters). The K-FAC family also runs with every label weighted by √p
# ("all"), which removes sampling noise from the factors: the gap between the two is Monte-Carlo error.
VARIANTS = (
    ("exact", "exact", {}),
    ("cg", "cg", {}),
    ("lissa", "lissa", {}),
    ("kfac", "kfac", {}),
    ("kfac (all labels)", "kfac", {"pseudo_labels": "all"}),
    ("ekfac", "ekfac", {}),
    ("ekfac (all labels)", "ekfac", {"pseudo_labels": "all"}),
    ("identity", "identity", {}),
)


def explained_model(store: ResultsStore, setting: settings_mod.Setting, seed: int = 0,
                    log=print) -> tuple[torch.nn.Module, str]:
    """The ground truth's full-data model 0 if a complete artifact exists (verified on load: a corrupt or
    stale one is an error, not a silent fallback), else a model trained here with the setting's recipe."""
    try:
        root = gt_artifact.latest(store.gt, setting)
    except ArtifactError as exc:
        reason = str(exc).split(";")[0]
    else:
        gt = gt_artifact.GroundTruth.open(root, setting, store=store)
        return gt.full_model(0), f"ground truth {store.relative(root)}, full-data model 0"
    from ..setup.training import evaluate, train

    data = setting.data()
    t0 = time.perf_counter()
    model = train(setting.model(seed), data.train_x, data.train_y, setting.recipe, seed).eval()
    acc = float(evaluate(model, data.test_x, data.test_y)["correct"].float().mean())
    log(f"{setting.name}: trained the explained model (recipe, seed {seed}) in {time.perf_counter() - t0:.0f} s, "
        f"test accuracy {acc:.4f} ({reason})")
    return model, f"trained with the setting's recipe, seed {seed} (test accuracy {acc:.4f})"


def _rows_metrics(r: torch.Tensor, ref: torch.Tensor, train_grads: torch.Tensor, ref_scores: np.ndarray) -> dict:
    r, ref = r.double(), ref.double()
    rel = ((r - ref).norm(dim=1) / ref.norm(dim=1)).numpy()
    cos = torch.nn.functional.cosine_similarity(r, ref, dim=1).numpy()
    rho = spearman_rows(-(r @ train_grads.T).numpy(), ref_scores)
    out = {}
    for key, values in (("rel_error", rel), ("cosine", cos), ("score_spearman", rho)):
        out[key], out[f"{key}_se"] = mean_se(values)
    return out


def _kfac_bound(eigs_true: torch.Tensor, eigs_approx: torch.Tensor, damping: float) -> float:
    """‖(Λ_true + λ)⁻¹ − (Λ̂ + λ)⁻¹‖ (operator norm of a diagonal), spectra paired in sorted order."""
    a = torch.sort(eigs_true.clamp_min(0), descending=True).values
    b = torch.sort(eigs_approx.flatten().double().cpu().clamp_min(0), descending=True).values
    return float((1 / (a + damping) - 1 / (b + damping)).abs().max())


def _lissa_norm_m(eigs: torch.Tensor, alpha: float, damping: float) -> float:
    """‖I − α(G + λI)‖ = max over G's spectrum of |1 − α(μ + λ)|."""
    lo, hi = float(eigs.min().clamp_min(0)), float(eigs.max())
    return max(abs(1 - alpha * (lo + damping)), abs(1 - alpha * (hi + damping)))


def run_setting(store: ResultsStore, setting: settings_mod.Setting, solvers: dict, dampings: list[float], queries: int,
                overrides: dict | None = None, log=print) -> tuple[list, list]:
    """Rows of IHVP error for every solver in ``solvers`` ({name: class}, ``exact`` among them) on one setting."""
    name = setting.name
    data = setting.data()
    model, source = explained_model(store, setting, log=log)
    task = Task(model, data.train_x, data.train_y, data.num_classes, "margin", seed=0)
    q_idx = np.sort(np.random.default_rng(0).choice(len(data.test_y), queries, replace=False))
    qx, qy = data.test_x[q_idx], data.test_y[q_idx]
    fm = core.FunctionalModel(model)
    v = core.per_sample_grads(fm, qx, qy, "margin")
    train_grads = core.per_sample_grads(fm, data.train_x, data.train_y, "loss").double()
    vnorm = v.double().norm(dim=1)
    P = fm.numel
    log(f"{name}: {P:,} parameters, {len(data.train_y):,} training examples, {queries} query gradients; "
        f"model: {source}")

    exact_cls = solvers["exact"]
    first = exact_cls(damping=dampings[0]).fit(task)
    log(f"{name}: dense G built in {first.info()['shared_seconds']:.0f} s")
    t0 = time.perf_counter()
    spectrum = torch.linalg.eigvalsh(first.matrix).cpu()
    log(f"{name}: spectrum of G in {time.perf_counter() - t0:.0f} s: largest {float(spectrum.max()):.4g}, "
        f"median {float(spectrum.median()):.3g}, {int((spectrum < 1e-10 * spectrum.max()).sum())} numerically zero")
    frob2 = float((spectrum ** 2).sum())
    refs = {}
    for lam in dampings:
        s = exact_cls(damping=lam).fit(task)
        refs[lam] = s.ihvp(v.double())
        residual = float(((refs[lam] @ s.matrix + lam * refs[lam]) - v.double()).norm(dim=1).max() / vnorm.min())
        if residual > 1e-8:
            raise RuntimeError(f"{name}: exact reference at λ={lam} has residual {residual:.2e}; not trustworthy")
    ref_scores = {lam: -(refs[lam] @ train_grads.T).numpy() for lam in dampings}

    base = {"setting": name, "parameters": P, "train_size": len(data.train_y), "queries": queries, "model": source}
    rows, lissa_rows = [], []
    for label, solver, fixed in VARIANTS:
        if solver not in solvers:
            continue
        cls = solvers[solver]
        for lam in dampings if "damping" in cls.defaults else [None]:
            params = {**fixed, **(overrides or {}).get(solver, {}), **({"damping": lam} if lam is not None else {})}
            s = cls(**params)
            t0 = time.perf_counter()
            s.fit(task)
            fit_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            if solver == "lissa":
                depths = sorted({d for d in LISSA_DEPTHS if d < int(s.params["depth"])} | {int(s.params["depth"])})
                path = s.ihvp_path(v, depths)
                r = path[int(s.params["depth"])]
            else:
                r = s.ihvp(v)
            ihvp_s = time.perf_counter() - t0
            info = s.info()
            # count the damping-independent work once per configuration, also when it came from the cache
            seconds = fit_s - s._built_seconds + s._shared_seconds + ihvp_s
            for ref_lam in dampings if lam is None else [lam]:
                ref = refs[ref_lam]
                # identity has no damping and no scale: compare its direction at the λ→∞ scale v/λ
                est = r.double() / ref_lam if lam is None else r
                row = {**base, "solver": label, "damping": ref_lam, **_rows_metrics(est, ref, train_grads, ref_scores[ref_lam]),
                       "seconds": seconds, "fit_seconds": fit_s, "ihvp_seconds": ihvp_s,
                       "shared_seconds": info.get("shared_seconds", 0.0), "bound_rel": math.nan,
                       "offdiag_mass": math.nan, "params": json.dumps(s.params), "info": json.dumps(info)}
                if solver == "lissa":
                    norm_m = _lissa_norm_m(spectrum, s.alpha, ref_lam)
                    for J in depths:
                        bound = (s.alpha * norm_m ** (J + 1) / (1 - norm_m) if norm_m < 1 else math.inf) * vnorm
                        rel, rel_se = mean_se(((path[J].double() - ref).norm(dim=1) / ref.norm(dim=1)).numpy())
                        lissa_rows.append({"setting": name, "damping": ref_lam, "depth": J, "rel_error": rel,
                                           "rel_error_se": rel_se, "bound_rel": float((bound / ref.norm(dim=1)).mean()),
                                           "alpha": s.alpha, "norm_M": norm_m, "batch_size": s.params["batch_size"]})
                    J = int(s.params["depth"])
                    row["bound_rel"] = next(x["bound_rel"] for x in lissa_rows[::-1] if x["depth"] == J)
                if solver in ("kfac", "ekfac"):
                    approx = torch.cat([(b["lam_y"][:, None] * b["lam_a"][None, :]).flatten() for b in s.bases.values()]
                                       ) if solver == "kfac" else torch.cat([e.flatten() for e in s.eigenvalues.values()])
                    row["bound_rel"] = float((_kfac_bound(spectrum, approx, ref_lam) * vnorm / ref.norm(dim=1)).mean())
                    row["offdiag_mass"] = 1 - float((approx.double() ** 2).sum()) / frob2
                rows.append(row)
                log(f"  {name:16s} {label:19s} λ={ref_lam:<7g} rel.err {row['rel_error']:9.3g}  cos {row['cosine']:.4f}  "
                    f"Spearman {row['score_spearman']:.4f}  {seconds:7.1f} s"
                    + (f"  bound {row['bound_rel']:.3g}" if math.isfinite(row["bound_rel"]) else ""))
    return rows, lissa_rows


def run(store: ResultsStore, settings: list[settings_mod.Setting], solvers: dict, dampings: list[float] | None = None,
        queries: int = 100, overrides: dict | None = None, log=print):
    """Every solver of ``solvers`` ({name: class}) against the exact inverse on each setting; writes
    ``<store>/ihvp_error.csv`` and ``ihvp_error_lissa.csv`` and returns both tables. ``overrides`` fixes solver
    parameters, e.g. ``{"lissa": {"depth": 300}}``."""
    import pandas as pd

    if "exact" not in solvers:
        raise SolverError("the IHVP-error benchmark needs the exact solver (solvers/exact.py)")
    store.check_writable(store.root)
    dampings = sorted(dampings or DAMPING_GRID)
    rows, lissa_rows = [], []
    for setting in settings:
        r, lr = run_setting(store, setting, solvers, dampings, queries, overrides, log)
        rows += r
        lissa_rows += lr
    df = pd.DataFrame(rows)
    lissa = pd.DataFrame(lissa_rows, columns=["setting", "damping", "depth", "rel_error", "rel_error_se", "bound_rel",
                                              "alpha", "norm_M", "batch_size"])
    out = csv_paths(store)
    df.to_csv(out[0], index=False)
    lissa.to_csv(out[1], index=False)
    log(f"wrote {out[0]} and {out[1]}")
    return df, lissa


def csv_paths(store: ResultsStore) -> tuple[Path, Path]:
    return store.root / "ihvp_error.csv", store.root / "ihvp_error_lissa.csv"
