"""Pretrain the tiny CLIP shipped in ``cmkd/assets/tiny_clip_digits`` (the project's offline default model).

CLIP's zero-shot teacher comes from contrastive pretraining on many captioned images of many looks. This script
reproduces that recipe in miniature, top to bottom:

1. a CLIP byte-level BPE tokenizer is learned from the caption templates (so the real ``CLIPTokenizer`` code
   path loads it, with all 512 byte tokens as fallback for unseen words);
2. a small ``CLIPModel`` (ViT 32x32 / patch 8, 64-d towers, 315k parameters) is trained with the model's own
   contrastive loss (``return_loss=True``) on freshly rendered *mixed*-style images of the ``pretrain`` digit pool,
   each with a caption naming the digit and (later in training) often its look, e.g.
   ``a blurry photo of the number: "7"`` or ``the digit seven written in red on a yellow background``;
3. the folder is saved with ``save_pretrained`` (safetensors + tokenizer + image processor), re-loaded through
   ``from_pretrained`` and evaluated on the digits domain shift (``cmkd.toy.make_digits_shift``): zero-shot with
   the release's digits prompt, a source-only linear probe, a source-only fine-tune and a target-oracle probe.
   The numbers go to ``README.md`` and ``training_metadata.json`` in the folder.

Run with the defaults to regenerate the shipped folder (same recipe; bitwise equality is not promised across
machines)::

    python -m recipes.pretrain_tiny_clip --output_dir cmkd/assets/tiny_clip_digits
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
)
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from cmkd.toy import (
    DIGIT_CLASSES,
    DIGIT_WORDS,
    DIGITS_PROMPT,
    IMAGE_SIZE,
    PALETTE,
    TINY_CLIP_PATH,
    load_digit_pools,
    make_digits_shift,
    render_digits,
    sample_styles,
)

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_TEXT_LEN = 24
CAPTION_TEMPLATES = (
    "a photo of the number {w}",
    'a {style} photo of the number: "{d}"',
    "a {style} handwritten {w}",
    "an image of the number {w}",
    "a picture of a {style} digit {d}",
    'a photo of the number: "{d}" in {fg} on {bg}',
    "the digit {w} written in {fg} on a {bg} background",
)
"""Variations of the prompt that also name the digit as a word, the image's look or its colours, like alt text.
Measured: when they are in the mix from the first step (even 20 % of captions), the contrastive loss is first
lowered by matching colours and looks, and after 800 steps the tiny model is still near chance on digits
(measured: 20 % source / 8 % target zero-shot). So the
first ``--plain_fraction`` of the steps use the plain prompt only (digit identity is then the only signal), and
only then half of the captions become variations, which no longer stops digit learning."""
NAMES = list(PALETTE)


# ------------------------------------------------------------------------------------------------- captions
def style_words(style: dict[str, torch.Tensor], i: int) -> list[str]:
    """Words that describe image ``i``'s look, like the alt text of a web image would (roughly)."""
    words = []
    if abs(float(style["angle"][i])) > 12:
        words.append("rotated")
    if abs(float(style["shear"][i])) > 0.15:
        words.append("slanted")
    if float(style["scale"][i]) < 0.85:
        words.append("small")
    if float(style["bold"][i]) > 0.6:
        words.append("bold")
    if float(style["blur"][i]) > 0.6:
        words.append("blurry")
    if float(style["noise"][i]) > 0.06:
        words.append("noisy")
    if float(style["gradient"][i]) > 0.3:
        words.append("shaded")
    return words or ["clean"]


def make_captions(
    labels: torch.Tensor, style: dict[str, torch.Tensor], rng: np.random.Generator, prompt_fraction: float
) -> list[str]:
    """One caption per image: the release's digits prompt with probability ``prompt_fraction``, else a variation."""
    captions = []
    for i, label in enumerate(labels.tolist()):
        if rng.random() < prompt_fraction:
            captions.append(DIGITS_PROMPT.format(DIGIT_CLASSES[label]))
            continue
        words = style_words(style, i)
        keep = rng.permutation(len(words))[: rng.integers(1, len(words) + 1)]
        template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
        captions.append(
            template.format(
                d=DIGIT_CLASSES[label],
                w=DIGIT_WORDS[label],
                style=" ".join(words[k] for k in sorted(keep)),
                fg=NAMES[int(style["fg"][i])],
                bg=NAMES[int(style["bg"][i])],
            )
        )
    return captions


# ------------------------------------------------------------------------------------------------- tokenizer
def build_tokenizer(corpus: list[str]) -> CLIPTokenizer:
    """Learn BPE merges on ``corpus`` with CLIP's normaliser/pre-tokeniser and lay the vocab out like CLIP's:
    the 256 byte symbols, the same with ``</w>``, the merge results in merge order, then the two specials."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    split = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=4096, min_frequency=1, initial_alphabet=alphabet, end_of_word_suffix="</w>", show_progress=False
    )
    bpe.train_from_iterator(corpus, trainer)
    merges = [
        tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in json.loads(bpe.to_str())["model"]["merges"]
    ]
    symbols = sorted(alphabet)
    vocab_list = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TEXT_LEN)


def tokenizer_corpus(rng: np.random.Generator, n: int = 4000) -> list[str]:
    """Every caption word many times (random captions) plus the prompt for every class."""
    pools = load_digit_pools()
    _, labels = pools["pretrain"]
    idx = torch.from_numpy(rng.integers(len(labels), size=n))
    style = sample_styles("mixed", n, torch.Generator().manual_seed(int(rng.integers(2**31))))
    corpus = make_captions(labels[idx], style, rng, prompt_fraction=0.0)
    corpus += [DIGITS_PROMPT.format(c) for c in DIGIT_CLASSES] + [f"a {w} number" for w in style_words_all()]
    corpus += [t.replace("{", "").replace("}", "") for t in CAPTION_TEMPLATES] + NAMES + DIGIT_WORDS
    return corpus


def style_words_all() -> list[str]:
    return ["rotated", "slanted", "small", "bold", "blurry", "noisy", "shaded", "clean"]


# ------------------------------------------------------------------------------------------------- model
def build_model(vocab_size: int, tokenizer: CLIPTokenizer, args: argparse.Namespace) -> CLIPModel:
    text = {
        "vocab_size": vocab_size,
        "hidden_size": args.text_hidden,
        "intermediate_size": 4 * args.text_hidden,
        "num_hidden_layers": args.text_layers,
        "num_attention_heads": 4,
        "max_position_embeddings": MAX_TEXT_LEN,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {
        "image_size": IMAGE_SIZE,
        "patch_size": args.patch_size,
        "hidden_size": args.vision_hidden,
        "intermediate_size": 4 * args.vision_hidden,
        "num_hidden_layers": args.vision_layers,
        "num_attention_heads": 4,
        "num_channels": 3,
    }
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=args.projection_dim)
    return CLIPModel(config)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] images -> CLIP pixel values, quantised to uint8 levels first like a saved PNG would be."""
    images = (images * 255).round() / 255
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def pretrain(model: CLIPModel, tokenizer: CLIPTokenizer, args: argparse.Namespace) -> list[float]:
    digits, labels = load_digit_pools()["pretrain"]
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    warmup = max(1, args.steps // 20)

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    model.train()
    losses, start = [], time.time()
    for step in range(args.steps):
        idx = torch.randint(len(labels), (args.batch_size,), generator=gen)
        style = sample_styles("mixed", args.batch_size, gen)
        pixel_values = normalize(render_digits(digits[idx], style))
        # Curriculum: plain prompts first (digits), then variations too (words, looks, colours); see CAPTION_TEMPLATES.
        prompt_fraction = 1.0 if step < args.plain_fraction * args.steps else args.prompt_fraction
        captions = make_captions(labels[idx], style, rng, prompt_fraction)
        text = tokenizer(captions, padding=True, truncation=True, return_tensors="pt")
        loss = model(**text, pixel_values=pixel_values, return_loss=True).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            recent = float(np.mean(losses[-args.log_every :]))
            print(f"step {step + 1}/{args.steps}  loss {recent:.3f}  {time.time() - start:.0f}s", flush=True)
    return losses


# ------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def image_features(model: CLIPModel, processor: CLIPProcessor, images: list, batch_size: int = 256) -> torch.Tensor:
    model.eval()
    feats = []
    for i in range(0, len(images), batch_size):
        pixels = processor(images=images[i : i + batch_size], return_tensors="pt")["pixel_values"]
        feats.append(model.get_image_features(pixel_values=pixels).pooler_output)
    return torch.cat(feats)


@torch.no_grad()
def zero_shot_accuracy(model: CLIPModel, processor: CLIPProcessor, images: list, labels: np.ndarray) -> float:
    prompts = [DIGITS_PROMPT.format(c) for c in DIGIT_CLASSES]
    text = processor(text=prompts, padding=True, truncation=True, return_tensors="pt")
    text_feats = F.normalize(model.get_text_features(**text).pooler_output, dim=-1)
    img = F.normalize(image_features(model, processor, images), dim=-1)
    return float(((img @ text_feats.T).argmax(-1).numpy() == labels).mean())


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    clf = LogisticRegression(max_iter=2000, C=1.0).fit(scaler.transform(train_x), train_y)
    return float(clf.score(scaler.transform(test_x), test_y))


def oracle_probe(x: np.ndarray, y: np.ndarray, seed: int) -> float:
    """5-fold cross-validated linear probe on the target itself: how linearly separable the features are."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    cv = StratifiedKFold(5, shuffle=True, random_state=seed)
    return float(cross_val_score(pipe, x, y, cv=cv).mean())


def source_only_finetune(
    model_dir: Path, processor: CLIPProcessor, data, args: argparse.Namespace, seed: int
) -> float:
    """Fine-tune vision tower + projection + linear head on labelled source images, report target accuracy.

    A cheap stand-in for the CMKD trainer's source-only baseline (no target data used), so the gap is known.
    """
    torch.manual_seed(seed)
    model = CLIPModel.from_pretrained(model_dir)
    head = torch.nn.Linear(model.config.projection_dim, len(DIGIT_CLASSES))
    params = list(model.vision_model.parameters()) + list(model.visual_projection.parameters())
    optimizer = torch.optim.AdamW([{"params": params, "lr": args.ft_lr}, {"params": head.parameters(), "lr": 1e-2}])
    src_pixels = processor(images=data["source"]["image"], return_tensors="pt")["pixel_values"]
    src_labels = torch.tensor(data["source"]["label"])
    model.train()
    for _ in range(args.ft_epochs):
        for batch in torch.randperm(len(src_labels)).split(64):
            feats = model.get_image_features(pixel_values=src_pixels[batch]).pooler_output
            loss = F.cross_entropy(head(feats), src_labels[batch], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        feats = image_features(model, processor, data["target"]["image"])
        pred = head(feats).argmax(-1).numpy()
    return float((pred == np.asarray(data["target"]["label"])).mean())


def evaluate(model_dir: Path, args: argparse.Namespace) -> dict[str, float]:
    model = CLIPModel.from_pretrained(model_dir)
    processor = CLIPProcessor.from_pretrained(model_dir)
    shift = make_digits_shift(seed=args.seed)
    data = {role: {"image": list(ds["image"]), "label": list(ds["label"])} for role, ds in shift.items()}
    y = {role: np.asarray(data[role]["label"]) for role in data}
    x = {role: image_features(model, processor, data[role]["image"]).numpy() for role in data}
    results = {
        f"zero_shot_{role}": zero_shot_accuracy(model, processor, data[role]["image"], y[role]) for role in data
    }
    results["linear_probe_source_to_target"] = linear_probe(x["source"], y["source"], x["target"], y["target"])
    results["linear_probe_target_oracle_cv"] = oracle_probe(x["target"], y["target"], args.seed)
    if args.ft_epochs > 0:
        runs = [source_only_finetune(model_dir, processor, data, args, args.seed + k) for k in range(args.ft_seeds)]
        results["finetune_source_to_target"] = float(np.mean(runs))
        results["finetune_source_to_target_min"] = min(runs)
        results["finetune_source_to_target_max"] = max(runs)
    return results


# ------------------------------------------------------------------------------------------------- saving
def write_card(out: Path, args: argparse.Namespace, results: dict[str, float], meta: dict) -> None:
    """The model card: how the folder was made and what it scores, so users know what the default can do."""
    rows = "\n".join(f"| `{k}` | {100 * v:.1f} % |" for k, v in results.items())
    card = f"""# tiny_clip_digits

A tiny CLIP-shaped model (`transformers.CLIPModel`, {meta["num_parameters"]:,} parameters, fp32 safetensors)
shipped with the project as its offline default. It is pretrained from scratch with the model's own contrastive
loss (`return_loss=True`) on captioned renders of real handwritten digits (scikit-learn's `load_digits`,
`pretrain` pool only) by `recipes/pretrain_tiny_clip.py`. Its zero-shot teacher with the release's digits prompt
`{DIGITS_PROMPT}` is useful but imperfect on the styled (target) domain of `cmkd.toy.make_digits_shift`, and a
classifier trained on the clean source alone transfers worse than that teacher: the gap CMKD is meant to close.

## How it was made

```
{meta["command"]}
```

- Data: the {meta["pretrain_images"]} digits of the `pretrain` pool (disjoint from the `source` and `target`
  pools), re-rendered at every step in the *mixed* style: each of rotation, shear, scale, shift, bold strokes,
  blur, brightness gradient and noise is on or off at random; colours are white-on-black (30 %),
  black-on-white (15 %) or a random pair from a named palette.
- Captions: the first {args.plain_fraction:.0%} of the steps use the plain prompt only; afterwards
  {1 - args.prompt_fraction:.0%} of the captions are variations from {len(CAPTION_TEMPLATES)} templates that name
  the digit as a word and/or describe the look and the colours (for example
  `the digit seven written in red on a yellow background`).
- Model: vision ViT {IMAGE_SIZE}x{IMAGE_SIZE}, patch {args.patch_size}, hidden {args.vision_hidden},
  {args.vision_layers} layers; text hidden {args.text_hidden}, {args.text_layers} layers, max length
  {MAX_TEXT_LEN}, {meta["vocab_size"]}-token CLIP byte-level BPE vocabulary (all 512 byte symbols plus merges
  learned on the caption words); projection {args.projection_dim}. Image processor: `CLIPImageProcessor`,
  {IMAGE_SIZE}x{IMAGE_SIZE}, OpenAI CLIP mean/std.
- Optimisation: {args.steps} steps, batch {args.batch_size}, AdamW lr {args.lr} (5 % warm-up, cosine), weight
  decay {args.weight_decay}, gradient clipping 1.0, seed {args.seed}; {meta["train_seconds"]:.0f} s of training
  on {args.threads} CPU thread(s) of a shared machine. Final loss {meta["final_loss"]:.3f} (ln {args.batch_size} =
  {math.log(args.batch_size):.2f} is chance; captions of one digit repeat within a batch, so the loss cannot
  approach 0).

## Results on the digits domain shift (`make_digits_shift(seed={args.seed})`)

Source: {meta["source_images"]} clean white-on-black digits. Target: {meta["target_images"]} styled digits,
evaluated on the whole set as the paper does.

| metric | accuracy |
|---|---|
{rows}

- `zero_shot_source` / `zero_shot_target`: argmax of the cosine similarity between the image embedding and the
  text embeddings of `{DIGITS_PROMPT}` for the 10 classes.
- `linear_probe_source_to_target`: logistic regression on frozen image embeddings, trained on labelled source
  images only, tested on the target.
- `linear_probe_target_oracle_cv`: the same probe trained on target labels (5-fold cross-validation); a
  reference for how separable the target features are, not an upper bound on zero-shot.
- `finetune_source_to_target*`: vision tower + projection + linear head fine-tuned on labelled source only
  ({args.ft_epochs} epochs, batch 64, AdamW lr {args.ft_lr} / head 1e-2, label smoothing 0.1), tested on the
  target; mean, min and max over {args.ft_seeds} seeds. This is the source-only baseline CMKD should beat.

## Loading (offline)

```python
from transformers import CLIPModel, CLIPProcessor
from cmkd.toy import TINY_CLIP_PATH

model = CLIPModel.from_pretrained(TINY_CLIP_PATH)
processor = CLIPProcessor.from_pretrained(TINY_CLIP_PATH)
```

`training_metadata.json` holds the arguments, the loss curve (means over 50 steps) and the results.
"""
    (out / "README.md").write_text(card)


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run: the output folder plus every option that differs from the default."""
    defaults = vars(parse_args([]))
    out = Path(args.output_dir).resolve()
    repo = Path(__file__).resolve().parents[1]
    shown = out.relative_to(repo) if out.is_relative_to(repo) else out
    extra = [f"--{k} {v}" for k, v in vars(args).items() if k != "output_dir" and v != defaults[k]]
    return " ".join(["python -m recipes.pretrain_tiny_clip", f"--output_dir {shown}", *extra])


def save_folder(model, tokenizer, output_dir: Path, args, losses, train_seconds) -> Path:
    """Write everything to a temporary sibling folder, evaluate it from disk, then swap it in atomically."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": IMAGE_SIZE},
            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
            image_mean=OPENAI_CLIP_MEAN,
            image_std=OPENAI_CLIP_STD,
        )
        model.save_pretrained(tmp)
        CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(tmp)
        results = evaluate(tmp, args)
        meta = {
            "command": command_line(args),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "vocab_size": len(tokenizer),
            "pretrain_images": len(load_digit_pools()["pretrain"][1]),
            "source_images": len(load_digit_pools()["source"][1]),
            "target_images": len(load_digit_pools()["target"][1]),
            "train_seconds": train_seconds,
            "final_loss": float(np.mean(losses[-max(1, args.log_every) :])),
            "loss_curve": [round(float(np.mean(losses[i : i + 50])), 4) for i in range(0, len(losses), 50)],
            "results": results,
            "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        }
        (tmp / "training_metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
        write_card(tmp, args, results, meta)
        for path in tmp.iterdir():  # mkdtemp and some writers create owner-only files; this is shipped data
            path.chmod(0o644)
        tmp.chmod(0o755)
        if output_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
            os.replace(output_dir, old / output_dir.name)
            os.replace(tmp, output_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, output_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--output_dir", type=Path, default=TINY_CLIP_PATH)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--prompt_fraction", type=float, default=0.5, help="share of captions that are the plain prompt")
    p.add_argument("--plain_fraction", type=float, default=0.4, help="share of steps (first) with plain prompts only")
    p.add_argument("--weight_decay", type=float, default=0.05)
    p.add_argument("--patch_size", type=int, default=8)
    p.add_argument("--vision_hidden", type=int, default=64)
    p.add_argument("--vision_layers", type=int, default=3)
    p.add_argument("--text_hidden", type=int, default=64)
    p.add_argument("--text_layers", type=int, default=2)
    p.add_argument("--projection_dim", type=int, default=64)
    p.add_argument("--ft_epochs", type=int, default=10, help="source-only fine-tune baseline epochs (0: skip)")
    p.add_argument("--ft_lr", type=float, default=3e-4)
    p.add_argument("--ft_seeds", type=int, default=3, help="source-only fine-tune runs (mean, min, max reported)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the model is too small to gain from more)")
    p.add_argument("--log_every", type=int, default=100)
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 2:
        p.error("--steps must be >= 1 and --batch_size >= 2 (the contrastive loss needs negatives).")
    if IMAGE_SIZE % args.patch_size:
        p.error(f"--patch_size must divide the image size {IMAGE_SIZE}.")
    return args


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer(tokenizer_corpus(np.random.default_rng(args.seed)))
    model = build_model(len(tokenizer), tokenizer, args)
    print(f"tokenizer: {len(tokenizer)} tokens; model: {sum(p.numel() for p in model.parameters()):,} parameters")
    start = time.time()
    losses = pretrain(model, tokenizer, args)
    results = save_folder(model, tokenizer, args.output_dir, args, losses, time.time() - start)
    for k, v in results.items():
        print(f"{k}: {100 * v:.1f} %")
    return results


if __name__ == "__main__":
    main()
