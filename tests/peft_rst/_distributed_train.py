"""Train a tiny model with RST in one of three ways and write what came out, for `test_distributed.py`.

- `ddp`: under `accelerate launch --num_processes 2`; each rank takes its half of every global batch, DDP averages
  the gradients, each rank's optimizer steps (and so each rank's RST reset runs);
- `accumulate`: one process, the same two halves as two micro-batches of loss / 2 (bitwise what DDP computes);
- `full`: one process, one backward over the whole global batch (equal to DDP only up to rounding).

Writes `<out>/rank<r>.safetensors` (every trainable tensor of rank r), `<out>/steps.txt` and, from the main process,
the adapter folder `<out>/adapter`.
"""

from __future__ import annotations

import argparse
import os

import torch
from peft import get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

import peft_rst  # noqa: F401  (registers RST)
from peft_rst import RSTConfig

TAU = 1e-3
STEPS = 4
GLOBAL_BATCH = 8
# The reset rules a run can use (`build_model(rule)`): the default threshold, the global top-r mode with a decaying
# fraction (paper appendix M), and RST_bias.
RULES = {
    "tau": {"tau": TAU},
    "keep_ratio": {"keep_ratio": 0.5, "keep_ratio_end": 0.1, "keep_ratio_schedule": "linear", "schedule_steps": STEPS},
    "bias_only": {"bias_only": True},
}


class Net(nn.Module):
    def __init__(self, width: int = 16) -> None:
        # an odd `width` makes FSDP2 shard the hidden layers unevenly over 2 ranks (8 and 7 rows)
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(6, width), nn.LayerNorm(width), nn.Tanh(), nn.Linear(width, width), nn.Tanh()
        )
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def build_model(rule: str = "tau", width: int = 16):
    """The tiny model (hidden size `width`) with an RST adapter resetting by `rule` (a key of `RULES`)."""
    if rule not in RULES:
        raise ValueError(f"unknown reset rule {rule!r}; use one of {sorted(RULES)}")
    torch.manual_seed(0)
    return get_peft_model(Net(width), RSTConfig(**RULES[rule], modules_to_save=["head"]))


def global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(GLOBAL_BATCH, 6, generator=g), torch.randint(0, 3, (GLOBAL_BATCH,), generator=g))
        for _ in range(STEPS)
    ]


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    # the release's optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def assert_run_matches(run: str, single: nn.Module, tmp_path: str) -> dict[str, torch.Tensor]:
    """A multi-process run's gathered weights (`<run>/trained.safetensors`) equal `single`'s bit for bit, and the
    adapter it saved (`<run>/adapter/`) equals the one `single` saves, tensor by tensor. Returns the run's weights."""
    trained = load_file(os.path.join(run, "trained.safetensors"))
    reference = trainable_state(single)
    assert trained.keys() == reference.keys() and any(".rst_weight." in k for k in trained)
    for key, value in trained.items():
        assert torch.equal(value.view(torch.int32), reference[key].view(torch.int32)), key
    single.save_pretrained(os.path.join(tmp_path, "single"))
    saved = load_file(os.path.join(run, "adapter", "adapter_model.safetensors"))
    saved_single = load_file(os.path.join(tmp_path, "single", "adapter_model.safetensors"))
    assert saved.keys() == saved_single.keys()
    for key in saved:
        assert saved[key].dtype == saved_single[key].dtype and torch.equal(saved[key], saved_single[key]), key
    return trained


def single_thread(fn):
    """CPU kernels split reductions (e.g. LayerNorm's bias gradient) across intra-op threads, so bitwise agreement
    between setups needs the same thread count: every run here uses one thread."""

    def wrapper(*args, **kwargs):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapper


@single_thread
def train_single(mode: str, rule: str = "tau", width: int = 16):
    """One process: `accumulate` (two half-batches of loss / 2) or `full` (one backward over the global batch)."""
    model = build_model(rule, width)
    opt = make_optimizer(model)
    half = GLOBAL_BATCH // 2
    for x, y in global_batches():
        opt.zero_grad()
        if mode == "accumulate":
            for r in range(2):
                rows = slice(r * half, (r + 1) * half)
                (nn.functional.cross_entropy(model(x[rows]), y[rows]) / 2).backward()
        else:
            nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


@single_thread
def train_ddp(out: str) -> None:
    from accelerate import Accelerator, DistributedType

    accelerator = Accelerator(cpu=True)
    assert accelerator.distributed_type == DistributedType.MULTI_CPU, accelerator.distributed_type
    model = build_model()
    opt = make_optimizer(model)
    model, opt = accelerator.prepare(model, opt)
    rank, world = accelerator.process_index, accelerator.num_processes
    assert world == 2, f"run with --num_processes 2, got {world}"
    half = GLOBAL_BATCH // world
    for x, y in global_batches():
        opt.zero_grad()
        rows = slice(rank * half, (rank + 1) * half)
        accelerator.backward(nn.functional.cross_entropy(model(x[rows]), y[rows]))
        opt.step()
    unwrapped = accelerator.unwrap_model(model)
    save_file(trainable_state(unwrapped), os.path.join(out, f"rank{rank}.safetensors"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped.save_pretrained(os.path.join(out, "adapter"))
        with open(os.path.join(out, "steps.txt"), "w") as f:
            f.write(str(unwrapped.base_model.reset_step()))
    accelerator.wait_for_everyone()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    train_ddp(args.out)


if __name__ == "__main__":
    main()
