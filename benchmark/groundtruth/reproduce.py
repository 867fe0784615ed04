"""Floor 3: retraining committed ground-truth units from their recorded seeds and subsets, to tell a ground truth
that reproduces from one that does not.

:func:`reproduce` draws units from an artifact, retrains them as jobs on an executor (local or Ray) exactly as
the build trained them (:func:`.builder.train_unit` inside :func:`~benchmark.setup.training.worker_training`),
and compares each retrain with the committed unit:

- bit-identical or not (all output rows; for a full-data model its weights too);
- the Pearson and Spearman correlation and the mean |Δ| of the query margins (reported and validation columns);
- the **seed-noise yardstick**, read from the artifact itself: the same statistics between every pair of seed
  replicas of the unit's subset (for a full-data model, every pair of full-data models). That is the variation
  the ground truth averages over, so it says what "close" means for this setting;
- a verdict, :func:`verdict`.

On the machine that built an artifact a retrain is bit-identical. On another machine the float round-off of its
kernels differs, SGD amplifies it over the epochs, and a retrain lands between the two: measured on the
committed CNN artifacts its disagreement with the committed unit is 0.07-0.37 of seed noise's, in variance
(docs/ground-truth.md). A retrain that is a *different model in meaning* (another seed, subset, recipe or
data) disagrees as much as seed noise does.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass

import numpy as np
import torch

from ..core.stats import spearman_rows
from ..setup import settings as settings_mod
from ..setup.artifacts import hardware, hardware_key, load_safetensors
from ..setup.config import Protocol, Unit
from .artifact import GroundTruth
from .builder import train_unit
from .protocol import OUTPUT_ROWS, all_units, checkpoint_file, unit_file

IDENTICAL = "identical"
ROUNDOFF = "reproduced within round-off"
NOT_REPRODUCED = "not reproduced"
VERDICTS = (IDENTICAL, ROUNDOFF, NOT_REPRODUCED)  # best first; the overall verdict is the worst unit's

# The rule for "reproduced within round-off": the retrain disagrees with the committed unit by at most HALF of
# what a change of seed causes, in variance terms, measured both ways against the seed-noise yardstick (the mean
# over its pairs):
#   1 - Pearson      <= 1/2      x the yardstick's 1 - Pearson
#   mean |Δ margin|  <= sqrt(1/2) x the yardstick's mean |Δ margin|   (|Δ| scales as the root of a variance)
# Pearson ignores a shift or scale of the margins; mean |Δ| catches them. Measured on the committed CNN artifacts
# (docs/ground-truth.md, "Reproducing the ground truth"): 17 units retrained on another machine than the one that
# built them reached at most 0.37 and 0.57 of the yardstick (1.24x inside the rule), while of the 600 seed-replica
# pairs of each artifact (each pair against its subset's yardstick) none falls inside it, the closest 1.28x
# (mnist-cnn) and 1.47x (fmnist-cnn) outside in one of the two.
MAX_DISAGREEMENT_FRACTION = 0.5
MAX_ABS_DIFF_FRACTION = 0.5 ** 0.5


def rule() -> str:
    return (f"{ROUNDOFF}: not bit-identical, but at most half of seed noise in variance: 1 - Pearson <= "
            f"{MAX_DISAGREEMENT_FRACTION:g} x and mean |Δ margin| <= {MAX_ABS_DIFF_FRACTION:.3f} x the yardstick's (two "
            f"seeds of the same subset, from the artifact); otherwise {NOT_REPRODUCED}")


# ---------------------------------------------------------------- retraining (runs in workers)

@dataclass(frozen=True)
class RetrainJob:
    """Units to retrain, with everything a worker needs (the Setting pickles by name). Nothing is written: the
    outputs travel back, so Ray workers need no access to the artifact folder."""

    setting: settings_mod.Setting
    protocol: Protocol
    units: tuple[Unit, ...]
    device: str = "cpu"
    threads: int = 0


def run_retrain_job(job: RetrainJob) -> list[dict]:
    """Retrain the job's units as the build trains them; return their outputs (and a full-data model's weights)."""
    from ..setup.training import worker_training

    results = []
    with worker_training(job.threads):
        device = torch.device(job.device)
        hw = hardware(device)
        for unit in job.units:
            model, outputs, acc, seconds = train_unit(job.setting, job.protocol, unit, device)
            weights = None
            if unit.subset is None:
                weights = {k: v.detach().cpu().contiguous().numpy() for k, v in model.state_dict().items()}
            results.append({"unit": unit.name, "outputs": outputs, "test_accuracy": acc, "seconds": seconds,
                            "weights": weights, "hardware": hw})
    return results


# ---------------------------------------------------------------- comparing

def margin_stats(a: np.ndarray, b: np.ndarray) -> dict:
    """Pearson, Spearman, mean and max |Δ| between two models' margins on the same queries."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = np.abs(a - b)
    with np.errstate(invalid="ignore", divide="ignore"):
        pearson = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")
    return {"pearson": pearson, "spearman": float(spearman_rows(a[None], b[None])[0]),
            "mean_abs_diff": float(d.mean()), "max_abs_diff": float(d.max())}


def seed_replicas(gt: GroundTruth, unit: Unit) -> np.ndarray:
    """The committed margins (n, Q+V) of the models that differ from ``unit`` only in their seed: the replicas of
    its subset, or the full-data models."""
    rows = gt.full_outputs["margin"] if unit.subset is None else gt.outputs["margin"][:, unit.subset]
    return rows[np.isfinite(rows).all(axis=1)]


def yardstick(gt: GroundTruth, unit: Unit) -> dict:
    """The seed-noise yardstick for ``unit``: :func:`margin_stats` between every pair of :func:`seed_replicas`,
    averaged over the pairs (with the range of each statistic)."""
    rows = seed_replicas(gt, unit)
    pairs = [margin_stats(rows[i], rows[j]) for i, j in itertools.combinations(range(len(rows)), 2)]
    if not pairs:
        raise ValueError(f"{gt.root}: {unit.name} has no seed-noise yardstick ({len(rows)} model(s) differing only in "
                         f"the seed; two are needed)")
    out: dict = {"pairs": len(pairs)}
    for key in pairs[0]:
        vals = np.array([p[key] for p in pairs])
        out[key] = float(vals.mean())
        out[f"{key}_range"] = [float(vals.min()), float(vals.max())]
    return out


def verdict(identical: bool, stats: dict, yard: dict) -> str:
    """identical / reproduced within round-off / not reproduced, by the rule of :func:`rule`."""
    if identical:
        return IDENTICAL
    abs_frac = stats["mean_abs_diff"] / yard["mean_abs_diff"] if yard["mean_abs_diff"] > 0 else float("inf")
    dis_frac = (1 - stats["pearson"]) / (1 - yard["pearson"]) if yard["pearson"] < 1 else float("inf")
    ok = abs_frac <= MAX_ABS_DIFF_FRACTION and dis_frac <= MAX_DISAGREEMENT_FRACTION  # NaN compares False
    return ROUNDOFF if ok else NOT_REPRODUCED


def _fractions(stats: dict, yard: dict) -> dict:
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"mean_abs_diff": float(np.float64(stats["mean_abs_diff"]) / yard["mean_abs_diff"]),
                "disagreement": float(np.float64(1 - stats["pearson"]) / (1 - yard["pearson"]))}


def compare_unit(gt: GroundTruth, unit: Unit, retrained: dict) -> dict:
    """One retrain against its committed unit and the unit's yardstick."""
    with np.load(unit_file(gt.root, unit)) as z:
        committed = z["outputs"]
        committed_acc = float(z["test_accuracy"]) if "test_accuracy" in z.files else None
        committed_hw = hardware_key(json.loads(str(z["hardware"]))) if "hardware" in z.files else ""
    outputs = retrained["outputs"]
    identical = bool(np.array_equal(outputs, committed))
    weights_identical, max_weight_diff = None, None
    if unit.subset is None:
        ref = load_safetensors(checkpoint_file(gt.root, unit.replica))
        new = retrained["weights"]
        weights_identical = ref.keys() == new.keys() and all(np.array_equal(ref[k].numpy(), new[k]) for k in ref)
        if ref.keys() == new.keys():
            max_weight_diff = max(float(np.abs(ref[k].numpy().astype(np.float64) - new[k]).max()) for k in ref)
        identical = identical and weights_identical
    stats = margin_stats(committed[0], outputs[0])
    yard = yardstick(gt, unit)
    q = len(gt.queries)
    correct = OUTPUT_ROWS.index("correct")
    return {"unit": unit.name, "replica": unit.replica, "subset": unit.subset, "seconds": retrained["seconds"],
            "identical": identical, "weights_identical": weights_identical, "max_weight_diff": max_weight_diff,
            **stats, "yardstick": yard, "fraction_of_yardstick": _fractions(stats, yard),
            "query_accuracy": {"committed": float(committed[correct, :q].mean()),
                               "retrained": float(outputs[correct, :q].mean())},
            "test_accuracy": None if unit.subset is not None else
            {"committed": committed_acc, "retrained": retrained["test_accuracy"]},
            "committed_hardware": committed_hw or "not recorded", "hardware": hardware_key(retrained["hardware"]),
            "verdict": verdict(identical, stats, yard)}


def overall(units: list[dict]) -> dict:
    """Means over the retrained units, their yardsticks' means, and the worst verdict."""
    keys = ("pearson", "spearman", "mean_abs_diff", "max_abs_diff")
    return {"units": len(units), "identical": sum(u["identical"] for u in units),
            **{k: float(np.mean([u[k] for u in units])) for k in keys},
            "yardstick": {k: float(np.mean([u["yardstick"][k] for u in units])) for k in keys},
            "fraction_of_yardstick": {k: float(np.mean([u["fraction_of_yardstick"][k] for u in units]))
                                      for k in ("mean_abs_diff", "disagreement")},
            "seconds": float(sum(u["seconds"] for u in units)),
            "verdicts": {v: sum(u["verdict"] == v for u in units) for v in VERDICTS},
            "verdict": max((u["verdict"] for u in units), key=VERDICTS.index)}


# ---------------------------------------------------------------- the command

def draw_units(gt: GroundTruth, subset_units: int, full_units: int = 0, seed: int = 0) -> list[Unit]:
    """``subset_units`` subset models and ``full_units`` full-data models drawn at random (``seed``) from the units
    the artifact holds, in the build's order (full-data models first)."""
    if subset_units < 0 or full_units < 0 or subset_units + full_units == 0:
        raise ValueError("ask for at least one unit to retrain (--reproduce N, --reproduce-full K)")
    listed = set(gt.manifest["files"])
    present = [u for u in all_units(gt.protocol) if str(unit_file(gt.root, u).relative_to(gt.root)) in listed]
    rng = np.random.default_rng(seed)
    chosen = []
    for want, pool, what in ((full_units, [u for u in present if u.subset is None], "full-data models"),
                             (subset_units, [u for u in present if u.subset is not None], "subset models")):
        if want > len(pool):
            raise ValueError(f"{gt.root} holds {len(pool)} {what}; cannot draw {want}")
        chosen += [pool[i] for i in sorted(rng.choice(len(pool), want, replace=False))]
    for u in chosen:
        yardstick(gt, u)  # fail before any training when a unit has nothing to be compared with
    return chosen


def reproduce(gt: GroundTruth, units: list[Unit], *, executor=None, device: str = "cpu", log=print) -> dict:
    """Retrain ``units`` of ``gt`` and compare each with the committed unit: ``{"units": [...], "overall": {...},
    ...}`` (per-unit records as :func:`compare_unit` gives them, in the order of ``units``)."""
    from .executors import LocalExecutor

    executor = executor or LocalExecutor.auto(torch.device(device), "loop")
    jobs = [RetrainJob(gt.setting, gt.protocol, (u,), device, executor.threads_per_worker) for u in units]
    by_name = {u.name: u for u in units}
    env = gt.manifest.get("environment", {})
    trainer = env.get("trainer", "loop")
    log(f"{gt.setting.name}: retraining {len(units)} unit(s) of {gt.root} on {device} ({executor.describe()}): "
        + ", ".join(u.name for u in units))
    done: dict[str, dict] = {}
    for results in executor.run(run_retrain_job, jobs):
        for r in results:
            rec = compare_unit(gt, by_name[r["unit"]], r)
            done[r["unit"]] = rec
            log(f"  {rec['unit']}: {rec['seconds']:.3g} s, {rec['verdict']} (Pearson {rec['pearson']:.4f}, mean |Δ| "
                f"{rec['mean_abs_diff']:.4g}; two seeds: {rec['yardstick']['pearson']:.4f}, "
                f"{rec['yardstick']['mean_abs_diff']:.4g})")
    records = [done[u.name] for u in units]
    return {"setting": gt.setting.name, "artifact": str(gt.root), "root_hash": gt.root_hash(),
            "device": device, "executor": executor.describe(), "units": records, "overall": overall(records),
            "rule": rule(), "artifact_trainer": trainer, "artifact_environment": env,
            "note": None if trainer == "loop" else
            (f"the artifact was trained with the {trainer} trainer, which batches models; a retrain uses the loop "
             f"trainer (the two agree to round-off only), so bit-identity is not expected")}
