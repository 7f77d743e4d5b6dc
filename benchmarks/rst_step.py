"""RST training-step time and peak memory against full fine-tuning, LoRA and the release's reset, side by side.

Run: python benchmarks/rst_step.py [--steps 4] [--batch 8] [--small]

Each variant runs in a fresh subprocess (so peak RSS is its own) on the ViT-B/16 vision tower (random init from
config), SGD momentum 0.9 nesterov + weight decay as in the release, batch 8 at 224x224. Step times are the median
of the timed steps after one warm-up step; variants are interleaved round-robin so that machine load hits all alike.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

VARIANTS = ("full", "rst", "release", "lora")


def build_model(small: bool):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    from vit_b16 import vit_b16_config

    if small:
        config = CLIPVisionConfig(
            hidden_size=192,
            intermediate_size=768,
            num_hidden_layers=4,
            num_attention_heads=3,
            image_size=112,
            patch_size=16,
            projection_dim=128,
        )
    else:  # ViT-B/16 as in CLIP (paper Appendix C: 86,192,640 parameters incl. projection)
        config = vit_b16_config()
    torch.manual_seed(0)
    return CLIPVisionModelWithProjection(config), config.image_size


def run_variant(variant: str, steps: int, batch: int, small: bool, tau: float) -> dict:
    import peft  # noqa: F401  (every variant pays the same imports, so peak memory compares training state only)

    import peft_rst  # noqa: F401

    model, size = build_model(small)
    targeted_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    release_w0 = None
    if variant == "rst":
        from peft import get_peft_model

        model = get_peft_model(model, peft_rst.RSTConfig(tau=tau))
    elif variant == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    elif variant == "release":
        release_w0 = copy.deepcopy(model)  # the release keeps a deep copy of the whole visual encoder
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=3e-6, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x = torch.randn(batch, 3, size, size)
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        loss = model(pixel_values=x).image_embeds.pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if release_w0 is not None:
            with torch.no_grad():  # the release's reset: float masks over every parameter
                for p, p0 in zip(model.parameters(), release_w0.parameters()):
                    mask = (p - p0).abs() > tau
                    p.copy_(mask.float() * p + (~mask).float() * p0)
        if step:  # first step is warm-up (allocations, momentum buffers)
            times.append(time.perf_counter() - start)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": variant, "times": times, "peak_bytes": peak_kib * 1024, "targeted_bytes": targeted_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2, help="round-robin repetitions of every variant")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tau", type=float, default=1e-6)
    parser.add_argument("--small", action="store_true", help="a small ViT for a quick check")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: run one variant
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.steps, args.batch, args.small, args.tau)))
        return

    results: dict[str, dict] = {}
    for _ in range(args.rounds):
        for variant in VARIANTS:
            cmd = [sys.executable, __file__, "--variant", variant, "--steps", str(args.steps)]
            cmd += ["--batch", str(args.batch), "--tau", str(args.tau)] + (["--small"] if args.small else [])
            out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            entry = results.setdefault(
                variant, {"times": [], "peak_bytes": 0, "targeted_bytes": out["targeted_bytes"]}
            )
            entry["times"] += out["times"]
            entry["peak_bytes"] = max(entry["peak_bytes"], out["peak_bytes"])
    full = results["full"]
    full_time = statistics.median(full["times"])
    targeted = full["targeted_bytes"]
    print(
        f"model: {'small ViT' if args.small else 'ViT-B/16 vision tower'}, batch {args.batch}, "
        f"{args.rounds}x{args.steps} timed steps per variant, torch threads {torch.get_num_threads()}"
    )
    print(f"targeted weights: {targeted / 2**20:.1f} MiB")
    print(
        f"{'variant':<10}{'step s (median)':>16}{'x full':>9}{'peak MiB':>11}{'peak - full':>13}{'(x targeted)':>14}"
    )
    for variant in VARIANTS:
        r = results[variant]
        t = statistics.median(r["times"])
        extra = r["peak_bytes"] - full["peak_bytes"]
        print(
            f"{variant:<10}{t:>16.3f}{t / full_time:>9.3f}{r['peak_bytes'] / 2**20:>11.0f}"
            f"{extra / 2**20:>13.0f}{extra / targeted:>14.2f}"
        )
    print("targets: rst step <= 1.03x full; rst peak <= full + 1.00x targeted")


if __name__ == "__main__":
    main()
