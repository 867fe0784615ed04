"""Helpers for the Makefile's bench targets.

    python -m benchmarks device      this machine's folder name under results/perf/ (e.g. cpu-amd-epyc-2c)
    python -m benchmarks baseline    the number of the committed saved run for this machine (what
                                     `make bench-compare` compares with); an error naming `make bench` if none
"""

from __future__ import annotations

import re
import subprocess
import sys

from benchmark.setup.training import default_device

from .common import PERF, device_slug


def committed_runs(device) -> list[str]:
    """Saved runs (pytest-benchmark JSON: <machine id>/<NNNN>_<name>.json) under results/perf/<device>/ that git
    tracks, oldest first."""
    folder = PERF / device_slug(device)
    out = subprocess.run(["git", "ls-files", "--", str(folder)], cwd=PERF.parent.parent, capture_output=True,
                         text=True, check=False).stdout.split()
    return sorted((p for p in out if re.search(r"/\d{4}_[^/]*\.json$", p)), key=lambda p: p.rsplit("/", 1)[1])


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    device = default_device()
    if args == ["device"]:
        print(device_slug(device))
        return 0
    if args == ["baseline"]:
        runs = committed_runs(device)
        if not runs:
            print(f"no committed benchmark run under {PERF / device_slug(device)}: run `make bench` on this machine "
                  f"and commit the JSON it saves", file=sys.stderr)
            return 1
        print(re.search(r"/(\d{4})_[^/]*\.json$", runs[-1]).group(1))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
