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
error.

Seed policy and training recipe need ground truths trained otherwise: *study artifacts* under
``results/gt-studies/`` (``tdabench gt mnist-cnn --study --seed-policy varied``, ``tdabench gt
mnist-cnn@epochs=3``), which the benchmark never uses as its ground truth. Every complete one comparable with
the benchmark's artifact (same α, subsets and validation queries; no more subsets or replicas) adds a pair of
rows: the benchmark's artifact restricted to the study's M subsets and R replicas, and the study artifact, each
explained by its own first full-data model with the same hyper-parameters; Δ of the study row is paired to
the restricted row.

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
from .artifacts import (MANIFEST, ArtifactError, code_version, environment, load_safetensors, read_json,
                        write_json)
from .plugins import REPO_ROOT
from .stats import mean_se, noise_ceiling

GAP_ROOT = REPO_ROOT / "results" / "gap"
STUDY_NOTE = "Δ paired to the benchmark's artifact restricted to the study's subsets and replicas (the row above)"


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


def study_artifacts(setting: str, gt: groundtruth.GroundTruth, replicas: list[int],
                    study_root: Path = groundtruth.STUDY_ROOT, log=print) -> list[groundtruth.GroundTruth]:
    """The complete study ground truths of ``setting`` (or of a setting derived from it) that ``gt`` can be
    compared with: the same subsets (masks) and validation queries, no more subsets or replicas than ``gt``."""
    root = Path(study_root)
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.partition(settings_mod.DERIVED_SEP)[0]
                   == setting) if root.is_dir() else []
    found = []
    for name in names:
        for path in groundtruth.versions(name, root):
            try:
                if not read_json(path / MANIFEST).get("complete"):
                    continue
                other = groundtruth.GroundTruth.open(path, settings_mod.get(name))
            except (ArtifactError, KeyError) as exc:
                log(f"  skipping study artifact {runner._rel(path)}: {exc}")
                continue
            m, r = other.protocol.subsets, len(other.complete_replicas())
            why = ("more subsets than the benchmark's artifact" if m > gt.masks.shape[0] else
                   "more replicas than the benchmark's artifact" if r > len(replicas) else
                   "other subsets" if not np.array_equal(other.masks, gt.masks[:m]) else
                   "other validation queries" if not np.array_equal(other.validation_queries, gt.validation_queries)
                   else None)
            if why:
                log(f"  skipping study artifact {runner._rel(path)}: {why}")
                continue
            found.append(other)
    return found


def _same_weights(a: Path, b: Path) -> bool:
    """Whether two artifacts' first full-data models are the same weights (file hashes differ even then:
    safetensors writes its metadata in no fixed order)."""
    wa, wb = (load_safetensors(groundtruth.checkpoint_file(r, 0)) for r in (a, b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _study_factor(other: groundtruth.GroundTruth, gt: groundtruth.GroundTruth) -> tuple[str, str, str]:
    """(factor, benchmark level, study level) naming what the study artifact changes."""
    factors, mine, theirs = [], [], []
    if other.protocol.seed_policy != gt.protocol.seed_policy:
        factors.append("seed policy")
        mine.append(f"{gt.protocol.seed_policy} seeds")
        theirs.append(f"{other.protocol.seed_policy} seeds")
    base, ours = gt.manifest["recipe"]["train"], other.manifest["recipe"]["train"]
    changed = sorted(k for k in ours if ours[k] != base.get(k))
    if changed:
        factors.append("training recipe")
        mine.append(", ".join(f"{k}={base.get(k)}" for k in changed))
        theirs.append(", ".join(f"{k}={ours[k]}" for k in changed))
    m, r = other.protocol.subsets, len(other.complete_replicas())
    scope = f"M={m}, R={r}"
    return (" + ".join(factors) or "replication", f"{'; '.join(mine) or 'benchmark'} ({gt.root.name}, {scope})",
            f"{'; '.join(theirs) or 'study'} (study {other.root.parent.name}/{other.root.name}, {scope})")


def study(setting: str, solver: str = "ekfac", params: dict | None = None, *, ensemble: int | None = None,
          dampings: list[float] | None = None, version: str | None = None, device=None,
          gt_root: Path = groundtruth.GT_ROOT, runs_root: Path = runner.RUNS_ROOT,
          study_root: Path = groundtruth.STUDY_ROOT, log=print) -> dict:
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
    studies = study_artifacts(setting, gt, replicas, study_root, log)
    # a study artifact whose first full-data model is the benchmark's own (same recipe and seed) needs no new fit
    to_fit = [o for o in studies if not _same_weights(o.root, root)]
    study_labels = [_study_factor(o, gt) for o in studies]
    for o, (factor, _, _) in zip(studies, study_labels):
        log(f"  study artifact {runner._rel(o.root)}: {factor}")

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
            fitted += [runner._fit(cls, params, [o.full_model(settings_mod.get(o.manifest["setting"]), 0)], tx, ty,
                                   data.num_classes, "margin", device, cost, "fit") for o in to_fit]
        out = [sc.numpy() for sc in runner._scores_many(fitted, vx, vy, tx, ty, cost, "score")]
        margin_scores.append(out[0])
        if k == 0:
            loss_scores, damping_scores = out[1], dict(zip(dampings, out[2:2 + len(dampings)]))
            study_scores = dict(zip([str(o.root) for o in to_fit], out[2 + len(dampings):]))
        del fitted, out
        log(f"  full model {k}: fitted and scored in {time.perf_counter() - t0:.0f} s")

    masks = gt.masks
    base_target = gt.target("margin", "validation", replicas)
    base = metrics.lds_per_query(margin_scores[0], masks, base_target)
    outputs = {m: gt.outputs[m][replicas][:, :, len(gt.queries):] for m in ("margin", "loss")}
    ceilings = {m: noise_ceiling(outputs[m]) for m in outputs}
    rows = []

    def add(factor: str, level: str, value, per_query: np.ndarray, ceiling: float | None = None, note: str = "",
            against: np.ndarray | None = None):
        mean, se = mean_se(per_query)
        d_mean, d_se = mean_se(per_query - (base if against is None else against))
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
    for o, (factor, mine, theirs) in zip(studies, study_labels):
        m, r = o.protocol.subsets, o.complete_replicas()
        mine_replicas = replicas[:len(r)]
        matched = metrics.lds_per_query(margin_scores[0], masks[:m],
                                        gt.target("margin", "validation", mine_replicas)[:m])
        studied = metrics.lds_per_query(study_scores.get(str(o.root), margin_scores[0]), o.masks,
                                        o.target("margin", "validation", r))
        mine_ceiling = noise_ceiling(gt.outputs["margin"][mine_replicas, :m, len(gt.queries):])["lds_ceiling"]
        their_ceiling = noise_ceiling(o.outputs["margin"][r][:, :, len(o.queries):])["lds_ceiling"]
        add(factor, mine, "benchmark", matched, mine_ceiling, STUDY_NOTE, against=matched)
        add(factor, theirs, "study", studied, their_ceiling, STUDY_NOTE, against=matched)

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
        "study_artifacts": [_study_reference(o) for o in studies],
        "cost": {"fit_s": cost.seconds("fit"), "score_s": cost.seconds("score"), "peak_mb": cost.peak_mb("fit", "score"),
                 "machine": metrics.machine_load()},
        "environment": environment(device), "code_version": code_version(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _study_reference(other: groundtruth.GroundTruth) -> dict:
    return {"setting": other.manifest["setting"],
            **runner.gt_reference(other.root, other.complete_replicas(), 1)}


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
            "rule": "each factor's level with the highest validation LDS, combined (the target keeps every replica; "
                    "seed-policy and recipe rows inform, the reported ground truth stays the benchmark's artifact)"}


def report(setting: str, rec: dict, *, device=None, gt_root: Path = groundtruth.GT_ROOT, log=print) -> dict:
    """The protocol :func:`best_protocol` chose on validation queries, evaluated once on the reported queries."""
    protocol = best_protocol(rec)
    log(f"reporting {setting} / {rec['solver']} {protocol['params']}, ensemble {protocol['ensemble']}, "
        f"measurement {protocol['measurement']} on the reported queries")
    lds = runner.evaluate_lds(setting, rec["solver"], protocol["params"], search=False, ensemble=protocol["ensemble"],
                              measurement=protocol["measurement"], version=rec["ground_truth"]["version"],
                              device=device, gt_root=gt_root, log=log)
    lds.pop("per_query")
    return {**protocol, "queries": lds["queries"], "lds": lds, "cost": lds.pop("cost"), "basis": _report_basis(rec),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def _report_basis(rec: dict) -> dict:
    """What a reported-query evaluation depends on beyond its protocol: the ground-truth files and the solver's
    code (the same inputs that make a run record stale)."""
    return {"ground_truth": rec["ground_truth"], "solver_code": runner.solver_code(rec["solver"])["hash"]}


def _carried_report(previous: dict | None, rec: dict) -> dict | None:
    """The stored reported-query evaluation when it still answers for ``rec``: the same protocol chosen on
    validation, the same ground-truth files and solver code. A new study artifact adds rows that inform but
    never change the chosen protocol (:func:`best_protocol`), so it need not cost a second 2000-query pass."""
    old = (previous or {}).get("reported")
    if not old or old.get("basis") != _report_basis(rec):
        return None
    chosen = best_protocol(rec)
    return old if all(old[k] == chosen[k] for k in ("params", "ensemble", "measurement")) else None


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
        mark = "†" if r.get("note") == STUDY_NOTE else ""
        lines.append(f"| {r['factor']} | {r['level']} | {r['lds']:.3f} ± {r['lds_se']:.3f} | "
                     f"{r['delta']:+.3f} ± {r['delta_se']:.3f}{mark} | {ceil} |")
    for d in grid_rows(rec):
        lines.append(f"| {d['factor']} | {d['level']} | {d['lds']:.3f} ± {d['lds_se']:.3f} | | |")
    if any(r.get("note") == STUDY_NOTE for r in rec["rows"]):
        lines += ["", f"† {STUDY_NOTE}; each artifact's first full-data model is explained with the same "
                      f"hyper-parameters."]
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


def _reusable(stored: dict | None, setting: str, solver: str, kw: dict) -> dict | None:
    """The stored study, if asked the same way, on the ground-truth files the benchmark would use now, with the
    run record's choice unchanged."""
    if stored is None:
        return None
    rec = stored
    asked = _options(kw.get("params"), kw.get("ensemble"), kw.get("dampings"), kw.get("version"))
    if rec.get("options") != asked:
        return None
    gt_root, runs_root = kw.get("gt_root", groundtruth.GT_ROOT), kw.get("runs_root", runner.RUNS_ROOT)
    root = (Path(gt_root) / setting / asked["version"]) if asked["version"] else runner.current_gt_root(setting, gt_root)
    if root is None or runner.gt_reference(root, rec["replicas"], rec["full_models"]) != rec["ground_truth"]:
        return None
    gt = groundtruth.GroundTruth.open(root, settings_mod.get(setting))
    found = study_artifacts(setting, gt, rec["replicas"], kw.get("study_root", groundtruth.STUDY_ROOT), lambda *a: None)
    if [_study_reference(o) for o in found] != rec.get("study_artifacts", []):
        return None
    if asked["params"] is None and runner.chosen_params(setting, solver, runs_root, gt_root)[0] != rec["params"]:
        return None
    return rec


def run(setting: str, solver: str = "ekfac", *, report_queries: bool = False, root: Path = GAP_ROOT,
        figures_dir: Path | None = None, log=print, **kw) -> dict:
    """:func:`study`, written to ``results/gap/<setting>_<solver>.json`` with its figure in ``results/figures``.

    ``report_queries``: also evaluate the protocol chosen on validation (:func:`best_protocol`) on the
    reported queries, reusing a stored study of the same artifact when no option asks for a new one. A stored
    reported-query evaluation is kept, with or without ``report_queries``, while :func:`_carried_report` says it
    still holds."""
    from . import figures

    path = study_path(setting, solver, root)
    previous = read_json(path) if path.is_file() else None
    rec = _reusable(previous, setting, solver, kw) if report_queries else None
    if rec is None:
        rec = study(setting, solver, log=log, **kw)
    else:
        log(f"reusing the validation study {runner._rel(path)} (created {rec['created']})")
    carried = _carried_report(previous, rec)
    if carried is not None:
        rec["reported"] = carried
        log("reusing the reported-query evaluation of the same protocol"
            + (f" (created {carried['created']})" if "created" in carried else ""))
    elif report_queries:
        rec["reported"] = report(setting, rec, device=kw.get("device"), gt_root=kw.get("gt_root", groundtruth.GT_ROOT),
                                 log=log)
    write_json(path, rec)
    fig = figures.gap_study(rec, None if figures_dir is None else Path(figures_dir) / f"{setting}_gap_{solver}.png")
    log(f"wrote {runner._rel(path)} and {runner._rel(fig)}")
    return rec
