"""Training throughput on this machine: plain loop vs vmap-batched, and ground-truth models per minute.

    python -m benchmarks.bench_train [--setting mnist-cnn] [--models 4] [--epochs 1]

Trains the same ``--models`` α-subset models three ways, side by side in one run:
  loop        one after another in this process (all torch threads)
  vmap        all at once with torch.func (stack_module_state + vmap)
  workers     one single-threaded process per core, what ``tdabench gt`` uses on a CPU
and prints seconds per model, the ratios, and the implied ground-truth throughput for the setting's
full recipe (seconds scale linearly with epochs). A figure printer, not a timed test.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from benchmark.groundtruth import protocol as groundtruth
from benchmark.groundtruth.executors import LocalExecutor, cpu_count
from benchmark.setup import settings
from benchmark.setup.config import Protocol, Unit, unit_seed
from benchmark.setup.training import default_device, train, train_batched


def _loop(setting, recipe, x, y, seeds, idxs):
    t = time.perf_counter()
    for s, i in zip(seeds, idxs):
        train(setting.model(s), x, y, recipe, s, i)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / len(seeds)


def _vmap(setting, recipe, x, y, seeds, idxs):
    t = time.perf_counter()
    train_batched([setting.model(s) for s in seeds], x, y, recipe, seeds, idxs)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / len(seeds)


def _train_one(args):
    name, epochs, seed, idx = args
    torch.set_num_threads(1)
    s = settings.get(name)
    d = s.data()
    recipe = dataclasses.replace(s.recipe, epochs=epochs)
    train(s.model(seed), d.train_x, d.train_y, recipe, seed, idx)
    return 0


def _workers(name, epochs, seeds, idxs):
    ex = LocalExecutor(cpu_count(), 1)
    list(ex.run(_train_one, [(name, epochs, 0, idxs[0])] * ex.workers))  # warm the pool (imports, data)
    t = time.perf_counter()
    list(ex.run(_train_one, [(name, epochs, s, i) for s, i in zip(seeds, idxs)]))
    return (time.perf_counter() - t) / len(seeds), ex.describe()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", default="mnist-cnn")
    p.add_argument("--models", type=int, default=4)
    p.add_argument("--epochs", type=int, default=1, help="epochs per model for the measurement")
    p.add_argument("--device", default=str(default_device()))
    a = p.parse_args(argv)

    setting = settings.get(a.setting)
    data = setting.data()
    device = torch.device(a.device)
    proto = Protocol(subsets=a.models, seeds=1)
    n = len(data.train_y)
    idxs = [torch.from_numpy(groundtruth.subset_indices(proto, n, j)) for j in range(a.models)]
    seeds = [unit_seed(proto, Unit(0, j)) + j for j in range(a.models)]
    recipe = dataclasses.replace(setting.recipe, epochs=a.epochs)
    x, y = data.train_x.to(device), data.train_y.to(device)

    print(f"{a.setting}: {a.models} models x {a.epochs} epoch(s) on {len(idxs[0])} examples, device {device}, "
          f"{torch.get_num_threads()} torch threads")
    _loop(setting, dataclasses.replace(recipe, epochs=1), x, y, seeds[:1], idxs[:1])  # warm-up
    loop = _loop(setting, recipe, x, y, seeds, idxs)
    vm = _vmap(setting, recipe, x, y, seeds, idxs)
    rows = [("loop (1 process)", loop), (f"vmap ({a.models} models batched)", vm)]
    if device.type == "cpu":
        w, desc = _workers(a.setting, a.epochs, seeds, idxs)
        rows.append((f"workers ({desc})", w))
    scale = setting.recipe.epochs / a.epochs
    print(f"{'trainer':42s} {'s/model':>9s} {'vs loop':>8s} {'full recipe: s/model':>21s} {'models/min':>11s}")
    for name, sec in rows:
        print(f"{name:42s} {sec:9.2f} {loop / sec:7.2f}x {sec * scale:21.1f} {60 / (sec * scale):11.2f}")
    best = min(rows, key=lambda r: r[1])
    per_model = best[1] * scale
    p_def = setting.protocols["default"]
    units = p_def.subsets * p_def.seeds
    print(f"fastest: {best[0]}; default protocol ({units} subset models) ≈ {units * per_model / 3600:.1f} h here")


if __name__ == "__main__":
    main()
