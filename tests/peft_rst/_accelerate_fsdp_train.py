"""Train `_distributed_train`'s tiny RST model through Accelerate's FSDP2 path (2 CPU processes on gloo).

For test_accelerate_fsdp.py; launched with `accelerate launch --multi_gpu --num_processes 2` (torchrun underneath).
Model and optimizer go through `accelerator.prepare`, which on `DistributedType.FSDP` with `fsdp_version=2` runs
Accelerate's `_prepare_fsdp2` / `fsdp2_prepare_model` (`fully_shard` per `RSTLayer` by the transformer-based wrap
policy, then the root) and swaps the optimizer's parameters for the sharded ones. With `--cpu-ram-efficient-loading`
Accelerate moves the model to meta, shards it there and loads rank 0's state dict into the shards
(`fsdp2_load_full_state_dict`). Each rank takes its half of every global batch. Rank 0 writes the gathered
trainable weights (`trained.safetensors`), the adapter saved the documented Accelerate way
(`unwrap_model(model).save_pretrained(..., state_dict=accelerator.get_state_dict(model))`, `adapter/`), the reset
step count (`steps.txt`), how many of the prepared model's parameters are sharded DTensors (`sharded.txt`) and how
many of the parameters built before `prepare` are still alive after it (`kept.txt`; their shards replaced them).

`--resume` then checks a resumed run with the `keep_ratio` schedule (`_distributed_train.RULES`): a fresh model
trains the first half of the steps and `accelerator.save_state` writes model and sharded optimizer state (DCP); a
second fresh model is prepared, `accelerator.load_state` loads that, and it trains the second half. Rank 0 writes
to `<out>/resumed/` the gathered trainable weights, the reset step count and the reset step right after
`load_state` (`loaded_step.txt`: the model's own count, adopted from the optimizer state only at the next step).
"""

from __future__ import annotations

import argparse
import gc
import os
import weakref

import _distributed_train as script
import torch
from accelerate import Accelerator, DistributedType, FullyShardedDataParallelPlugin, PartialState
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor


def use_fsdp_on_cpu(accelerator: Accelerator, plugin: FullyShardedDataParallelPlugin) -> None:
    """Switch the CPU fallback to `DistributedType.FSDP`, as Accelerate itself does on a GPU; the only shim.

    Accelerate 1.15's `AcceleratorState.__init__` (accelerate/state.py, lines 986-1016) sets
    `distributed_type = DistributedType.FSDP` and keeps `fsdp_plugin` only when the distributed type is one of
    MULTI_GPU, MULTI_NPU, MULTI_XPU, ... (GPU-class devices); then it copies the type to `PartialState` (line 1037).
    On CPU (MULTI_CPU) it drops the plugin with no error and `prepare` would wrap the model in DDP. This helper does
    those three assignments (no mixed precision, so `set_mixed_precision` is not called there either). Everything
    after it, `prepare`, `backward`, `get_state_dict`, `unwrap_model`, is Accelerate's unmodified code.
    """
    state = accelerator.state
    if accelerator.is_fsdp2:  # an Accelerate that honours the plugin on CPU needs no shim
        return
    if state.distributed_type != DistributedType.MULTI_CPU:
        raise RuntimeError(f"expected the MULTI_CPU fallback, got {state.distributed_type}; launch on CPU")
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    assert accelerator.is_fsdp2


@script.single_thread
def train(out: str, cpu_ram_efficient_loading: bool, resume: bool = False) -> None:
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["RSTLayer"],
        cpu_ram_efficient_loading=cpu_ram_efficient_loading,
        reshard_after_forward=True,
    )
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
    use_fsdp_on_cpu(accelerator, plugin)
    rank, world = accelerator.process_index, accelerator.num_processes
    assert world == 2, f"run with --num_processes 2, got {world}"
    model = script.build_model()
    if cpu_ram_efficient_loading and rank != 0:
        # as with transformers' empty-weight init: only rank 0's values may reach the shards
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float("nan"))
    optimizer = script.make_optimizer(model)
    originals = [weakref.ref(p) for p in model.parameters()]  # replaced by their shards in `prepare`
    model, optimizer = accelerator.prepare(model, optimizer)
    gc.collect()
    kept = sum(r() is not None for r in originals)
    half = script.GLOBAL_BATCH // world
    for x, y in script.global_batches():
        optimizer.zero_grad()
        rows = slice(rank * half, (rank + 1) * half)
        accelerator.backward(nn.functional.cross_entropy(model(x[rows]), y[rows]))
        optimizer.step()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    params = list(model.parameters())
    sharded = sum(isinstance(p, DTensor) and p.to_local().numel() < p.numel() for p in params)
    full = accelerator.get_state_dict(model)  # collective: every rank calls it, rank 0 gets the tensors
    if accelerator.is_main_process:
        save_file(
            {n: t.contiguous() for n, t in full.items() if n in trainable}, os.path.join(out, "trained.safetensors")
        )
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(os.path.join(out, "adapter"), state_dict=full)
        with open(os.path.join(out, "steps.txt"), "w") as f:
            f.write(str(unwrapped.base_model.reset_step()))
        with open(os.path.join(out, "sharded.txt"), "w") as f:
            f.write(f"{sharded}/{len(params)}")
        with open(os.path.join(out, "kept.txt"), "w") as f:
            f.write(str(kept))
    accelerator.wait_for_everyone()
    if resume:
        train_resumed(accelerator, out)
    accelerator.end_training()


def _prepared(accelerator: Accelerator, rule: str):
    accelerator.free_memory()  # forget the earlier models and optimizers: save_state / load_state see only these
    model = script.build_model(rule)
    return accelerator.prepare(model, script.make_optimizer(model))


def _steps(accelerator: Accelerator, model, optimizer, batches) -> None:
    rank, half = accelerator.process_index, script.GLOBAL_BATCH // accelerator.num_processes
    for x, y in batches:
        optimizer.zero_grad()
        rows = slice(rank * half, (rank + 1) * half)
        accelerator.backward(nn.functional.cross_entropy(model(x[rows]), y[rows]))
        optimizer.step()


def train_resumed(accelerator: Accelerator, out: str, rule: str = "keep_ratio") -> None:
    """Half the steps, `save_state`, a fresh model and `load_state`, the other half; see the module docstring."""
    out = os.path.join(out, "resumed")
    batches, cut = script.global_batches(), script.STEPS // 2
    model, optimizer = _prepared(accelerator, rule)
    _steps(accelerator, model, optimizer, batches[:cut])
    accelerator.save_state(os.path.join(out, "state"))
    del model, optimizer
    model, optimizer = _prepared(accelerator, rule)
    accelerator.load_state(os.path.join(out, "state"))
    loaded_step = accelerator.unwrap_model(model).base_model.reset_step()
    _steps(accelerator, model, optimizer, batches[cut:])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    full = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        save_file(
            {n: t.contiguous() for n, t in full.items() if n in trainable}, os.path.join(out, "trained.safetensors")
        )
        with open(os.path.join(out, "steps.txt"), "w") as f:
            f.write(str(accelerator.unwrap_model(model).base_model.reset_step()))
        with open(os.path.join(out, "loaded_step.txt"), "w") as f:
            f.write(str(loaded_step))
    accelerator.wait_for_everyone()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--cpu-ram-efficient-loading", action="store_true")
    parser.add_argument("--resume", action="store_true", help="also check save_state / load_state mid-schedule")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    train(args.out, args.cpu_ram_efficient_loading, args.resume)


if __name__ == "__main__":
    main()
