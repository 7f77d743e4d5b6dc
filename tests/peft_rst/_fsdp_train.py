"""Train `_distributed_train`'s tiny RST model under FSDP2 (`fully_shard`, 2 CPU processes on gloo); for test_fsdp.py.

Launched with `python -m torch.distributed.run --nproc_per_node 2`. Each rank takes its half of every global batch;
FSDP2 shards every parameter (w0, W, the saved head) across the ranks, reduce-scatters the gradients and each rank
steps its shard, so RST's reset runs on the local shards. `--rules tau,keep_ratio,...` trains once per reset rule
(`_distributed_train.RULES`) in the same processes; for each, rank 0 writes to `<out>/<rule>/` the gathered trainable
weights (`trained.safetensors`), the adapter saved from the gathered state dict (`adapter/`) and the reset step count.
"""

from __future__ import annotations

import argparse
import os

import _distributed_train as script
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor


@script.single_thread
def train_fsdp(out: str, rule: str, width: int) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, f"run with --nproc_per_node 2, got {world}"
    out = os.path.join(out, rule)
    os.makedirs(out, exist_ok=True)
    model = script.build_model(rule, width)
    for block in model.base_model.model.body:  # one FSDP unit per block with parameters, then the root
        if any(True for _ in block.parameters()):
            fully_shard(block)
    fully_shard(model)
    weight = model.base_model.model.body[0].rst_weight["default"]["weight"]
    assert isinstance(weight, DTensor) and weight.to_local().numel() < weight.numel(), "parameters are not sharded"
    optimizer = script.make_optimizer(model)
    half = script.GLOBAL_BATCH // world
    for x, y in script.global_batches():
        optimizer.zero_grad()
        rows = slice(rank * half, (rank + 1) * half)
        nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
        optimizer.step()
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        save_file(
            {n: t.contiguous() for n, t in full.items() if n in trainable}, os.path.join(out, "trained.safetensors")
        )
        model.save_pretrained(os.path.join(out, "adapter"), state_dict=full)
        with open(os.path.join(out, "steps.txt"), "w") as f:
            f.write(str(model.base_model.reset_step()))
    dist.barrier()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--rules", default="tau", help="comma-separated keys of _distributed_train.RULES")
    parser.add_argument("--width", type=int, default=16, help="hidden size; odd shards unevenly over 2 ranks")
    args = parser.parse_args()
    rules = args.rules.split(",")
    unknown = sorted(set(rules) - set(script.RULES))
    if unknown:
        parser.error(f"unknown rules {unknown}; use keys of {sorted(script.RULES)}")
    dist.init_process_group("gloo")
    try:
        for rule in rules:
            train_fsdp(args.out, rule, args.width)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
