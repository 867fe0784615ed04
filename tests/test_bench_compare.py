"""`make bench-compare`'s machinery, on a toy benchmark that uses the suite's own fixtures (benchmarks/conftest.py):
a saved run, then the same run compared with it passes, and with the planted 2× slowdown fails at the
Makefile's threshold. The suite itself (benchmarks/) is never part of `make test`."""

import re
import subprocess
import sys
import textwrap

from benchmark.setup.plugins import REPO_ROOT

TOY = textwrap.dedent('''
    import time

    def test_toy(timed):
        timed(lambda: time.sleep(0.05), rounds=3, floor_flops=1e6)
''')


def _pytest(tmp_path, *args, slowdown="1"):
    import os

    env = {**os.environ, "TDABENCH_BENCH_SLOWDOWN": slowdown, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "pytest", str(tmp_path / "bench_toy.py"), "-p", "no:cacheprovider",
                           "--benchmark-enable", "--benchmark-only", f"--benchmark-storage=file://{tmp_path / 'perf'}",
                           *args], cwd=tmp_path, env=env, capture_output=True, text=True)


def test_compare_fails_on_a_planted_slowdown(tmp_path):
    threshold = re.search(r"^BENCH_FAIL\s*\?=\s*(\S+)", (REPO_ROOT / "Makefile").read_text(), re.M).group(1)
    (tmp_path / "conftest.py").write_text("from benchmarks.conftest import *  # noqa: F401,F403\n")
    (tmp_path / "bench_toy.py").write_text(TOY)
    (tmp_path / "pytest.ini").write_text("[pytest]\npython_files = bench_*.py\n")
    saved = _pytest(tmp_path, "--benchmark-save=base")
    assert saved.returncode == 0, saved.stdout + saved.stderr
    assert "x floor" in saved.stdout and "test_toy" in saved.stdout  # the stage beside its floor
    same = _pytest(tmp_path, "--benchmark-compare=0001", f"--benchmark-compare-fail={threshold}")
    assert same.returncode == 0, same.stdout + same.stderr
    slow = _pytest(tmp_path, "--benchmark-compare=0001", f"--benchmark-compare-fail={threshold}", slowdown="2")
    assert slow.returncode != 0 and "Performance has regressed" in slow.stdout + slow.stderr, slow.stdout
