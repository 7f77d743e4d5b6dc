"""timm's RandAugment vs the hand-written approximation it replaced, and the cost of per-item seeding.

1. The FixMatch strong view (RGB, Resize, CenterCrop, HFlip, ColorJitter(0.4, 0.4, 0.4, 0), RandAugment
   ``rand-n2-m10-mstd0.5``, normalise) with timm's RandAugment (`cmkd.transforms`, what the release runs) against the
   same pipeline with the torchvision-based ``RandAugmentMstd`` that cmkd used before (copied below as it was).
   The two run interleaved in rounds on the same images, so machine load hits both alike; the ratio is the result.
2. `cmkd.data.make_paired_dataloader` over the Office-style train transform with per-item seeding (default) and
   without, interleaved the same way: what the reproducible-augmentation guarantee costs per item.

    python benchmarks/strong_augment.py                 # 224 px, ~1 min on 2 (shared) CPU cores
    python benchmarks/strong_augment.py --size 32 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode, RandAugment

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cmkd.data import make_paired_dataloader, with_image_transform  # noqa: E402
from cmkd.transforms import CLIP_MEAN, CLIP_STD, ToRGB, build_transform  # noqa: E402


class RandAugmentMstd(RandAugment):
    """The hand-written approximation cmkd used before timm (torchvision op set, magnitude ~ N(M, S), p=0.5)."""

    def __init__(
        self, num_ops=2, magnitude=10.0, magnitude_std=0.5, apply_prob=0.5, max_magnitude=10.0, resolution=100
    ):
        super().__init__(
            num_ops=1, magnitude=resolution, num_magnitude_bins=resolution + 1, interpolation=InterpolationMode.NEAREST
        )
        self.total_ops, self.mean_magnitude, self.magnitude_std = num_ops, magnitude, magnitude_std
        self.apply_prob, self.max_magnitude, self.resolution = apply_prob, max_magnitude, resolution

    def _draw_bin(self) -> int:
        m = self.mean_magnitude + self.magnitude_std * float(torch.randn(()))
        return int(round(min(max(m, 0.0), self.max_magnitude) / self.max_magnitude * self.resolution))

    def forward(self, img):
        for _ in range(self.total_ops):
            if float(torch.rand(())) >= self.apply_prob:
                continue
            self.magnitude = self._draw_bin()
            img = super().forward(img)
        return img


def hand_written_strong(size: int) -> T.Compose:
    return T.Compose(
        [
            ToRGB(),
            T.Resize(size),
            T.CenterCrop(size),
            T.RandomHorizontalFlip(),
            T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.0),
            RandAugmentMstd(),
            T.ToTensor(),
            T.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )


def photos(n: int, size: int) -> list[Image.Image]:
    """Smooth random images with mild noise (photo-like statistics, unlike pure noise), 256/224 of ``size``."""
    rng = np.random.default_rng(0)
    side = round(size * 256 / 224)
    out = []
    for _ in range(n):
        small = Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).resize((side, side), Image.BILINEAR)
        noise = rng.integers(-12, 12, (side, side, 3))
        out.append(Image.fromarray(np.clip(np.asarray(small, dtype=np.int16) + noise, 0, 255).astype(np.uint8)))
    return out


def items_per_second(fn, items) -> float:
    start = time.perf_counter()
    for item in items:
        fn(item)
    return len(items) / (time.perf_counter() - start)


def loader_items_per_second(dataset, seeded: bool, batches: int, batch_size: int) -> float:
    loader = make_paired_dataloader(dataset, source_batch_size=batch_size, seed=0, seed_augmentation=seeded)
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch_size / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    images = photos(args.images, args.size)
    timm_strong, hand_strong = build_transform("fixmatch_strong", args.size), hand_written_strong(args.size)
    for fn in (timm_strong, hand_strong):  # warm-up (lazy imports, first-call caches)
        items_per_second(fn, images[:4])

    rates: dict[str, list[float]] = {"timm": [], "hand_written": [], "seeded": [], "unseeded": []}
    for _ in range(args.rounds):
        rates["timm"].append(items_per_second(timm_strong, images))
        rates["hand_written"].append(items_per_second(hand_strong, images))

    from datasets import Dataset
    from datasets import Image as ImageFeature

    dataset = Dataset.from_dict({"image": images, "label": [0] * len(images)}).cast_column("image", ImageFeature())
    dataset = with_image_transform(dataset, build_transform("office_train", args.size))
    batches, batch_size = max(1, args.images // 16), 16
    for _ in range(args.rounds):
        rates["seeded"].append(loader_items_per_second(dataset, True, batches, batch_size))
        rates["unseeded"].append(loader_items_per_second(dataset, False, batches, batch_size))

    med = {k: statistics.median(v) for k, v in rates.items()}
    result = {
        "size": args.size,
        "rounds": args.rounds,
        "images_per_round": args.images,
        "items_per_s_median": {k: round(v, 1) for k, v in med.items()},
        "strong_view_timm_over_hand_written": round(med["timm"] / med["hand_written"], 3),
        "paired_loader_seeded_over_unseeded": round(med["seeded"] / med["unseeded"], 3),
        "torch_threads": torch.get_num_threads(),
    }
    ratio_strong = result["strong_view_timm_over_hand_written"]
    ratio_seed = result["paired_loader_seeded_over_unseeded"]
    print(f"strong view, {args.size}px, items/s (median of {args.rounds} interleaved rounds):")
    print(f"  timm RandAugment     {med['timm']:8.1f}")
    print(f"  hand-written (old)   {med['hand_written']:8.1f}   ratio timm/old = {ratio_strong}")
    print("paired loader, office_train, 0 workers, items/s:")
    print(f"  seeded per item      {med['seeded']:8.1f}")
    print(f"  unseeded             {med['unseeded']:8.1f}   ratio seeded/unseeded = {ratio_seed}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
