"""RST through Accelerate's FSDP2 path (2 CPU processes on gloo) equals one process bitwise and saves the same adapter.

`_accelerate_fsdp_train.py` prepares model and optimizer with `accelerator.prepare` on `DistributedType.FSDP`,
`fsdp_version=2` (Accelerate's `fsdp2_prepare_model`, `fully_shard` per `RSTLayer`), trains, and saves through
`accelerator.get_state_dict` + `unwrap_model(...).save_pretrained`. Accelerate 1.15 keeps the FSDP plugin only on
GPU-class devices; on CPU the script switches the fallback's `distributed_type` to FSDP as Accelerate does on a GPU
(`use_fsdp_on_cpu`), everything else is Accelerate's code. The second variant sets `cpu_ram_efficient_loading`:
Accelerate moves the model to meta, shards it there and loads rank 0's state dict into the shards
(`fsdp2_load_full_state_dict`, `load_state_dict(assign=True)`, so every W and w0 is a new tensor); rank 1 starts
from NaN weights, so only values broadcast from rank 0 can give the reference.

The plain launch also resumes (`--resume`): a fresh model trains half the steps of the `keep_ratio` schedule,
`accelerator.save_state` writes the sharded model and optimizer state (DCP), a second fresh model is prepared and
`accelerator.load_state` loads it, and it trains the second half. The reset step travels in the optimizer state, so
the result must equal the uninterrupted one-process run; a schedule restarted at 0 keeps 40 % and 30 % instead of
20 % and 10 % in the last two steps and ends elsewhere.

Reference and tolerance as in test_fsdp.py: `_distributed_train.train_single("accumulate")`; FSDP2 reduce-scatters
the mean (g0 + g1) / 2, the same bits as g0 / 2 + g1 / 2, so weights and saved tensors must match bit for bit.
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


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "cpu_ram_efficient_loading"])
def accelerate_run(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("accelerate_fsdp")
    # as in test_distributed.py: `--multi_gpu` starts the processes through torchrun; the script's
    # Accelerator(cpu=True) makes them gloo processes on the CPU
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
        os.path.join(HERE, "_accelerate_fsdp_train.py"), "--out", str(out),
    ]  # fmt: skip
    cmd.append("--cpu-ram-efficient-loading" if request.param else "--resume")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=HERE)
    assert result.returncode == 0, result.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def single():
    return script.train_single("accumulate")


@pytest.mark.slow
def test_accelerate_fsdp2_equals_one_process_bitwise_and_saves_the_same_adapter(accelerate_run, single, tmp_path):
    # every parameter of the prepared model is a DTensor holding a proper shard: no DDP fallback
    sharded, total = map(int, (accelerate_run / "sharded.txt").read_text().split("/"))
    assert sharded == total == sum(1 for _ in single.parameters())
    # nothing keeps the unsharded parameters alive: each rank holds its shards only
    assert (accelerate_run / "kept.txt").read_text() == "0"
    assert (accelerate_run / "steps.txt").read_text() == str(script.STEPS)  # one reset per optimizer step

    trained = script.assert_run_matches(accelerate_run, single, tmp_path)

    # sanity: training moved entries and the reset put others back
    bases = {n: p for n, p in single.named_parameters() if not p.requires_grad}
    changed = total_entries = 0
    for key, w in trained.items():
        if ".rst_weight." in key:
            w0 = bases[key.replace(".rst_weight.default.", ".base_layer.")]
            changed += int((w != w0).sum())
            total_entries += w.numel()
    assert 0 < changed < total_entries


@pytest.mark.slow
def test_accelerate_fsdp2_save_state_load_state_continues_the_schedule_exactly(accelerate_run):
    resumed = accelerate_run / "resumed"
    if not resumed.exists():
        pytest.skip("only the plain launch resumes")
    # load_state leaves the model's count alone (DCP's state-initialising optimizer step does not count); the next
    # step adopts the saved one
    assert (resumed / "loaded_step.txt").read_text() == "0"
    assert (resumed / "steps.txt").read_text() == str(script.STEPS)
    trained = load_file(resumed / "trained.safetensors")
    reference = script.trainable_state(script.train_single("accumulate", "keep_ratio"))
    assert trained.keys() == reference.keys()
    for key, value in trained.items():
        assert torch.equal(value.view(torch.int32), reference[key].view(torch.int32)), key
