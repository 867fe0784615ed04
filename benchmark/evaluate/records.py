"""Floor 4: run records — one JSON file per setting × method, and when its numbers stop being current.

``run(store, setting, method)`` evaluates and writes ``<store>/runs/<setting>/<method>.json`` with an ``lds``
and a ``mislabel`` section (:mod:`.engine`). Each section records what produced it:

- the artifact it used: path, version, **root hash** (:mod:`benchmark.groundtruth.index`), recipe hash, the
  replicas and a hash of exactly the files it read, and a hash of the target it was scored against;
- the **behavioural fingerprint** of the code (:mod:`.fingerprint`): the solver's probe scores with the
  section's parameters, the metric probe, and the engine version.

A section is *stale* (:func:`stale_reasons`) when any of these no longer holds: the artifact the benchmark would
use now is another one or has another root hash or recipe, the target differs, or the solver or metric code
computes something else. A stale number is never printed as current.

A record is also checked against itself whenever it is read (:func:`read_record`, :func:`record_problems`): its
LDS summary (mean, se, bootstrap interval, fraction of the ceiling) must be what :mod:`.metrics` computes from its
own per-query values, its mislabel numbers must follow from its recall curve, and its ``content_sha256`` (over the
canonical JSON of the rest, written by :func:`run`) must match. One that does not is refused
(:class:`RecordError`), never shown.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from pathlib import Path

import numpy as np

from ..groundtruth import artifact as gt_artifact
from ..groundtruth import mislabel as mislabel_mod
from ..groundtruth import zoo as zoo_mod
from ..groundtruth.artifact import GroundTruth
from ..setup import settings as settings_mod
from ..setup.artifacts import MANIFEST, ArtifactError, code_version, environment, read_json, write_json
from ..setup.config import Protocol, stable_hash
from ..setup.data import DataError
from ..setup.store import ResultsStore
from . import engine, fingerprint, metrics
from .cost import machine_load
from .engine import LOSS, RANDOM, Baseline, RunError
from .solver import Solver

# Bump when the record's layout changes: every record made before goes stale.
RUN_FORMAT = 2
TASKS = ("lds", "mislabel")
# The corruption the leaderboard reports (10% flipped, seed 0, one model); other specs are studies.
MISLABEL_SPEC = mislabel_mod.Spec()


# ---------------------------------------------------------------- what a section used

def _complete_replicas(man: dict) -> list[int]:
    protocol = Protocol(**man["protocol"])
    listed = set(man.get("files", {}))
    return [r for r in range(protocol.seeds)
            if all(f"units/r{r:02d}_s{j:04d}.npz" in listed for j in range(protocol.subsets))]


def gt_reference(store: ResultsStore, root: Path, replicas: list[int] | None = None, full_models: int = 1) -> dict:
    """Identity of a ground-truth artifact *as used*: which version, its root hash, which replicas, and a hash
    over the sha256 of exactly the files the evaluation read (so a build that progresses elsewhere does not
    make a record stale, but new complete replicas or changed files do)."""
    root = Path(root)
    man = read_json(root / MANIFEST)
    replicas = _complete_replicas(man) if replicas is None else list(replicas)
    files = man.get("files", {})
    protocol = Protocol(**man["protocol"])
    used = ["masks.npy", "queries.npy", "validation_queries.npy"]
    used += [f"units/r{r:02d}_s{j:04d}.npz" for r in replicas for j in range(protocol.subsets)]
    for k in range(full_models):
        used += [f"full/full_k{k:02d}.npz", f"full/full_k{k:02d}.safetensors"]
    return {
        "path": store.relative(root), "setting": man["setting"], "version": man["version"],
        "complete": bool(man.get("complete")), "root_hash": gt_artifact.root_hash(man),
        "recipe_hash": man["recipe_hash"], "replicas": replicas, "replicas_total": protocol.seeds,
        "units_done": man.get("units_done"), "units_total": man.get("units_total"), "full_models_used": full_models,
        "used_files_hash": stable_hash({u: files.get(u) for u in used}),
        "missing_files": [u for u in used if u not in files],
    }


def mislabel_reference(store: ResultsStore, art: mislabel_mod.MislabelArtifact) -> dict:
    man = art.manifest
    return {"path": store.relative(art.root), "setting": man["setting"], "version": man["version"],
            "root_hash": art.root_hash(), "spec": man["spec"], "recipe_hash": man["recipe_hash"],
            "models": man.get("models")}


def target_hash(gt: GroundTruth, section: dict) -> str:
    """Hash of the targets a section was scored against (reported columns and validation), from ``gt`` now."""
    replicas, measurement = section["replicas"], section["measurement"]
    reported = gt.target(measurement, "queries", replicas)
    if section.get("query_columns") is not None:
        reported = reported[:, section["query_columns"]]
    return fingerprint.target_hash(gt.masks, reported, gt.target(measurement, "validation", replicas))


# ---------------------------------------------------------------- fingerprints

def solver_fingerprint(method, params: dict | None) -> dict | None:
    if isinstance(method, Baseline):
        return None
    return fingerprint.cached_probe(method, json.dumps({**method.defaults, **(params or {})}, sort_keys=True))


def section_fingerprint(method, params: dict | None) -> dict:
    return {"version": fingerprint.FINGERPRINT_VERSION, "engine": engine.ENGINE_VERSION,
            "solver": solver_fingerprint(method, params), "metrics": fingerprint.metric_probe()}


def _fingerprint_reasons(recorded: dict | None, method, params: dict | None) -> list[str]:
    recorded = recorded or {}
    why = []
    if recorded.get("version") != fingerprint.FINGERPRINT_VERSION:
        why.append(f"fingerprint version {recorded.get('version')} != {fingerprint.FINGERPRINT_VERSION}")
        return why
    if recorded.get("engine") != engine.ENGINE_VERSION:
        why.append(f"evaluation engine version {recorded.get('engine')} != {engine.ENGINE_VERSION}")
    # A peer adapter whose library is not installed here cannot be probed: its record is shown as recorded (with
    # the library's version, :func:`recorded_with`), the rest of it checked as usual; it is not stale for that.
    missing = None if isinstance(method, Baseline) else method.unavailable()
    if not missing and not isinstance(method, Baseline):
        diff = fingerprint.compare_solver(recorded.get("solver"), solver_fingerprint(method, params), method,
                                          {**method.defaults, **(params or {})})
        if diff:
            why.append(f"the solver computes something else now (probe: {diff})")
    diff = fingerprint.compare(recorded.get("metrics"), fingerprint.metric_probe(), fingerprint.METRIC_RTOL)
    if diff:
        why.append(f"the metric code computes something else now (probe: {diff})")
    return why


def recorded_with(record: dict, method) -> str | None:
    """For a solver that cannot run here (its optional library is not installed): "recorded with kronfluence 1.0.1"
    and how to install it, since its solver probe cannot be re-checked on this machine; None where it can."""
    missing = None if isinstance(method, Baseline) or method is None else method.unavailable()
    if not missing:
        return None
    libraries = sorted({f"{i['library']} {i.get('library_version') or '(version not recorded)'}"
                        for section in TASKS for i in (record.get(section) or {}).get("solver_info") or []
                        if isinstance(i, dict) and i.get("library")})
    return (f"recorded with {', '.join(libraries) or 'a library not installed here'}; its solver probe cannot be "
            f"re-checked here: the solver {missing}")


# ---------------------------------------------------------------- records on disk

# An ensemble row (scores averaged over n explained models) is its own leaderboard row and record, beside the
# solver's single-model one: "trak-ens8" is TRAK averaged over 8 zoo models.
ENSEMBLE_MARK = "-ens"


def row_name(method_name: str, ensemble: int = 1) -> str:
    """The leaderboard row (and record file) of ``method_name`` averaged over ``ensemble`` explained models."""
    if ensemble < 1:
        raise RunError(f"an ensemble has at least one model, not {ensemble}")
    return method_name if ensemble == 1 else f"{method_name}{ENSEMBLE_MARK}{ensemble}"


def parse_row_name(name: str) -> tuple[str, int]:
    """(solver name, ensemble size) of a row name; the inverse of :func:`row_name`."""
    base, mark, n = name.rpartition(ENSEMBLE_MARK)
    if mark and base and n.isdigit() and int(n) > 1:
        return base, int(n)
    return name, 1


def run_path(store: ResultsStore, setting_name: str, method_name: str, ensemble: int = 1) -> Path:
    return store.runs / setting_name / f"{row_name(method_name, ensemble)}.json"


# ---------------------------------------------------------------- a record checked against itself

class RecordError(ArtifactError):
    """A run record that does not check against itself (edited by hand, truncated, a field deleted, or written
    without its content hash): refused before any of its numbers is used."""


CONTENT_HASH = "content_sha256"
# Per-query LDS values are stored rounded to 6 decimals (engine.evaluate_lds) while the summary was computed before
# rounding: a mean, standard error or bootstrap quantile recomputed from them moves by at most 5e-7.
SUMMARY_ATOL = 1e-6
LDS_SUMMARY = ("mean", "se", "ci_low", "ci_high", "ci_level", "n", "n_undefined")
MISLABEL_KEYS = ("n", "n_flipped", "auc", "auc_se", "recall_curve", "recall_curve_area") + tuple(
    k for f in metrics.FRACTIONS for k in (f"recall_{round(100 * f)}", f"recall_{round(100 * f)}_se"))
_CHECKED: dict[str, list[str]] = {}  # content hash -> problems of its numbers (a hash fixes the content)


def content_hash(record: dict) -> str:
    """sha256 of the canonical JSON (sorted keys) of ``record`` without its own content hash."""
    return stable_hash({k: v for k, v in record.items() if k != CONTENT_HASH}, length=64)


def seal(record: dict) -> dict:
    """``record`` with its content hash as the last field, as :func:`run` writes it."""
    body = {k: v for k, v in record.items() if k != CONTENT_HASH}
    return {**body, CONTENT_HASH: content_hash(body)}


def _close(stored, want, atol: float) -> bool:
    """``stored`` (a JSON number or null) equals ``want`` (NaN stored as null) within ``atol``."""
    if want is None or (isinstance(want, float) and not math.isfinite(want)):
        return stored is None
    if isinstance(stored, bool) or not isinstance(stored, (int, float)):
        return False
    return abs(stored - want) <= atol


def _lds_problems(lds: dict, random: bool) -> list[str]:
    """What in an ``lds`` section is not what its own per-query values give (metrics.lds_summary, bootstrap
    included: same seed, same resamples)."""
    missing = [k for k in LDS_SUMMARY if k not in lds]
    if missing:
        return [f"lds has no {', '.join(missing)}"]
    per_query = lds.get("per_query")
    if per_query is None:
        if not random:  # only the random baseline stores no per-query values (engine.evaluate_random_lds)
            return ["lds has no per_query values to check its summary against"]
        ceiling = lds.get("ceiling")
        if ceiling and lds["mean"] is not None and not _close(lds.get("of_ceiling"), lds["mean"] / ceiling, 1e-12):
            return [f"lds.of_ceiling {lds.get('of_ceiling')!r} is not lds.mean / lds.ceiling"]
        return []
    if not isinstance(per_query, list) or any(v is not None and (isinstance(v, bool) or not isinstance(
            v, (int, float)) or abs(v) > 1) for v in per_query):
        return ["lds.per_query holds something other than correlations in [-1, 1] (or null)"]
    if lds.get("queries") is not None and lds["queries"] != len(per_query):
        return [f"lds.queries is {lds['queries']} but lds.per_query holds {len(per_query)} values"]
    ceiling = lds.get("ceiling")
    if ceiling is not None and (lds.get("noise_ceiling") or {}).get("lds_ceiling", ceiling) != ceiling:
        return ["lds.ceiling is not lds.noise_ceiling.lds_ceiling"]
    want = metrics.lds_summary(np.array([np.nan if v is None else v for v in per_query], dtype=np.float64),
                               ceiling)
    problems = []
    for key in LDS_SUMMARY + ("of_ceiling", "of_ceiling_se"):
        atol = SUMMARY_ATOL / ceiling if key.startswith("of_ceiling") and ceiling else SUMMARY_ATOL
        if not _close(lds.get(key), want[key], atol):
            problems.append(f"lds.{key} is {lds.get(key)!r} but its {len(per_query)} per-query values give "
                            f"{want[key]:.6g}")
    return problems


def _mislabel_problems(mis: dict, random: bool) -> list[str]:
    """What in a ``mislabel`` section does not follow from the rest of it. Recall at 10..50% must be read off the
    stored recall curve, each standard error must be its formula's, the curve's area its trapezoid, and the AUC
    must match that area: without ties, the area under the exact recall curve is p/2 + (1 − p)·AUC (p the flipped
    share), and the curve sampled at 1% steps of a non-decreasing recall lies within 0.005 of it. The AUC itself
    needs the scores, which a record does not keep (the content hash covers it)."""
    missing = [k for k in MISLABEL_KEYS if k not in mis]
    if missing:
        return [f"mislabel has no {', '.join(missing)}"]
    n, n_flipped = mis["n"], mis["n_flipped"]
    if not (isinstance(n, int) and isinstance(n_flipped, int) and 0 < n_flipped < n):
        return [f"mislabel.n {n!r} and n_flipped {n_flipped!r} are not two counts with 0 < n_flipped < n"]
    if random:  # the expected random order is exact: all of it recomputes
        want = metrics.random_baseline(n, n_flipped)
        return [f"mislabel.{k} is not the random order's expectation" for k, v in want.items()
                if (mis.get(k) != v if isinstance(v, dict) else not _close(mis.get(k), v, 1e-12))]
    curve = mis["recall_curve"]
    fractions, recall = curve.get("fractions"), curve.get("recall")
    if fractions != list(metrics.CURVE_FRACTIONS) or not isinstance(recall, list) or len(recall) != len(fractions):
        return [f"mislabel.recall_curve is not sampled at the {len(metrics.CURVE_FRACTIONS)} fractions 0, 0.01, …, 1"]
    r = np.asarray(recall, dtype=np.float64)
    found = r * n_flipped
    if r[0] != 0 or r[-1] != 1 or (np.diff(r) < 0).any() or np.abs(found - np.round(found)).max() > 1e-9:
        return ["mislabel.recall_curve is not a recall curve (from 0 to 1, non-decreasing, in steps of "
                "1/n_flipped)"]
    problems = []
    for f in metrics.FRACTIONS:
        key = f"recall_{round(100 * f)}"
        value = float(r[metrics.CURVE_FRACTIONS.index(f)])
        if not _close(mis[key], value, 1e-12):
            problems.append(f"mislabel.{key} is {mis[key]!r} but its recall curve gives {value:.6g}")
        elif not _close(mis[f"{key}_se"], metrics.recall_se(value, n_flipped), 1e-12):
            problems.append(f"mislabel.{key}_se is not the binomial standard error of {key}")
    area = float(np.trapezoid(r, fractions))
    if not _close(mis["recall_curve_area"], area, 1e-12):
        problems.append(f"mislabel.recall_curve_area is {mis['recall_curve_area']!r} but its curve gives {area:.6g}")
    auc, p = mis["auc"], n_flipped / n
    from_curve = (area - p / 2) / (1 - p)
    if not _close(auc, from_curve, 0.005 / (1 - p) + 1e-9):  # |Δarea| ≤ 0.005, so |ΔAUC| ≤ 0.005 / (1 − p)
        problems.append(f"mislabel.auc is {auc!r} but its recall curve gives {from_curve:.4f} ± {0.005 / (1 - p):.4f}")
    elif not _close(mis["auc_se"], metrics.auc_se(auc, n_flipped, n - n_flipped), 1e-12):
        problems.append("mislabel.auc_se is not the Hanley-McNeil standard error of mislabel.auc")
    return problems


def record_problems(record, setting_name: str | None = None, row: str | None = None) -> list[str]:
    """Why ``record`` does not check against itself (empty: it does): its summary numbers must be what its own
    per-query values (and recall curve) give, computed by :mod:`.metrics`; it must be the record of
    ``setting_name`` / ``row`` where given; and its content hash must match the rest of it."""
    if not isinstance(record, dict):
        return ["it is not a JSON object"]
    problems = [f"it has no {k!r} field" for k in ("format", "setting", "solver") if k not in record]
    if problems:
        return problems
    if setting_name is not None and record["setting"] != setting_name:
        problems.append(f"it is a record of setting {record['setting']!r}, not {setting_name!r}")
    try:
        own = row_name(record["solver"], record.get("ensemble") or 1)
    except (RunError, TypeError):
        own = None
    if row is not None and own != row:
        problems.append(f"it is the record of row {own!r}, not {row!r}")
    if not any(t in record for t in TASKS):
        problems.append("it has neither an lds nor a mislabel section")
    stored = record.get(CONTENT_HASH)
    sealed = stored is not None and stored == content_hash(record)
    if sealed and stored in _CHECKED:
        problems += _CHECKED[stored]
    else:
        numbers = []
        random = record["solver"] == RANDOM.name
        for task, check in (("lds", _lds_problems), ("mislabel", _mislabel_problems)):
            if task not in record:
                continue
            try:
                if not isinstance(record[task], dict):
                    raise TypeError(f"{type(record[task]).__name__}, not an object")
                numbers += check(record[task], random)
            except (TypeError, ValueError, KeyError, AttributeError, ZeroDivisionError) as exc:
                numbers.append(f"its {task} section is malformed ({type(exc).__name__}: {exc})")
        if sealed:
            _CHECKED[stored] = numbers
        problems += numbers
    if stored is None:
        problems.append(f"it has no content hash ({CONTENT_HASH}), so nothing shows it is what `tdabench run` wrote")
    elif not sealed:
        problems.append(f"its {CONTENT_HASH} does not match its content: it was changed after `tdabench run` wrote it")
    return problems


def read_record(store: ResultsStore, setting_name: str, method_name: str, ensemble: int = 1) -> dict | None:
    """The run record of a row, checked against itself (:func:`record_problems`), or None when there is none.
    Raises :class:`RecordError`, naming the file and what is wrong, for one that does not check."""
    path = run_path(store, setting_name, method_name, ensemble)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError: a truncated or damaged file
        problems = [f"it is not valid JSON ({exc})"]
    else:
        problems = record_problems(record, setting_name, row_name(method_name, ensemble))
    if problems:
        redo = f"tdabench run --setting {setting_name} --solver {method_name}" + (
            f" --ensemble {ensemble}" if ensemble > 1 else "")
        try:  # the path as a person at the prompt types it
            shown = path.resolve().relative_to(Path.cwd())
        except ValueError:
            shown = path
        raise RecordError(f"refused run record {shown}: {'; '.join(problems[:3])}"
                          + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else "")
                          + f"; restore it from git or recompute it with `{redo}`")
    return record


def _clean(obj):
    """JSON without NaN/inf (null instead) and with plain Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def mislabel_available(store: ResultsStore, setting: settings_mod.Setting) -> bool:
    try:
        return mislabel_mod.find(store, setting, MISLABEL_SPEC) is not None
    except (DataError, ImportError):  # its weights or timm are not here
        return False


def mislabel_not_applicable(method, ensemble: int = 1) -> str | None:
    """Why ``method`` (averaged over ``ensemble`` models) cannot rank the corrupted training set by self-influence,
    or None (baselines rank it by their own rule)."""
    if isinstance(method, Baseline):
        return None
    if ensemble > 1:
        return (f"an ensemble row: self-influence ranks the one corrupted-label model's training set, as the "
                f"single-model {method.name} row does")
    if not method.has_self_influence:
        return f"{method.name} computes no self-influence"
    if method.needs_trajectory:
        return (f"{method.name} attributes through the training run, and the mislabel artifact holds only the "
                f"corrupted-label model, not its checkpoints")
    return None


_OPENED: dict[tuple, GroundTruth] = {}


def open_current(store: ResultsStore, setting: settings_mod.Setting, root: Path) -> GroundTruth:
    """The ground truth at ``root``, verified, opened once per process while its manifest is unchanged."""
    key = (str(store.root), str(root), setting.name, setting.recipe_hash(), (Path(root) / MANIFEST).stat().st_mtime_ns)
    if key not in _OPENED:
        _OPENED[key] = GroundTruth.open(Path(root), setting, allow_incomplete=True, store=store)
    return _OPENED[key]


def stale_reasons(record: dict, store: ResultsStore, setting: settings_mod.Setting, method) -> dict[str, list[str]]:
    """Why each section of a record no longer describes what a fresh run would compute ({} = fresh)."""
    reasons: dict[str, list[str]] = {}
    common = [] if record.get("format") == RUN_FORMAT else [f"record format {record.get('format')} != {RUN_FORMAT}"]
    if "lds" in record:
        lds = record["lds"]
        why = common + _fingerprint_reasons(lds.get("fingerprint"), method, lds.get("params"))
        used = lds.get("ground_truth", {})
        root = gt_artifact.current(store, setting)
        if root is None:
            why.append("its ground truth is gone")
        else:
            now = gt_reference(store, root, None, used.get("full_models_used", 1))
            if now["path"] != used.get("path"):
                why.append(f"ground truth is now {now['path']} (record used {used.get('path')})")
            elif used.get("recipe_hash") != setting.recipe_hash():
                why.append(f"the setting's training recipe changed (record: {used.get('recipe_hash')}, code now: "
                           f"{setting.recipe_hash()})")
            elif now["root_hash"] != used.get("root_hash"):
                why.append("the ground truth's root hash changed (its files or manifest were rewritten)")
            elif now["complete"] != used.get("complete") or now["replicas"] != used.get("replicas"):
                why.append(f"ground truth now has complete replicas {now['replicas']} (record used "
                           f"{used.get('replicas')})")
            elif now["used_files_hash"] != used.get("used_files_hash"):
                why.append("ground-truth files changed")
            else:
                try:
                    gt = open_current(store, setting, root)
                    if target_hash(gt, lds) != lds.get("target_sha256"):
                        why.append("the target the ground truth yields now differs from the one scored against")
                except ArtifactError as exc:
                    why.append(f"its ground truth does not verify: {str(exc).splitlines()[0]}")
            if (unpinned := gt_artifact.index.unpinned(store, root)) and not any("UNPINNED" in w for w in why):
                why.append(unpinned)  # finished but not pinned: changed, or its pin lost, outside a build
        why += _explained_reasons(store, setting, lds.get("explained"))
        if why:
            reasons["lds"] = why
    if "mislabel" in record:
        mis = record["mislabel"]
        why = common + _fingerprint_reasons(mis.get("fingerprint"), method, mis.get("params"))
        path = mislabel_mod.find(store, setting, MISLABEL_SPEC)
        used = mis.get("artifact", {})
        if path is None:
            why.append("its mislabel artifact is gone")
        elif store.relative(path) != used.get("path"):
            why.append(f"mislabel artifact is now {store.relative(path)}")
        elif mislabel_mod.index.root_hash(read_json(path / MANIFEST)) != used.get("root_hash"):
            why.append("the mislabel artifact's root hash changed")
        if path is not None and (unpinned := mislabel_mod.index.unpinned(store, path)):
            why.append(unpinned)
        if why:
            reasons["mislabel"] = why
    return reasons


def _explained_reasons(store: ResultsStore, setting: settings_mod.Setting, explained: dict | None) -> list[str]:
    """Models explained from the zoo must still be the zoo's, file for file."""
    if not explained or explained.get("source") != "zoo":
        return []
    try:
        zoo = zoo_mod.load(store, setting, min_models=max(explained["models"]) + 1)
    except ArtifactError as exc:
        return [f"its explained models are no longer in the zoo: {str(exc).splitlines()[0]}"]
    if zoo.reference(explained["models"])["used_files_hash"] != explained.get("used_files_hash"):
        return ["the zoo models it explained changed"]
    return []


def unpaired_reasons(a: dict, b: dict) -> list[str]:
    """Why two LDS sections' per-query values cannot be differenced query by query (empty: they can): each must
    score the same queries against the same target, explaining models of the same artifact — the same zoo, or
    the ground truth's own (an ensemble against one of its models measures what the ensemble adds; the ground
    truth's models against the zoo's would mix in their coupling to the target)."""
    why = []
    if _explained_key(a)[:2] != _explained_key(b)[:2]:
        why.append(f"they explain models of different artifacts ({explained_label(a)} vs {explained_label(b)})")
    if a.get("target_sha256") != b.get("target_sha256"):
        why.append("they are scored against different targets (ground-truth version, replicas or measurement)")
    if a.get("query_columns") != b.get("query_columns") or len(a.get("per_query") or ()) != len(
            b.get("per_query") or ()):
        why.append("they report different queries")
    return why


def _explained_key(lds: dict) -> tuple:
    """(artifact kind, which artifact, model indices) an LDS section explained: the zoo's models file for file, or
    the ground truth's own full-data models 0..n-1 (older sections say so by omitting ``explained``). A zoo is
    named by its setting, version and recipe, not its root hash: the zoo only grows, and a model's files are
    checked on their own (``used_files_hash``), so a row explaining model 20 pairs with one explaining model 0
    that was recorded before model 20 was trained."""
    e = lds.get("explained") or {}
    if e.get("source") == "zoo":
        return "zoo", (e.get("setting"), e.get("version"), e.get("recipe_hash")), tuple(e.get("models") or (0,))
    return "gt", None, tuple(range(lds.get("ensemble") or 1))


def explained_label(lds: dict) -> str:
    """Which models an LDS section attributed, as the leaderboard shows it: "zoo 0", "zoo 0–7" (uncoupled) or
    "gt 0" (the ground truth's own, coupled to the target)."""
    source, _, models = _explained_key(lds)
    return f"{source} {models[0]}" + (f"–{models[-1]}" if len(models) > 1 else "")


def compare_rows(store: ResultsStore, setting: settings_mod.Setting, rows: list[str], methods: dict) -> list[dict]:
    """Each leaderboard row's LDS against the first row's, paired query by query where the two are paired.
    ``methods``: {solver name: solver class or baseline} of the rows, so that each row says whether it is stale
    (:func:`stale_reasons`, ``stale``: the LDS section's reasons, [] when current)."""
    lds, stale = {}, {}
    for row in rows:
        solver, n = parse_row_name(row)
        rec = read_record(store, setting.name, solver, n)
        if rec is None or not rec.get("lds") or rec["lds"].get("mean") is None:
            path = store.relative(run_path(store, setting.name, solver, n))
            raise RunError(f"no LDS for {row!r} on {setting.name} ({path}); run it with `tdabench run --setting "
                           f"{setting.name} --solver {solver}" + (f" --ensemble {n}`" if n > 1 else "`"))
        lds[row] = rec["lds"]
        stale[row] = stale_reasons(rec, store, setting, methods[solver]).get("lds", [])
    first = lds[rows[0]]
    out = []
    for row in rows:
        sec = lds[row]
        why = unpaired_reasons(sec, first)
        item = {"row": row, "lds": sec["mean"], "se": sec["se"], "explained": explained_label(sec), "paired": not why,
                "unpaired_reasons": why, "stale": stale[row]}
        if not why and row != rows[0]:
            d = metrics.paired_difference(sec["per_query"], first["per_query"])
            item.update(difference=d["difference"], difference_se=d["se"], n=d["n"], wins=d["wins"])
        out.append(item)
    return out


CHOSEN_ON_VALIDATION = "chosen on validation queries"


def chosen_params(store: ResultsStore, setting: settings_mod.Setting, cls: type[Solver]) -> tuple[dict, str]:
    """Hyper-parameters chosen on validation queries in a fresh run record, else the solver's defaults."""
    rec = read_record(store, setting.name, cls.name)
    if rec and "lds" in rec and "lds" not in stale_reasons(rec, store, setting, cls):
        return rec["lds"]["params"], CHOSEN_ON_VALIDATION
    return dict(cls.defaults), "solver defaults (no fresh run record)"


def _summary_cost(record: dict) -> dict:
    lds, mis = record.get("lds", {}), record.get("mislabel", {})
    peaks = [c.get("cost", {}).get("peak_mb") for c in (lds, mis)]
    peaks = [p for p in peaks if p is not None]
    return {"fit_s": lds.get("cost", {}).get("fit_s", mis.get("cost", {}).get("fit_s")),
            "score_s": lds.get("cost", {}).get("score_s"),
            "self_score_s": mis.get("cost", {}).get("self_score_s"),
            "peak_mb": max(peaks) if peaks else None}


# ---------------------------------------------------------------- running

EXPLAIN = ("ground truth", "zoo")


def explained_models(store: ResultsStore, gt: GroundTruth, source: str, n: int) -> engine.Explained:
    """The ``n`` models to explain: the ground truth's full-data models, or the zoo's (seeds no replica uses)."""
    if source == "zoo":
        return engine.Explained.from_zoo(zoo_mod.load(store, gt.setting, min_models=n), n)
    if source != "ground truth":
        raise RunError(f"explained models come from {' or '.join(EXPLAIN)}, not {source!r}")
    return engine.Explained.from_ground_truth(gt, n)


def lds_section(store: ResultsStore, gt: GroundTruth, method, params: dict | None = None, *,
                explain: str = "ground truth", ensemble: int = 1, **kw) -> dict:
    """An evaluated ``lds`` section with the references and fingerprint that keep it honest."""
    if method is LOSS:
        raise RunError("the training-loss baseline ranks training points; it has no LDS")
    if method is RANDOM:
        section = engine.evaluate_random_lds(gt)
        explained = None
    else:
        explained = explained_models(store, gt, explain, ensemble)
        section = engine.evaluate_lds(gt, method, params, explained=explained, **kw)
    used = 1 if explained is None else explained.ground_truth_models
    section["ground_truth"] = gt_reference(store, gt.root, section["replicas"], used)
    section["ground_truth"]["target_sha256"] = section["target_sha256"] = target_hash(gt, section)
    section["fingerprint"] = section_fingerprint(method, section.get("params"))
    return section


def mislabel_section(store: ResultsStore, art: mislabel_mod.MislabelArtifact, method, params: dict | None = None,
                     device=None) -> dict:
    section = engine.evaluate_mislabel(art, method, params, device=device)
    section["artifact"] = mislabel_reference(store, art)
    section["fingerprint"] = section_fingerprint(method, section.get("params"))
    return section


def run(store: ResultsStore, setting: settings_mod.Setting, method, params: dict | None = None, *, tasks=None,
        search: bool = True, grid: dict | None = None, search_queries: int | None = None, ensemble: int = 1,
        explain: str = "ground truth", measurement: str | None = None, version: str | None = None, device=None,
        params_source: str | None = None, write: bool = True, log=print) -> dict:
    """Evaluate ``method`` (a Solver class or a baseline) on ``setting`` and write its run record.

    ``tasks``: any of "lds", "mislabel"; default: LDS, plus mislabel when its artifact exists. Sections not
    rerun are kept from the previous record while they are still fresh. ``ensemble`` > 1 averages the scores of
    that many explained models and writes the row :func:`row_name` names (LDS only). ``params_source`` says where
    given ``params`` were chosen (kept in the LDS section's ``selection``).
    """
    import torch

    from ..setup.training import default_device

    device = torch.device(device or default_device())
    name = method.name
    no_mislabel = mislabel_not_applicable(method, ensemble)
    if ensemble > 1 and isinstance(method, Baseline):
        raise RunError(f"{name} is a baseline; it has no explained models to average over")
    if write:
        store.check_writable(store.runs / setting.name)
    if tasks is None:
        tasks = [] if method is LOSS else ["lds"]  # training loss ranks train points; no LDS
        if mislabel_available(store, setting) and not no_mislabel:
            tasks.append("mislabel")
    tasks = list(tasks)
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise RunError(f"unknown task(s) {bad}; choose from {TASKS}")
    if "mislabel" in tasks and no_mislabel:
        raise RunError(f"no mislabel detection for {name}: {no_mislabel}; run --task lds")
    if not tasks:
        raise RunError(f"nothing to run for {name} on {setting.name}: it needs the mislabel artifact; build it with "
                       f"`tdabench mislabel {setting.name} --build`")
    try:
        old = read_record(store, setting.name, name, ensemble)
    except RecordError as exc:  # rerunning is how a refused record is replaced; nothing of it is kept
        log(f"{setting.name} / {row_name(name, ensemble)}: replacing a refused record ({str(exc).splitlines()[0]})")
        old = None
    old_stale = stale_reasons(old, store, setting, method) if old else {}
    record = {"format": RUN_FORMAT, "setting": setting.name, "solver": name}
    if ensemble > 1:
        record["ensemble"] = ensemble
    if "lds" in tasks:
        if version:
            root = gt_artifact.gt_root(store) / setting.name / version
        else:
            root = gt_artifact.current(store, setting)
        if root is None:
            raise ArtifactError(f"no ground truth for {setting.name!r} under {store.gt / setting.name}; build it with "
                                f"`tdabench gt {setting.name}`")
        gt = GroundTruth.open(root, setting, allow_incomplete=True, store=store)
        if not isinstance(method, Baseline):
            log(f"{setting.name} / {name}: LDS" + (" (grid search on validation queries)" if search else ""))
        record["lds"] = lds_section(store, gt, method, params, search=search, grid=grid, search_queries=search_queries,
                                    ensemble=ensemble, explain=explain, measurement=measurement, device=device,
                                    log=log)
        if params_source and not record["lds"]["selection"].get("searched"):
            record["lds"]["selection"]["method"] = params_source
    # Self-influence uses the parameters chosen for LDS: a mislabel section made with others (e.g. the
    # defaults, before the ground truth existed) is redone once LDS has chosen.
    if ("lds" in record and "mislabel" not in tasks and not isinstance(method, Baseline) and old and "mislabel" in old
            and {**method.defaults, **(old["mislabel"].get("params") or {})}
            != {**method.defaults, **record["lds"]["params"]}
            and mislabel_available(store, setting) and not no_mislabel):
        log(f"{setting.name} / {name}: redoing mislabel detection with the parameters LDS chose")
        tasks.append("mislabel")
    if "mislabel" in tasks:
        if "lds" in record:
            mis_params, source = record["lds"].get("params"), "chosen for LDS on validation queries (this run)"
        elif old and "lds" in old and "lds" not in old_stale:
            mis_params = old["lds"].get("params")
            source = f"chosen for LDS on validation queries ({old.get('created')})"
        else:
            mis_params, source = params, "given by the user" if params else "solver defaults"
        if mis_params and params:
            mis_params = {**mis_params, **params}
        log(f"{setting.name} / {name}: mislabel detection (self-influence on the corrupted-label model)")
        art = mislabel_mod.load(store, setting, MISLABEL_SPEC)
        record["mislabel"] = mislabel_section(store, art, method, mis_params, device=device)
        if not isinstance(method, Baseline):
            record["mislabel"]["params_source"] = source
    if old is not None:
        for section in TASKS:
            if section not in record and section in old and section not in old_stale:
                record[section] = old[section]
    record.update({
        "params": record.get("lds", {}).get("params", record.get("mislabel", {}).get("params")),
        "device": engine.device_name(device),
        "environment": environment(device),
        "machine_load": machine_load(),
        "code_version": code_version(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    })
    record["cost"] = _summary_cost(record)
    record = seal(_clean(record))
    if write:
        write_json(run_path(store, setting.name, name, ensemble), record)
    return record
