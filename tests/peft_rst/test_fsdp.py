"""RST under FSDP2 (`fully_shard`, 2 CPU processes on gloo) equals one process bitwise and saves the same adapter,
for each reset rule (tau, the global top-r mode `keep_ratio` with a decaying fraction, `bias_only`) and with even and
uneven shards (hidden width 16 and 15 over 2 ranks). One launch trains all of them in sequence.

Reference: `_distributed_train.train_single("accumulate")`, the two per-rank halves of each global batch as two
micro-batches of loss / 2 in one process. FSDP2 reduce-scatters the mean of the ranks' gradients, (g0 + g1) / 2, which
is the same bits as g0 / 2 + g1 / 2 (halving is exact), so the tolerance is zero: weights and saved tensors match
bit for bit. Accelerate is not used for the launch: its FSDP plugin is only honoured on GPU-class devices, on CPU it
falls back to DDP (docs/rst.md); what it would apply is this `fully_shard`.

The top-r ranking is also checked alone on random DTensors (ties, a NaN, uneven shards, FSDP and HSDP meshes, a plain
tensor among DTensors) against one process, bitwise, and the sharded ranking must cost one small all-gather per step.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from peft_rst.reset import ResetTarget, _keep_top_fraction_

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("_distributed_train", os.path.join(HERE, "_distributed_train.py"))
script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(script)


RULES = ("tau", "keep_ratio", "bias_only")
WIDTHS = (16, 15)  # 15 rows shard unevenly over 2 ranks (8 and 7)


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
        "--rules", ",".join(RULES), "--widths", ",".join(map(str, WIDTHS)), "--ranking",
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
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("rule", RULES)
def test_fsdp2_equals_one_process_bitwise_and_saves_the_same_adapter(fsdp_run, tmp_path, rule, width):
    run = fsdp_run / f"{rule}-{width}"
    assert (run / "steps.txt").read_text() == str(script.STEPS)  # one reset per optimizer step
    single = script.train_single("accumulate", rule, width)
    trained = script.assert_run_matches(run, single, tmp_path)

    # sanity: training moved entries and the rule put others back
    bases = {n: p for n, p in single.named_parameters() if not p.requires_grad}
    changed = {"weight": 0, "bias": 0}
    total = 0
    for key, w in trained.items():
        if ".rst_weight." in key:
            w0 = bases[key.replace(".rst_weight.default.", ".base_layer.")]
            changed[key.rsplit(".", 1)[1]] += int((w != w0).sum())
            total += w.numel()
    if rule == "bias_only":
        assert changed["weight"] == 0 and changed["bias"] > 0
    else:
        assert 0 < sum(changed.values()) < total
    if rule == "keep_ratio":  # no two changes tie here, so exactly the final fraction of entries is kept
        config = single.peft_config["default"]
        assert sum(changed.values()) == round(config.keep_ratio_at(script.STEPS) * total)


@pytest.mark.slow
def test_sharded_top_r_ranking_is_global_and_one_small_all_gather(fsdp_run):
    tensors = load_file(fsdp_run / "ranking" / "tensors.safetensors")
    comms = json.loads((fsdp_run / "ranking" / "comms.json").read_text())
    count = sum(k.startswith("base") for k in tensors)
    bases = [tensors[f"base{i}"] for i in range(count)]
    assert len(comms) == 4 * 2 * 4
    for case, counts in comms.items():
        layout, source, fraction = case.split("/")
        targets = [ResetTarget(tensors[f"{source}{i}"].clone(), bases[i], is_bias=False) for i in range(count)]
        _keep_top_fraction_(targets, float(fraction))
        if source == "weight":  # (a NaN ranks first, makes the threshold NaN and so resets nothing, as in one process)
            kept = sum(int((t.weight != b).sum()) for t, b in zip(targets, bases))
            assert 0 < kept < sum(b.numel() for b in bases), case  # the rule reset some entries and kept others
        for i, t in enumerate(targets):
            assert torch.equal(tensors[f"{case}/{i}"].view(torch.int32), t.weight.view(torch.int32)), (case, i)
        if layout != "mixed":  # local candidates, not whole tensors, cross the ranks
            assert counts == {"c10d.allgather_": 1}, (case, counts)
