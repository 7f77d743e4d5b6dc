"""RST under FSDP2 (`fully_shard`, 2 CPU processes on gloo) equals one process bitwise and saves the same adapter.

Reference: `_distributed_train.train_single("accumulate")`, the two per-rank halves of each global batch as two
micro-batches of loss / 2 in one process. FSDP2 reduce-scatters the mean of the ranks' gradients, (g0 + g1) / 2, which
is the same bits as g0 / 2 + g1 / 2 (halving is exact), so the tolerance is zero: weights and saved tensors match
bit for bit. Accelerate is not used for the launch: its FSDP plugin is only honoured on GPU-class devices, on CPU it
falls back to DDP (docs/rst.md); what it would apply is this `fully_shard`.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("_distributed_train", os.path.join(HERE, "_distributed_train.py"))
script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(script)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        os.path.join(HERE, "_fsdp_train.py"), "--out", str(out),
    ]  # fmt: skip
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=HERE)
    assert result.returncode == 0, result.stderr[-4000:]
    return out


@pytest.mark.slow
def test_fsdp2_equals_one_process_bitwise_and_saves_the_same_adapter(fsdp_run, tmp_path):
    trained = load_file(fsdp_run / "trained.safetensors")
    assert (fsdp_run / "steps.txt").read_text() == str(script.STEPS)  # one reset per optimizer step

    single = script.train_single("accumulate")
    reference = script.trainable_state(single)
    assert trained.keys() == reference.keys() and any(".rst_weight." in k for k in trained)
    for key, value in trained.items():
        assert torch.equal(value.view(torch.int32), reference[key].view(torch.int32)), key

    single.save_pretrained(tmp_path / "single")
    saved_fsdp = load_file(fsdp_run / "adapter" / "adapter_model.safetensors")
    saved_single = load_file(tmp_path / "single" / "adapter_model.safetensors")
    assert saved_fsdp.keys() == saved_single.keys()
    for key in saved_fsdp:
        assert saved_fsdp[key].dtype == saved_single[key].dtype and torch.equal(saved_fsdp[key], saved_single[key]), (
            key
        )

    # sanity: training moved entries and the reset put others back
    bases = {n: p for n, p in single.named_parameters() if not p.requires_grad}
    changed = total = 0
    for key, w in trained.items():
        if ".rst_weight." in key:
            w0 = bases[key.replace(".rst_weight.default.", ".base_layer.")]
            changed += int((w != w0).sum())
            total += w.numel()
    assert 0 < changed < total
