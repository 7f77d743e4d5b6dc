"""Suite-wide settings.

No test touches the network: pyproject's pytest `addopts` turn sockets off except to localhost (pytest-socket), and
huggingface_hub, transformers and datasets are put in offline mode here, before any test module imports them (they
read the variable once, at import), so that they never try huggingface.co (peft's mock models otherwise look for a
remote config.json). Tests that talk to a stand-in Hub on 127.0.0.1 switch offline mode off for themselves.

Every test runs tiny models: one intra-op thread is faster for them than torch's default on this 2-core machine
and makes the timing independent of what else the machine is doing (2 threads under load were 25x slower).
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
