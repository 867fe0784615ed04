"""Our EK-FAC against Kronfluence's, in one run on one machine (`make bench-peers`).

    python -m benchmarks.bench_peers [--queries 2000] [--damping 1e-4] [--out PATH]

On ``mnist-cnn``'s explained model (the ground truth's full_k00; 60,000 training points, 46,730 parameters) and
the ground truth's first ``--queries`` reported queries, each solver runs in its own process (so its peak
resident memory is its own), at the same absolute damping, and measures:

  fit      the curvature (Kronecker factors, eigendecompositions, eigenvalue correction)
  lds      the LDS evaluation path (``subset_predictions``: ours sums train gradients per subset in one pass and
           scores each query against the sums; Kronfluence's pipeline gives full scores, then summed per subset)
  scores   the Q × N pairwise scores
  LDS      on the same queries against the same target, from the pairwise scores; the paired difference

It prints the ratios (ours / Kronfluence) beside the floor of each stage (its unavoidable matrix-multiply work
over the rate this machine multiplies float32 matrices at) and writes ``results/perf/peers-<device>.json``.
Targets (issue 17): ours ≤ 0.5× Kronfluence's time and ≤ 1.0× its memory, at a paired |ΔLDS| within two
standard errors; the file says whether each is met. Needs the peers extra (``pip install -e '.[peers]'``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmark.core.stats import mean_se
from benchmark.evaluate import metrics, registry
from benchmark.evaluate.cost import Cost
from benchmark.evaluate.solver import Solver, Task, subset_predictions, train_subset_sums
from benchmark.groundtruth import artifact as gt_artifact
from benchmark.groundtruth.artifact import GroundTruth
from benchmark.setup import settings
from benchmark.setup.artifacts import code_version, environment, write_json
from benchmark.setup.store import ResultsStore
from benchmark.setup.training import default_device

from .common import PERF, device_slug, gradient_flops, machine, matmul_rate

SETTING = "mnist-cnn"
SOLVERS = ("ekfac", "kronfluence-ekfac")


def measure(name: str, queries: int, damping: float, device: str) -> dict:
    """In a child process: fit, the LDS path and the pairwise scores of one solver, each a Cost stage."""
    setting = settings.get(SETTING)
    gt = ground_truth(setting)
    model, source = gt.full_model(0).eval(), f"ground truth {gt.root.name}, full_k00"
    data = setting.data()
    dev = torch.device(device)
    tx, ty = data.train_x.to(dev), data.train_y.to(dev)
    q_idx = torch.from_numpy(gt.queries[:queries])
    qx, qy = data.test_x[q_idx].to(dev), data.test_y[q_idx].to(dev)
    replicas = gt.complete_replicas()
    target = gt.target(setting.measurement, "queries", replicas)[:, :queries]
    membership = torch.from_numpy(gt.masks)
    cls = registry.get(name)
    task = Task(model.to(dev), tx, ty, data.num_classes, setting.measurement, dev, seed=0)
    cost = Cost(dev)
    load = {"before": machine()}
    with cost.stage("fit"):
        solver = cls(damping=damping).fit(task)
    if type(solver).scores is Solver.scores:  # ours: where the LDS path's time goes
        with cost.stage("lds: train gradients summed per subset"):
            train_subset_sums(solver, tx, ty, membership.to(torch.float64))
        with cost.stage("lds: query features and products"):
            predictions = subset_predictions([solver], qx, qy, tx, ty, membership)[0]
    else:
        with cost.stage("lds"):
            predictions = subset_predictions([solver], qx, qy, tx, ty, membership)[0]
    lds_path = metrics.lds_from_predictions(predictions, target)
    del predictions
    with cost.stage("scores"):
        scores = solver.scores(qx, qy, tx, ty)
    lds_pairwise = metrics.lds_per_query(scores, gt.masks, target)
    load["after"] = machine()
    stages = cost.to_dict()
    lds_s = sum(v["seconds"] for k, v in stages.items() if k.startswith("lds"))
    info = solver.info()
    return {"solver": name, "library": info.get("library", "tdabench"), "library_version": info.get("library_version"),
            "model": source, "damping": damping, "queries": int(len(qy)), "train": int(len(ty)),
            "subsets": int(membership.shape[0]), "replicas": replicas, "parameters": solver.feature_dim(),
            "fit_s": stages["fit"]["seconds"], "lds_s": lds_s, "score_s": stages["scores"]["seconds"],
            "peak_mb": {k: v["peak_mb"] for k, v in stages.items()},
            "start_mb": stages["fit"]["start_mb"], "memory_method": stages["fit"]["memory_method"],
            "stages": stages, "lds_per_query": [float(v) for v in lds_pairwise],
            "lds_path_per_query": [float(v) for v in lds_path], "machine": load, "info": info}


def ground_truth(setting) -> GroundTruth:
    """The committed ground truth (verified): its full_k00 is the explained model, its queries and target the LDS's."""
    store = ResultsStore.default()
    return GroundTruth.open(gt_artifact.latest(store.gt, setting), setting, store=store)


def _floors(row: dict, model, example, rate: float) -> dict:
    """Seconds no implementation can beat here: the matrix products each stage must do, over ``rate``."""
    q, n, m, d = row["queries"], row["train"], row["subsets"], row["parameters"]
    grad = gradient_flops(model, example)
    flops = {"fit": 2 * n * grad,  # two passes of per-example pseudo-gradients (factors, eigenvalue correction)
             "scores": 2 * q * n * d + (n + q) * grad,  # the Q × N products, one train and one query pass
             "lds": 2 * m * n * d + 2 * m * q * d + (n + q) * grad}  # sums per subset, then M products a query
    return {k: {"flops": v, "seconds": v / rate} for k, v in flops.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--damping", type=float, default=1e-4, help="absolute λ on the GGN of the mean loss (both)")
    p.add_argument("--device", default=str(default_device()))
    p.add_argument("--out", type=Path, help="default: results/perf/peers-<device>.json")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one, args.queries, args.damping, args.device)))
        return 0
    missing = [n for n in SOLVERS if registry.get(n).unavailable()]
    if missing:
        print(f"{', '.join(missing)}: {registry.get(missing[0]).unavailable()}", file=sys.stderr)
        return 2
    setting = settings.get(SETTING)
    model = ground_truth(setting).full_model(0).eval()
    rate = matmul_rate(args.device)
    started = machine()
    rows = {}
    for name in SOLVERS:
        cmd = [sys.executable, "-m", "benchmarks.bench_peers", "--one", name, "--queries", str(args.queries),
               "--damping", repr(args.damping), "--device", args.device]
        t0 = time.perf_counter()
        res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # the child's progress bars go to stderr
        if res.returncode != 0:
            print(f"{name}: failed ({res.returncode})", file=sys.stderr)
            return 1
        rows[name] = json.loads(res.stdout.strip().splitlines()[-1])
        rows[name]["wall_s"] = round(time.perf_counter() - t0, 1)
    ours, peer = rows["ekfac"], rows["kronfluence-ekfac"]
    example = setting.data().test_x[:1]
    floors = _floors(ours, model, example, rate)
    diff = np.asarray(ours["lds_per_query"]) - np.asarray(peer["lds_per_query"])
    d_mean, d_se = mean_se(diff)
    summary = {}
    for name, row in rows.items():
        row["lds"], row["lds_se"] = mean_se(np.asarray(row["lds_per_query"]))
        row["lds_path_equals_pairwise"] = float(np.nanmax(np.abs(np.asarray(row["lds_per_query"])
                                                                  - np.asarray(row["lds_path_per_query"]))))
        row["peak_mb_max"] = max(row["peak_mb"].values())
        summary[name] = {k: row[k] for k in ("fit_s", "lds_s", "score_s", "peak_mb_max", "lds", "lds_se")}
    ratio = {k: ours[k] / peer[k] for k in ("fit_s", "lds_s", "score_s")}
    ratio["fit+scores"] = (ours["fit_s"] + ours["score_s"]) / (peer["fit_s"] + peer["score_s"])
    ratio["fit+lds"] = (ours["fit_s"] + ours["lds_s"]) / (peer["fit_s"] + peer["lds_s"])
    ratio["peak_mb"] = ours["peak_mb_max"] / peer["peak_mb_max"]
    targets = {"time ≤ 0.5× (fit + scores)": ratio["fit+scores"] <= 0.5,
               "time ≤ 0.5× (fit + LDS path)": ratio["fit+lds"] <= 0.5,
               "memory ≤ 1.0×": ratio["peak_mb"] <= 1.0,
               "|ΔLDS| ≤ 2 se": abs(d_mean) <= 2 * d_se}
    out = {"what": f"{SETTING}: ours (ekfac) vs Kronfluence (kronfluence-ekfac), same model, queries, damping",
           "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "code_version": code_version(), "environment": environment(args.device), "device": device_slug(args.device),
           "machine_at_start": started, "matmul_rate_flops": rate, "floors": floors, "summary": summary,
           "ratio_ours_over_kronfluence": ratio, "paired_lds_difference": {"mean": d_mean, "se": d_se},
           "targets_met": targets, "runs": rows}
    path = args.out or PERF / f"peers-{device_slug(args.device)}.json"
    write_json(path, out)
    print(f"\n{SETTING}: {ours['queries']} queries x {ours['train']:,} train points, {ours['parameters']:,} parameters, "
          f"λ = {args.damping:g}; {machine()['cpu_count']} cores, load {started['loadavg_1min']:.2f} at start; "
          f"float32 matmul {rate / 1e9:.0f} GFLOP/s")
    print(f"{'':26s} {'ours':>10s} {'kronfluence':>12s} {'ratio':>7s} {'floor':>8s}")
    for key, label, floor in (("fit_s", "fit s", "fit"), ("score_s", f"scores s ({ours['queries']} x N)", "scores"),
                              ("lds_s", "LDS path s", "lds"), ("peak_mb_max", "peak MiB (own process)", None)):
        fl = f"{floors[floor]['seconds']:8.1f}" if floor else ""
        r = ours[key] / peer[key]
        print(f"{label:26s} {ours[key]:10.1f} {peer[key]:12.1f} {r:7.2f} {fl}")
    print(f"{'LDS':26s} {ours['lds']:10.4f} {peer['lds']:12.4f}   paired difference {d_mean:+.4f} ± {d_se:.4f}")
    for stage, rec in ours["stages"].items():
        print(f"  ours {stage}: {rec['seconds']:.1f} s, peak {rec['peak_mb']:.0f} MiB")
    for what, ok in targets.items():
        print(f"target {what}: {'met' if ok else 'NOT met'}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
