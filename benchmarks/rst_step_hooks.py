"""What RST adds to `optimizer.step()`: its own optimizer's step, and the step of any other optimizer in the process.

Run: python benchmarks/rst_step_hooks.py [--model tower12|vit_b16] [--repeats 30] [--threads 1]

RST's reset runs as a global optimizer post-step hook (with a pre-step hook for resuming), so it runs after the step
of every optimizer in the process. Two figures, each side by side in one run:
- RST's own step: `optimizer.step()` of the RST model (SGD momentum 0.9 nesterov + weight decay, as in the release)
  against the same step of full fine-tuning over the same number of parameters. The difference is the reset and
  the hooks' bookkeeping.
- Another optimizer's step: a plain model's `optimizer.step()`, timed in a loop of its own while an RST model is
  alive, and again after that model is deleted. The difference is what RST costs an optimizer that
  holds none of its parameters (it should be ~0: the hooks recognise such an optimizer from the plan's W ids).
Gradients are fixed random tensors, so only the step is timed. Times: min and median over `--repeats` calls.
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import time

import torch
from peft import get_peft_model
from rst_block_overhead import tower
from transformers import CLIPVisionModelWithProjection
from vit_b16 import vit_b16_config

import peft_rst


def build(name: str) -> torch.nn.Module:
    if name == "vit_b16":
        torch.manual_seed(0)
        return CLIPVisionModelWithProjection(vit_b16_config())
    return tower(int(name.removeprefix("tower")))


def with_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(1)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    return torch.optim.SGD(params, lr=1e-3, momentum=0.9, nesterov=True, weight_decay=5e-4)


def timed(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def summary(times: list[float]) -> str:
    return f"min {min(times) * 1e3:8.3f} ms  median {statistics.median(times) * 1e3:8.3f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default="tower12", help="tower<N> (the width-64 tower of rst_block_overhead) or vit_b16"
    )
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    other = build(args.model)
    other_opt = with_optimizer(other)
    other_opt.step()  # optimizer state exists, as in training
    alone = [timed(other_opt.step) for _ in range(3)]  # warm-up

    full = build(args.model)
    full_opt = with_optimizer(full)
    rst = get_peft_model(copy.deepcopy(full), peft_rst.RSTConfig(tau=1e-6))
    rst_opt = with_optimizer(rst)
    for opt in (full_opt, rst_opt):
        opt.step()
    entries = sum(p.numel() for p in rst_opt.param_groups[0]["params"])
    full_times, rst_times = [], []
    for _ in range(args.repeats):
        full_times.append(timed(full_opt.step))
        rst_times.append(timed(rst_opt.step))
    # the other optimizer on its own (its caches as warm as below), while the RST model is alive
    other_times = [timed(other_opt.step) for _ in range(args.repeats)]

    # the other optimizer again, with no RST model alive
    del rst, rst_opt
    gc.collect()
    alone = []
    for _ in range(args.repeats):
        alone.append(timed(other_opt.step))

    print(f"model {args.model}: {entries:,} trainable entries; torch threads {torch.get_num_threads()}")
    print(f"full fine-tuning optimizer.step()            {summary(full_times)}")
    print(f"RST optimizer.step() (step + reset + hooks)  {summary(rst_times)}")
    print(
        f"  RST - full: {(min(rst_times) - min(full_times)) * 1e3:+.3f} ms (min), "
        f"{statistics.median(r - f for r, f in zip(rst_times, full_times)) * 1e3:+.3f} ms (paired median)"
    )
    print(f"another optimizer, RST model alive            {summary(other_times)}")
    print(f"another optimizer, no RST model               {summary(alone)}")
    print(f"  alive - none: {(min(other_times) - min(alone)) * 1e3:+.3f} ms (min)")


if __name__ == "__main__":
    main()
