"""Label new images with an adapted model: ``python -m cmkd predict --model PATH IMAGES --output CSV``.

Two kinds of trained model are accepted, the two a CMKD run leaves behind:

* a saved :class:`~cmkd.CLIPAdaptationModel` folder (``save_pretrained``; loads with
  ``AutoModelForImageClassification``), and
* a base model plus an adapter folder (RST or any peft adapter) loaded with ``PeftModel.from_pretrained``. The base is
  either a saved ``CLIPAdaptationModel`` folder or a CLIP (Hub id / folder) together with ``--class_names`` and
  ``--prompt_template`` (the lines of the adapter's model card that build ``base``).

Images are read with PIL one by one, so a corrupt or unreadable file becomes a row with an ``error`` and no labels
instead of stopping the run; the rest are classified in batches. The CSV is written atomically at the end.
"""

from __future__ import annotations

import csv
import io
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "PredictArguments",
    "Prediction",
    "collect_images",
    "load_classifier",
    "main",
    "predict_images",
    "write_predictions_csv",
]


@dataclass
class PredictArguments:
    """Arguments of ``python -m cmkd predict`` (parsed with ``transformers.HfArgumentParser``)."""

    model: str = field(
        metadata={
            "help": "saved CLIPAdaptationModel folder (or Hub id); with --adapter, the base: such a folder or a CLIP "
            "plus --class_names and --prompt_template"
        }
    )
    output: str = field(default="predictions.csv", metadata={"help": "CSV to write (atomically)"})
    adapter: str | None = field(default=None, metadata={"help": "peft adapter folder (e.g. an RST adapter)"})
    images: list[str] = field(
        default_factory=list, metadata={"help": "image files or folders (searched recursively); also positional"}
    )
    top_k: int = field(default=5, metadata={"help": "labels (with scores) per image"})
    batch_size: int = field(default=32, metadata={"help": "images per forward pass"})
    class_names: str | None = field(
        default=None,
        metadata={"help": "with a CLIP as --model: class names in label order, comma-separated or a text file"},
    )
    prompt_template: str | None = field(
        default=None, metadata={"help": "with a CLIP as --model: the prompt the adapter was trained with"}
    )
    device: str | None = field(default=None, metadata={"help": "torch device; unset: cuda if available, else cpu"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar (--progress false to hide it)"})

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"--top_k must be >= 1, got {self.top_k}")
        if self.batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {self.batch_size}")


@dataclass
class Prediction:
    """One row of the output: the image and its top-k ``(label, score)`` pairs, or why it could not be read."""

    path: str
    labels: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None


# ---------------------------------------------------------------------------------------------------------- inputs
def _image_suffixes() -> set[str]:
    from PIL import Image

    return {suffix.lower() for suffix in Image.registered_extensions()}


def collect_images(inputs: Iterable[str | Path]) -> list[Path]:
    """Files as given (whatever their suffix) and, for each folder, the image files under it (sorted, recursive).

    A path that does not exist is kept, so it is reported as an error row rather than dropped silently.
    """
    suffixes = _image_suffixes()
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
        else:
            found.append(path)
    return found


def _read_image(path: Path):
    """RGB PIL image, or the reason it cannot be read (never raises for a bad file)."""
    from PIL import Image, ImageOps

    if not path.is_file():
        return None, "file not found" if not path.exists() else "not a file"
    try:
        with Image.open(path) as image:
            image.load()
            return ImageOps.exif_transpose(image).convert("RGB"), None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return None, f"{type(exc).__name__}: {exc}"


# ---------------------------------------------------------------------------------------------------------- model
def _class_names(value: str) -> list[str]:
    path = Path(value)
    if path.is_file():
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    else:
        names = [name.strip() for name in value.split(",")]
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"--class_names {value!r} holds no class names")
    return names


def _build_base(model: str, class_names: str | None, prompt_template: str | None):
    """The model an adapter goes onto: a saved CLIPAdaptationModel, or one built from a CLIP (+ class names)."""
    from transformers import AutoConfig

    from .model import CLIPAdaptationConfig, CLIPAdaptationModel

    config = AutoConfig.from_pretrained(model)
    if isinstance(config, CLIPAdaptationConfig):
        if class_names or prompt_template:
            raise ValueError(
                f"{model} is a saved CLIPAdaptationModel: it already holds its class names and prompts; drop "
                "--class_names / --prompt_template"
            )
        return CLIPAdaptationModel.from_pretrained(model)
    if not class_names or not prompt_template:
        raise ValueError(
            f"{model} is a {type(config).__name__}, not a saved CLIPAdaptationModel: pass --class_names and "
            "--prompt_template as in the adapter's model card (the lines that build `base`), or pass a "
            "CLIPAdaptationModel folder as --model"
        )
    return CLIPAdaptationModel.from_clip(model, _class_names(class_names), prompt_template)


def _image_processor(*candidates: str | None):
    """The image processor saved with the model (or adapter, or base CLIP): the first candidate that has one."""
    from transformers import AutoImageProcessor

    errors = []
    for name in candidates:
        if not name:
            continue
        try:
            return AutoImageProcessor.from_pretrained(name)
        except (OSError, ValueError) as exc:
            errors.append(f"{name}: {exc}")
    raise ValueError(
        "no image processor found (preprocessor_config.json / processor_config.json) in "
        f"{', '.join(c for c in candidates if c)}; save the CLIP's processor next to the model, e.g. "
        "AutoImageProcessor.from_pretrained(clip).save_pretrained(folder). Details: " + " | ".join(errors)
    )


def load_classifier(
    model: str,
    adapter: str | None = None,
    class_names: str | None = None,
    prompt_template: str | None = None,
    device: str | torch.device | None = None,
):
    """``(model, image_processor)`` ready for inference (eval mode, on ``device``).

    Without ``adapter``: ``AutoModelForImageClassification.from_pretrained(model)``. With it:
    ``PeftModel.from_pretrained(base, adapter)`` where ``base`` is built by :func:`_build_base`. Either result works in
    ``transformers.pipeline("image-classification", model=..., image_processor=...)``.
    """
    from transformers import AutoModelForImageClassification

    from . import model as _registration  # noqa: F401  (registers CLIPAdaptationModel with the Auto classes)

    if adapter is None:
        if class_names or prompt_template:
            raise ValueError("--class_names / --prompt_template only apply with --adapter (a CLIP base)")
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model)
        if getattr(config, "model_type", None) == "clip":
            raise ValueError(
                f"{model} is a CLIP without a trained task head (loading it would classify with a random head); pass "
                "the adapted model folder, or this CLIP as the base of --adapter"
            )
        classifier = AutoModelForImageClassification.from_pretrained(model)
        processor = _image_processor(model)
    else:
        from peft import PeftModel

        import peft_rst  # noqa: F401  (registers the RST tuner with peft)

        base = _build_base(model, class_names, prompt_template)
        classifier = PeftModel.from_pretrained(base, adapter)
        processor = _image_processor(adapter, model)
    device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return classifier.to(device).eval(), processor


# ---------------------------------------------------------------------------------------------------------- predict
def _config(model):
    return model.get_base_model().config if hasattr(model, "get_base_model") else model.config


@torch.no_grad()
def predict_images(
    model,
    image_processor,
    paths: Sequence[str | Path],
    top_k: int = 5,
    batch_size: int = 32,
    progress: bool = True,
) -> Iterator[Prediction]:
    """Top-k labels with softmax scores for each path, in input order; unreadable files yield an ``error``."""
    from tqdm.auto import tqdm

    id2label = _config(model).id2label
    k = min(top_k, len(id2label))
    device = next(model.parameters()).device
    bar = tqdm(total=len(paths), unit="image", desc="predict", disable=not progress)
    pending: list[tuple[str, Any]] = []

    def flush() -> Iterator[Prediction]:
        pixels = image_processor(images=[image for _, image in pending], return_tensors="pt")["pixel_values"]
        logits = model(pixel_values=pixels.to(device)).logits.float()
        scores, ids = logits.softmax(dim=-1).topk(k, dim=-1)
        for (path, _), row_scores, row_ids in zip(pending, scores.tolist(), ids.tolist()):
            yield Prediction(path, [(id2label[i], s) for i, s in zip(row_ids, row_scores)])
        bar.update(len(pending))
        pending.clear()

    try:
        for path in paths:
            image, error = _read_image(Path(path))
            if error is not None:
                # keep input order: rows read before this one are emitted first
                if pending:
                    yield from flush()
                bar.update(1)
                yield Prediction(str(path), error=error)
                continue
            pending.append((str(path), image))
            if len(pending) == batch_size:
                yield from flush()
        if pending:
            yield from flush()
    finally:
        bar.close()


def write_predictions_csv(predictions: Iterable[Prediction], output: str | Path, top_k: int) -> list[Prediction]:
    """CSV with ``path, label_1, score_1, ..., label_k, score_k, error``; written to a temp file, then renamed."""
    from peft_rst.files import atomic_write_text

    rows = list(predictions)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", *[f"{kind}_{i}" for i in range(1, top_k + 1) for kind in ("label", "score")], "error"])
    for row in rows:
        cells: list[Any] = []
        for i in range(top_k):
            cells += [row.labels[i][0], f"{row.labels[i][1]:.6f}"] if i < len(row.labels) else ["", ""]
        writer.writerow([row.path, *cells, row.error or ""])
    atomic_write_text(output, buffer.getvalue())
    return rows


# ---------------------------------------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None = None) -> PredictArguments:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(PredictArguments, prog="python -m cmkd predict", description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="*", metavar="IMAGES_OR_FOLDER", help="image files or folders")
    try:
        args, extra = parser.parse_args_into_dataclasses(args=list(argv) if argv is not None else None)
    except ValueError as exc:  # __post_init__ checks
        parser.error(str(exc))
    args.images = [*args.images, *extra.paths]
    if not args.images:
        parser.error("pass at least one image file or folder (IMAGES_OR_FOLDER)")
    return args


def main(argv: Sequence[str] | None = None) -> list[Prediction]:
    """``python -m cmkd predict``: load, predict, write the CSV, print a summary line (errors listed)."""
    args = parse_args(argv)
    paths = collect_images(args.images)
    if not paths:
        raise SystemExit(f"error: no image files found in {', '.join(args.images)}")
    try:
        model, processor = load_classifier(
            args.model, args.adapter, args.class_names, args.prompt_template, device=args.device
        )
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: cannot load the model: {exc}") from exc
    rows = write_predictions_csv(
        predict_images(model, processor, paths, args.top_k, args.batch_size, progress=args.progress),
        args.output,
        min(args.top_k, len(_config(model).id2label)),
    )
    errors = [r for r in rows if r.error]
    print(f"{len(rows) - len(errors)} images labelled, {len(errors)} unreadable; wrote {args.output}", flush=True)
    for row in errors:
        print(f"  unreadable: {row.path} ({row.error})", file=sys.stderr)
    return rows
