"""Floor 5: Table 1 — the paper's LDS row for a setting, either recomputed from the committed ground truth or
read from the committed run records.

:func:`recompute` (``make lds-mnist``) verifies the ground truth, fits the solver on the committed explained
model, chooses its hyper-parameters on the validation queries, scores the reported queries, and compares the
result with the committed record, query by query. :func:`committed` (``make table1``) only reads the records,
and says for each whether it is still current.
"""

from __future__ import annotations

import time

from ..evaluate import metrics, records
from ..groundtruth import artifact as gt_artifact
from ..setup import settings as settings_mod
from ..setup.artifacts import ArtifactError, read_json
from ..setup.store import ResultsStore
from . import gap


def compare(new: dict, old: dict) -> dict:
    """The recomputed LDS against the committed one: the difference of the means, the paired per-query difference
    with its standard error, and whether they agree within the committed standard error."""
    theirs = old.get("per_query") or []
    paired = metrics.paired_difference(new["per_query"], theirs) if len(new["per_query"]) == len(theirs) else {}
    diff = None if new.get("mean") is None or old.get("mean") is None else new["mean"] - old["mean"]
    return {"difference": diff, "paired_difference": paired.get("difference"),
            "paired_difference_se": paired.get("se"), "max_query_difference": paired.get("max_abs"),
            "tolerance": old.get("se"), "agree": diff is not None and abs(diff) <= (old.get("se") or 0.0)}


def recompute(store: ResultsStore, setting: settings_mod.Setting, cls, *, explain: str | None = None, device=None,
              search_queries=None, log=print) -> dict:
    """Recompute ``cls``'s Table 1 LDS on ``setting`` from the committed ground truth; never writes a record.
    ``explain``: where the explained model comes from (default: as in the committed record)."""
    old = records.read_record(store, setting.name, cls.name)
    committed_lds = (old or {}).get("lds")
    if explain is None:
        explain = ((committed_lds or {}).get("explained") or {}).get("source", "ground truth")
    stages = {}
    t0 = time.perf_counter()
    log(f"[1/3] verifying the ground truth of {setting.name} (every file's sha256, the pinned root hash, the "
        f"manifest against its files)")
    gt = gt_artifact.load(store, setting)
    stages["verify_s"] = time.perf_counter() - t0
    log(f"      {store.relative(gt.root)}: {len(gt.manifest['files'])} files verified in {stages['verify_s']:.0f} s"
        + (", root hash pinned" if gt.pinned else ", root hash NOT pinned in the store's index"))
    log(f"[2/3] fitting {cls.name} on the explained model and choosing its hyper-parameters on "
        f"{len(gt.validation_queries)} validation queries; [3/3] scoring {len(gt.queries)} reported queries "
        f"(progress bars below, one per pass over the training set)")
    fixed, grid = search_space(cls, committed_lds)
    section = records.lds_section(store, gt, cls, fixed, search=True, grid=grid, search_queries=search_queries,
                                  explain=explain, device=device, log=log)
    cost = section["cost"]
    stages.update(fit_s=cost.get("fit_measured_s"), search_s=cost.get("search_s"), score_s=cost.get("score_s"),
                  total_s=time.perf_counter() - t0, peak_mb=cost.get("peak_mb"))
    return {"setting": setting.name, "solver": cls.name, "recomputed": section, "committed": committed_lds,
            "committed_created": (old or {}).get("created"),
            "comparison": compare(section, committed_lds) if committed_lds else None, "stages": stages}


def search_space(cls, committed_lds: dict | None) -> tuple[dict, dict | None]:
    """The hyper-parameters the committed record fixed and the grid it searched, read from its trials, so the
    recomputation chooses among the same candidates (a record made with ``--param`` keeps those values fixed);
    without a record, the solver's own grid."""
    trials = ((committed_lds or {}).get("selection") or {}).get("trials") or []
    if not trials:
        return (dict(committed_lds["params"]) if committed_lds and committed_lds.get("params") else {}), None
    keys = sorted(set().union(*(t["params"] for t in trials)))
    values = {k: [] for k in keys}
    for t in trials:
        for k in keys:
            if t["params"].get(k) not in values[k]:
                values[k].append(t["params"].get(k))
    fixed = {k: v[0] for k, v in values.items() if len(v) == 1 and k in cls.accepted()}
    grid = {k: v for k, v in values.items() if len(v) > 1}
    return fixed, grid


def committed(store: ResultsStore, setting: settings_mod.Setting, methods: list) -> list[dict]:
    """The committed records of ``methods`` on ``setting``: ``{name, record, stale}`` (``stale``: reasons, {} when
    current)."""
    out = []
    for method in methods:
        rec = records.read_record(store, setting.name, method.name)
        if rec is None or "lds" not in rec:
            out.append({"name": method.name, "record": None, "stale": {}})
            continue
        out.append({"name": method.name, "record": rec, "stale": records.stale_reasons(rec, store, setting, method)})
    return out


def gap_reported(store: ResultsStore, setting: settings_mod.Setting, methods: list) -> list[dict]:
    """The gap study's protocol (chosen on validation queries) evaluated on the reported queries, where one was
    made and is still current (``tdabench gap --report``)."""
    out = []
    root = gt_artifact.current(store, setting)
    for method in methods:
        path = gap.study_path(store, setting.name, method.name)
        if root is None or not path.is_file():
            continue
        rec = read_json(path)
        rep = rec.get("reported")
        if not rep:
            continue
        try:
            stale = records.stale_reasons({"format": records.RUN_FORMAT, "lds": rep["lds"]}, store, setting, method)
        except (ArtifactError, KeyError) as exc:
            stale = {"lds": [str(exc)]}
        out.append({"name": method.name, "path": store.relative(path), "reported": rep, "stale": stale})
    return out
