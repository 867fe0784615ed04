"""Training throughput of ground-truth subset models on mnist-cnn, three ways: a plain loop in this process (all
torch threads), vmap-batched (all models at once with torch.func), and one single-threaded worker process per
core (what `tdabench gt` uses on a CPU). The same 4 models × 1 epoch on α = 0.5 subsets of the first 6,000
training points each way; the floor is the models' forward and backward products over the matmul rate.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

from benchmark.groundtruth import protocol as gt_protocol
from benchmark.groundtruth.executors import cpu_count
from benchmark.setup import settings
from benchmark.setup.config import Protocol, Unit, unit_seed
from benchmark.setup.training import train, train_batched

from .conftest import SETTING, TRAIN

MODELS, EPOCHS = 4, 1


def _units(n):
    proto = Protocol(subsets=MODELS, seeds=1)
    idxs = [torch.from_numpy(gt_protocol.subset_indices(proto, n, j)) for j in range(MODELS)]
    return [unit_seed(proto, Unit(0, j)) + j for j in range(MODELS)], idxs


def _train_one(args):
    """In a worker process: one model, single-threaded (importable, so the pool can pickle it)."""
    name, seed, idx = args
    torch.set_num_threads(1)
    s = settings.get(name)
    d = s.data()
    recipe = dataclasses.replace(s.recipe, epochs=EPOCHS)
    train(s.model(seed), d.train_x[:TRAIN], d.train_y[:TRAIN], recipe, seed, idx)
    return 0


@pytest.mark.parametrize("how", ["loop", "vmap", "workers"])
def test_train_throughput(how, cnn, timed, request):
    setting = cnn.setting
    recipe = dataclasses.replace(setting.recipe, epochs=EPOCHS)
    x, y = cnn.tx, cnn.ty
    seeds, idxs = _units(len(y))
    floor = MODELS * EPOCHS * sum(len(i) for i in idxs) / MODELS * cnn.grad_flops
    if how == "loop":
        train(setting.model(seeds[0]), x, y, recipe, seeds[0], idxs[0][:256])  # warm-up: first calls allocate

        def run():
            for s, i in zip(seeds, idxs):
                train(setting.model(s), x, y, recipe, s, i)
    elif how == "vmap":
        def run():
            train_batched([setting.model(s) for s in seeds], x, y, recipe, seeds, idxs)
    else:
        if cnn.device.type != "cpu":
            pytest.skip("worker processes are how `tdabench gt` trains on a CPU")
        # A pool that lives across the calls, as during a ground-truth build (spawning it costs seconds, once)
        pool = ProcessPoolExecutor(max_workers=cpu_count(), mp_context=mp.get_context("spawn"))
        request.addfinalizer(pool.shutdown)
        list(pool.map(_train_one, [(SETTING, seeds[0], idxs[0][:256])] * cpu_count()))  # imports, data, first calls

        def run():
            list(pool.map(_train_one, [(SETTING, s, i) for s, i in zip(seeds, idxs)]))
    timed(run, floor_flops=floor, models=MODELS, epochs=EPOCHS, examples_per_model=len(idxs[0]),
          how=how if how != "workers" else f"workers ({cpu_count()} single-threaded processes)")
