"""Test-session settings shared by every module."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread in the test process.

    The tests use tiny tensors and networks, where a second thread only adds synchronisation, and
    subprocess tests (DDP ranks) would otherwise oversubscribe the 2-core CI machine: on a loaded
    2-core machine a tiny U-Net forward took 1,067 ms with 2 threads and 74 ms with 1.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
