"""RST's fixed cost per wrapped transformer block: a training step of RST against full fine-tuning, side by side.

Run: python benchmarks/rst_block_overhead.py [--blocks 2,6,12] [--rounds 15] [--steps 5] [--threads 1]

Target (issue 12): forward + backward + reset overhead of RST over full fine-tuning <= 0.2 ms per block, on a small
CLIP vision tower (width 64, batch 32) where per-call costs are not hidden by the matrix products.

Both variants live in this one process, built from the same seed, with SGD momentum 0.9 nesterov + weight decay as
in the release (RST's reset runs in the optimizer's post-step hook, so it is inside the optimizer phase). Each round
times `--steps` steps of full fine-tuning, then of RST, alternating which goes first, so machine load hits both
alike. Reported per variant: median and min over rounds of the mean step time, split into forward, backward and
optimizer step (+ reset); the overhead is RST minus full on the medians (and on the minima), divided by the number
of blocks. The slope between the smallest and largest depth separates the per-block cost from the fixed cost of
the layers outside the blocks (embeddings, pre/post norms, projection).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from peft import get_peft_model
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

import peft_rst

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


class Variant:
    """A model, its optimizer and a fixed batch; `run` times `steps` training steps phase by phase with `clock`."""

    def __init__(self, model: torch.nn.Module, batch: int, clock=time.perf_counter) -> None:
        self.clock = clock
        self.model = model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9, nesterov=True, weight_decay=5e-4)
        self.pixels = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        self.times: dict[str, list[float]] = {phase: [] for phase in PHASES}

    def run(self, steps: int, record: bool = True) -> None:
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
    variants = {"full": Variant(full_model, batch, clock), "rst": Variant(rst_model, batch, clock)}
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
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=5, help="steps per round per variant")
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
    header = f"{'blocks':>6} {'variant':<5}" + "".join(f"{p + ' ms':>12}" for p in PHASES)
    print(header + f"{'step ms med':>13}{'step ms min':>13}")
    overhead_med, overhead_min = {}, {}
    for blocks in depths:
        variants = measure(blocks, args.batch, args.rounds, args.steps, clock)
        for name, v in variants.items():
            parts = "".join(f"{statistics.median(v.times[p]) * ms:>12.2f}" for p in PHASES)
            steps = v.step_times()
            print(f"{blocks:>6} {name:<5}{parts}{statistics.median(steps) * ms:>13.2f}{min(steps) * ms:>13.2f}")
        full, rst = variants["full"].step_times(), variants["rst"].step_times()
        overhead_med[blocks] = statistics.median(rst) - statistics.median(full)
        overhead_min[blocks] = min(rst) - min(full)
        medians = {name: {p: statistics.median(v.times[p]) for p in PHASES} for name, v in variants.items()}
        phase_overhead = ", ".join(f"{p} {(medians['rst'][p] - medians['full'][p]) * ms:+.2f}" for p in PHASES)
        print(
            f"{blocks:>6} RST - full: median {overhead_med[blocks] * ms:+.2f} ms/step "
            f"({overhead_med[blocks] / blocks * ms:+.3f} ms/block), min {overhead_min[blocks] * ms:+.2f} ms/step "
            f"({overhead_min[blocks] / blocks * ms:+.3f} ms/block); by phase (medians): {phase_overhead} ms; "
            f"ratio {statistics.median(rst) / statistics.median(full):.3f}x"
        )
    if len(depths) > 1:
        lo, hi = min(depths), max(depths)
        slope_med = (overhead_med[hi] - overhead_med[lo]) / (hi - lo)
        slope_min = (overhead_min[hi] - overhead_min[lo]) / (hi - lo)
        print(
            f"per-block slope {lo}->{hi} blocks: median {slope_med * ms:+.3f} ms/block, min {slope_min * ms:+.3f} "
            "ms/block"
        )
    print("target: RST - full <= 0.2 ms per block")


if __name__ == "__main__":
    main()
