"""The Ray executor on a real cluster: a head node and a worker node started as separate processes on this
machine (`ray start`), one CPU each. The ground truth built there must be the very artifact a local
in-process build gives, and a worker process killed mid-job must cost nothing: its unit is retried, no unit
is lost, none is trained or reported twice.
"""

import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'tdabench[distributed]')")

from benchmark import groundtruth as G  # noqa: E402
from benchmark.groundtruth import builder  # noqa: E402
from benchmark.setup import settings  # noqa: E402
from benchmark.setup.store import ResultsStore  # noqa: E402
from benchmark.groundtruth.executors import LocalExecutor, RayExecutor  # noqa: E402
from test_groundtruth import _assert_same, _content  # noqa: E402

SETTING = "synthetic-mlp"
KILL_BEFORE = "r00_s0003"  # its worker dies before training it: the retry trains it
KILL_AFTER = "r01_s0005"   # its worker dies after writing it, before reporting: the retry must not retrain it
quiet = dict(progress=False, log=lambda *_: None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_cli() -> list[str]:
    script = Path(sys.executable).with_name("ray")
    return [str(script)] if script.exists() else [sys.executable, "-c", "from ray.scripts.scripts import main; main()"]


def _processes_under(tag: str) -> set[int]:
    """Live processes whose command line names ``tag`` (our temp dir), and all their descendants."""
    table = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state, ppid = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:2]
        except OSError:
            continue
        if state != "Z":
            table[int(pid)] = (int(ppid), cmd)
    mine = {p for p, (_, cmd) in table.items() if tag in cmd and p != os.getpid()}
    while True:
        more = {p for p, (pp, _) in table.items() if pp in mine and p not in mine}
        if not more:
            return mine
        mine |= more


def _stop_cluster(tag: str) -> set[int]:
    """Stop exactly the Ray processes this test started (found by their temp dir), not every Ray on the machine
    as `ray stop` would. Returns what survived."""
    for sig, wait_s in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        for pid in _processes_under(tag):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while _processes_under(tag) and time.monotonic() < deadline:
            time.sleep(0.2)
    return _processes_under(tag)


@pytest.fixture(scope="module")
def cluster():
    tmp = tempfile.mkdtemp(prefix="tdabench-ray-")  # short: Ray's unix socket paths must stay < 108 bytes
    port = _free_port()
    # A local Ray instance started earlier on this machine (`tdabench gt --executor ray`) leaves a token in
    # ~/.ray/auth_token; with it, Ray >= 2.5x starts this head with token authentication and the worker node is
    # refused. The test cluster runs without it, here and in this process's ray.init.
    auth_mode = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--num-gpus=0", "--disable-usage-stats", f"--temp-dir={tmp}", "--object-store-memory=80000000"]
    try:
        for args in (["--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false"],
                     [f"--address=127.0.0.1:{port}", "--num-cpus=1"]):
            proc = subprocess.run([*_ray_cli(), "start", *args, *common], env=env, capture_output=True, text=True,
                                  timeout=180)
            assert proc.returncode == 0, f"`ray start {' '.join(args)}` failed:\n{proc.stdout}\n{proc.stderr}"
        address = f"127.0.0.1:{port}"
        ray.init(address=address, configure_logging=False, log_to_driver=False)
        try:
            deadline = time.monotonic() + 60
            while len([n for n in ray.nodes() if n["Alive"]]) < 2 and time.monotonic() < deadline:
                time.sleep(0.5)
            nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        finally:
            ray.shutdown()
        assert len(nodes) == 2, f"expected a head and a worker node, the cluster has {len(nodes)}"
        # Job functions defined here travel by value: the workers cannot import this test module.
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        yield {"address": address, "nodes": nodes, "tmp": tmp}
    finally:
        try:
            ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        except ValueError:  # never registered: the cluster did not come up
            pass
        survivors = _stop_cluster(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if auth_mode is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = auth_mode
        assert not survivors, f"Ray processes survived teardown: {sorted(survivors)}"


def _job_on_cluster(job, log: str, marks: str):
    """Log who runs which units; the first time KILL_BEFORE / KILL_AFTER turns up, kill this worker process
    before training it / after its unit is written (a marker file makes each kill happen once)."""
    import os
    import signal
    import time

    import ray

    from benchmark.groundtruth import run_job

    names = [u.name for u in job.units]
    with open(log, "a") as f:
        f.write(f"{' '.join(names)} {os.getpid()} {ray.get_runtime_context().get_node_id()} {time.time():.2f}\n")

    def once(name):
        try:
            os.close(os.open(os.path.join(marks, name), os.O_CREAT | os.O_EXCL))
            return True
        except FileExistsError:
            return False

    if KILL_BEFORE in names and once(KILL_BEFORE):
        os.kill(os.getpid(), signal.SIGKILL)
    results = run_job(job)
    if KILL_AFTER in names and once(KILL_AFTER):
        os.kill(os.getpid(), signal.SIGKILL)
    return results


class Recording(RayExecutor):
    """Keeps every result the executor hands to the build."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.results = []

    def run(self, fn, jobs):
        for results in super().run(fn, jobs):
            self.results.extend(results)
            yield results


def test_ray_cluster_builds_the_local_artifact_and_survives_killed_workers(cluster, tmp_path, monkeypatch):
    setting = settings.get(SETTING)
    local = G.build(setting, store=ResultsStore(tmp_path / "local"), executor=LocalExecutor(1), device="cpu",
                    trainer="loop", **quiet)

    log, marks = tmp_path / "attempts.log", tmp_path / "marks"
    marks.mkdir()
    executor = Recording(address=cluster["address"], num_cpus_per_task=1, max_retries=2)
    assert executor.threads_per_worker == 1  # bitwise-equal CPU results need one torch thread per unit
    # build() hands builder.run_job to the executor; route it through the logging, killing job function.
    monkeypatch.setattr(builder, "run_job", functools.partial(_job_on_cluster, log=str(log), marks=str(marks)))
    built = G.build(setting, store=ResultsStore(tmp_path / "ray"), executor=executor, device="cpu", trainer="loop",
                    **quiet)

    protocol = setting.protocols["default"]
    units = [u.name for u in G.all_units(protocol)]

    # Both kills happened.
    assert sorted(p.name for p in marks.iterdir()) == sorted([KILL_BEFORE, KILL_AFTER])
    attempts = [line.split() for line in log.read_text().splitlines()]
    tried = [a[0] for a in attempts]  # loop trainer: one unit per job
    assert tried.count(KILL_BEFORE) == 2, "the killed attempt and its retry"
    assert tried.count(KILL_AFTER) == 1, "a unit written before the kill must not be trained again"
    assert sorted(set(tried)) == sorted(units)
    assert all(tried.count(u) == 1 for u in units if u != KILL_BEFORE)

    # The units ran on the cluster: in worker processes on both nodes, never in this process.
    pids = {int(a[1]) for a in attempts}
    assert os.getpid() not in pids and len(pids) >= 3  # two workers at least, plus replacements of killed ones
    assert {a[2] for a in attempts} == cluster["nodes"], "units should run on the head and on the worker node"
    assert {p["node_id"] for p in executor.placements} <= cluster["nodes"]

    # Every unit reported exactly once (the one written before its worker died: from disk), none lost.
    reported = [r["unit"] for r in executor.results]
    assert sorted(reported) == sorted(units)
    assert [r["unit"] for r in executor.results if r.get("already_done")] == [KILL_AFTER]

    # The artifact is the local one, bit for bit (timings aside), complete and verified.
    man = G.GroundTruth.open(built, setting).manifest
    assert man["complete"] and man["units_done"] == len(units)
    assert man["environment"]["executor"].startswith("ray 127.0.0.1")
    _assert_same(_content(built), _content(local))


def test_ray_executor_refuses_what_the_cluster_cannot_run(cluster, tmp_path):
    import dataclasses

    from benchmark.groundtruth.executors import ExecutorError

    from benchmark.setup.config import Unit

    setting = settings.get(SETTING)
    job = G.Job(setting, setting.protocols["default"], str(tmp_path), (Unit(0, 0),), device="cuda")
    with pytest.raises(ExecutorError, match="needs 0.5 GPU but the Ray cluster has 0"):
        list(RayExecutor(address=cluster["address"], num_gpus_per_task=0.5).run(G.run_job, [job]))
    with pytest.raises(ValueError, match="no GPU is requested"):
        list(RayExecutor(address=cluster["address"]).run(G.run_job, [job]))
    with pytest.raises(ValueError, match="pass --device cuda"):
        list(RayExecutor(address=cluster["address"], num_gpus_per_task=1).run(
            G.run_job, [dataclasses.replace(job, device="cpu")]))
    assert not ray.is_initialized()  # the executor disconnects from a cluster it connected to
    assert not list(tmp_path.iterdir())  # nothing ran, nothing was left behind (the storage probe included)


def test_reproduce_retrains_on_the_cluster(cluster, tmp_path):
    """`gt --reproduce` runs its retrains as jobs on the executor: on the cluster, in its workers, they come back
    bit-identical to the units a build in this process wrote."""
    from benchmark.groundtruth import reproduce as R
    from eval_helpers import synthetic_store

    gt = G.load(synthetic_store(tmp_path, "ensemble"), settings.get(SETTING))
    executor = RayExecutor(address=cluster["address"], num_cpus_per_task=1)
    rep = R.reproduce(gt, R.draw_units(gt, 3, 1), executor=executor, log=lambda *a: None)
    assert rep["overall"]["verdict"] == R.IDENTICAL and rep["overall"]["identical"] == 4
    assert sorted(u for p in executor.placements for u in p["units"]) == sorted(u["unit"] for u in rep["units"])
    assert {p["node_id"] for p in executor.placements} <= cluster["nodes"]
    assert os.getpid() not in {p["pid"] for p in executor.placements}
