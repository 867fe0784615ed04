"""Table 1 gap study (issue 4 §5): how much each protocol factor moves a solver's LDS.

The paper reports LDS 0.50 on MNIST; a peer's EK-FAC scored 0.17 on a single-seed ground truth. The factors
that one committed artifact can answer without retraining are measured here, side by side, on the
ground truth's *validation* queries (the reported queries stay untouched, so a protocol chosen from this
table is still chosen on validation):

- **target replicas**: the ground truth averaged over 1, 2, ... seed replicas per subset (disjoint groups of
  replicas, averaged), with the noise ceiling each implies;
- **ensemble**: scores averaged over 1, 2, ... full-data models (the artifact's K seeded models);
- **measurement**: margin vs loss, as the solver's query function and the ground-truth output together;
- **damping**: the validation LDS of every damping the run record's grid search tried, and of further
  dampings asked for (``dampings``: e.g. below the grid when its smallest value won), on the first model.

Every row also gives its difference to the baseline (1 model, all replicas, margin/margin, the chosen
damping) with a *paired* standard error over the same queries, which is much smaller than either row's own
error. Seed policy and training length need further artifacts (other recipes) and are not measured here.

:func:`report` then scores the protocol made of each factor's best validation level (:func:`best_protocol`)
once on the reported queries: the number to set beside the paper's.
"""

from __future__ import annotations

import datetime as _dt
import time
from pathlib import Path

import numpy as np
import torch

from . import groundtruth, metrics, runner, solver_api
from . import settings as settings_mod
from .artifacts import ArtifactError, code_version, environment, read_json, write_json
from .plugins import REPO_ROOT
from .stats import mean_se, noise_ceiling

GAP_ROOT = REPO_ROOT / "results" / "gap"


def spearman_brown_ceiling(single_seed: float | None, replicas: int) -> float | None:
    """LDS ceiling against an average of ``replicas`` seeds, from the single-seed agreement ρ₁:
    sqrt(rρ₁ / (1 + (r-1)ρ₁))."""
    if single_seed is None or not np.isfinite(single_seed) or single_seed <= 0:
        return None
    rel = replicas * single_seed / (1 + (replicas - 1) * single_seed)
    return float(np.sqrt(rel))


def _replica_groups(replicas: list[int], size: int) -> list[list[int]]:
    """Disjoint groups of ``size`` replicas (as many as fit), so each row averages independent targets."""
    return [replicas[i:i + size] for i in range(0, len(replicas) - size + 1, size)]


def _sizes(total: int) -> list[int]:
    """1, 2, 4, ... up to ``total``, and ``total`` itself."""
    out, n = [], 1
    while n < total:
        out.append(n)
        n *= 2
    return out + [total]


def study(setting: str, solver: str = "ekfac", params: dict | None = None, *, ensemble: int | None = None,
          dampings: list[float] | None = None, version: str | None = None, device=None,
          gt_root: Path = groundtruth.GT_ROOT, runs_root: Path = runner.RUNS_ROOT, log=print) -> dict:
    """Measure the factors on the validation queries of ``setting``'s ground truth; return the study record.

    ``params``: the solver's hyper-parameters; default those chosen on validation queries in the fresh run
    record (``tdabench run``), else its defaults. ``ensemble``: largest ensemble (default: every full model).
    ``dampings``: further damping values to measure on the first model (scored in the same train pass).
    """
    from .training import default_device

    options = _options(params, ensemble, dampings, version)
    s = settings_mod.get(setting)
    cls = solver_api.get(solver)
    device = torch.device(device or default_device())
    root = (Path(gt_root) / setting / version) if version else runner.current_gt_root(setting, gt_root)
    if root is None:
        raise ArtifactError(f"no ground truth for {setting!r}; build it with `tdabench gt {setting}`")
    gt = groundtruth.GroundTruth.open(root, s)  # complete artifacts only: a study compares whole protocols
    replicas = gt.complete_replicas()
    if len(gt.validation_queries) == 0:
        raise ArtifactError(f"{root} has no validation queries; the gap study measures on them")
    k_max = gt.protocol.full_models if ensemble is None else ensemble
    if not 1 <= k_max <= gt.protocol.full_models:
        raise ValueError(f"ensemble must be between 1 and {gt.protocol.full_models} (full models in {root})")
    if params is None:
        params, source = runner.chosen_params(setting, solver, runs_root, gt_root)
    else:
        params, source = {**cls.defaults, **params}, "given by the user"
    dampings = [float(d) for d in dampings or [] if float(d) != params.get("damping")]
    if dampings and "damping" not in params:
        raise ValueError(f"solver {solver!r} has no damping parameter to vary")
    data = s.data()
    tx, ty = data.train_x.to(device), data.train_y.to(device)
    v_idx = torch.from_numpy(gt.validation_queries)
    vx, vy = data.test_x[v_idx].to(device), data.test_y[v_idx].to(device)
    log(f"gap study {setting} / {solver} {params} ({source}): {len(vy)} validation queries, "
        f"{k_max} full model(s), replicas {replicas}")

    cost = metrics.Cost(device)
    margin_scores, loss_scores = [], None
    for k in range(k_max):
        model = gt.full_model(s, k)
        t0 = time.perf_counter()
        fitted = [runner._fit(cls, params, [model], tx, ty, data.num_classes, "margin", device, cost, "fit")]
        if k == 0:  # measurement and damping on the first model: curvature is cached, the train pass shared
            fitted.append(runner._fit(cls, params, [model], tx, ty, data.num_classes, "loss", device, cost, "fit"))
            fitted += [runner._fit(cls, {**params, "damping": d}, [model], tx, ty, data.num_classes, "margin", device,
                                   cost, "fit") for d in dampings]
        out = [sc.numpy() for sc in runner._scores_many(fitted, vx, vy, tx, ty, cost, "score")]
        margin_scores.append(out[0])
        if k == 0:
            loss_scores, damping_scores = out[1], dict(zip(dampings, out[2:]))
        del fitted, out
        log(f"  full model {k}: fitted and scored in {time.perf_counter() - t0:.0f} s")

    masks = gt.masks
    base_target = gt.target("margin", "validation", replicas)
    base = metrics.lds_per_query(margin_scores[0], masks, base_target)
    outputs = {m: gt.outputs[m][replicas][:, :, len(gt.queries):] for m in ("margin", "loss")}
    ceilings = {m: noise_ceiling(outputs[m]) for m in outputs}
    rows = []

    def add(factor: str, level: str, value, per_query: np.ndarray, ceiling: float | None = None, note: str = ""):
        mean, se = mean_se(per_query)
        d_mean, d_se = mean_se(per_query - base)
        rows.append({"factor": factor, "level": level, "value": value, "lds": mean, "lds_se": se, "delta": d_mean,
                     "delta_se": d_se, "ceiling": ceiling, "note": note})

    rho1 = ceilings["margin"].get("pairwise_single_seed")
    for size in _sizes(len(replicas)):
        groups = _replica_groups(replicas, size)
        per = np.nanmean([metrics.lds_per_query(margin_scores[0], masks, gt.target("margin", "validation", g))
                          for g in groups], axis=0)
        add("target replicas", f"{size} seed(s) per subset", size, per, spearman_brown_ceiling(rho1, size),
            f"mean over {len(groups)} disjoint group(s)")
    for size in _sizes(k_max):
        per = metrics.lds_per_query(np.mean(margin_scores[:size], axis=0), masks, base_target)
        add("ensemble", f"{size} full model(s)", size, per)
    loss_target = gt.target("loss", "validation", replicas)
    # Matched pairs only: margin and loss move in opposite directions, so a mismatched pair only flips sign.
    for m, sc, tg in (("margin", margin_scores[0], base_target), ("loss", loss_scores, loss_target)):
        add("measurement", f"{m} (solver and target)", m, metrics.lds_per_query(sc, masks, tg),
            spearman_brown_ceiling(ceilings[m].get("pairwise_single_seed"), len(replicas)))

    if dampings:
        for d in sorted([*dampings, params["damping"]]):
            add("damping", f"λ={d:g}" + (" (chosen)" if d == params["damping"] else ""), d,
                base if d == params["damping"] else metrics.lds_per_query(damping_scores[d], masks, base_target))
    damping = []
    rec = runner.read_record(setting, solver, runs_root)
    if rec and "lds" in rec and not runner.stale_reasons(rec, gt_root=gt_root):
        for t in rec["lds"]["selection"].get("trials", []):
            if t.get("validation_lds") is not None:
                damping.append({"params": t["params"], "lds": t["validation_lds"], "lds_se": t["validation_lds_se"]})
    return {
        "setting": setting, "solver": solver, "options": options, "params": params, "params_source": source,
        "split": "validation", "queries": int(len(vy)), "subsets": int(masks.shape[0]),
        "replicas": replicas, "full_models": k_max, "rows": rows, "damping": damping,
        "noise_ceiling": ceilings,
        "ground_truth": runner.gt_reference(root, replicas, k_max),
        "cost": {"fit_s": cost.seconds("fit"), "score_s": cost.seconds("score"), "peak_mb": cost.peak_mb("fit", "score"),
                 "machine": metrics.machine_load()},
        "environment": environment(device), "code_version": code_version(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def best_protocol(rec: dict) -> dict:
    """Each factor's best level on the validation queries, combined: the protocol to report."""
    def best(factor, default, extra=()):
        rows = [r for r in [*rec["rows"], *extra] if r["factor"] == factor and np.isfinite(r["lds"])]
        return max(rows, key=lambda r: r["lds"])["value"] if rows else default

    params = dict(rec["params"])
    if "damping" in params:
        # the grid search's trials were scored on the same queries and model: candidates too
        params["damping"] = best("damping", params["damping"], [{**g, "factor": "damping"} for g in grid_rows(rec)])
    return {"params": params, "ensemble": best("ensemble", 1), "measurement": best("measurement", "margin"),
            "rule": "each factor's level with the highest validation LDS, combined (the target keeps every replica)"}


def report(setting: str, rec: dict, *, device=None, gt_root: Path = groundtruth.GT_ROOT, log=print) -> dict:
    """The protocol :func:`best_protocol` chose on validation queries, evaluated once on the reported queries."""
    protocol = best_protocol(rec)
    log(f"reporting {setting} / {rec['solver']} {protocol['params']}, ensemble {protocol['ensemble']}, "
        f"measurement {protocol['measurement']} on the reported queries")
    lds = runner.evaluate_lds(setting, rec["solver"], protocol["params"], search=False, ensemble=protocol["ensemble"],
                              measurement=protocol["measurement"], version=rec["ground_truth"]["version"],
                              device=device, gt_root=gt_root, log=log)
    lds.pop("per_query")
    return {**protocol, "queries": lds["queries"], "lds": lds, "cost": lds.pop("cost")}


def study_path(setting: str, solver: str, root: Path = GAP_ROOT) -> Path:
    return Path(root) / f"{setting}_{solver}.json"


def format_table(rec: dict) -> str:
    """The study as a Markdown table (what README quotes)."""
    lines = [f"Gap study, {rec['setting']} / {rec['solver']} {rec['params']} ({rec['params_source']}); "
             f"{rec['queries']} validation queries, M={rec['subsets']}. Δ: paired difference to the baseline "
             f"(1 model, {len(rec['replicas'])} replicas, margin/margin).",
             "", "| factor | level | LDS ± se | Δ ± se | noise ceiling |", "|---|---|---|---|---|"]
    for r in rec["rows"]:
        ceil = "" if r["ceiling"] is None else f"{r['ceiling']:.3f}"
        lines.append(f"| {r['factor']} | {r['level']} | {r['lds']:.3f} ± {r['lds_se']:.3f} | "
                     f"{r['delta']:+.3f} ± {r['delta_se']:.3f} | {ceil} |")
    for d in grid_rows(rec):
        lines.append(f"| {d['factor']} | {d['level']} | {d['lds']:.3f} ± {d['lds_se']:.3f} | | |")
    if rec.get("reported"):
        r, lds = rec["reported"], rec["reported"]["lds"]
        ceil = "" if lds.get("ceiling") is None else f"; noise ceiling {lds['ceiling']:.3f} ({lds['of_ceiling']:.2f} of it)"
        lines += ["", f"Chosen on validation ({r['rule']}): {r['params']}, ensemble of {r['ensemble']}, "
                      f"measurement {r['measurement']}. On the {r['queries']} reported queries: LDS {lds['mean']:.3f} ± "
                      f"{lds['se']:.3f} [{lds['ci_low']:.3f}, {lds['ci_high']:.3f}]{ceil}."]
    return "\n".join(lines)


def grid_rows(rec: dict) -> list[dict]:
    """The run record's grid-search trials as rows, except dampings the study itself measured (with Δ)."""
    measured = {r["value"] for r in rec["rows"] if r["factor"] == "damping"}
    return [{"factor": "damping (run record's grid search)", "level": f"λ={d['params']['damping']:g}",
             "value": d["params"]["damping"], "lds": d["lds"], "lds_se": d["lds_se"], "ceiling": None}
            for d in rec["damping"] if "damping" in d["params"] and d["params"]["damping"] not in measured]


def _options(params, ensemble, dampings, version) -> dict:
    """What a study was asked for (to know when a stored one answers the same question)."""
    return {"params": params, "ensemble": ensemble, "dampings": sorted(float(d) for d in dampings or []),
            "version": version}


def _reusable(path: Path, setting: str, solver: str, kw: dict) -> dict | None:
    """A stored study asked the same way, on the ground-truth files the benchmark would use now, with the
    run record's choice unchanged."""
    if not path.is_file():
        return None
    rec = read_json(path)
    asked = _options(kw.get("params"), kw.get("ensemble"), kw.get("dampings"), kw.get("version"))
    if rec.get("options") != asked:
        return None
    gt_root, runs_root = kw.get("gt_root", groundtruth.GT_ROOT), kw.get("runs_root", runner.RUNS_ROOT)
    root = (Path(gt_root) / setting / asked["version"]) if asked["version"] else runner.current_gt_root(setting, gt_root)
    if root is None or runner.gt_reference(root, rec["replicas"], rec["full_models"]) != rec["ground_truth"]:
        return None
    if asked["params"] is None and runner.chosen_params(setting, solver, runs_root, gt_root)[0] != rec["params"]:
        return None
    return rec


def run(setting: str, solver: str = "ekfac", *, report_queries: bool = False, root: Path = GAP_ROOT,
        figures_dir: Path | None = None, log=print, **kw) -> dict:
    """:func:`study`, written to ``results/gap/<setting>_<solver>.json`` with its figure in ``results/figures``.

    ``report_queries``: also evaluate the protocol chosen on validation (:func:`best_protocol`) on the
    reported queries, reusing a stored study of the same artifact when no option asks for a new one."""
    from . import figures

    path = study_path(setting, solver, root)
    rec = _reusable(path, setting, solver, kw) if report_queries else None
    if rec is None:
        rec = study(setting, solver, log=log, **kw)
    else:
        log(f"reusing the validation study {runner._rel(path)} (created {rec['created']})")
    if report_queries:
        rec["reported"] = report(setting, rec, device=kw.get("device"), gt_root=kw.get("gt_root", groundtruth.GT_ROOT),
                                 log=log)
    write_json(path, rec)
    fig = figures.gap_study(rec, None if figures_dir is None else Path(figures_dir) / f"{setting}_gap_{solver}.png")
    log(f"wrote {runner._rel(path)} and {runner._rel(fig)}")
    return rec
