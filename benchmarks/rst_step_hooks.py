"""What RST adds to `optimizer.step()`: its own optimizer's step, and the step of any other optimizer in the process.

Run: python benchmarks/rst_step_hooks.py [--model tower12|vit_b16] [--repeats 30] [--threads 1]

RST's reset runs as a global optimizer post-step hook (with a pre-step hook for resuming), so it runs after the step
of every optimizer in the process. Two figures, each side by side in one run:
- RST's own step: `optimizer.step()` of the RST model (SGD momentum 0.9 nesterov + weight decay, as in the release)
  against the same step of full fine-tuning over the same number of parameters. The difference is the reset and
  the hooks' bookkeeping; the reset alone (`ResetPlan.reset`, the arithmetic the post-step hook runs) is timed in
  the same loop.
- Another optimizer's step: RST's two global hooks as they run around the step of a plain model's optimizer,
  timed directly (timing that step with and without an RST model alive measured memory effects of the model's
  presence, not the hooks). This is what RST costs an optimizer that holds none of its parameters (it should be
  far below the step itself: the hooks recognise such an optimizer from the plan's W ids). The plain step is
  printed for scale.
Gradients are fixed random tensors, so only the step is timed. Times: min and median over `--repeats` calls.
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import time

import torch
from peft import get_peft_model
from rst_block_overhead import tower
from transformers import CLIPVisionModelWithProjection
from vit_b16 import vit_b16_config

import peft_rst
from peft_rst.reset import _after_optimizer_step as after_optimizer_step
from peft_rst.reset import current_plan
from peft_rst.resume import before_optimizer_step


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


def run_hooks(optimizer: torch.optim.Optimizer) -> None:
    """What torch runs of RST around `optimizer.step()`: its global pre-step and post-step hooks."""
    before_optimizer_step(optimizer, (), {})
    after_optimizer_step(optimizer, (), {})


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
    for _ in range(3):  # warm-up
        other_opt.step()

    full = build(args.model)
    full_opt = with_optimizer(full)
    rst = get_peft_model(copy.deepcopy(full), peft_rst.RSTConfig(tau=1e-6))
    rst_opt = with_optimizer(rst)
    for opt in (full_opt, rst_opt):
        opt.step()
    entries = sum(p.numel() for p in rst_opt.param_groups[0]["params"])
    # the reset alone: what the post-step hook runs on the plan it keeps for the adapter
    reset = functools.partial(current_plan(rst.base_model._reset_groups["default"]).reset, 1e-6)
    full_times, rst_times, reset_times = [], [], []
    for _ in range(args.repeats):
        full_times.append(timed(full_opt.step))
        rst_times.append(timed(rst_opt.step))
        reset_times.append(timed(reset))
    del reset
    other_times, hook_times = [], []
    for _ in range(args.repeats):
        other_times.append(timed(other_opt.step))
        hook_times.append(timed(functools.partial(run_hooks, other_opt)))

    print(f"model {args.model}: {entries:,} trainable entries; torch threads {torch.get_num_threads()}")
    print(f"full fine-tuning optimizer.step()            {summary(full_times)}")
    print(f"RST optimizer.step() (step + reset + hooks)  {summary(rst_times)}")
    print(
        f"  RST - full: {(min(rst_times) - min(full_times)) * 1e3:+.3f} ms (min), "
        f"{statistics.median(r - f for r, f in zip(rst_times, full_times)) * 1e3:+.3f} ms (paired median)"
    )
    print(f"  of which the reset alone (ResetPlan.reset)  {summary(reset_times)}")
    print(f"another optimizer's step (for scale)          {summary(other_times)}")
    print(f"  RST's hooks around it (pre + post)          {summary(hook_times)}")


if __name__ == "__main__":
    main()
