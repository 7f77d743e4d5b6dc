"""RST's fixed cost per wrapped transformer block: a training step of RST against full fine-tuning, side by side.

Run: python benchmarks/rst_block_overhead.py [--blocks 2,6,12] [--rounds 25] [--steps 2] [--clock cpu|wall]

Target (issue 12): forward + backward + reset overhead of RST over full fine-tuning <= 0.2 ms per block, on a small
CLIP vision tower (width 64, batch 32) where per-call costs are not hidden by the matrix products.

Both variants live in this one process, built from the same seed, with SGD momentum 0.9 nesterov + weight decay as
in the release (RST's reset runs in the optimizer's post-step hook, so it is inside the optimizer phase). RST's
hooks are global (they run around every optimizer's step in the process), so while full fine-tuning is timed the RST
model's reset groups are unregistered: the baseline is full fine-tuning in a process without RST, and what RST's hooks
cost another optimizer is `benchmarks/rst_step_hooks.py`'s figure. Each round
times `--steps` steps of full fine-tuning, then of RST, alternating which goes first, so machine load hits both
alike. Reported: the median over rounds of each variant's mean step time, their ratio, and the overhead: the median
over rounds of (RST - full) within the round, with the interquartile range of those per-round differences (this
machine's noise is of the order of the target), and, as a check, min(RST) - min(full); in total, per block, and per
block for each phase (forward, backward, optimizer step including RST's reset). The slope between the smallest and
largest depth separates the per-block cost from the fixed cost of the layers outside the blocks (embeddings,
pre/post norms, projection).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time

import torch
from peft import get_peft_model
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

import peft_rst
from peft_rst.reset import register, unregister

PHASES = ("forward", "backward", "step")


def tower(blocks: int) -> CLIPVisionModelWithProjection:
    config = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=blocks,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=32,
    )
    torch.manual_seed(0)
    return CLIPVisionModelWithProjection(config)


@contextlib.contextmanager
def without_rst_hooks(rst_model: torch.nn.Module):
    """RST's global optimizer hooks see no reset group of `rst_model` inside: they return at once."""
    groups = list(rst_model.base_model._reset_groups.values())
    for group in groups:
        unregister(group)
    try:
        yield
    finally:
        for group in groups:
            register(group)


class Variant:
    """A model, its optimizer and a fixed batch; `run` times `steps` training steps phase by phase with `clock`."""

    def __init__(self, model: torch.nn.Module, batch: int, clock=time.perf_counter, context=contextlib.nullcontext):
        self.clock = clock
        self.context = context  # what the steps run inside
        self.model = model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9, nesterov=True, weight_decay=5e-4)
        self.pixels = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        self.times: dict[str, list[float]] = {phase: [] for phase in PHASES}

    def run(self, steps: int, record: bool = True) -> None:
        with self.context():
            self._run(steps, record)

    def _run(self, steps: int, record: bool) -> None:
        totals = dict.fromkeys(PHASES, 0.0)
        for _ in range(steps):
            t0 = self.clock()
            loss = self.model(pixel_values=self.pixels).image_embeds.pow(2).mean()
            t1 = self.clock()
            loss.backward()
            t2 = self.clock()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            t3 = self.clock()
            totals["forward"] += t1 - t0
            totals["backward"] += t2 - t1
            totals["step"] += t3 - t2
        if record:
            for phase in PHASES:
                self.times[phase].append(totals[phase] / steps)

    def step_times(self) -> list[float]:
        return [sum(parts) for parts in zip(*(self.times[p] for p in PHASES))]


def measure(blocks: int, batch: int, rounds: int, steps: int, clock) -> dict[str, Variant]:
    full_model = tower(blocks)
    rst_model = get_peft_model(copy.deepcopy(full_model), peft_rst.RSTConfig(tau=1e-6))
    variants = {
        "full": Variant(full_model, batch, clock, context=lambda: without_rst_hooks(rst_model)),
        "rst": Variant(rst_model, batch, clock),
    }
    for variant in variants.values():  # warm-up: allocations, momentum buffers
        variant.run(2, record=False)
    for r in range(rounds):
        order = ("full", "rst") if r % 2 == 0 else ("rst", "full")
        for name in order:
            variants[name].run(steps)
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", default="2,6,12", help="comma-separated depths")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--steps", type=int, default=2, help="steps per round per variant (few: tight pairs)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: least disturbed)")
    parser.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="cpu: this thread's CPU time (time.thread_time; needs --threads 1), which waiting for a core shared "
        "with other processes does not inflate; wall: time.perf_counter",
    )
    args = parser.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu counts the calling thread only: use --threads 1, or --clock wall")
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    depths = [int(b) for b in args.blocks.split(",")]

    ms = 1000
    print(
        f"CLIP vision tower width 64, batch {args.batch}, 32x32 px in 8 px patches; {args.rounds} rounds x "
        f"{args.steps} steps per variant, A/B alternating; torch threads {torch.get_num_threads()}, "
        f"{args.clock} time"
    )
    print(
        f"{'blocks':>6}{'full ms':>10}{'RST ms':>10}{'RST/full':>10}{'RST-full ms':>13}{'ms/block':>10}"
        f"{'IQR/block':>18}{'(min-based)':>13}   ms/block by phase: forward, backward, optimizer step + reset"
    )
    overhead: dict[int, tuple[float, float]] = {}
    for blocks in depths:
        variants = measure(blocks, args.batch, args.rounds, args.steps, clock)
        full, rst = variants["full"], variants["rst"]
        full_steps, rst_steps = full.step_times(), rst.step_times()
        # rounds are paired (both variants ran back to back), so the median of per-round differences
        differences = [r - f for r, f in zip(rst_steps, full_steps)]
        paired = statistics.median(differences)
        # the spread of the per-round differences: how far one run's median can be trusted on this machine
        q1, _, q3 = statistics.quantiles(differences, n=4) if len(differences) > 1 else (paired, paired, paired)
        spread = f"[{q1 / blocks * ms:+.3f},{q3 / blocks * ms:+.3f}]"
        by_min = min(rst_steps) - min(full_steps)
        overhead[blocks] = (paired, by_min)
        phases = ", ".join(
            f"{statistics.median(r - f for r, f in zip(rst.times[p], full.times[p])) / blocks * ms:+.3f}"
            for p in PHASES
        )
        full_ms, rst_ms = statistics.median(full_steps) * ms, statistics.median(rst_steps) * ms
        print(
            f"{blocks:>6}{full_ms:>10.2f}{rst_ms:>10.2f}{rst_ms / full_ms:>10.3f}{paired * ms:>+13.2f}"
            f"{paired / blocks * ms:>+10.3f}{spread:>18}{by_min / blocks * ms:>+13.3f}   {phases}"
        )
    if len(depths) > 1:
        lo, hi = min(depths), max(depths)
        slope = [(overhead[hi][i] - overhead[lo][i]) / (hi - lo) * ms for i in (0, 1)]
        print(
            f"per-block slope {lo}->{hi} blocks (the fixed cost outside the blocks removed): {slope[0]:+.3f} ms/block "
            f"(min-based {slope[1]:+.3f})"
        )
    print("target: RST - full <= 0.2 ms per block")


if __name__ == "__main__":
    main()
