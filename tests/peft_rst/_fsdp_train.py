"""Train `_distributed_train`'s tiny RST model under FSDP2 (`fully_shard`, 2 CPU processes on gloo); for test_fsdp.py.

Launched with `python -m torch.distributed.run --nproc_per_node 2`. Each rank takes its half of every global batch;
FSDP2 shards every parameter (w0, W, the saved head) across the ranks, reduce-scatters the gradients and each rank
steps its shard, so RST's reset runs on the local shards. Rank 0 writes the gathered trainable weights
(`trained.safetensors`), the adapter saved from the gathered state dict (`adapter/`) and the reset step count.
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
def train_fsdp(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, f"run with --nproc_per_node 2, got {world}"
    model = script.build_model()
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
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    train_fsdp(args.out)


if __name__ == "__main__":
    main()
