"""Floor 5: the noise ceiling's bias on every committed ground truth, and the ceiling corrected for it.

The manifests record :func:`~benchmark.core.stats.noise_ceiling` (their hashes are pinned, so it stays as it is);
:func:`run` measures its bias on each ground truth with :func:`~benchmark.core.stats.ceiling_bias` and writes
``<store>/ceiling.json``: per setting the recorded ceiling, the bias ± se, the corrected ceiling with its
interval, the ground truth's root hash (a later ground truth makes the entry stale), and the fraction of each
ceiling reached by the leaderboard's EK-FAC row and its best row.
"""

from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass, field

from ..core.stats import CeilingSimulation, ceiling_bias
from ..evaluate import records
from ..groundtruth import artifact as gt_artifact
from ..setup import settings as settings_mod
from ..setup.artifacts import MANIFEST, ArtifactError, code_version, read_json, write_json
from ..setup.store import ResultsStore

FORMAT = 1
FILE = "ceiling.json"
# The leaderboard row every setting is read against (Table 1's method), besides the setting's best row.
REFERENCE_ROW = "ekfac"


@dataclass(frozen=True)
class CeilingStudy:
    """What :func:`run` computes: the settings (default: every one with a committed ground truth) and the
    simulation's settings."""

    settings: tuple = ()
    simulation: CeilingSimulation = field(default_factory=CeilingSimulation)


def path(store: ResultsStore):
    return store.root / FILE


def committed_settings(store: ResultsStore) -> list[settings_mod.Setting]:
    """Every registered setting with a complete ground truth in the store."""
    return [s for s in settings_mod.available().values() if _complete_root(store, s) is not None]


def _complete_root(store: ResultsStore, setting: settings_mod.Setting):
    try:
        return gt_artifact.latest(store.gt, setting)
    except ArtifactError:
        return None


def setting_entry(store: ResultsStore, setting: settings_mod.Setting, sim: CeilingSimulation, log=print) -> dict:
    """The bias and corrected ceiling of ``setting``'s current ground truth (reported queries, every replica: the
    target and ceiling every run record uses), with the of-ceiling of its EK-FAC and best rows."""
    gt = gt_artifact.load(store, setting)
    measurement = setting.measurement
    replicas = gt.complete_replicas()
    outputs = gt.outputs[measurement][replicas][:, :, :len(gt.queries)]
    recorded = ((gt.manifest.get("noise_ceiling") or {}).get(measurement) or {}).get("lds_ceiling")
    log(f"{setting.name}: {outputs.shape[0]} replicas x {outputs.shape[1]} subsets x {outputs.shape[2]} queries, "
        f"simulating {sim.repeats} ground truths ...")
    result = ceiling_bias(outputs, sim=sim)
    if recorded is None or not math.isclose(recorded, result["lds_ceiling"], rel_tol=0, abs_tol=1e-9):
        raise ArtifactError(f"{store.relative(gt.root)}: the manifest's noise ceiling ({recorded}) is not what its "
                            f"outputs give ({result['lds_ceiling']}); verify it with `tdabench gt-verify` before "
                            f"correcting it")
    entry = {"ground_truth": store.relative(gt.root), "root_hash": gt.root_hash(), "measurement": measurement,
             "replicas": replicas, "recorded_ceiling": recorded, **result,
             "rows": of_ceiling_rows(store, setting, gt.root_hash(), recorded, result)}
    log(f"  ceiling {recorded:.4f} ± {result['lds_ceiling_se']:.4f}, bias {result['bias']:+.4f} ± "
        f"{result['bias_se']:.4f} -> corrected {result['corrected']:.4f} "
        f"({result['interval'][0]:.4f} to {result['interval'][1]:.4f})")
    return entry


def of_ceiling_rows(store: ResultsStore, setting: settings_mod.Setting, root_hash: str, ceiling: float,
                    result: dict) -> dict:
    """The EK-FAC row and the highest-LDS row measured against this ground truth's full target, as fractions of
    the recorded ceiling and of the corrected one (with the range the corrected ceiling's interval gives)."""
    rows = {}
    folder = store.runs / setting.name
    for file in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        method, ensemble = records.parse_row_name(file.stem)
        lds = (records.read_record(store, setting.name, method, ensemble) or {}).get("lds") or {}
        # only rows whose ceiling is this one: the same ground truth, every query and replica
        if (lds.get("ground_truth") or {}).get("root_hash") != root_hash or lds.get("mean") is None \
                or lds.get("ceiling") is None or not math.isclose(lds["ceiling"], ceiling, abs_tol=1e-9):
            continue
        rows[file.stem] = lds
    picked = {}
    if REFERENCE_ROW in rows:
        picked["ekfac"] = REFERENCE_ROW
    if rows:
        picked["best"] = max(rows, key=lambda name: rows[name]["mean"])
    low, high = result["interval"]
    return {role: {"row": name, "lds": rows[name]["mean"], "lds_se": rows[name]["se"],
                   "of_ceiling": rows[name]["mean"] / ceiling,
                   "of_corrected_ceiling": rows[name]["mean"] / result["corrected"],
                   "of_corrected_ceiling_range": [rows[name]["mean"] / high, rows[name]["mean"] / low]}
            for role, name in picked.items()}


def run(store: ResultsStore, study: CeilingStudy, log=print) -> dict:
    """Compute every setting's entry and write ``<store>/ceiling.json`` atomically (entries for settings not
    computed this time are kept)."""
    chosen = list(study.settings) or committed_settings(store)
    if not chosen:
        raise ArtifactError(f"no complete ground truth under {store.relative(store.gt)}: build one with "
                            f"`tdabench gt SETTING` first")
    out = path(store)
    doc = read_json(out) if out.is_file() else {}
    entries = dict(doc.get("settings") or {})
    for setting in chosen:
        entries[setting.name] = setting_entry(store, setting, study.simulation, log)
    doc = {"format": FORMAT, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "code_version": code_version(),
           "what": "the noise ceiling's bias (estimate minus the true datamodel's LDS, from a simulation "
                   "calibrated to each ground truth) and the ceiling corrected for it; docs/protocol.md",
           "settings": {k: entries[k] for k in sorted(entries)}}
    write_json(out, records._clean(doc))  # JSON-safe: NaN as null, plain numbers
    return doc


def stale(store: ResultsStore, setting: settings_mod.Setting, entry: dict) -> str | None:
    """Why ``entry`` no longer describes ``setting``'s current ground truth, or None."""
    root = _complete_root(store, setting)
    if root is None:
        return "its ground truth is gone"
    now = gt_artifact.root_hash(read_json(root / MANIFEST))
    if now == entry.get("root_hash"):
        return None
    return f"computed on ground truth {str(entry.get('root_hash'))[:12]}, the current one is {now[:12]}"
