"""Train `_distributed_train`'s tiny RST model under FSDP2 (`fully_shard`, 2 CPU processes on gloo); for test_fsdp.py.

Launched with `python -m torch.distributed.run --nproc_per_node 2`. Each rank takes its half of every global batch;
FSDP2 shards every parameter (w0, W, the saved head) across the ranks, reduce-scatters the gradients and each rank
steps its shard, so RST's reset runs on the local shards. `--rules tau,keep_ratio,... --widths 16,15` trains once per
reset rule (`_distributed_train.RULES`) and hidden width (15 shards unevenly: 8 and 7 rows) in the same processes; for
each, rank 0 writes to `<out>/<rule>-<width>/` the gathered trainable weights (`trained.safetensors`), the adapter
saved from the gathered state dict (`adapter/`) and the reset step count.

`--ranking` also runs the top-r reset alone on random DTensors (uneven shards, ties, a NaN; FSDP's 1-D mesh and HSDP's
2-D meshes; one plain tensor among DTensors) and rank 0 writes to `<out>/ranking/` the inputs, the gathered results
and the collectives each reset issued, for the test to compare with one process.
"""

from __future__ import annotations

import argparse
import json
import os

import _distributed_train as script
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.debug import CommDebugMode

from peft_rst.reset import ResetTarget, _keep_top_fraction_


@script.single_thread
def train_fsdp(out: str, rule: str, width: int) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, f"run with --nproc_per_node 2, got {world}"
    out = os.path.join(out, f"{rule}-{width}")
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


RANKING_FRACTIONS = (0.01, 0.1, 0.3, 0.77)


@torch.no_grad()
def check_ranking(out: str) -> None:
    """`_keep_top_fraction_` on DTensors laid out as FSDP2 and HSDP lay them out; see the module docstring."""
    rank = dist.get_rank()
    out = os.path.join(out, "ranking")
    os.makedirs(out, exist_ok=True)
    g = torch.Generator().manual_seed(2)
    shapes = [(3, 5), (7,), (16, 4), (1,), (5, 3, 2), (2, 9)]
    bases = [torch.randn(s, generator=g) for s in shapes]
    weights = [b + 1e-2 * torch.randn(s, generator=g) for s, b in zip(shapes, bases)]
    for w, b in zip(weights, bases):  # ties: every other entry moved by exactly the same amount
        w.view(-1)[::2] = b.view(-1)[::2] + 0.5
    with_nan = [w.clone() for w in weights]
    with_nan[4].view(-1)[3] = float("nan")
    tensors = {f"base{i}": b for i, b in enumerate(bases)}
    tensors |= {f"weight{i}": w for i, w in enumerate(weights)}
    tensors |= {f"nanweight{i}": w for i, w in enumerate(with_nan)}
    layouts = {
        "fsdp": (init_device_mesh("cpu", (2,)), [Shard(0)]),
        "hsdp_1x2": (init_device_mesh("cpu", (1, 2), mesh_dim_names=("a", "b")), [Replicate(), Shard(0)]),
        "hsdp_2x1": (init_device_mesh("cpu", (2, 1), mesh_dim_names=("c", "d")), [Replicate(), Shard(0)]),
        "mixed": (init_device_mesh("cpu", (2,)), [Shard(0)]),  # the last pair stays a plain tensor
    }
    comms = {}
    for layout, (mesh, placements) in layouts.items():
        for source in ("weight", "nanweight"):
            for fraction in RANKING_FRACTIONS:
                targets = []
                for i in range(len(shapes)):
                    w, b = tensors[f"{source}{i}"].clone(), bases[i]
                    if layout != "mixed" or i < len(shapes) - 1:
                        w, b = distribute_tensor(w, mesh, placements), distribute_tensor(b, mesh, placements)
                    targets.append(ResetTarget(w, b, is_bias=False))
                with CommDebugMode() as comm:
                    _keep_top_fraction_(targets, fraction)
                case = f"{layout}/{source}/{fraction}"
                comms[case] = {str(op): n for op, n in comm.get_comm_counts().items()}
                for i, t in enumerate(targets):
                    w = t.weight.full_tensor() if isinstance(t.weight, DTensor) else t.weight
                    tensors[f"{case}/{i}"] = w.contiguous()
    if rank == 0:
        save_file(tensors, os.path.join(out, "tensors.safetensors"))
        with open(os.path.join(out, "comms.json"), "w") as f:
            json.dump(comms, f)
    dist.barrier()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--rules", default="tau", help="comma-separated keys of _distributed_train.RULES")
    parser.add_argument("--widths", default="16", help="comma-separated hidden sizes; odd ones shard unevenly")
    parser.add_argument("--ranking", action="store_true", help="also check the top-r ranking on random DTensors")
    args = parser.parse_args()
    rules = args.rules.split(",")
    unknown = sorted(set(rules) - set(script.RULES))
    if unknown:
        parser.error(f"unknown rules {unknown}; use keys of {sorted(script.RULES)}")
    dist.init_process_group("gloo")
    try:
        for rule in rules:
            for width in args.widths.split(","):
                train_fsdp(args.out, rule, int(width))
        if args.ranking:
            check_ranking(args.out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
