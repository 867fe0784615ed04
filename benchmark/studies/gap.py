"""Floor 5: the Table 1 gap study — how much each protocol factor moves a solver's LDS.

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
``<store>/gt-studies/`` (``tdabench gt mnist-cnn --study --seed-policy varied``, ``tdabench gt
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

from .. import core
from ..core.stats import mean_se, noise_ceiling
from ..evaluate import engine, metrics, records
from ..evaluate.cost import Cost, machine_load
from ..groundtruth import artifact as gt_artifact
from ..groundtruth import zoo as zoo_mod
from ..groundtruth.artifact import GroundTruth
from ..groundtruth.protocol import checkpoint_file
from ..setup import settings as settings_mod
from ..setup.artifacts import MANIFEST, ArtifactError, code_version, environment, load_safetensors, read_json, write_json
from ..setup.store import ResultsStore

# Bump when the study measures other rows (a stored study of another version is never reused).
STUDY_VERSION = 2  # 2: the explained model's seed (coupling) rows
STUDY_NOTE = "Δ paired to the benchmark's artifact restricted to the study's subsets and replicas (the row above)"


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


def study_artifacts(store: ResultsStore, setting: settings_mod.Setting, gt: GroundTruth, replicas: list[int],
                    log=print) -> list[GroundTruth]:
    """The complete study ground truths of ``setting`` (or of a setting derived from it) that ``gt`` can be
    compared with: the same subsets (masks) and validation queries, no more subsets or replicas than ``gt``."""
    root = store.gt_studies
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.partition(settings_mod.DERIVED_SEP)[0]
                   == setting.name) if root.is_dir() else []
    found = []
    for name in names:
        spec = name.partition(settings_mod.DERIVED_SEP)[2]
        for path in gt_artifact.versions(root, name):
            try:
                if not read_json(path / MANIFEST).get("complete"):
                    continue
                other = GroundTruth.open(path, setting.derived(spec) if spec else setting, store=store)
            except (ArtifactError, KeyError) as exc:
                log(f"  skipping study artifact {store.relative(path)}: {exc}")
                continue
            m, r = other.protocol.subsets, len(other.complete_replicas())
            why = ("more subsets than the benchmark's artifact" if m > gt.masks.shape[0] else
                   "more replicas than the benchmark's artifact" if r > len(replicas) else
                   "other subsets" if not np.array_equal(other.masks, gt.masks[:m]) else
                   "other validation queries" if not np.array_equal(other.validation_queries, gt.validation_queries)
                   else None)
            if why:
                log(f"  skipping study artifact {store.relative(path)}: {why}")
                continue
            found.append(other)
    return found


def _same_weights(a: Path, b: Path) -> bool:
    """Whether two artifacts' first full-data models are the same weights (file hashes differ even then:
    safetensors writes its metadata in no fixed order)."""
    wa, wb = (load_safetensors(checkpoint_file(r, 0)) for r in (a, b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _study_factor(other: GroundTruth, gt: GroundTruth) -> tuple[str, str, str]:
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


def study(store: ResultsStore, setting: settings_mod.Setting, cls, params: dict | None = None, *,
          ensemble: int | None = None, dampings: list[float] | None = None, version: str | None = None, device=None,
          log=print) -> dict:
    """Measure the factors on the validation queries of ``setting``'s ground truth; return the study record.

    ``params``: the solver's hyper-parameters; default those chosen on validation queries in the fresh run
    record (``tdabench run``), else its defaults. ``ensemble``: largest ensemble (default: every full model).
    ``dampings``: further damping values to measure on the first model (scored in the same train pass).
    """
    from ..setup.training import default_device

    options = _options(params, ensemble, dampings, version)
    device = torch.device(device or default_device())
    root = (store.gt / setting.name / version) if version else gt_artifact.current(store, setting)
    if root is None:
        raise ArtifactError(f"no ground truth for {setting.name!r}; build it with `tdabench gt {setting.name}`")
    gt = GroundTruth.open(root, setting, store=store)  # complete artifacts only: a study compares whole protocols
    replicas = gt.complete_replicas()
    if len(gt.validation_queries) == 0:
        raise ArtifactError(f"{root} has no validation queries; the gap study measures on them")
    k_max = gt.protocol.full_models if ensemble is None else ensemble
    if not 1 <= k_max <= gt.protocol.full_models:
        raise ValueError(f"ensemble must be between 1 and {gt.protocol.full_models} (full models in {root})")
    if params is None:
        params, source = records.chosen_params(store, setting, cls)
    else:
        params, source = {**cls.defaults, **params}, "given by the user"
    dampings = [float(d) for d in dampings or [] if float(d) != params.get("damping")]
    if dampings and "damping" not in params:
        raise ValueError(f"solver {cls.name!r} has no damping parameter to vary")
    data = setting.data()
    tx, ty = data.train_x.to(device), data.train_y.to(device)
    v_idx = torch.from_numpy(gt.validation_queries)
    vx, vy = data.test_x[v_idx].to(device), data.test_y[v_idx].to(device)
    log(f"gap study {setting.name} / {cls.name} {params} ({source}): {len(vy)} validation queries, "
        f"{k_max} full model(s), replicas {replicas}")
    studies = study_artifacts(store, setting, gt, replicas, log)
    # a study artifact whose first full-data model is the benchmark's own (same recipe and seed) needs no new fit
    to_fit = [o for o in studies if not _same_weights(o.root, root)]
    study_labels = [_study_factor(o, gt) for o in studies]
    for o, (factor, _, _) in zip(studies, study_labels):
        log(f"  study artifact {store.relative(o.root)}: {factor}")

    zoo = _zoo(store, setting, k_max, log)
    cost = Cost(device)
    cache = core.CurvatureCache()

    def fitted(p, model, measurement="margin"):
        return engine.fit(cls, p, [model], tx, ty, data.num_classes, measurement, device, cost, "fit", cache)

    membership = torch.from_numpy(gt.masks)  # study artifacts hold the first m of these subsets (checked)
    margin_preds, loss_preds = [], None
    for k in range(k_max):
        model = gt.full_model(k)
        t0 = time.perf_counter()
        configs = [fitted(params, model)]
        if k == 0:  # measurement and damping on the first model: curvature is cached, the train pass shared
            configs.append(fitted(params, model, "loss"))
            configs += [fitted({**params, "damping": d}, model) for d in dampings]
            configs += [fitted(params, o.full_model(0)) for o in to_fit]
        out = [p.numpy() for p in engine.ensemble_predictions(configs, vx, vy, tx, ty, membership, cost, "score")]
        margin_preds.append(out[0])
        if k == 0:
            loss_preds, damping_preds = out[1], dict(zip(dampings, out[2:2 + len(dampings)]))
            study_preds = dict(zip([str(o.root) for o in to_fit], out[2 + len(dampings):]))
        del configs, out
        log(f"  full model {k}: fitted and scored in {time.perf_counter() - t0:.0f} s")
    zoo_preds = []
    for k in range(k_max if zoo is not None else 0):  # the same, for models that share no seed with the target
        t0 = time.perf_counter()
        zoo_preds.append(engine.ensemble_predictions([fitted(params, zoo.model(k))], vx, vy, tx, ty, membership, cost,
                                                     "score")[0].numpy())
        log(f"  zoo model {k}: fitted and scored in {time.perf_counter() - t0:.0f} s")

    masks = gt.masks
    base_target = gt.target("margin", "validation", replicas)
    base = metrics.lds_from_predictions(margin_preds[0], base_target)
    outputs = {m: gt.outputs[m][replicas][:, :, len(gt.queries):] for m in ("margin", "loss")}
    ceilings = {m: noise_ceiling(outputs[m]) for m in outputs}
    rows = []

    def add(factor: str, level: str, value, per_query: np.ndarray, ceiling: float | None = None, note: str = "",
            against: np.ndarray | None = None):
        mean, se = mean_se(per_query)
        d_mean, d_se = mean_se(per_query - (base if against is None else against))
        rows.append({"factor": factor, "level": level, "value": value, "lds": mean, "lds_se": se, "delta": d_mean,
                     "delta_se": d_se, "ceiling": ceiling, "note": note})

    for size in _sizes(len(replicas)):
        groups = _replica_groups(replicas, size)
        per = np.nanmean([metrics.lds_from_predictions(margin_preds[0], gt.target("margin", "validation", g))
                          for g in groups], axis=0)
        add("target replicas", f"{size} seed(s) per subset", size, per,
            noise_ceiling(outputs["margin"], target_replicas=size)["lds_ceiling"],
            f"mean over {len(groups)} disjoint group(s)")
    for size in _sizes(k_max):
        per = metrics.lds_from_predictions(np.mean(margin_preds[:size], axis=0), base_target)
        add("ensemble", f"{size} full model(s)", size, per)
    if zoo_preds:
        _coupling_rows(add, gt, replicas, margin_preds, zoo_preds, outputs["margin"])
    loss_target = gt.target("loss", "validation", replicas)
    # Matched pairs only: margin and loss move in opposite directions, so a mismatched pair only flips sign.
    for m, pred, tg in (("margin", margin_preds[0], base_target), ("loss", loss_preds, loss_target)):
        add("measurement", f"{m} (solver and target)", m, metrics.lds_from_predictions(pred, tg),
            ceilings[m]["lds_ceiling"])

    if dampings:
        for d in sorted([*dampings, params["damping"]]):
            add("damping", f"λ={d:g}" + (" (chosen)" if d == params["damping"] else ""), d,
                base if d == params["damping"] else metrics.lds_from_predictions(damping_preds[d], base_target))
    for o, (factor, mine, theirs) in zip(studies, study_labels):
        m, r = o.protocol.subsets, o.complete_replicas()
        mine_replicas = replicas[:len(r)]
        matched = metrics.lds_from_predictions(margin_preds[0][:m],
                                               gt.target("margin", "validation", mine_replicas)[:m])
        studied = metrics.lds_from_predictions(study_preds.get(str(o.root), margin_preds[0])[:m],
                                               o.target("margin", "validation", r))
        mine_ceiling = noise_ceiling(gt.outputs["margin"][mine_replicas, :m, len(gt.queries):])["lds_ceiling"]
        their_ceiling = noise_ceiling(o.outputs["margin"][r][:, :, len(o.queries):])["lds_ceiling"]
        add(factor, mine, "benchmark", matched, mine_ceiling, STUDY_NOTE, against=matched)
        add(factor, theirs, "study", studied, their_ceiling, STUDY_NOTE, against=matched)

    damping = []
    rec = records.read_record(store, setting.name, cls.name)
    if rec and "lds" in rec and "lds" not in records.stale_reasons(rec, store, setting, cls):
        for t in rec["lds"]["selection"].get("trials", []):
            if t.get("validation_lds") is not None:
                damping.append({"params": t["params"], "lds": t["validation_lds"], "lds_se": t["validation_lds_se"]})
    return {
        "setting": setting.name, "solver": cls.name, "options": options, "params": params, "params_source": source,
        "split": "validation", "queries": int(len(vy)), "subsets": int(masks.shape[0]),
        "replicas": replicas, "full_models": k_max, "rows": rows, "damping": damping,
        "noise_ceiling": ceilings,
        "ground_truth": records.gt_reference(store, root, replicas, k_max),
        "study_artifacts": [_study_reference(store, o) for o in studies],
        "cost": {"fit_s": cost.seconds("fit"), "score_s": cost.seconds("score"), "peak_mb": cost.peak_mb("fit", "score"),
                 "machine": machine_load()},
        "environment": environment(device), "code_version": code_version(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _zoo(store: ResultsStore, setting: settings_mod.Setting, n: int, log):
    """The setting's model zoo when it holds ``n`` models, else None (the coupling rows are then left out)."""
    try:
        return zoo_mod.load(store, setting, min_models=n)
    except ArtifactError as exc:
        log(f"  no coupling rows: {str(exc).splitlines()[0]}")
        return None


def _coupling_rows(add, gt: GroundTruth, replicas: list[int], coupled: list, independent: list, outputs) -> None:
    """Does an explained model that shares its seed with a replica of its target score higher? Under the shared
    seed policy full-data model k has replica k's seed; zoo models share none. Both groups against the same
    targets, per query averaged over the models of a group, Δ paired:

    - every replica in the target: the ground truth's models (each coupled to one replica) vs zoo models;
    - the target without replica k: full-data model k (now uncoupled) vs zoo model k — the same targets, no
      coupling on either side, so they should agree.
    """
    note = "mean over models 0-{} of each group; Δ paired to the row above".format(len(coupled) - 1)
    target = gt.target("margin", "validation", replicas)
    with_own = np.nanmean([metrics.lds_from_predictions(p, target) for p in coupled], axis=0)
    zoo_all = np.nanmean([metrics.lds_from_predictions(p, target) for p in independent], axis=0)
    ceiling = noise_ceiling(outputs)["lds_ceiling"]
    add("explained model's seed", "shares its seed with one target replica (ground truth's full models)", "coupled",
        with_own, ceiling, note, against=with_own)
    add("explained model's seed", "shares no seed with the target (zoo models)", "independent", zoo_all, ceiling,
        note, against=with_own)
    k_max = min(len(coupled), len(replicas))
    if len(replicas) < 2:
        return
    others = [[r for r in replicas if r != replicas[k]] for k in range(k_max)]
    full_minus = np.nanmean([metrics.lds_from_predictions(coupled[k], gt.target("margin", "validation", others[k]))
                             for k in range(k_max)], axis=0)
    zoo_minus = np.nanmean([metrics.lds_from_predictions(independent[k], gt.target("margin", "validation", others[k]))
                            for k in range(k_max)], axis=0)
    ceiling_minus = float(np.mean([noise_ceiling(outputs[[replicas.index(r) for r in others[k]]])["lds_ceiling"]
                                   for k in range(k_max)]))
    add("target without the explained model's replica", "full model k vs the target without replica k", "full",
        full_minus, ceiling_minus, note, against=full_minus)
    add("target without the explained model's replica", "zoo model k vs the target without replica k", "zoo",
        zoo_minus, ceiling_minus, note, against=full_minus)


def _study_reference(store: ResultsStore, other: GroundTruth) -> dict:
    return {"setting": other.manifest["setting"],
            **records.gt_reference(store, other.root, other.complete_replicas(), 1)}


def best_protocol(rec: dict) -> dict:
    """Each factor's best level on the validation queries, combined: the protocol to report."""
    def best(factor, default, extra=()):
        rows = [r for r in [*rec["rows"], *extra] if r["factor"] == factor and np.isfinite(r["lds"])]
        return max(rows, key=lambda r: r["lds"])["value"] if rows else default

    params = dict(rec["params"])
    if "damping" in params:
        # the grid search's trials were scored on the same queries and model: candidates too
        params["damping"] = best("damping", params["damping"], [{**g, "factor": "damping"} for g in grid_rows(rec)])
    # explained models that share no seed with the target, where the zoo has them (docs/protocol.md: an explained
    # model is independent of its target); the coupling rows measure what the ground truth's own models would add
    explain = "zoo" if any(r["factor"] == "explained model's seed" for r in rec["rows"]) else "ground truth"
    return {"params": params, "ensemble": best("ensemble", 1), "measurement": best("measurement", "margin"),
            "explain": explain,
            "rule": "each factor's level with the highest validation LDS, combined; explained models from the zoo "
                    "(independent of the target) where it exists; the target keeps every replica; seed-policy and "
                    "recipe rows inform, the reported ground truth stays the benchmark's artifact"}


def report(store: ResultsStore, setting: settings_mod.Setting, cls, rec: dict, *, device=None, log=print) -> dict:
    """The protocol :func:`best_protocol` chose on validation queries, evaluated once on the reported queries."""
    protocol = best_protocol(rec)
    log(f"reporting {setting.name} / {cls.name} {protocol['params']}, ensemble {protocol['ensemble']}, "
        f"measurement {protocol['measurement']} on the reported queries")
    gt = GroundTruth.open(store.gt / setting.name / rec["ground_truth"]["version"], setting, store=store)
    lds = records.lds_section(store, gt, cls, protocol["params"], search=False, ensemble=protocol["ensemble"],
                              explain=protocol["explain"], measurement=protocol["measurement"], device=device,
                              log=log)
    lds.pop("per_query")
    return {**protocol, "queries": lds["queries"], "lds": lds, "cost": lds.pop("cost"),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def carried_report(store: ResultsStore, setting: settings_mod.Setting, cls, previous: dict | None,
                   rec: dict) -> dict | None:
    """The stored reported-query evaluation when it still answers for ``rec``: the same protocol chosen on
    validation, and still current (its ground truth, target and fingerprint — as a run record's section). A new
    study artifact adds rows that inform but never change the chosen protocol (:func:`best_protocol`), so it need
    not cost a second reported-query pass."""
    old = (previous or {}).get("reported")
    if not old:
        return None
    chosen = best_protocol(rec)
    if any(old.get(k, "ground truth" if k == "explain" else None) != chosen[k]
           for k in ("params", "ensemble", "measurement", "explain")):
        return None
    stale = records.stale_reasons({"format": records.RUN_FORMAT, "lds": old["lds"]}, store, setting, cls)
    return None if stale else old


def study_path(store: ResultsStore, setting_name: str, solver_name: str) -> Path:
    return store.gap / f"{setting_name}_{solver_name}.json"


def grid_rows(rec: dict) -> list[dict]:
    """The run record's grid-search trials as rows, except dampings the study itself measured (with Δ)."""
    measured = {r["value"] for r in rec["rows"] if r["factor"] == "damping"}
    return [{"factor": "damping (run record's grid search)", "level": f"λ={d['params']['damping']:g}",
             "value": d["params"]["damping"], "lds": d["lds"], "lds_se": d["lds_se"], "ceiling": None}
            for d in rec["damping"] if "damping" in d["params"] and d["params"]["damping"] not in measured]


def _options(params, ensemble, dampings, version) -> dict:
    """What a study was asked for (to know when a stored one answers the same question)."""
    return {"params": params, "ensemble": ensemble, "dampings": sorted(float(d) for d in dampings or []),
            "version": version, "study_version": STUDY_VERSION}


def _reusable(store: ResultsStore, setting: settings_mod.Setting, cls, stored: dict | None, kw: dict) -> dict | None:
    """The stored study, if asked the same way, on the ground-truth files the benchmark would use now, with the
    run record's choice unchanged."""
    if stored is None:
        return None
    asked = _options(kw.get("params"), kw.get("ensemble"), kw.get("dampings"), kw.get("version"))
    if stored.get("options") != asked:
        return None
    root = (store.gt / setting.name / asked["version"]) if asked["version"] else gt_artifact.current(store, setting)
    if root is None or records.gt_reference(store, root, stored["replicas"], stored["full_models"]) != \
            stored["ground_truth"]:
        return None
    gt = GroundTruth.open(root, setting, store=store)
    found = study_artifacts(store, setting, gt, stored["replicas"], lambda *a: None)
    if [_study_reference(store, o) for o in found] != stored.get("study_artifacts", []):
        return None
    if asked["params"] is None and records.chosen_params(store, setting, cls)[0] != stored["params"]:
        return None
    return stored


def run(store: ResultsStore, setting: settings_mod.Setting, cls, *, report_queries: bool = False, log=print,
        **kw) -> dict:
    """:func:`study`, written to ``<store>/gap/<setting>_<solver>.json`` (the command line draws its figure).

    ``report_queries``: also evaluate the protocol chosen on validation (:func:`best_protocol`) on the
    reported queries, reusing a stored study of the same artifact when no option asks for a new one. A stored
    reported-query evaluation is kept, with or without ``report_queries``, while :func:`carried_report` says it
    still holds."""
    store.check_writable(store.gap)
    path = study_path(store, setting.name, cls.name)
    previous = read_json(path) if path.is_file() else None
    rec = _reusable(store, setting, cls, previous, kw) if report_queries else None
    if rec is None:
        rec = study(store, setting, cls, log=log, **kw)
    else:
        log(f"reusing the validation study {store.relative(path)} (created {rec['created']})")
    carried = carried_report(store, setting, cls, previous, rec)
    if carried is not None:
        rec["reported"] = carried
        log("reusing the reported-query evaluation of the same protocol"
            + (f" (created {carried['created']})" if "created" in carried else ""))
    elif report_queries:
        rec["reported"] = report(store, setting, cls, rec, device=kw.get("device"), log=log)
    write_json(path, records._clean(rec))
    log(f"wrote {store.relative(path)}")
    return rec
