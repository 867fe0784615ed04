"""The cost benchmarks (pytest-benchmark): shared fixtures, peak memory and flop floors in each benchmark's
``extra_info``, the machine in every saved run, and a planted slowdown to prove `make bench-compare` fails.

Run them with `make bench` (saves a run under results/perf/<device>/) and `make bench-compare` (compares with the
committed run and fails on a slowdown beyond BENCH_FAIL). Never part of `make test` (its test path is tests/).

``$TDABENCH_BENCH_SLOWDOWN=f`` makes every benchmarked call take f times as long (it sleeps (f − 1)× the call's
own time after it): `make bench-compare BENCH_SLOWDOWN=2` must fail.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from benchmark.evaluate import Task, registry
from benchmark.evaluate.engine import Explained
from benchmark.groundtruth import zoo as zoo_mod
from benchmark.setup import settings
from benchmark.setup.artifacts import cpu_model
from benchmark.setup.data import DataError
from benchmark.setup.training import default_device

from benchmark.setup.store import ResultsStore
from benchmark.studies.ihvp_error import explained_model

from .common import device_slug, gradient_flops, machine, matmul_rate, measured

SETTING = "mnist-cnn"
TRAIN = 6000  # the fixed reduced size: the first 6,000 training points,
QUERIES = 200  # 200 test queries for pairwise scores,
VALIDATION = 100  # 100 validation queries and
SUBSETS = 50  # 50 random half-subsets for the LDS path and the grid pass,
SELF = 1000  # self-influence of the first 1,000 training points
_RESULTS: list[dict] = []


@dataclass
class Workload:
    setting: object
    model: torch.nn.Module
    source: str
    device: torch.device
    tx: torch.Tensor
    ty: torch.Tensor
    qx: torch.Tensor
    qy: torch.Tensor
    vx: torch.Tensor
    vy: torch.Tensor
    membership: torch.Tensor
    num_classes: int
    parameters: int  # D: what every feature vector of the generic scores holds (all of mnist-cnn's are factored)
    grad_flops: float  # forward + backward of one example
    rate: float  # float32 matrix-multiply flop/s of this machine
    trajectory: object = None  # the explained model's training run (benchmark.evaluate.Trajectory), if known


def _slowdown() -> float:
    raw = os.environ.get("TDABENCH_BENCH_SLOWDOWN", "")
    return float(raw) if raw else 1.0


@pytest.fixture(scope="session")
def device():
    return torch.device(os.environ.get("TDABENCH_BENCH_DEVICE") or default_device())


@pytest.fixture(scope="session")
def rate(device):
    return matmul_rate(device)


@pytest.fixture(scope="session")
def cnn(device, rate) -> Workload:
    setting = settings.get(SETTING)
    try:
        data = setting.data()
    except DataError as exc:
        if os.environ.get("TDABENCH_REQUIRE_DATA"):
            raise
        pytest.skip(f"{SETTING}'s data is not here ({str(exc).splitlines()[0]}); get it with `make data`")
    model, source, trajectory = _explained(setting)
    model = model.to(device).eval()
    gen = torch.Generator().manual_seed(0)
    membership = torch.rand(SUBSETS, TRAIN, generator=gen) < 0.5
    tx, ty = data.train_x[:TRAIN].to(device), data.train_y[:TRAIN].to(device)
    test = torch.randperm(len(data.test_y), generator=gen)
    q, v = test[:QUERIES], test[QUERIES:QUERIES + VALIDATION]
    _warm_up(model, tx[:256], ty[:256], data.num_classes, setting.measurement, device)
    return Workload(setting, model, source, device, tx, ty, data.test_x[q].to(device), data.test_y[q].to(device),
                    data.test_x[v].to(device), data.test_y[v].to(device), membership, data.num_classes,
                    sum(p.numel() for p in model.parameters()), gradient_flops(model, data.test_x[:1].to(device)), rate,
                    trajectory)


def _warm_up(model, x, y, num_classes, measurement, device):
    """One small EK-FAC fit and scoring, untimed: the first torch.func transforms, thread pools and allocations of a
    process cost seconds once, which a one-round benchmark that happens to run first would otherwise pay (a
    `make bench-compare` of a subset measured test_fit[ekfac] 1.6× its committed, warmed time)."""
    task = Task(model, x, y, num_classes, measurement, device, seed=0)
    registry.get("ekfac")().fit(task).scores(x[:8], y[:8], x, y)


def _explained(setting):
    """The zoo's model 0 with its training run (what the leaderboard rows explain; TracIn and SOURCE need the
    run), else the ground truth's full_k00 or a model trained here, without one (those two are then skipped)."""
    store = ResultsStore.default()
    if zoo_mod.exists(store, setting):
        explained = Explained.from_zoo(zoo_mod.load(store, setting))
        return explained.models[0], f"zoo {explained.reference['version']}, model 0", explained.trajectories[0]
    model, source = explained_model(store, setting, log=lambda *a: None)
    return model, source, None


@pytest.fixture
def timed(benchmark, device, rate):
    """``timed(fn, setup=None, rounds=1, floor_flops=None, **info)``: benchmark ``fn`` (``setup()`` before each round
    returns its arguments, untimed), record the peak memory over the rounds and the flop floor in extra_info."""

    def run(fn, setup=None, rounds: int = 1, floor_flops: float | None = None, **info):
        peaks, factor = [], _slowdown()

        def call(*args):
            out, seconds, peak = measured(lambda: fn(*args), device)
            peaks.append(peak)
            if factor != 1.0:  # a planted slowdown, to show that the comparison fails
                time.sleep((factor - 1.0) * seconds)
            return out

        kwargs = {"rounds": rounds, "iterations": 1}
        if setup is not None:
            kwargs["setup"] = lambda: (setup(), {})
        out = benchmark.pedantic(call, **kwargs)
        benchmark.extra_info.update(info)
        benchmark.extra_info["peak_mb"] = round(max(peaks), 1)
        benchmark.extra_info["memory"] = "process resident-set peak (CPU) / allocator peak (GPU) during the call"
        if floor_flops is not None:
            benchmark.extra_info["floor_flops"] = floor_flops
            benchmark.extra_info["floor_s"] = floor_flops / rate
        if factor != 1.0:
            benchmark.extra_info["planted_slowdown"] = factor
        _RESULTS.append({"name": benchmark.name, "bench": benchmark, "floor_s": benchmark.extra_info.get("floor_s"),
                         "peak_mb": benchmark.extra_info["peak_mb"]})
        return out

    return run


def pytest_benchmark_update_machine_info(config, machine_info):
    """Every saved run says what it ran on and how busy the machine was."""
    device = torch.device(os.environ.get("TDABENCH_BENCH_DEVICE") or default_device())
    machine_info.update({"tdabench_device": device_slug(device), "cpu_model": cpu_model(),
                         "torch_threads": torch.get_num_threads(), "load": machine(),
                         "matmul_gflops_float32": round(matmul_rate(device) / 1e9, 1), "slowdown": _slowdown()})


def pytest_terminal_summary(terminalreporter):
    """Each stage beside its floor: the seconds no implementation can beat on this machine."""
    rows = [r for r in _RESULTS if r["bench"].stats is not None]
    if not rows:
        return
    tr = terminalreporter
    tr.section("stages beside their flop floors (floor = unavoidable matrix products / measured matmul rate)")
    tr.write_line(f"{'benchmark':58s} {'min s':>9s} {'floor s':>9s} {'x floor':>8s} {'peak MiB':>9s}")
    for r in rows:
        best = r["bench"].stats.stats.min
        floor = r["floor_s"]
        x = f"{best / floor:8.1f}" if floor else f"{'':8s}"
        tr.write_line(f"{r['name'][:58]:58s} {best:9.3f} {(floor or np.nan):9.3f} {x} {r['peak_mb']:9.0f}")
