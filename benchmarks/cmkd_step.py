"""What does a CMKD training step cost on top of the vision-tower passes it needs? And does the text tower ever run?

Measured side by side in one process, interleaved (A, B, A, B, ...), as the median CPU time of this process per
step (what the step computes, whatever else runs on the shared cores; wall times are printed too), on a small
CLIP ViT (randomly initialised from its config; only FLOPs matter here):

- ``tower``: the irreducible work of a UDA step: source + target batch through the vision tower, projection and
  head, a cross-entropy on the source logits, backward.
- ``cmkd``: `CMKDTrainer.training_step` (the Trainer's step: input preparation, the CMKD loss with teacher logits,
  alpha, Gini terms, per-term logging, backward). Target <= 1.05x ``tower``.
- ``cmkd_fixmatch``: the same with the strong target view (a third batch through the tower; compared with a
  ``tower`` pass over three batches).
- ``release_two_pass``: for reference, the release's layout of the same work (one tower pass per batch).

Then `trainer.train()` runs a few full steps (optimizer included) with a forward hook counting text-tower calls,
which must stay 0: the class prompts are encoded once in `CLIPAdaptationModel.from_clip`.

    python benchmarks/cmkd_step.py                 # ~2-4 min on 2 shared CPU cores
    python benchmarks/cmkd_step.py --layers 2 --repeats 5   # quick look
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cmkd import CLIPAdaptationModel, CMKDTrainer, CMKDTrainingArguments  # noqa: E402


class CharTokenizer:
    """Offline stand-in for the CLIP BPE tokenizer (the text tower runs once either way)."""

    def __call__(self, texts, padding=True, truncation=True, return_tensors="pt"):
        ids = [[3 + (ord(c) % 90) for c in t][:30] + [99] for t in texts]
        width = max(map(len, ids))
        mask = [[1] * len(i) + [0] * (width - len(i)) for i in ids]
        ids = [i + [0] * (width - len(i)) for i in ids]
        return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}


class RandomImages(torch.utils.data.Dataset):
    def __init__(self, n: int, size: int, num_classes: int, seed: int, strong: bool = False):
        g = torch.Generator().manual_seed(seed)
        self.pixels = torch.randn(n, 3, size, size, generator=g)
        self.labels = torch.randint(num_classes, (n,), generator=g)
        self.strong = strong

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        item = {"pixel_values": self.pixels[i], "labels": int(self.labels[i])}
        if self.strong:
            item["pixel_values_strong"] = self.pixels[i].flip(-1)
        return item


def build_clip(args) -> CLIPModel:
    vision = dict(
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        image_size=args.image_size,
        patch_size=16,
    )
    text = dict(
        vocab_size=100,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=32,
        eos_token_id=99,
        pad_token_id=0,
        bos_token_id=98,
    )
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=args.projection_dim)).eval()


def tower_step(model, batch: dict, keys: list[str]) -> None:
    """Source + target (+ strong) through tower and head, CE on source, backward: the work any UDA step needs."""
    parts = [batch[k] for k in keys]
    model.train()
    out = model(pixel_values=torch.cat(parts), segment_sizes=[p.shape[0] for p in parts])
    loss = F.cross_entropy(out.logits[: parts[0].shape[0]], batch["source_labels"])
    loss.backward()
    model.zero_grad(set_to_none=True)


def two_pass_step(model, batch: dict) -> None:
    model.train()
    src = model(pixel_values=batch["source_pixel_values"])
    tgt = model(pixel_values=batch["target_pixel_values"])
    (F.cross_entropy(src.logits, batch["source_labels"]) + 0 * tgt.logits.sum()).backward()
    model.zero_grad(set_to_none=True)


def cmkd_step(trainer, model, batch: dict) -> None:
    trainer.training_step(model, batch)
    model.zero_grad(set_to_none=True)


def timed(fn) -> tuple[float, float]:
    """(CPU seconds of this process, wall seconds). CPU time counts the work whatever else runs on the machine."""
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


def compare(name_a, fn_a, name_b, fn_b, repeats: int) -> dict[str, tuple[float, float]]:
    """Interleaved A, B, A, B, ... after a warm-up; per name the median (CPU, wall) seconds."""
    fn_a(), fn_b()
    times = {name_a: [], name_b: []}
    for _ in range(repeats):
        times[name_a].append(timed(fn_a))
        times[name_b].append(timed(fn_b))
    return {k: (statistics.median(c for c, _ in v), statistics.median(w for _, w in v)) for k, v in times.items()}


def make_trainer(model, args, mode: str, out_dir: str, steps: int = 1) -> CMKDTrainer:
    strong = mode == "cmkd_fixmatch"
    training_args = CMKDTrainingArguments(
        output_dir=out_dir,
        mode=mode,
        max_steps=steps,
        per_device_train_batch_size=args.batch,
        learning_rate=1e-5,
        eval_strategy="no",
        save_strategy="no",
        load_best_model_at_end=False,
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
        report_to="none",
    )
    n = 4 * args.batch
    return CMKDTrainer(
        model,
        training_args,
        source_dataset=RandomImages(n, args.image_size, args.num_classes, 0),
        target_dataset=RandomImages(n, args.image_size, args.num_classes, 1, strong=strong),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--projection-dim", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16, help="per stream (source and target each)")
    parser.add_argument("--num-classes", type=int, default=65, help="65 = Office-Home")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--train-steps", type=int, default=5)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: no OpenMP spin-waits inflate CPU time)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)

    clip = build_clip(args)
    text_calls = []
    hook = clip.text_model.register_forward_hook(lambda *_: text_calls.append(1))
    model = CLIPAdaptationModel.from_clip(
        clip, [f"class_{i}" for i in range(args.num_classes)], "a photo of a {}.", tokenizer=CharTokenizer()
    )
    calls_building = len(text_calls)
    text_calls.clear()
    tower_params = sum(p.numel() for p in model.vision_model.parameters()) + model.visual_projection.weight.numel()
    tokens = (args.image_size // 16) ** 2 + 1
    print(
        f"ViT: {args.layers} layers, hidden {args.hidden}, {args.image_size}px/16 -> {tokens} tokens, "
        f"{tower_params / 1e6:.1f}M tower params; batch {args.batch} source + {args.batch} target; "
        f"{args.num_classes} classes; torch threads {torch.get_num_threads()}"
    )

    with tempfile.TemporaryDirectory() as out:
        results = {}
        for mode, keys in (
            ("cmkd", ["source_pixel_values", "target_pixel_values"]),
            ("cmkd_fixmatch", ["source_pixel_values", "target_pixel_values", "target_strong_pixel_values"]),
        ):
            trainer = make_trainer(model, args, mode, out)
            trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(); we call training_step alone
            batch = next(iter(trainer.get_train_dataloader()))
            med = compare(
                "tower", lambda b=batch, k=keys: tower_step(model, b, k),
                mode, lambda b=batch, t=trainer: cmkd_step(t, model, b),
                args.repeats,
            )  # fmt: skip
            results[mode] = med[mode][0] / med["tower"][0]
            print(
                f"{mode:>14}: CPU {med[mode][0] * 1e3:8.1f} ms/step vs {med['tower'][0] * 1e3:8.1f} ms for the tower "
                f"passes it needs ({len(keys)} batches): {results[mode]:.3f}x (target <= 1.05x); "
                f"wall {med[mode][1] * 1e3:.0f} vs {med['tower'][1] * 1e3:.0f} ms"
            )
            if mode == "cmkd":
                two = compare(
                    "tower", lambda b=batch, k=keys: tower_step(model, b, k),
                    "release_two_pass", lambda b=batch: two_pass_step(model, b),
                    args.repeats,
                )  # fmt: skip
                print(
                    f"{'release layout':>14}: CPU {two['release_two_pass'][0] * 1e3:8.1f} ms/step (one tower pass per "
                    f"batch) vs {two['tower'][0] * 1e3:8.1f} ms (one pass over both): "
                    f"{two['release_two_pass'][0] / two['tower'][0]:.3f}x"
                )

        trainer = make_trainer(model, args, "cmkd", out, steps=args.train_steps)
        start = time.perf_counter()
        trainer.train()
        per_step = (time.perf_counter() - start) / args.train_steps
    hook.remove()
    print(f"trainer.train(): {args.train_steps} full steps (incl. SGD), {per_step * 1e3:.1f} ms/step")
    print(f"text-tower calls: {calls_building} while building the model (prompt cache), {len(text_calls)} in training")
    if text_calls:
        raise SystemExit("FAIL: the text tower ran during training")
    worst = max(results.values())
    print(f"worst CMKD step / tower passes (CPU time): {worst:.3f}x -> {'OK' if worst <= 1.05 else 'ABOVE 1.05x'}")


if __name__ == "__main__":
    main()
