"""Switching the active RST domain, against an in-memory `load_state_dict` of the full dense weights, in one run.

Run: python benchmarks/rst_switch.py [--counts 1 12 50 100] [--changed 100000] [--repeats 60] [--distinct 4]
    [--profile] [--threads N]

Targets (issue 12): on a CLIP ViT-B/16 vision tower (built from its config, random init, no download) with 100k
changed entries per domain, `PeftModel.set_adapter` takes <= 0.10x the time of `load_state_dict` of a full dense
state dict held in memory, with 12 domains loaded; and the switch cost stays flat from 1 to 100 loaded domains.
Both are timed interleaved in the same loop, so the ratio holds under machine load; min and median are printed.
`--profile` prints where a switch spends its time (cProfile over the switches at the largest count).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import tempfile
import time

import torch
from peft import PeftModel, get_peft_model
from transformers import CLIPVisionModel
from vit_b16 import vit_b16_config

import peft_rst


def base_model() -> CLIPVisionModel:
    torch.manual_seed(0)
    return CLIPVisionModel(vit_b16_config()).eval()


@torch.no_grad()
def make_adapters(work: str, count: int, changed: int) -> list[str]:
    """`count` adapter folders, each changing `changed` random entries spread over the whole tower.

    One model is built and saved per domain; the entries are drawn with `randint` (not a permutation of all 86M
    positions) and put back to w0 after saving, so that setup stays a few seconds per domain.
    """
    model = get_peft_model(base_model(), peft_rst.RSTConfig(tau=1e-6))
    layers = [m for m in model.modules() if isinstance(m, peft_rst.RSTLayer)]
    weights = [w for layer in layers for w in layer.rst_weight["default"].values()]
    bases = [b for layer in layers for b in layer.get_base_layer()._parameters.values() if b is not None]
    sizes = torch.tensor([w.numel() for w in weights])
    ends = torch.cumsum(sizes, 0)
    folders = []
    for seed in range(count):
        generator = torch.Generator().manual_seed(seed)
        positions = torch.empty(0, dtype=torch.long)
        while positions.numel() < changed:  # distinct positions: draw, deduplicate, top up
            drawn = torch.randint(int(ends[-1]), (changed,), generator=generator)
            positions = torch.cat([positions, drawn]).unique()
        positions = positions[torch.randperm(positions.numel(), generator=generator)[:changed]].sort().values
        owner = torch.searchsorted(ends, positions, right=True)
        touched = []
        for i in owner.unique().tolist():
            local = positions[owner == i] - (ends[i] - sizes[i])
            weights[i].view(-1)[local] += 1e-3 * torch.randn(local.numel(), generator=generator)
            touched.append((i, local))
        folder = os.path.join(work, f"domain{seed}")
        model.save_pretrained(folder)
        for i, local in touched:  # back to w0 for the next domain
            weights[i].view(-1)[local] = bases[i].view(-1)[local]
        folders.append(folder)
    return folders


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 12, 50, 100])
    parser.add_argument("--changed", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument(
        "--distinct",
        type=int,
        default=4,
        help="domains saved to disk; further domains load these files again under new names (each load holds its "
        "own entries in memory, so a switch does the same work; only setup time is saved)",
    )
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch intra-op threads (0: torch's default); 1 keeps both sides on the calling thread, which a loaded "
        "machine disturbs far less than ops split across threads waiting for a busy core",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    counts = sorted(args.counts)
    with tempfile.TemporaryDirectory() as work:
        start = time.perf_counter()
        folders = make_adapters(work, min(counts[-1], args.distinct), args.changed)
        print(f"setup: {len(folders)} domains saved in {time.perf_counter() - start:.1f} s", flush=True)
        dense = {k: v.clone() for k, v in base_model().state_dict().items()}
        plain = base_model()
        model = PeftModel.from_pretrained(base_model(), folders[0], adapter_name="d0")
        loaded = 1
        rows = []
        for count in counts:
            for i in range(loaded, count):
                model.load_adapter(folders[i % len(folders)], adapter_name=f"d{i}")
            if count > loaded:
                print(f"setup: {count} domains loaded ({time.perf_counter() - start:.1f} s so far)", flush=True)
            loaded = max(loaded, count)
            names = [f"d{i}" for i in range(count)] if count > 1 else ["d0"]
            switch, full = [], []
            with torch.no_grad():
                for k in range(args.repeats):
                    if count == 1:  # no other domain to switch to: take the patch out and put it back
                        switch.append(timed(lambda: reactivate(model, "d0")))
                    else:
                        name = names[(k + 1) % count]
                        switch.append(timed(lambda name=name: model.set_adapter(name)))
                    full.append(timed(lambda: plain.load_state_dict(dense)))
            rows.append((count, switch, full))
            if args.profile and count == counts[-1]:
                profile(model, names, args.repeats)
    ms = 1000
    print(
        f"CLIP ViT-B/16 vision tower, {args.changed:,} changed entries per domain; {args.repeats} switches per row, "
        "each timed next to an in-memory load_state_dict of the full dense weights (same loop); torch threads "
        f"{torch.get_num_threads()}"
    )
    print(f"{'domains':>8} {'switch ms min/med':>18} {'load_state_dict ms min/med':>27} {'ratio min/med':>14}")
    for count, switch, full in rows:
        ratio_min = min(switch) / min(full)
        ratio_med = statistics.median(switch) / statistics.median(full)
        print(
            f"{count:>8} {min(switch) * ms:>8.2f} / {statistics.median(switch) * ms:<7.2f}"
            f" {min(full) * ms:>13.2f} / {statistics.median(full) * ms:<11.2f}"
            f" {ratio_min:>6.3f} / {ratio_med:.3f}"
        )
    base = statistics.median(rows[0][1])
    print(
        "switch cost relative to the first row (median): "
        + ", ".join(f"{c} domains {statistics.median(s) / base:.2f}x" for c, s, _ in rows)
    )
    print("targets: ratio <= 0.10 at 12 domains; flat from 1 to 100 domains")


def reactivate(model: PeftModel, name: str) -> None:
    """The work of a switch with one domain loaded: take its patch out (no adapter active), then activate it again."""
    model.base_model.set_adapter([])
    model.set_adapter(name)


def profile(model, names: list[str], repeats: int) -> None:
    profiler = cProfile.Profile()
    with torch.no_grad():
        profiler.enable()
        for k in range(repeats):
            model.set_adapter(names[(k + 1) % len(names)])
        profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
