"""RST under DDP (`accelerate launch --cpu --num_processes 2`): ranks agree bitwise, and so does one process.

Why two single-process references:
- `accumulate` runs the two per-rank halves of each global batch as two micro-batches of loss / 2 in one process.
  DDP averages the ranks' gradients as (g0 + g1) / 2; accumulation gives g0 / 2 + g1 / 2. Halving is exact in binary
  floating point and a + b == b + a, so both are the same bits, and the weights must match bit for bit.
- `full` does one backward over the whole global batch. Its gradient sums the 8 samples in another order than two
  sums of 4, so it differs from DDP by float rounding (~1e-7 relative); an entry whose |w - w0| lands within that
  rounding of tau can then be reset in one run and not in the other. It is compared within a tight tolerance.
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
SCRIPT = os.path.join(HERE, "_distributed_train.py")


def _script():
    spec = importlib.util.spec_from_file_location("_distributed_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    # accelerate 1.x: `--cpu` picks the single-process launcher on one machine; `--multi_gpu` starts the processes
    # through torchrun, and the script's Accelerator(cpu=True) makes that DDP over gloo on the CPU (MULTI_CPU).
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
        SCRIPT, "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=HERE)
    assert result.returncode == 0, result.stderr[-4000:]
    return out


@pytest.mark.slow
def test_ranks_bitwise_identical_and_equal_to_one_process(ddp_run, tmp_path):
    script = _script()
    rank0 = load_file(ddp_run / "rank0.safetensors")
    rank1 = load_file(ddp_run / "rank1.safetensors")
    assert rank0.keys() == rank1.keys() and any(".rst_weight." in k for k in rank0)
    for key in rank0:
        assert torch.equal(rank0[key].view(torch.int32), rank1[key].view(torch.int32)), key
    assert (ddp_run / "steps.txt").read_text() == str(script.STEPS)  # one reset per optimizer step, not per rank

    accumulate = script.train_single("accumulate")
    single = script.trainable_state(accumulate)
    assert single.keys() == rank0.keys()
    for key in rank0:
        assert torch.equal(single[key].view(torch.int32), rank0[key].view(torch.int32)), key

    # the saved adapters agree too, tensor by tensor (encoded sparse entries, headers, fingerprints)
    accumulate.save_pretrained(tmp_path / "single")
    saved_ddp = load_file(ddp_run / "adapter" / "adapter_model.safetensors")
    saved_single = load_file(tmp_path / "single" / "adapter_model.safetensors")
    assert saved_ddp.keys() == saved_single.keys()
    for key in saved_ddp:
        assert saved_ddp[key].dtype == saved_single[key].dtype and torch.equal(saved_ddp[key], saved_single[key]), key

    # sanity: the run trained something and reset something
    bases = {n: p for n, p in accumulate.named_parameters() if not p.requires_grad}
    changed = total = 0
    for key, w in single.items():
        if ".rst_weight." in key:
            w0 = bases[key.replace(".rst_weight.default.", ".base_layer.")]
            changed += int((w != w0).sum())
            total += w.numel()
    assert 0 < changed < total


@pytest.mark.slow
def test_full_batch_single_process_within_rounding(ddp_run):
    script = _script()
    full = script.train_single("full")
    state = script.trainable_state(full)
    rank0 = load_file(ddp_run / "rank0.safetensors")
    bases = {n: p for n, p in full.named_parameters() if not p.requires_grad}
    flipped = total = 0
    for key, w in rank0.items():
        diff = (state[key] - w).abs()
        if ".rst_weight." not in key:
            assert diff.max() <= 1e-5, key
            continue
        w0 = bases[key.replace(".rst_weight.default.", ".base_layer.")]
        same_decision = (state[key] == w0) == (w == w0)
        flipped += int((~same_decision).sum())
        total += w.numel()
        assert diff[same_decision].max() <= 1e-5, key
        # a flipped entry was within rounding of tau: its kept value is ~tau away from w0
        assert (diff[~same_decision] <= script.TAU + 1e-5).all(), key
    assert flipped <= 0.01 * total
