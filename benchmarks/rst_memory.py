"""Training memory per process of RST on CLIP vision towers under DDP and FSDP2: accounting, checked by measuring.

Run: python benchmarks/rst_memory.py [--measure] [--markdown]

Accounting (fp32, every parameter of the tower targeted, P parameters, 4 bytes each; activations not included, they
depend on batch and resolution, not on the method):
- full fine-tuning: weights + gradient + optimizer state = 3P (SGD momentum) or 4P (AdamW: exp_avg, exp_avg_sq);
- RST: w0 + W + gradient of W + optimizer state of W = 4P (SGD momentum) or 5P (AdamW);
- DDP: every process holds all of it, plus the reducer's gradient buckets (1P; 0 with gradient_as_bucket_view=True);
- FSDP2 as tests/peft_rst/_fsdp_train.py runs it (`fully_shard` per block, then the root): every parameter is
  sharded, w0 included, so each of N processes holds 1/N of w0, W, gradient and optimizer state, plus, while a block
  runs, that block's all-gathered w0 and W and the next block's (prefetch), and in backward one block's unsharded
  gradient before its reduce-scatter.
`--measure` checks the accounting on a small CLIP tower: the bytes of the distinct storages of parameters, gradients
and optimizer state after a step (one process, and each rank of a 2-process FSDP2 run on gloo), and the RSS growth of
one process (glibc set to return freed memory, so that RSS follows live memory).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

GIB = 2**30

# ViT-B/16 and ViT-L/14: the CLIP vision configs; ViT-g/14: open_clip's "ViT-g-14" numbers
# (width 1408, 40 layers, MLP 6144, 16 heads, patch 14, 224 px, embed dim 1024).
TOWERS = {
    "ViT-B/16": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     patch_size=16, projection_dim=512),
    "ViT-L/14": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     patch_size=14, projection_dim=768),
    "ViT-g/14": dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=40, num_attention_heads=16,
                     patch_size=14, projection_dim=1024),
}  # fmt: skip
OPTIMIZER_STATES = {"SGD momentum": 1, "AdamW": 2}  # state tensors per parameter


def tower_counts(name: str) -> tuple[int, int]:
    """(parameters of the vision tower with projection, parameters of its largest FSDP unit = one block)."""
    config = CLIPVisionConfig(image_size=224, **TOWERS[name])
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(config)
    total = sum(p.numel() for p in model.parameters())
    block = max(sum(p.numel() for p in layer.parameters()) for layer in model.vision_model.encoder.layers)
    return total, block


def per_process_bytes(total: int, block: int, states: int, setup: str, n: int = 1) -> int:
    """Accounted training memory of one process (4-byte parameters), as in the module docstring."""
    if setup == "full":
        return 4 * total * (2 + states)
    if setup == "rst":
        return 4 * total * (3 + states)
    if setup == "rst-ddp":
        return 4 * total * (4 + states)
    if setup == "rst-fsdp":
        sharded = 4 * total * (3 + states) / n
        transient = 4 * block * (2 * 2 + 1)  # w0 + W of the running and the prefetched block, one block's gradient
        return int(sharded + transient)
    raise ValueError(setup)


def accounting_table(markdown: bool) -> None:
    rows = []
    for name in TOWERS:
        total, block = tower_counts(name)
        for opt, states in OPTIMIZER_STATES.items():
            cells = [
                per_process_bytes(total, block, states, "full"),
                per_process_bytes(total, block, states, "rst"),
                per_process_bytes(total, block, states, "rst-ddp"),
            ] + [per_process_bytes(total, block, states, "rst-fsdp", n) for n in (2, 4, 8)]
            rows.append((f"{name} ({total / 1e6:.1f}M params)", opt, cells))
    header = ["tower", "optimizer", "full FT", "RST, 1 process", "RST DDP (any N)", "FSDP N=2", "N=4", "N=8"]
    if markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for tower, opt, cells in rows:
            print(f"| {tower} | {opt} | " + " | ".join(f"{c / GIB:.2f}" for c in cells) + " |")
    else:
        print("GiB per process (parameters, gradients, optimizer state; activations excluded)")
        print(f"{header[0]:<28}{header[1]:<14}" + "".join(f"{h:>17}" for h in header[2:]))
        for tower, opt, cells in rows:
            print(f"{tower:<28}{opt:<14}" + "".join(f"{c / GIB:>17.2f}" for c in cells))


# ------------------------------------------------------------------------------------------------ measurement
def small_tower() -> CLIPVisionModelWithProjection:
    config = CLIPVisionConfig(
        hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, image_size=32,
        patch_size=8, projection_dim=128,
    )  # fmt: skip
    torch.manual_seed(0)
    return CLIPVisionModelWithProjection(config)


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of the distinct storages held by parameters, gradients and optimizer state (local shards if sharded)."""
    seen: set[int] = set()

    def add(tensors) -> int:
        total = 0
        for t in tensors:
            storage = _local(t).untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        return total

    params = list(model.parameters())
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim()]
    return {
        "parameters": add(params),
        "gradients": add(p.grad for p in params if p.grad is not None),
        "optimizer": add(state),
    }


def train_one_step(model: torch.nn.Module, optimizer_name: str) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer_name == "AdamW":
        optimizer = torch.optim.AdamW(params, lr=1e-4)
    else:
        optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9, nesterov=True, weight_decay=5e-4)
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model(pixel_values=pixels).image_embeds.pow(2).mean().backward()
    optimizer.step()
    return optimizer


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_single(setup: str, optimizer_name: str) -> dict:
    """One process: storages after a step, and RSS growth from before the model to after the step."""
    from peft import get_peft_model

    import peft_rst

    rss0 = rss_bytes()
    model = small_tower()
    total = sum(p.numel() for p in model.parameters())
    if setup == "rst":
        model = get_peft_model(model, peft_rst.RSTConfig(tau=1e-6))
    optimizer = train_one_step(model, optimizer_name)
    return {"total": total, "rss": rss_bytes() - rss0, **state_bytes(model, optimizer)}


def fsdp_worker(out: str, optimizer_name: str) -> None:
    """One rank of the 2-process FSDP2 run: RST sharded as tests/peft_rst/_fsdp_train.py does; writes its bytes."""
    import torch.distributed as dist
    from peft import get_peft_model
    from torch.distributed.fsdp import fully_shard

    import peft_rst

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    base = small_tower()
    total = sum(p.numel() for p in base.parameters())
    model = get_peft_model(base, peft_rst.RSTConfig(tau=1e-6))
    for layer in model.base_model.model.vision_model.encoder.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = train_one_step(model, optimizer_name)
    measured = {"total": total, **state_bytes(model, optimizer)}
    with open(os.path.join(out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(measured, f)
    dist.barrier()
    dist.destroy_process_group()


def measure(optimizer_name: str) -> None:
    import socket
    import tempfile

    states = OPTIMIZER_STATES[optimizer_name]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": "1"}
    for setup, factor in (("full", 2 + states), ("rst", 3 + states)):
        cmd = [sys.executable, __file__, "--single", setup, "--optimizer", optimizer_name]
        out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout)
        held = out["parameters"] + out["gradients"] + out["optimizer"]
        expected = 4 * out["total"] * factor
        print(
            f"  1 process, {setup:<4}: storages {held / 2**20:7.2f} MiB = {held / expected:.4f}x the accounting "
            f"({factor}P = {expected / 2**20:.2f} MiB); RSS growth {out['rss'] / 2**20:7.2f} MiB, of which "
            f"{(out['rss'] - held) / 2**20:.1f} MiB beyond the storages (torch's lazy state, allocator)"
        )
    with tempfile.TemporaryDirectory() as work, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
            "--master_addr", "127.0.0.1", "--master_port", str(port),
            __file__, "--fsdp-worker", work, "--optimizer", optimizer_name,
        ]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
        for rank in (0, 1):
            with open(os.path.join(work, f"rank{rank}.json")) as f:
                out = json.load(f)
            held = out["parameters"] + out["gradients"] + out["optimizer"]
            expected = 4 * out["total"] * (3 + states) / 2
            print(
                f"  FSDP2 rank {rank} of 2: parameters {out['parameters'] / 2**20:.2f}, gradients "
                f"{out['gradients'] / 2**20:.2f}, optimizer {out['optimizer'] / 2**20:.2f} MiB; total "
                f"{held / 2**20:.2f} MiB = {held / expected:.4f}x the sharded accounting ({3 + states}P / 2)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", action="store_true", help="check the accounting on a small tower")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--optimizer", default="SGD momentum", choices=OPTIMIZER_STATES, help=argparse.SUPPRESS)
    parser.add_argument("--single", choices=("full", "rst"), help=argparse.SUPPRESS)  # internal
    parser.add_argument("--fsdp-worker", metavar="DIR", help=argparse.SUPPRESS)  # internal
    args = parser.parse_args()
    if args.single:
        print(json.dumps(measure_single(args.single, args.optimizer)))
        return
    if args.fsdp_worker:
        fsdp_worker(args.fsdp_worker, args.optimizer)
        return
    accounting_table(args.markdown)
    if args.measure:
        for optimizer_name in OPTIMIZER_STATES:
            print(f"check on a CLIP tower of width 256, 4 blocks, {optimizer_name}:")
            measure(optimizer_name)


if __name__ == "__main__":
    main()
