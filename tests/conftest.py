import os

import pytest
import torch

# Tests must never reach for the network: data sources that need it are skipped.
os.environ.setdefault("TDABENCH_OFFLINE", "1")

if "MUTANT_UNDER_TEST" in os.environ:  # under mutmut (`make mutate`, docs/testing.md)
    # mutmut routes a mutant to its function by the module name it derives from the file's path (solvers.kfac);
    # the plugin loader names the repository's own solver files benchmark._plugins.solvers.builtin.kfac.
    from benchmark.setup import plugins

    _stable_name = plugins.module_name

    def _path_name(kind, path):
        name = _stable_name(kind, path)
        return f"{kind}.{name.rsplit('.', 1)[1]}" if f".{kind}.builtin." in name else name

    plugins.module_name = _path_name


@pytest.fixture(autouse=True)
def _single_thread_determinism():
    """Float summation order depends on the thread count; pin it so equality tests are meaningful."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
