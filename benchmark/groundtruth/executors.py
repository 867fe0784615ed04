"""Floor 3: where units of work (ground-truth models, zoo models, retrained models) run. Every executor runs the same ``run_job`` on independent jobs
and yields each job's results as it finishes; the caller records progress, so any executor can be
interrupted and the build resumed.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Callable, Iterable, Iterator

import torch


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class LocalExecutor:
    """Runs jobs on this machine: in-process (``workers=1``) or in a pool of spawned processes.

    On a CPU, several single-threaded workers beat one multi-threaded process for small models
    (MNIST CNN on 2 cores: 22 s a model with 2 workers x 1 thread vs 30 s with 1 worker x 2 threads).
    """

    def __init__(self, workers: int = 1, threads_per_worker: int = 0):
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.workers = workers
        self.threads_per_worker = threads_per_worker

    @classmethod
    def auto(cls, device: torch.device, trainer: str) -> "LocalExecutor":
        if device.type == "cpu" and trainer == "loop":
            n = cpu_count()
            return cls(workers=n, threads_per_worker=1) if n > 1 else cls(1, 0)
        return cls(workers=1, threads_per_worker=0)

    def describe(self) -> str:
        threads = self.threads_per_worker or torch.get_num_threads()
        return f"local, {self.workers} worker{'s' if self.workers > 1 else ''} x {threads} thread{'s' if threads > 1 else ''}"

    def run(self, fn: Callable, jobs: Iterable) -> Iterator:
        jobs = list(jobs)
        if self.workers == 1:
            for job in jobs:
                yield fn(job)
            return
        ctx = mp.get_context("spawn")  # fork is unsafe once torch has started threads
        pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx, initializer=_ignore_interrupts)
        pending = set()
        try:
            for job in jobs:  # keep at most 2 jobs per worker in flight, so results stream in order
                pending.add(pool.submit(fn, job))
                if len(pending) >= 2 * self.workers:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in done:
                        yield f.result()
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    yield f.result()
        except BaseException:
            # Ctrl-C, an error, or the caller stopped listening: stop the workers now. A unit being trained is
            # lost (its files are written atomically, so none is half-written); finished ones are kept.
            for f in pending:
                f.cancel()
            for proc in list((getattr(pool, "_processes", None) or {}).values()):
                proc.terminate()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)


def _ignore_interrupts() -> None:
    """Workers leave Ctrl-C to the parent, which stops them: one message instead of a traceback per worker."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


class ExecutorError(RuntimeError):
    """A cluster cannot run the jobs as asked (missing resources, storage the workers cannot see)."""


# Settings that say where data and caches live: forwarded to Ray workers, which otherwise see the
# environment of the process that started their node, not this one.
FORWARDED_ENV = ("TDABENCH_DATA", "TDABENCH_OFFLINE", "TDABENCH_NETWORK_TIMEOUT", "TDABENCH_DATASETS_PATH",
                 "TDABENCH_SOLVERS_PATH", "TDABENCH_RESULTS",
                 "XDG_CACHE_HOME", "HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE", "HF_HUB_OFFLINE",
                 "HF_DATASETS_OFFLINE", "HF_ENDPOINT")


def _finished_part(job):
    """Jobs that can tell which of their units a dead attempt already finished (``finished_part()``) are
    split into those summaries and a job for the rest; other jobs pass through untouched."""
    split = getattr(job, "finished_part", None)
    return split() if split is not None else ([], job)


def _ray_task(fn: Callable, job):
    """What one Ray task runs: the job's unfinished units, plus where it ran."""
    import socket

    import ray

    ctx = ray.get_runtime_context()
    where = {"node_id": ctx.get_node_id(), "pid": os.getpid(), "host": socket.gethostname(),
             "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}
    done, job = _finished_part(job)
    results = fn(job) if getattr(job, "units", True) else []
    return done + list(results), where


def _path_visible(path: str) -> bool:
    return os.path.exists(path)


class RayExecutor:
    """Runs jobs as Ray tasks on a cluster (``address``) or on a Ray instance started on this machine.

    Each job is one task asking for ``num_cpus_per_task`` CPUs and ``num_gpus_per_task`` GPUs; a fraction
    (e.g. 0.25) lets several small models share one GPU. A task whose worker process or node dies is
    retried up to ``max_retries`` times; a task that *raises* is not retried (the error would repeat) and
    the error is re-raised here. Units are written by the tasks themselves, atomically, into the artifact
    folder, so every node must see that folder (shared storage): this is checked before any work starts.
    Workers import this project, so it must be installed on every node (the same venv on one machine).
    """

    def __init__(self, address: str | None = None, num_gpus_per_task: float = 0.0, num_cpus_per_task: float = 1.0,
                 max_retries: int = 3, threads_per_worker: int | None = None, runtime_env: dict | None = None,
                 log_to_driver: bool = False):
        from ..setup.deps import require

        self._ray = require("ray", "the Ray executor (`tdabench gt --executor ray`)")
        if num_gpus_per_task < 0 or num_cpus_per_task <= 0 or max_retries < 0:
            raise ValueError("num_gpus_per_task must be >= 0, num_cpus_per_task > 0 and max_retries >= 0")
        self.address = address
        self.num_gpus_per_task = float(num_gpus_per_task)
        self.num_cpus_per_task = float(num_cpus_per_task)
        self.max_retries = int(max_retries)
        # Torch threads inside a task: as many as CPUs reserved for it (1 keeps CPU results bitwise stable).
        self.threads_per_worker = threads_per_worker if threads_per_worker is not None else max(1, int(num_cpus_per_task))
        self.runtime_env = runtime_env
        self.log_to_driver = log_to_driver
        self.placements: list[dict] = []  # where each finished job ran, in finishing order

    def describe(self) -> str:
        return (f"ray {self.address or 'local instance'}: {self.num_cpus_per_task:g} CPU + {self.num_gpus_per_task:g} "
                f"GPU per task, {self.threads_per_worker} thread{'s' if self.threads_per_worker > 1 else ''}, "
                f"max_retries {self.max_retries}")

    def _runtime_env(self) -> dict:
        env = dict(self.runtime_env or {})
        forwarded = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        if forwarded:
            env["env_vars"] = {**forwarded, **env.get("env_vars", {})}
        return env

    def _connect(self) -> bool:
        """Join the cluster (or start a local instance); True when this call did, so ``run`` disconnects."""
        ray = self._ray
        if ray.is_initialized():
            return False
        try:
            ray.init(address=self.address, runtime_env=self._runtime_env() or None, log_to_driver=self.log_to_driver,
                     configure_logging=False)
        except ConnectionError as exc:
            raise ExecutorError(f"cannot connect to the Ray cluster at {self.address!r}: {exc}. Start one with "
                                f"`ray start --head` (workers: `ray start --address=HEAD:PORT`) or pass its "
                                f"address (--address)") from exc
        return True

    def _check(self, jobs: list) -> None:
        ray = self._ray
        devices = {str(getattr(j, "device", "cpu")) for j in jobs}
        if self.num_gpus_per_task > 0 and any(not d.startswith("cuda") for d in devices):
            raise ValueError(f"GPUs requested per task ({self.num_gpus_per_task:g}) but jobs run on {sorted(devices)}; "
                             f"pass --device cuda")
        if self.num_gpus_per_task == 0 and any(d.startswith("cuda") for d in devices):
            raise ValueError("jobs run on cuda but no GPU is requested per task, so Ray would not schedule them "
                             "onto GPUs; pass --gpus-per-task (e.g. 0.25 to share a GPU between 4 models)")
        total = ray.cluster_resources()
        for name, need in (("CPU", self.num_cpus_per_task), ("GPU", self.num_gpus_per_task)):
            if need > 0 and total.get(name, 0) < need:
                raise ExecutorError(f"each task needs {need:g} {name} but the Ray cluster has {total.get(name, 0):g} "
                                    f"in all; tasks would wait forever. Add nodes with {name}s or ask for fewer per task")
        roots = sorted({j.root for j in jobs if getattr(j, "root", None)})
        if roots:
            self._check_shared_storage(roots)

    def _check_shared_storage(self, roots: list[str]) -> None:
        """Every node that can run a task must see the artifact folder, or its units would land elsewhere."""
        import uuid

        ray = self._ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        probes = []
        for root in roots:
            probe = os.path.join(root, f".ray-probe-{uuid.uuid4().hex}")
            with open(probe, "w") as f:
                f.write("tdabench: can every Ray node see this folder?\n")
            probes.append(probe)
        try:
            nodes = [n for n in ray.nodes() if n.get("Alive") and
                     n["Resources"].get("CPU", 0) >= self.num_cpus_per_task and
                     n["Resources"].get("GPU", 0) >= self.num_gpus_per_task]
            check = ray.remote(_path_visible)
            refs = {(n["NodeID"], n.get("NodeManagerAddress"), p): check.options(
                num_cpus=0, max_retries=1,
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(p)
                for n in nodes for p in probes}
            blind = [(addr, os.path.dirname(p)) for (nid, addr, p), ref in refs.items() if not ray.get(ref)]
        finally:
            for p in probes:
                os.unlink(p)
        if blind:
            raise ExecutorError("Ray nodes that would run units cannot see the artifact folder: "
                                + "; ".join(f"node {a} cannot see {d}" for a, d in blind)
                                + ". Put the results folder on storage every node mounts at the same path (NFS, ...)")

    def run(self, fn: Callable, jobs: Iterable) -> Iterator:
        jobs = list(jobs)
        if not jobs:
            return
        ray = self._ray
        owns = self._connect()
        pending: dict = {}
        try:
            self._check(jobs)
            task = ray.remote(_ray_task).options(num_cpus=self.num_cpus_per_task, num_gpus=self.num_gpus_per_task,
                                                 max_retries=self.max_retries, retry_exceptions=False)
            # Ray queues every task and runs as many as the cluster's resources allow; results stream back
            # in finishing order, so the caller records progress (and can resume) as units land.
            pending = {task.remote(fn, job): job for job in jobs}
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    job = pending.pop(ref)
                    try:
                        results, where = ray.get(ref)
                    except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                            ray.exceptions.OutOfMemoryError) as exc:
                        units = [u.name for u in getattr(job, "units", ())]
                        raise ExecutorError(f"job {units or job} failed on the cluster after {self.max_retries} "
                                            f"retries: {exc}. Finished units are kept; rerun to resume") from exc
                    self.placements.append({**where, "units": [r.get("unit") for r in results
                                                               if isinstance(r, dict)]})
                    yield results
        except BaseException:
            for ref in pending:  # units are written atomically: cancelling mid-unit loses only that unit
                ray.cancel(ref, force=True)
            raise
        finally:
            if owns:
                ray.shutdown()
