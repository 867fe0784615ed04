"""Solver cost on this machine: fit time, score time for Q × N pairwise scores, and peak memory.

    python -m benchmarks.bench_solvers [--setting mnist-cnn] [--queries 2000] [--solver NAME ...]

Each solver runs in its own process (so its peak resident memory is its own): it fits on the whole training
set — a real, full-size fit — then times the three parts of ``scores`` on a measured chunk and extrapolates
to Q × N, saying so:

    score time ≈ Q·(query gradient + IHVP per query) + ⌈Q/query_chunk⌉·N·(train gradient per point)
                 + Q·N·(dot product per pair)

Solvers whose IHVP iterates over the whole training set (cg, lissa) are measured with a few iterations and
scaled to their default iteration count (for CG an upper bound: it stops early once converged). A figure
printer, not a timed test.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time

import torch

from benchmark import core as curvature
from benchmark.evaluate import registry, solver as solver_api
from benchmark.groundtruth import artifact as gt_artifact
from benchmark.setup import settings
from benchmark.setup.artifacts import ArtifactError
from benchmark.setup.store import ResultsStore

# Iterative solvers are timed with a few iterations on a few queries and scaled to their configured count;
# CG's iterations each sweep the whole training set, so they are timed on a subset and scaled by N too.
MEASURED_ITERATIONS = {"cg": ("max_iter", 2), "lissa": ("depth", 5)}
ITERATIVE_QUERIES = 8
CG_TRAIN_SUBSET = 2048


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _model(setting, log):
    try:
        store = ResultsStore.default()
        gt = gt_artifact.GroundTruth.open(gt_artifact.latest(store.gt, setting, allow_incomplete=True), setting,
                                          allow_incomplete=True, verify=False, store=store)
        return gt.full_model(0), f"ground-truth full-data model 0 ({gt.root.name})"
    except ArtifactError as exc:
        log(f"no ground-truth model ({str(exc).split(';')[0]}); training one epoch instead")
    from benchmark.setup.training import train
    import dataclasses

    d = setting.data()
    recipe = dataclasses.replace(setting.recipe, epochs=1)
    return train(setting.model(0), d.train_x, d.train_y, recipe, 0).eval(), "trained for 1 epoch here"


def measure(setting_name: str, solver: str, queries: int, chunk_queries: int, chunk_train: int) -> dict:
    """Runs in a child process: one solver, full fit, chunked score timing, extrapolation."""
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    setting = settings.get(setting_name)
    data = setting.data()
    model, source = _model(setting, log)
    tx, ty = data.train_x, data.train_y
    N, P = len(ty), sum(p.numel() for p in model.parameters())
    base_rss = _rss_mb()
    out = {"solver": solver, "setting": setting_name, "model": source, "parameters": P, "train": N, "queries": queries,
           "threads": torch.get_num_threads(), "base_rss_mb": round(base_rss)}
    cls = registry.get(solver)
    params = dict(cls.defaults)
    scale = 1.0
    if solver in MEASURED_ITERATIONS:
        key, few = MEASURED_ITERATIONS[solver]
        extra = 1 if solver == "cg" else 0  # CG makes one more product to report its true residual
        scale = (params[key] + extra) / (few + extra)
        params[key] = few
        out["iterations"] = f"measured {key}={few}, scaled ×{scale:g} to the default {key}={cls.defaults[key]}"
    task = solver_api.Task(model, tx, ty, data.num_classes, setting.measurement, seed=0)
    s = cls(**params)
    t0 = time.perf_counter()
    try:
        s.fit(task)
    except solver_api.SolverError as exc:
        return {**out, "error": str(exc)}
    out["fit_s"] = time.perf_counter() - t0
    qc, _ = s.chunk_sizes()
    qx, qy = data.test_x[:chunk_queries], data.test_y[:chunk_queries]
    fm = curvature.FunctionalModel(model)
    curvature.per_sample_grads(fm, qx[:2], qy[:2], setting.measurement)  # warm-up: first calls trace and allocate
    t0 = time.perf_counter()
    gq = curvature.per_sample_grads(fm, qx, qy, setting.measurement)
    qgrad_s = (time.perf_counter() - t0) / len(qy)
    timer, gq_all = s, gq
    if solver in MEASURED_ITERATIONS:
        gq = gq[:ITERATIVE_QUERIES]
        if solver == "cg" and N > CG_TRAIN_SUBSET:  # cost per iteration is linear in N
            timer = cls(**params).fit(solver_api.Task(model, tx[:CG_TRAIN_SUBSET], ty[:CG_TRAIN_SUBSET],
                                                      data.num_classes, setting.measurement, seed=0))
            scale *= N / CG_TRAIN_SUBSET
            out["iterations"] += f", on {CG_TRAIN_SUBSET} train points scaled ×{N / CG_TRAIN_SUBSET:g} to N"
    t0 = time.perf_counter()
    timer.ihvp(gq)
    ihvp_s = (time.perf_counter() - t0) / len(gq) * scale
    t0 = time.perf_counter()
    gt = curvature.per_sample_grads(fm, tx[:chunk_train], ty[:chunk_train], "loss")
    tgrad_s = (time.perf_counter() - t0) / chunk_train
    t0 = time.perf_counter()
    _ = gq_all @ gt.T  # the dot-product cost does not depend on the values: time it on the whole chunk
    dot_s = (time.perf_counter() - t0) / (len(gq_all) * chunk_train)
    t0 = time.perf_counter()
    n_q = len(gq)
    timer.scores(qx[:n_q], qy[:n_q], tx[:chunk_train], ty[:chunk_train])  # the real code path, for the record
    out["measured_chunk"] = {"queries": n_q, "train": chunk_train, "scores_s": round(time.perf_counter() - t0, 3)}
    passes = math.ceil(queries / qc)
    parts = {"query_grads_s": queries * qgrad_s, "ihvp_s": queries * ihvp_s, "train_grads_s": passes * N * tgrad_s,
             "dot_s": queries * N * dot_s}
    out.update({k: round(v, 2) for k, v in parts.items()})
    out["score_s_extrapolated"] = round(sum(parts.values()), 1)
    out["query_chunk"] = qc
    out["peak_rss_mb"] = round(_peak_mb())
    out["scores_matrix_mb"] = round(queries * N * 4 / 2**20)
    out["info"] = s.info()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--setting", default="mnist-cnn")
    p.add_argument("--solver", action="append", help="solver (repeatable; default: all)")
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--chunk-queries", type=int, default=64, help="queries in the measured chunk")
    p.add_argument("--chunk-train", type=int, default=2048, help="train points in the measured chunk")
    p.add_argument("--threads", type=int, help="torch threads in each child")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(measure(args.setting, args.one, args.queries, args.chunk_queries, args.chunk_train)))
        return 0
    names = args.solver or list(registry.available())
    rows = []
    for name in names:
        cmd = [sys.executable, "-m", "benchmarks.bench_solvers", "--one", name, "--setting", args.setting,
               "--queries", str(args.queries), "--chunk-queries", str(args.chunk_queries),
               "--chunk-train", str(args.chunk_train)] + (["--threads", str(args.threads)] if args.threads else [])
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            print(f"{name}: failed ({res.returncode}):\n{res.stderr[-2000:]}", file=sys.stderr)
            continue
        row = json.loads(res.stdout.strip().splitlines()[-1])
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if not rows:
        return 1
    r0 = rows[0]
    print(f"\n{r0['setting']}: {r0['parameters']:,} parameters, {r0['train']:,} train points, {r0['queries']:,} queries; "
          f"model: {r0['model']}; {r0['threads']} torch threads")
    print(f"{'solver':9s} {'fit s':>8s} {'score s (Q×N, extrapolated)':>28s} {'of which IHVP':>14s} "
          f"{'peak RSS MB':>12s} {'(base)':>7s}")
    for r in rows:
        if "error" in r:
            print(f"{r['solver']:9s} refused: {r['error']}")
            continue
        print(f"{r['solver']:9s} {r['fit_s']:8.1f} {r['score_s_extrapolated']:28.1f} {r['ihvp_s']:14.1f} "
              f"{r['peak_rss_mb']:12d} {r['base_rss_mb']:7d}" + (f"   ({r['iterations']})" if "iterations" in r else ""))
    print(f"score time extrapolated from a measured chunk of {r0['measured_chunk']['queries']} queries × "
          f"{r0['measured_chunk']['train']} train points (see the JSON lines above for the parts); the "
          f"{r0['scores_matrix_mb']} MB score matrix itself is not in the measured peak.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
