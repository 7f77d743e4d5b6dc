"""The suite runs offline: no socket to another host, the Hugging Face libraries in offline mode, no test downloads.

These check the configuration itself (pyproject's pytest addopts and tests/conftest.py), so that a change to either
that would let a test reach the network fails here rather than on a machine without internet.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_hugging_face_libraries_are_in_offline_mode():
    import datasets
    import huggingface_hub

    assert huggingface_hub.constants.is_offline_mode()  # what transformers and peft ask too
    assert datasets.config.HF_HUB_OFFLINE


def test_sockets_reach_localhost_only():
    from pytest_socket import SocketConnectBlockedError

    with pytest.raises(SocketConnectBlockedError):  # a documentation address (TEST-NET-3): never routed
        socket.create_connection(("203.0.113.1", 80), timeout=1)
    with socket.create_server(("127.0.0.1", 0)) as server:
        accepted = threading.Thread(target=lambda: server.accept()[0].close())
        accepted.start()
        with socket.create_connection(server.getsockname(), timeout=5):
            pass
        accepted.join(timeout=5)


@pytest.mark.slow  # a pytest subprocess: a few seconds
def test_peft_generic_tests_skip_with_the_fetch_command_when_not_fetched(tmp_path):
    """Without peft's cached tests, test_peft_generic.py skips (it never downloads) and names the command."""
    env = {**os.environ, "PEFT_RST_UPSTREAM_TESTS": str(tmp_path / "absent")}
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider"]
    done = subprocess.run(
        [*cmd, "tests/peft_rst/test_peft_generic.py"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    # 5: pytest's "no tests collected", as the whole module skipped (in the full suite it is one skip among passes)
    assert done.returncode in (0, 5), done.stdout[-2000:] + done.stderr[-2000:]
    assert "1 skipped" in done.stdout and "python scripts/fetch_peft_tests.py" in done.stdout, done.stdout[-2000:]
    assert not (tmp_path / "absent").exists()
