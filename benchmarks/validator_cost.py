"""Cost of the label-free validators per evaluation, relative to the plain evaluation pass (target: <= 1.1x).

The validators reuse the logits and features of the evaluation pass, so their cost is the computation on those
arrays. Two settings, both on CPU with one thread:

- **demo world**: the shipped tiny CLIP (`cmkd.toy.TINY_CLIP_PATH`) on the toy target (450 styled digits,
  batch 256) with a held-out source split of 45 images, measured end to end.
- **ViT-B/16**: a CLIP ViT-B/16 tower built from its config (random weights, `benchmarks/vit_b16.py`), forward at
  batch 8. A whole target set does not fit in a benchmark on a CPU, so the pass is the measured time per batch x
  the number of batches of an Office-Home-sized target (default 4,365 images, Clipart); the validators are timed
  on outputs of that size (65 classes, 512-d features, 10 % source split).

Per row: evaluation pass, validators (all of them; then the cheap ones, without DEV), the extra source-split pass
(needed only by ``source_accuracy`` and ``dev``), and the ratios::

    OMP_NUM_THREADS=1 python benchmarks/validator_cost.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cmkd import CLIPAdaptationConfig, CLIPAdaptationModel  # noqa: E402
from cmkd.validators import SND_MAX_SAMPLES, VALIDATORS, ValidationInputs, ValidatorWarning, compute_validators  # noqa: E402

CHEAP = [n for n in VALIDATORS if n != "dev"]


def best_of(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def forward_pass(model, images: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What an evaluation pass produces: student logits, teacher logits, image features, batch by batch."""
    outs = [model(pixel_values=images[i : i + batch]) for i in range(0, len(images), batch)]
    return (
        torch.cat([o.logits for o in outs]),
        torch.cat([o.teacher_logits for o in outs]),
        torch.cat([o.image_embeds for o in outs]),
    )


def validator_times(inputs: ValidationInputs, repeats: int) -> tuple[float, float]:
    every = best_of(lambda: compute_validators(inputs), repeats)
    cheap = best_of(lambda: compute_validators(inputs, CHEAP), repeats)
    return every, cheap


def demo_world(repeats: int) -> dict[str, float]:
    from transformers import AutoModel, AutoTokenizer

    from cmkd.toy import DIGITS_PROMPT, TINY_CLIP_PATH, make_digits_shift
    from cmkd.transforms import build_transform

    shift = make_digits_shift(0)
    tf = build_transform("digits_test", 32)
    target = torch.stack([tf(im) for im in shift["target"]["image"]])
    source = torch.stack([tf(im) for im in shift["source"]["image"][:45]])
    source_labels = torch.tensor(shift["source"]["label"][:45])
    clip = AutoModel.from_pretrained(TINY_CLIP_PATH)
    names = shift["source"].features["label"].names
    model = CLIPAdaptationModel.from_clip(clip, names, DIGITS_PROMPT, AutoTokenizer.from_pretrained(TINY_CLIP_PATH))
    model.eval()
    plain = best_of(lambda: forward_pass(model, target, 256), repeats)
    source_pass = best_of(lambda: forward_pass(model, source, 256), repeats)
    student, teacher, feats = forward_pass(model, target, 256)
    s_student, _, s_feats = forward_pass(model, source, 256)
    inputs = ValidationInputs(student, feats, teacher.argmax(-1), s_student, source_labels, s_feats)
    every, cheap = validator_times(inputs, repeats)
    return {"n": len(target), "pass": plain, "source_pass": source_pass, "every": every, "cheap": cheap}


def vit_b16(repeats: int, target_size: int, batch: int = 8, classes: int = 65) -> dict[str, float]:
    from vit_b16 import vit_b16_config

    torch.manual_seed(0)
    config = CLIPAdaptationConfig(
        vision_config=vit_b16_config().to_dict(),
        projection_dim=512,
        class_names=[f"class_{i}" for i in range(classes)],
        has_text_features=True,
    )
    config.vision_config.model_type = "clip_vision_model"
    model = CLIPAdaptationModel(config).eval()
    model.text_features.copy_(torch.nn.functional.normalize(torch.randn(classes, 512), dim=-1))
    images = torch.randn(batch, 3, 224, 224)
    per_batch = best_of(lambda: forward_pass(model, images, batch), max(1, repeats // 2))
    batches = -(-target_size // batch)
    n_source = max(4, target_size // 10)
    g = torch.Generator().manual_seed(0)
    inputs = ValidationInputs(
        torch.randn(target_size, classes, generator=g) * 4,
        torch.randn(target_size, 512, generator=g),
        torch.randint(0, classes, (target_size,), generator=g),
        torch.randn(n_source, classes, generator=g) * 4,
        torch.randint(0, classes, (n_source,), generator=g),
        torch.randn(n_source, 512, generator=g),
    )
    every, cheap = validator_times(inputs, repeats)
    return {
        "n": target_size,
        "pass": per_batch * batches,
        "source_pass": per_batch * -(-n_source // batch),
        "every": every,
        "cheap": cheap,
        "per_batch": per_batch,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--target_size", type=int, default=4365, help="ViT-B/16 row: target images (Clipart: 4,365)")
    parser.add_argument("--skip_vit", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", ValidatorWarning)  # random weights: collapsed or vague predictions are expected
    rows = [("demo world (tiny CLIP, 32 px, batch 256)", demo_world(args.repeats))]
    if not args.skip_vit:
        rows.append(("ViT-B/16 (config-built, batch 8)", vit_b16(args.repeats, args.target_size)))
    print(f"validators per evaluation vs the evaluation pass (CPU, 1 thread; SND on <= {SND_MAX_SAMPLES} samples)\n")
    print(
        "| setting | target images | eval pass (s) | validators, all (s) | without DEV (s) | source split pass (s) "
        "| ratio all | ratio without DEV | ratio all + source pass |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows:
        p = r["pass"]
        print(
            f"| {name} | {r['n']:,} | {p:.3f} | {r['every']:.3f} | {r['cheap']:.3f} | {r['source_pass']:.3f} | "
            f"{(p + r['every']) / p:.3f}x | {(p + r['cheap']) / p:.3f}x | "
            f"{(p + r['every'] + r['source_pass']) / p:.3f}x |"
        )
    if len(rows) > 1:
        print(
            f"\nViT-B/16 pass = {rows[1][1]['per_batch']:.3f} s per batch of 8 (median) x {-(-args.target_size // 8)} "
            "batches."
        )


if __name__ == "__main__":
    main()
