"""Pretrain the tiny CLIP shipped in ``cmkd/assets/tiny_clip_digits`` (the project's offline default model).

CLIP's zero-shot teacher comes from contrastive pretraining on many captioned images of many looks; this script does
that in miniature: (1) a CLIP byte-level BPE tokenizer is learned from the caption words (the real ``CLIPTokenizer``
loads it; the 512 byte symbols cover unseen words); (2) a small ``CLIPModel`` (ViT 32x32 / patch 8, 64-d towers) is
trained with its own contrastive loss (``return_loss=True``) on freshly rendered *mixed*-style images of the
``pretrain`` digit pool, each captioned with its digit and, later in training, often its look; (3) the folder is
saved (safetensors + tokenizer + image processor), re-loaded and evaluated on ``cmkd.toy.make_digits_shift``; the
numbers go to its ``README.md`` and ``training_metadata.json``.

Deterministic on CPU (seeded generators, one thread). The defaults regenerate the shipped folder::

    python recipes/pretrain_tiny_clip.py --output_dir cmkd/assets/tiny_clip_digits
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
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
from transformers.utils.constants import OPENAI_CLIP_MEAN as MEAN
from transformers.utils.constants import OPENAI_CLIP_STD as STD

from cmkd import toy

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
"""Variations that name the digit as a word, the look or the colours, like alt text. In the mix from the first
step, they let the loss fall by matching looks and colours while digits stay near chance; hence the plain-prompt
phase first (``--plain_fraction``)."""
NAMES = list(toy.PALETTE)


# ------------------------------------------------------------------------------------------------- captions
STYLE_WORDS = (
    ("rotated", "angle", 12.0),
    ("slanted", "shear", 0.15),
    ("small", "scale", -0.85),
    ("bold", "bold", 0.6),
    ("blurry", "blur", 0.6),
    ("noisy", "noise", 0.06),
    ("shaded", "gradient", 0.3),
)
"""(word, style key, threshold): the word describes an image whose |value| exceeds the threshold (negative: is below
its magnitude)."""


def style_words(style: dict[str, torch.Tensor], i: int) -> list[str]:
    """Words that describe image ``i``'s look, like the alt text of a web image would (roughly)."""
    words = []
    for word, key, threshold in STYLE_WORDS:
        value = abs(float(style[key][i]))
        if (value > threshold) if threshold > 0 else (value < -threshold):
            words.append(word)
    return words or ["clean"]


def make_captions(
    labels: torch.Tensor, style: dict[str, torch.Tensor], rng: np.random.Generator, prompt_fraction: float
) -> list[str]:
    """One caption per image: the release's digits prompt with probability ``prompt_fraction``, else a variation."""
    captions = []
    for i, label in enumerate(labels.tolist()):
        if rng.random() < prompt_fraction:
            captions.append(toy.DIGITS_PROMPT.format(toy.DIGIT_CLASSES[label]))
            continue
        words = style_words(style, i)
        keep = rng.permutation(len(words))[: rng.integers(1, len(words) + 1)]
        template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
        captions.append(
            template.format(
                d=toy.DIGIT_CLASSES[label],
                w=toy.DIGIT_WORDS[label],
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
    pools = toy.load_digit_pools()
    _, labels = pools["pretrain"]
    idx = torch.from_numpy(rng.integers(len(labels), size=n))
    style = toy.sample_styles("mixed", n, torch.Generator().manual_seed(int(rng.integers(2**31))))
    corpus = make_captions(labels[idx], style, rng, prompt_fraction=0.0)
    corpus += (
        [toy.DIGITS_PROMPT.format(c) for c in toy.DIGIT_CLASSES]
        + [f"a {w[0]} number" for w in STYLE_WORDS]
        + ["a clean number"]
    )
    corpus += [t.replace("{", "").replace("}", "") for t in CAPTION_TEMPLATES] + NAMES + toy.DIGIT_WORDS
    return corpus


# ------------------------------------------------------------------------------------------------- model
def build_model(vocab_size: int, tokenizer: CLIPTokenizer, args: argparse.Namespace) -> CLIPModel:
    heads, mlp = {"num_attention_heads": 4}, 4  # MLP width = 4 x hidden, as in CLIP
    text = dict(vocab_size=vocab_size, hidden_size=args.text_hidden, intermediate_size=mlp * args.text_hidden)
    text |= dict(num_hidden_layers=args.text_layers, max_position_embeddings=MAX_TEXT_LEN, **heads)
    text |= dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    text |= dict(pad_token_id=tokenizer.pad_token_id)
    vision = dict(
        image_size=toy.IMAGE_SIZE, patch_size=args.patch_size, hidden_size=args.vision_hidden, num_channels=3
    )
    vision |= dict(intermediate_size=mlp * args.vision_hidden, num_hidden_layers=args.vision_layers, **heads)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=args.projection_dim)
    return CLIPModel(config)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] images -> CLIP pixel values, quantised to uint8 levels first like a saved PNG would be."""
    images = (images * 255).round() / 255
    return (images - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def pretrain(model: CLIPModel, tokenizer: CLIPTokenizer, args: argparse.Namespace) -> list[float]:
    digits, labels = toy.load_digit_pools()["pretrain"]
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
        style = toy.sample_styles("mixed", args.batch_size, gen)
        pixel_values = normalize(toy.render_digits(digits[idx], style))
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
    prompts = [toy.DIGITS_PROMPT.format(c) for c in toy.DIGIT_CLASSES]
    text = processor(text=prompts, padding=True, truncation=True, return_tensors="pt")
    text_feats = F.normalize(model.get_text_features(**text).pooler_output, dim=-1)
    img = F.normalize(image_features(model, processor, images), dim=-1)
    return float(((img @ text_feats.T).argmax(-1).numpy() == labels).mean())


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    """Logistic regression on frozen (standardised) image embeddings: trained on ``train``, scored on ``test``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return float(
        make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(train_x, train_y).score(test_x, test_y)
    )


def evaluate(model_dir: Path, args: argparse.Namespace) -> dict[str, float]:
    """Zero-shot accuracy per domain, a source-trained linear probe on the target, and (oracle, a separability
    reference) a probe trained on half of the target and scored on the other half. The demo reports the trained
    methods."""
    model = CLIPModel.from_pretrained(model_dir)
    processor = CLIPProcessor.from_pretrained(model_dir)
    shift = toy.make_digits_shift(seed=args.seed)
    data = {role: {"image": list(ds["image"]), "label": list(ds["label"])} for role, ds in shift.items()}
    y = {role: np.asarray(data[role]["label"]) for role in data}
    x = {role: image_features(model, processor, data[role]["image"]).numpy() for role in data}
    results = {f"zero_shot_{r}": zero_shot_accuracy(model, processor, data[r]["image"], y[r]) for r in data}
    results["linear_probe_source_to_target"] = linear_probe(x["source"], y["source"], x["target"], y["target"])
    half = np.random.default_rng(args.seed).permutation(len(y["target"])) < len(y["target"]) // 2
    xt, yt = x["target"], y["target"]
    results["linear_probe_target_oracle"] = linear_probe(xt[half], yt[half], xt[~half], yt[~half])
    return results


# ------------------------------------------------------------------------------------------------- saving
def write_card(out: Path, args: argparse.Namespace, results: dict[str, float], meta: dict) -> None:
    """The model card: how the folder was made and what it scores, so users know what the default can do."""
    rows = "\n".join(f"| `{k}` | {100 * v:.1f} % |" for k, v in results.items())
    card = f"""# tiny_clip_digits

A tiny `transformers.CLIPModel` ({meta["num_parameters"]:,} parameters, fp32 safetensors), the project's offline
default, pretrained from scratch with the model's own contrastive loss on captioned renders of the `pretrain` pool
of scikit-learn's `load_digits` by `recipes/pretrain_tiny_clip.py`. Its zero-shot teacher with the release's digits
prompt `{toy.DIGITS_PROMPT}` is useful but imperfect on the styled target of `cmkd.toy.make_digits_shift`: the gap CMKD
is meant to close.

## How it was made

`{meta["command"]}` (torch {meta["versions"]["torch"]}, transformers {meta["versions"]["transformers"]};
deterministic on one CPU thread: every random draw comes from seeded generators).

- Data: the {meta["pretrain_images"]} `pretrain` digits (disjoint from `source` and `target`), re-rendered at every
  step in the *mixed* style of `cmkd.toy.sample_styles` (see its docstring for which looks it covers).
- Captions: the first {args.plain_fraction:.0%} of the steps use the plain prompt only; afterwards
  {1 - args.prompt_fraction:.0%} are variations from {len(CAPTION_TEMPLATES)} templates naming the digit as a word
  and/or its look and colours (e.g. `the digit seven written in red on a yellow background`).
- Model: ViT {toy.IMAGE_SIZE} px, patch {args.patch_size}, hidden {args.vision_hidden}, {args.vision_layers}
  layers; text hidden {args.text_hidden}, {args.text_layers} layers, max length {MAX_TEXT_LEN},
  {meta["vocab_size"]}-token CLIP byte-level BPE vocabulary; projection {args.projection_dim}; `CLIPImageProcessor`
  with OpenAI CLIP mean/std.
- Optimisation: {args.steps} steps, batch {args.batch_size}, AdamW lr {args.lr} (5 % warm-up, cosine), weight decay
  {args.weight_decay}, gradient clipping 1.0, seed {args.seed}. Final loss {meta["final_loss"]:.3f} (chance: ln
  {args.batch_size} = {math.log(args.batch_size):.2f}; captions of one digit repeat in a batch, so it cannot reach 0).

## Results on the digits domain shift (`make_digits_shift(seed={args.seed})`)

Source: {meta["source_images"]} clean digits; target: {meta["target_images"]} styled digits (the whole set).

| metric | accuracy |
|---|---|
{rows}

`zero_shot_*`: argmax of the cosine similarity with the 10 prompts' text embeddings. `linear_probe_*`: logistic
regression on frozen image embeddings trained on labelled source (scored on the target) or, as a separability
reference, on half of the target (scored on the other half; oracle, uses target labels). The demo
(`python recipes/demo.py`) reports the trained methods: source-only, CMKD and CMKD+RST.

```python
from transformers import CLIPModel, CLIPProcessor
from cmkd.toy import TINY_CLIP_PATH

model, processor = CLIPModel.from_pretrained(TINY_CLIP_PATH), CLIPProcessor.from_pretrained(TINY_CLIP_PATH)
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
    return " ".join(["python recipes/pretrain_tiny_clip.py", f"--output_dir {shown}", *extra])


def save_folder(model, tokenizer, output_dir: Path, args, losses) -> dict[str, float]:
    """Write everything to a temporary sibling folder, evaluate it from disk, then swap it in atomically."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        size, crop = {"shortest_edge": toy.IMAGE_SIZE}, {"height": toy.IMAGE_SIZE, "width": toy.IMAGE_SIZE}
        image_processor = CLIPImageProcessor(size=size, crop_size=crop, image_mean=MEAN, image_std=STD)
        model.save_pretrained(tmp)
        CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(tmp)
        results = evaluate(tmp, args)
        meta = {
            "command": command_line(args),
            "args": {k: v for k, v in vars(args).items() if k != "output_dir"},
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "vocab_size": len(tokenizer),
            **{f"{pool}_images": len(ids) for pool, ids in toy.split_digit_pools().items()},
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
    p.add_argument("--output_dir", type=Path, default=toy.TINY_CLIP_PATH)
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
    p.add_argument("--threads", type=int, default=1, help="torch threads (the model is too small to gain from more)")
    p.add_argument("--log_every", type=int, default=100)
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 2:
        p.error("--steps must be >= 1 and --batch_size >= 2 (the contrastive loss needs negatives).")
    if toy.IMAGE_SIZE % args.patch_size:
        p.error(f"--patch_size must divide the image size {toy.IMAGE_SIZE}.")
    return args


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer(tokenizer_corpus(np.random.default_rng(args.seed)))
    model = build_model(len(tokenizer), tokenizer, args)
    print(f"tokenizer: {len(tokenizer)} tokens; model: {sum(p.numel() for p in model.parameters()):,} parameters")
    losses = pretrain(model, tokenizer, args)
    results = save_folder(model, tokenizer, args.output_dir, args, losses)
    for k, v in results.items():
        print(f"{k}: {100 * v:.1f} %")
    return results


if __name__ == "__main__":
    main()
