"""Suite-wide settings.

Every test runs tiny models: one intra-op thread is faster for them than torch's default on this 2-core machine
and makes the timing independent of what else the machine is doing (2 threads under load were 25x slower).
"""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
