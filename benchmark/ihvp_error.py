"""Floor 6: how close is each solver's inverse-curvature product to the exact one? (`make ihvp-error`)

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

from . import curvature, groundtruth, solver_api
from . import settings as settings_mod
from .plugins import REPO_ROOT
from .stats import mean_se, spearman_rows

SETTINGS = ("mnist-lr", "mnist-mlp-small")
RESULTS = REPO_ROOT / "results"
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


def explained_model(setting: settings_mod.Setting, seed: int = 0, log=print) -> tuple[torch.nn.Module, str]:
    """The ground truth's full-data model 0 if a complete artifact exists (verified on load: a corrupt or
    stale one is an error, not a silent fallback), else a model trained here with the setting's recipe."""
    try:
        root = groundtruth.latest(setting.name)
    except groundtruth.ArtifactError as exc:
        reason = str(exc).split(";")[0]
    else:
        gt = groundtruth.GroundTruth.open(root, setting)
        return gt.full_model(setting, 0), f"ground truth {root.relative_to(REPO_ROOT)}, full-data model 0"
    from .training import evaluate, train

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


def run_setting(name: str, solvers: list[str], dampings: list[float], queries: int, overrides: dict | None = None,
                log=print) -> tuple[list, list]:
    setting = settings_mod.get(name)
    data = setting.data()
    model, source = explained_model(setting, log=log)
    task = solver_api.Task(model, data.train_x, data.train_y, data.num_classes, "margin", seed=0)
    q_idx = np.sort(np.random.default_rng(0).choice(len(data.test_y), queries, replace=False))
    qx, qy = data.test_x[q_idx], data.test_y[q_idx]
    fm = curvature.FunctionalModel(model)
    v = curvature.per_sample_grads(fm, qx, qy, "margin")
    train_grads = curvature.per_sample_grads(fm, data.train_x, data.train_y, "loss").double()
    vnorm = v.double().norm(dim=1)
    P = fm.numel
    log(f"{name}: {P:,} parameters, {len(data.train_y):,} training examples, {queries} query gradients; "
        f"model: {source}")

    exact_cls = solver_api.get("exact")
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
        cls = solver_api.get(solver)
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


def plot(df, lissa, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    names = list(dict.fromkeys(df["setting"]))
    labels = [x for x in dict.fromkeys(df["solver"]) if x != "exact"]  # exact is the reference
    palette = dict(zip(labels, sns.color_palette("tab10", len(labels))))
    fig, axes = plt.subplots(len(names), 4, figsize=(22, 5.2 * len(names)), squeeze=False)
    for i, name in enumerate(names):
        d = df[df["setting"] == name]
        ax = axes[i, 0]
        for label in labels:
            s = d[d["solver"] == label]
            ax.errorbar(s["damping"], s["rel_error"], yerr=s["rel_error_se"], marker="o", label=label,
                        color=palette[label], ls="--" if label == "identity" else "-", capsize=2)
        ax.set(xscale="log", yscale="log", xlabel="damping λ", ylabel="‖r − r*‖ / ‖r*‖",
               title=f"{name}: IHVP relative error vs exact (identity at scale 1/λ)")
        ax.legend(fontsize=8)
        ax = axes[i, 1]
        for label in labels:
            s = d[d["solver"] == label]
            ax.errorbar(s["damping"], s["score_spearman"], yerr=s["score_spearman_se"], marker="o", label=label,
                        color=palette[label], ls="--" if label == "identity" else "-", capsize=2)
        ax.set(xscale="log", xlabel="damping λ", ylabel="Spearman vs exact-inverse scores (mean ± s.e.)",
               title=f"{name}: agreement of influence scores with exact", ylim=(min(0.0, float(d["score_spearman"].min())), 1.02))
        ax.legend(fontsize=8)
        ax = axes[i, 2]
        ls = lissa[lissa["setting"] == name]
        colors = sns.color_palette("viridis", ls["damping"].nunique())
        for c, (lam, s) in zip(colors, ls.groupby("damping")):
            ax.plot(s["depth"], s["rel_error"], marker="o", color=c, label=f"λ={lam:g} measured")
            ax.plot(s["depth"], s["bound_rel"].clip(1e-9, 1e4), ls="--", color=c, label=f"λ={lam:g} §6.1 bound")
        ax.set(xscale="log", yscale="log", xlabel="LiSSA depth J", ylabel="relative error (bound clipped to [1e-9, 1e4])",
               ylim=(1e-9, 2e4),
               title=f"{name}: LiSSA error vs depth (batch {int(ls['batch_size'].iloc[0]) if len(ls) else '?'})")
        ax.legend(fontsize=7, ncol=2)
        ax = axes[i, 3]
        for label in [x for x in labels if x.startswith(("ekfac", "kfac"))]:
            s = d[d["solver"] == label]
            ax.plot(s["damping"], s["rel_error"], marker="o", color=palette[label], label=f"{label} measured")
            ax.plot(s["damping"], s["bound_rel"], marker="x", ls="--", color=palette[label], label=f"{label} §6.2 bound")
        ax.set(xscale="log", yscale="log", xlabel="damping λ", ylabel="relative error",
               title=f"{name}: K-FAC / EK-FAC beside the §6.2 bound\n(sorted spectra; it assumes shared eigenvectors)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def replot(out: Path = RESULTS / "ihvp_error.csv", figure: Path = RESULTS / "figures" / "ihvp_error.png") -> Path:
    """Redraw the figure from the CSV files of an earlier run."""
    import pandas as pd

    out = Path(out)
    plot(pd.read_csv(out), pd.read_csv(out.with_name(out.stem + "_lissa.csv")), Path(figure))
    return Path(figure)


def run(settings: list[str] | None = None, solvers: list[str] | None = None, dampings: list[float] | None = None,
        queries: int = 100, out: Path = RESULTS / "ihvp_error.csv", figure: Path = RESULTS / "figures" / "ihvp_error.png",
        overrides: dict | None = None, log=print) -> Path:
    """Run the benchmark; ``overrides`` fixes solver parameters, e.g. ``{"lissa": {"depth": 300}}``."""
    import pandas as pd

    solvers = solvers or list(solver_api.available())
    if "exact" not in solver_api.available():
        raise solver_api.SolverError("the IHVP-error benchmark needs the exact solver (solvers/exact.py)")
    dampings = sorted(dampings or solver_api.DAMPING_GRID)
    rows, lissa_rows = [], []
    for name in settings or SETTINGS:
        r, lr = run_setting(name, solvers, dampings, queries, overrides, log)
        rows += r
        lissa_rows += lr
    df = pd.DataFrame(rows)
    lissa = pd.DataFrame(lissa_rows, columns=["setting", "damping", "depth", "rel_error", "rel_error_se", "bound_rel",
                                              "alpha", "norm_M", "batch_size"])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False)
    lissa.to_csv(out.with_name(out.stem + "_lissa.csv"), index=False)
    plot(df, lissa, Path(figure))
    log(f"wrote {out}, {out.with_name(out.stem + '_lissa.csv')} and {figure}")
    return out
