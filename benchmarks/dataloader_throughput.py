"""Does data loading keep the model busy? Loader images/s vs. what a training step consumes, on this machine.

1. Generates a small ImageFolder of 256x256 JPEGs in a temp dir (Office-Home-like), loads it with the recipes'
   loader and the release's Office-style training transform (Resize 256, RandomCrop 224, flip, normalise), and
   measures images/s for ``num_workers`` 0, 1, 2 (first batch excluded: worker start-up).
2. Times a training step of a CLIP ViT-B/16 vision tower (randomly initialised from its config: same FLOPs as
   ``openai/clip-vit-base-patch16``; forward + backward + SGD step) and reports the images/s it consumes. A CMKD
   step encodes a source and a target batch, so consumption = images encoded per second.
3. Runs the two together (loader feeding the step, as in training) and reports the time spent waiting for data.

    python benchmarks/dataloader_throughput.py            # ~2 min on 2 (shared) CPU cores
    python benchmarks/dataloader_throughput.py --small    # 4-layer ViT-B/16 step instead of 12 (stated in output)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from torch.utils.data import DataLoader  # noqa: E402

from cmkd.benchmarks import load_benchmark_config  # noqa: E402
from cmkd.data import collate_images  # noqa: E402
from recipes.core.data import bench_transform, default_num_workers, load_domain, transformed


def make_image_folder(root: Path, num_images: int, num_classes: int, size: int, fmt: str) -> None:
    """Smooth random images (JPEG sizes similar to photos, unlike pure noise) in root/Art/<class>/."""
    rng = np.random.default_rng(0)
    for i in range(num_images):
        cls = root / "Art" / f"class_{i % num_classes:02d}"
        cls.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((size, size), Image.BILINEAR)
        noise = rng.integers(-12, 12, (size, size, 3))
        img = Image.fromarray(np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8))
        img.save(cls / f"{i:05d}.{fmt}", quality=90) if fmt == "jpg" else img.save(cls / f"{i:05d}.{fmt}")


def make_loader(dataset, batch_size: int, num_workers: int) -> DataLoader:
    """As the Trainer builds it for the recipes: shuffled, persistent workers, prefetching."""
    return DataLoader(
        dataset,
        batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        collate_fn=collate_images,
        generator=torch.Generator().manual_seed(0),
    )


def loader_rate(dataset, batch_size: int, num_workers: int, batches: int) -> float:
    loader = make_loader(dataset, batch_size, num_workers)
    it = iter(loader)
    next(it)  # worker start-up and first prefetch
    start = time.perf_counter()
    n = 0
    for _ in range(batches):
        x = next(it)["pixel_values"]
        n += x.shape[0]
    rate = n / (time.perf_counter() - start)
    del it, loader
    return rate


def make_step(num_layers: int, batch_size: int):
    from transformers import CLIPVisionModelWithProjection
    from vit_b16 import vit_b16_config

    torch.manual_seed(0)
    cfg = vit_b16_config(num_hidden_layers=num_layers)
    model = CLIPVisionModelWithProjection(cfg).train()
    head = torch.nn.Linear(512, 65)
    opt = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=1e-6, momentum=0.9, nesterov=True)
    labels = torch.zeros(batch_size, dtype=torch.long)

    def step(pixel_values: torch.Tensor) -> None:
        feats = model(pixel_values=pixel_values).image_embeds
        loss = torch.nn.functional.cross_entropy(head(feats), labels[: pixel_values.shape[0]])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", type=int, default=160)
    parser.add_argument("--batch_size", type=int, default=32, help="loader batch size (release: 32)")
    parser.add_argument("--loader_batches", type=int, default=4, help="timed batches per num_workers setting")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--format", choices=("jpg", "png"), default="jpg")
    parser.add_argument("--step_batch", type=int, default=4, help="images per timed training step")
    parser.add_argument("--steps", type=int, default=1, help="timed training steps (after one warm-up)")
    parser.add_argument("--small", action="store_true", help="4 transformer layers instead of 12 (faster)")
    parser.add_argument("--json", help="also write the numbers to this JSON file")
    args = parser.parse_args()

    t0 = time.perf_counter()
    cfg = load_benchmark_config("office_home")
    num_classes = 5
    cfg_small = dataclasses.replace(cfg, num_classes=num_classes)
    print(f"CPUs available: {default_num_workers(max_workers=1024)}, torch threads: {torch.get_num_threads()}")
    out: dict = {"cpus": default_num_workers(max_workers=1024), "torch_threads": torch.get_num_threads()}

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_image_folder(root, args.num_images, num_classes, 256, args.format)
        tf = bench_transform(cfg, cfg.augmentation.train_preset("Ar", "source"))  # office_train at 224
        ds = transformed(load_domain(cfg_small, "Ar", data_dir=str(root)), tf)
        fmt = args.format.upper()
        print(f"\nloader: {len(ds)} {fmt} images 256x256, office_train -> 224, batch {args.batch_size}")
        out["loader"] = {}
        threads = torch.get_num_threads()
        for w in args.workers:
            rate = loader_rate(ds, args.batch_size, w, args.loader_batches)
            out["loader"][w] = rate
            note = f"main process, {threads} torch threads" if w == 0 else "workers use 1 torch thread each"
            print(f"  num_workers={w}: {rate:7.1f} images/s ({note})")
            if w == 0 and threads > 1:
                # transforms in the main process inherit its intra-op threads; on a busy CPU that oversubscribes
                torch.set_num_threads(1)
                rate1 = loader_rate(ds, args.batch_size, 0, args.loader_batches)
                torch.set_num_threads(threads)
                out["loader_main_1thread"] = rate1
                print(f"  num_workers=0: {rate1:7.1f} images/s (main process, 1 torch thread)")

        layers = 4 if args.small else 12
        step = make_step(layers, args.step_batch)
        x = torch.randn(args.step_batch, 3, 224, 224)
        step(x)  # warm-up
        start = time.perf_counter()
        for _ in range(args.steps):
            step(x)
        step_time = (time.perf_counter() - start) / args.steps
        consumed = args.step_batch / step_time
        full_est = consumed * layers / 12
        label = "ViT-B/16 vision tower" if layers == 12 else "ViT-B/16 width, 4 of 12 layers"
        print(f"\ntraining step ({label}, fwd+bwd+SGD, batch {args.step_batch}): {step_time:.2f} s/step")
        extra = f" (12 layers: ~{full_est:.2f} images/s)" if args.small else ""
        print(f"  consumes {consumed:.2f} images/s{extra}")
        out["step"] = {"layers": layers, "batch": args.step_batch, "seconds": step_time, "images_per_s": consumed}

        best_w = max(out["loader"], key=out["loader"].get)
        print("\nloader / consumption (measured separately):")
        for w, rate in out["loader"].items():
            print(f"  num_workers={w}: {rate / consumed:6.1f}x")

        # overlapped: the loader (2 workers if allowed) feeds the step, as in training; time spent in next(it)
        w = min(2, max(out["loader"]))
        loader = make_loader(ds, args.step_batch, w)
        it = iter(loader)
        next(it)
        waits, computes = [], []
        for _ in range(args.steps):
            a = time.perf_counter()
            xb = next(it)["pixel_values"]
            b = time.perf_counter()
            step(xb)
            waits.append(b - a)
            computes.append(time.perf_counter() - b)
        del it, loader
        wait, comp = sum(waits) / len(waits), sum(computes) / len(computes)
        share = 100 * wait / (wait + comp)
        print(
            f"\noverlapped (num_workers={w} feeding the step): data wait {wait * 1000:.0f} ms per step, "
            f"compute {comp:.2f} s per step -> the step waited for data {share:.1f}% of the time"
        )
        out["overlapped"] = {"num_workers": w, "wait_s": wait, "compute_s": comp}
        out["best_workers"] = best_w

    print(f"\ntotal benchmark time {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
