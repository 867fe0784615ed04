"""Floor 4: how cost is measured — wall-clock and peak memory per named stage.

On CPU, peak memory is the process's resident set (its high-water mark, reset at the start of each stage where
Linux allows it); on a GPU it is ``torch.cuda.max_memory_allocated``, reset per stage.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from contextlib import contextmanager

import torch


def _proc_status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def rss_mb() -> float | None:
    """The process's current resident set size in MiB (Linux), else None."""
    return _proc_status_mb("VmRSS")


def _reset_rss_peak() -> bool:
    """Reset the kernel's resident-set high-water mark (Linux ≥ 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _Sampler(threading.Thread):
    """Fallback peak tracker: polls the resident set every few milliseconds."""

    def __init__(self, interval: float = 0.005):
        super().__init__(daemon=True)
        self.interval, self.peak, self._halt = interval, rss_mb() or 0.0, threading.Event()

    def run(self):
        while not self._halt.wait(self.interval):
            self.peak = max(self.peak, rss_mb() or 0.0)

    def stop(self) -> float:
        self._halt.set()
        self.join()
        return self.peak


class Cost:
    """Wall-clock and peak memory per named stage.

    >>> cost = Cost("cpu")
    >>> with cost.stage("fit"):
    ...     pass
    >>> sorted(cost.stages["fit"])  # doctest: +NORMALIZE_WHITESPACE
    ['memory_method', 'peak_mb', 'seconds', 'start_mb']

    Stages must not nest (the peak counter is process-wide). ``peak_mb`` is the absolute process peak on
    CPU (it includes the loaded data and the torch runtime), the allocator's peak on a GPU.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.stages: dict[str, dict] = {}
        self._open = False

    @contextmanager
    def stage(self, name: str):
        if self._open:
            raise RuntimeError("Cost stages must not nest: the peak-memory counter is process-wide")
        self._open = True
        cuda = self.device.type == "cuda"
        sampler = None
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            start, method = torch.cuda.memory_allocated(self.device) / 2**20, "torch.cuda.max_memory_allocated"
        elif _reset_rss_peak():
            start, method = rss_mb(), "VmHWM (reset per stage)"
        elif rss_mb() is not None:
            sampler = _Sampler()
            sampler.start()
            start, method = rss_mb(), "VmRSS sampled every 5 ms"
        else:
            start, method = None, "ru_maxrss (process lifetime peak)"
        t0 = time.perf_counter()
        try:
            yield self
        finally:
            if cuda:
                torch.cuda.synchronize(self.device)
            seconds = time.perf_counter() - t0
            if cuda:
                peak = torch.cuda.max_memory_allocated(self.device) / 2**20
            elif sampler is not None:
                peak = sampler.stop()
            elif method.startswith("VmHWM"):
                peak = _proc_status_mb("VmHWM")
            else:
                scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20
            rec = self.stages.setdefault(name, {"seconds": 0.0, "peak_mb": 0.0, "start_mb": start,
                                                "memory_method": method})
            rec["seconds"] += seconds  # a stage entered twice (e.g. ensemble members) accumulates
            rec["peak_mb"] = max(rec["peak_mb"], peak or 0.0)
            self._open = False

    def seconds(self, *names: str) -> float | None:
        """Total seconds of the named stages; None when none of them ran (not measured is not zero)."""
        present = [n for n in names if n in self.stages]
        return float(sum(self.stages[n]["seconds"] for n in present)) if present else None

    def peak_mb(self, *names: str) -> float | None:
        vals = [self.stages[n]["peak_mb"] for n in (names or self.stages) if n in self.stages]
        return float(max(vals)) if vals else None

    def to_dict(self) -> dict:
        return {name: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()}
                for name, rec in self.stages.items()}


def machine_load() -> dict:
    """Context for timings: the 1-minute load average against the cores (a loaded machine runs slower)."""
    try:
        load1 = os.getloadavg()[0]
    except OSError:
        load1 = None
    return {"loadavg_1min": load1, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
