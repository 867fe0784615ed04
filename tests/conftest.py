import os

import pytest
import torch

# Tests must never reach for the network: data sources that need it are skipped.
os.environ.setdefault("TDABENCH_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _single_thread_determinism():
    """Float summation order depends on the thread count; pin it so equality tests are meaningful."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
