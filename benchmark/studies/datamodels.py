"""Floor 5: datamodels as the far end of the cost–quality frontier — attribution by retraining.

A datamodel (Ilyas et al., *Datamodels*, ICML 2022) fits, for each query q, a ridge regression of the query's margin on
which training points a model saw, over n retrained α-subset models (:mod:`benchmark.groundtruth.datamodel_models`,
drawn apart from every ground truth): θ_q = argmin ‖y_q − X̃θ‖² + λ‖θ‖² with X̃ the centred (n, N) masks and y_q the
centred margins. θ_q(i) is an attribution τ(q, i) like any solver's (up-weighting point i raises the margin), so it is
scored with the project's LDS against the evaluation ground truth: Σ_{i∈S_m} θ_q(i) over the ground truth's subsets.

One eigendecomposition of the smaller Gram matrix (n × n in the dual, N × N in the primal) serves every query and
every ridge: θ(λ) = B diag(1/(s + λ)) Lᵀ y with (B, L, s) from :func:`decompose`. λ = c · tr(X̃ᵀX̃)/N, c chosen on the
ground truth's validation queries only. Cost: the n models' training seconds (as the builder measured them) plus the
regression's seconds. A datamodel explains no single model: its paired difference against a leaderboard row compares
attribution quality against the same target on the same queries, not two explanations of one model.

Output ``<store>/datamodels/<setting>.json``: per n, the LDS summary with per-query values, the chosen ridge and
its validation trials, the cost, the paired difference against every leaderboard row scored on the same target; the
smallest n that beats each row; ``points`` for the cost–quality frontier; and what it was computed from (ground truth
reference, training artifact root hash and the hash of the chunks used, metric probe, the rows' content hashes),
from which :func:`stale_reasons` says when it no longer describes what a rerun would compute.
"""

from __future__ import annotations

import datetime as _dt
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..evaluate import fingerprint, metrics, records
from ..evaluate.cost import machine_load
from ..groundtruth import artifact as gt_artifact
from ..groundtruth.artifact import GroundTruth
from ..groundtruth.datamodel_models import Spec, SubsetModels, chunk_file, latest
from ..setup import settings as settings_mod
from ..setup.artifacts import ArtifactError, code_version, environment, write_json
from ..setup.config import stable_hash
from ..setup.store import ResultsStore

STUDY_VERSION = 1
# Ridge λ = c · tr(X̃ᵀX̃)/N (the mean per-point mask variance times n): c searched over half decades.
RIDGE_GRID = tuple(float(10.0 ** e) for e in np.arange(-3.0, 3.01, 0.5))
Z_BEAT = 1.96  # a datamodel "beats" a row when the paired difference's 95% interval lies above zero
DECIMALS = 6  # per-query values are stored rounded, and every summary is computed from the rounded values


@dataclass(frozen=True)
class Options:
    sizes: tuple[int, ...] = (100, 300, 1000, 3000)
    spec: Spec = field(default_factory=Spec)
    ridge_grid: tuple[float, ...] = RIDGE_GRID


# ---------------------------------------------------------------- the regression

@dataclass
class Decomposition:
    """θ(λ) = basis · diag(1/(eig + λ)) · leftᵀ (Y − Ȳ) for the centred ridge regression of Y on the masks."""

    left: np.ndarray  # (n, r)
    basis: np.ndarray  # (N, r)
    eig: np.ndarray  # (r,)
    scale: float  # tr(X̃ᵀX̃) / N: the unit of λ

    def coefficients(self, y: np.ndarray) -> np.ndarray:
        """(r, Q) coordinates of the centred outputs ``y`` (n, Q)."""
        return self.left.T @ (y - y.mean(axis=0))

    def weights(self, coef: np.ndarray, c: float) -> np.ndarray:
        """(N, Q) θ for relative ridge ``c``."""
        return self.basis @ (coef / (self.eig + c * self.scale)[:, None])


def decompose(masks: np.ndarray) -> Decomposition:
    """Eigendecomposition of the smaller Gram matrix of the centred (n, N) masks: dual (n ≤ N) or primal."""
    x = np.asarray(masks, dtype=np.float64)
    x = x - x.mean(axis=0)
    n, n_train = x.shape
    scale = float((x * x).sum()) / n_train
    if n <= n_train:  # θ = X̃ᵀ U diag(1/(s+λ)) Uᵀ y, with X̃X̃ᵀ = U S Uᵀ
        s, u = np.linalg.eigh(x @ x.T)
        return Decomposition(u, x.T @ u, np.clip(s, 0.0, None), scale)
    s, v = np.linalg.eigh(x.T @ x)  # θ = V diag(1/(s+λ)) Vᵀ X̃ᵀ y, with X̃ᵀX̃ = V S Vᵀ
    return Decomposition(x @ v, v, np.clip(s, 0.0, None), scale)


def ridge_weights(masks: np.ndarray, outputs: np.ndarray, c: float) -> np.ndarray:
    """(N, Q) ridge weights of ``outputs`` (n, Q) on ``masks`` (n, N) at relative ridge ``c``."""
    d = decompose(masks)
    return d.weights(d.coefficients(np.asarray(outputs, dtype=np.float64)), c)


def _per_query(d: Decomposition, projected: np.ndarray, coef: np.ndarray, c: float, target: np.ndarray) -> np.ndarray:
    # Σ_{i∈S_m} θ_q(i) = (M_eval B) diag(1/(s+λ)) coef: the (N, Q) weights are never formed.
    pred = projected @ (coef / (d.eig + c * d.scale)[:, None])
    return np.round(metrics.lds_from_predictions(pred, target), DECIMALS)


@dataclass
class Fit:
    """One datamodel: its validation search, chosen ridge, reported per-query LDS and the seconds it took."""

    n: int
    trials: dict  # c -> validation mean LDS
    ridge: float
    per_query: np.ndarray
    fit_s: float  # decomposition + the reported queries' weights and scores at the chosen ridge
    search_s: float  # the validation search
    scale: float  # λ = ridge · scale


def fit_datamodel(masks: np.ndarray, reported: np.ndarray, validation: np.ndarray, gt_masks: np.ndarray,
                  target_reported: np.ndarray, target_validation: np.ndarray, grid) -> Fit:
    """Choose the ridge on the validation columns, then score the reported ones once."""
    t0 = time.perf_counter()
    d = decompose(masks)
    projected = np.asarray(gt_masks, dtype=np.float64) @ d.basis
    decompose_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    coef_v = d.coefficients(np.asarray(validation, dtype=np.float64))
    trials = {float(c): float(np.nanmean(_per_query(d, projected, coef_v, c, target_validation))) for c in grid}
    search_s = time.perf_counter() - t0
    best = max(trials, key=lambda c: (trials[c], -c))  # ties: the stronger ridge
    t0 = time.perf_counter()
    coef = d.coefficients(np.asarray(reported, dtype=np.float64))
    per_query = _per_query(d, projected, coef, best, target_reported)
    return Fit(len(masks), trials, best, per_query, decompose_s + time.perf_counter() - t0, search_s, d.scale)


# ---------------------------------------------------------------- the study

def _artifact_reference(store: ResultsStore, art: SubsetModels, n: int) -> dict:
    files = art.manifest["files"]
    used = ["queries.npy", "validation_queries.npy"] + [
        str(chunk_file(art.root, c).relative_to(art.root)) for c in range(-(-n // art.spec.chunk))]
    return {"path": store.relative(art.root), "root_hash": art.root_hash(), "complete": bool(art.manifest["complete"]),
            "models_used": n, "used_files_hash": stable_hash({u: files.get(u) for u in used})}


def _rows(store: ResultsStore, setting: settings_mod.Setting) -> dict[str, dict]:
    """Every leaderboard row's LDS section, read through the records' own check (a refused record is reported)."""
    folder = store.runs / setting.name
    out = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        method, ensemble = records.parse_row_name(path.stem)
        try:
            rec = records.read_record(store, setting.name, method, ensemble)
        except records.RecordError as exc:
            out[path.stem] = {"refused": str(exc)}
            continue
        if rec and "lds" in rec:
            out[path.stem] = {"lds": rec["lds"], "content_sha256": rec.get(records.CONTENT_HASH)}
    return out


def run(store: ResultsStore, setting: settings_mod.Setting, options: Options, *, gt: GroundTruth | None = None,
        progress: bool = True, log=print) -> dict:
    """Fit a datamodel on the first n training models for each n of ``options.sizes`` the artifact holds."""
    from tqdm.auto import tqdm

    gt = gt or gt_artifact.load(store, setting)
    root = latest(store, setting, options.spec, gt)
    if root is None:
        raise ArtifactError(f"no datamodel training models for {setting.name} on {store.relative(gt.root)}'s queries; "
                            f"train them with `tdabench datamodels {setting.name}`")
    art = SubsetModels.open(store, setting, root, gt)
    sizes = [n for n in sorted(options.sizes) if n <= art.n]
    if not sizes:
        raise ArtifactError(f"{store.relative(root)} holds {art.n} models, fewer than the smallest size asked "
                            f"({min(options.sizes)}); train more with `tdabench datamodels {setting.name}`")
    skipped = [n for n in options.sizes if n > art.n]
    if skipped:
        log(f"{store.relative(root)} holds {art.n} models: sizes {skipped} wait for more training")
    replicas = gt.complete_replicas()
    t_rep, t_val = gt.target("margin", "queries", replicas), gt.target("margin", "validation", replicas)
    target_sha = fingerprint.target_hash(gt.masks, t_rep, t_val)
    ceiling = gt.manifest["noise_ceiling"]["margin"]["lds_ceiling"]
    rows = _rows(store, setting)
    pairable = {}
    for name, row in rows.items():
        lds = row.get("lds")
        if lds is None:
            continue
        why = [] if lds.get("target_sha256") == target_sha else ["scored against another target"]
        if not lds.get("per_query"):
            why.append("stores no per-query values")
        elif lds.get("query_columns") is not None or len(lds["per_query"]) != len(gt.queries):
            why.append("reports other queries")
        row["unpaired"] = why
        if not why:
            pairable[name] = lds
    points = []
    for n in tqdm(sizes, desc=f"datamodels {setting.name}", unit="fit", disable=not progress):
        f = fit_datamodel(art.masks[:n], art.outputs("queries")[:n], art.outputs("validation")[:n], gt.masks,
                          t_rep, t_val, options.ridge_grid)
        summary = metrics.lds_summary(f.per_query, ceiling)
        training_s = float(art.seconds[:n].sum())
        paired = {}
        for name, lds in pairable.items():
            d = metrics.paired_difference(f.per_query, lds["per_query"])
            paired[name] = {"difference": d["difference"], "se": d["se"], "n": d["n"], "wins": d["wins"],
                            "row_lds": lds["mean"], "beats": bool(d["difference"] - Z_BEAT * d["se"] > 0)}
        points.append({
            "members": n, "lds": summary["mean"], "lds_se": summary["se"], "ci_low": summary["ci_low"],
            "ci_high": summary["ci_high"], "n_queries": summary["n"], "n_undefined": summary["n_undefined"],
            "of_ceiling": summary["of_ceiling"], "of_ceiling_se": summary["of_ceiling_se"],
            "ridge": f.ridge, "ridge_lambda": f.ridge * f.scale,
            "validation_trials": {repr(c): v for c, v in f.trials.items()},
            "compute_s": training_s + f.fit_s, "training_s": training_s, "fit_s": f.fit_s, "search_s": f.search_s,
            "paired": paired, "per_query": [None if not np.isfinite(v) else float(v) for v in f.per_query],
            "artifact": _artifact_reference(store, art, n)})
        log(f"{setting.name} datamodel n={n}: LDS {summary['mean']:.4f} ± {summary['se']:.4f} "
            f"(ridge c={f.ridge:g}; {training_s:.0f} s training + {f.fit_s:.1f} s fitting)")
    smallest = {}
    for name in pairable:
        won = [p["members"] for p in points if p["paired"][name]["beats"]]
        smallest[name] = won[0] if won else f"not within {max(sizes)}"
    return {
        "format": STUDY_VERSION, "setting": setting.name, "kind": "datamodels",
        "method": "ridge regression of each query's margin on the centred subset masks of n retrained alpha-subset "
                  "models (subsets and seeds drawn apart from every ground truth); ridge chosen on the validation "
                  "queries; attribution tau(q, i) = theta_q(i)",
        "pairing": "per query, on the same reported queries and target as each row; a datamodel explains no single "
                   "model, so the difference compares attribution quality against the same target",
        "beats_rule": f"paired difference - {Z_BEAT} se > 0",
        "sizes_asked": list(options.sizes), "sizes": sizes, "ridge_grid": list(options.ridge_grid),
        "ceiling": ceiling, "queries": len(gt.queries), "validation_queries": len(gt.validation_queries),
        "target_sha256": target_sha,
        "ground_truth": records.gt_reference(store, gt.root, replicas, full_models=0),
        "artifact": {"path": store.relative(art.root), "root_hash": art.root_hash(), "spec": art.manifest["spec"],
                     "models_available": art.n, "pinned": art.root_hash() == _pinned(store, art.root)},
        "metrics_probe": fingerprint.metric_probe(),
        "rows": {name: {"content_sha256": row.get("content_sha256"), "lds": (row.get("lds") or {}).get("mean"),
                        "unpaired": row.get("unpaired") or [], **({"refused": row["refused"]} if "refused" in row else {})}
                 for name, row in rows.items()},
        "smallest_n_beating": smallest, "points": points,
        "environment": environment("cpu"), "machine_load": machine_load(), "code_version": code_version(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _pinned(store: ResultsStore, root: Path) -> str | None:
    from ..groundtruth import index

    return index.pinned(store, root)


# ---------------------------------------------------------------- the file, and when it is current

def path_of(store: ResultsStore, setting: settings_mod.Setting) -> Path:
    return store.root / "datamodels" / f"{setting.name}.json"


def problems(result: dict) -> list[str]:
    """Why a result file does not check against itself (empty: it does)."""
    why = []
    if result.get(records.CONTENT_HASH) != records.content_hash(result):
        why.append("its content_sha256 does not match its content (edited or truncated)")
    for p in result.get("points", []):
        pq = np.array([np.nan if v is None else v for v in p["per_query"]], dtype=np.float64)
        s = metrics.lds_summary(pq, result.get("ceiling"))
        if not (np.isclose(s["mean"], p["lds"], atol=1e-12) and np.isclose(s["se"], p["lds_se"], atol=1e-12)):
            why.append(f"n={p['members']}: its LDS {p['lds']} ± {p['lds_se']} is not what its per-query values give")
    return why


def write(store: ResultsStore, setting: settings_mod.Setting, result: dict) -> Path:
    """Write the result atomically with its content hash, and read it back through the check."""
    path = path_of(store, setting)
    write_json(path, records.seal(json.loads(json.dumps(result, default=float))))
    read(store, setting)
    return path


def read(store: ResultsStore, setting: settings_mod.Setting) -> dict | None:
    path = path_of(store, setting)
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except ValueError as exc:
        raise ArtifactError(f"refused {path}: not valid JSON ({exc}); rerun `tdabench datamodels {setting.name}`")
    why = problems(result)
    if why:
        raise ArtifactError(f"refused {path}: {'; '.join(why[:3])}; restore it from git or rerun "
                            f"`tdabench datamodels {setting.name} --no-train`")
    return result


def stale_reasons(result: dict, store: ResultsStore, setting: settings_mod.Setting) -> list[str]:
    """Why the result no longer describes what a rerun would compute (empty: current)."""
    why = []
    if result.get("format") != STUDY_VERSION:
        why.append(f"study format {result.get('format')} != {STUDY_VERSION}")
    root = gt_artifact.current(store, setting)
    used = result["ground_truth"]
    if root is None:
        why.append("its ground truth is gone")
    else:
        now = records.gt_reference(store, root, used["replicas"], full_models=0)
        if now["path"] != used["path"]:
            why.append(f"the ground truth is now {now['path']} (result used {used['path']})")
        elif now["root_hash"] != used["root_hash"] or now["used_files_hash"] != used["used_files_hash"]:
            why.append("the ground truth's files or root hash changed")
        elif used["recipe_hash"] != setting.recipe_hash():
            why.append("the setting's training recipe changed")
    art_root = store.root / result["artifact"]["path"]
    from ..groundtruth.datamodel_models import KIND
    from ..setup.artifacts import MANIFEST, read_json

    if not (art_root / MANIFEST).is_file():
        why.append(f"its training artifact {result['artifact']['path']} is gone")
    else:
        man = read_json(art_root / MANIFEST)
        if man.get("kind") != KIND or man.get("recipe_hash") != setting.recipe_hash():
            why.append("its training artifact was trained with another recipe")
        for p in result["points"]:
            ref = p["artifact"]
            files = man.get("files", {})
            used_files = ["queries.npy", "validation_queries.npy"] + [
                f"chunks/c{c:04d}.npz" for c in range(-(-ref["models_used"] // man["spec"]["chunk"]))]
            if stable_hash({u: files.get(u) for u in used_files}) != ref["used_files_hash"]:
                why.append(f"n={p['members']}: the training models it used changed")
        if man.get("complete") and not result["artifact"].get("pinned"):
            why.append("it was computed before its training artifact was finished and pinned")
    if result.get("metrics_probe") != fingerprint.metric_probe():
        why.append("the metric code computes something else now")
    rows = _rows(store, setting)
    for name, old in result.get("rows", {}).items():
        if (rows.get(name) or {}).get("content_sha256") != old.get("content_sha256"):
            why.append(f"leaderboard row {name} changed")
    for name in set(rows) - set(result.get("rows", {})):
        why.append(f"leaderboard row {name} is new")
    return why


def table(result: dict) -> str:
    """The result as a terminal table: LDS and cost per n, then the smallest n beating each row."""
    lines = [f"{result['setting']}: datamodels against {result['ground_truth']['path']} (ceiling "
             f"{result['ceiling']:.3f}; {result['queries']} reported queries)",
             f"{'n':>6} {'LDS':>8} {'± se':>7} {'of ceil.':>8} {'ridge c':>8} {'train s':>9} {'fit s':>7}"]
    for p in result["points"]:
        lines.append(f"{p['members']:>6} {p['lds']:>8.4f} {p['lds_se']:>7.4f} {p['of_ceiling']:>8.3f} "
                     f"{p['ridge']:>8g} {p['training_s']:>9.0f} {p['fit_s']:>7.1f}")
    lines.append("smallest n beating each row (paired per query, 95%):")
    for name, n in sorted(result["smallest_n_beating"].items(), key=lambda kv: -(result["rows"][kv[0]]["lds"] or 0)):
        lds = result["rows"][name]["lds"]
        lines.append(f"  {name:<24} {lds:>7.4f}  {n}")
    for name, row in sorted(result["rows"].items()):
        if row.get("unpaired") or row.get("refused"):
            lines.append(f"  {name:<24} not paired: {'; '.join(row.get('unpaired') or [row.get('refused')])}")
    return "\n".join(lines)
