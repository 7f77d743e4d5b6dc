"""An embedded, offline default task: a domain shift built from scikit-learn's handwritten digits.

The paper's benchmarks (Office-Home, VisDA, ...) and CLIP checkpoints cannot be downloaded here, yet the
whole pipeline must run end to end. This module builds the smallest task that still *is* a domain-adaptation
problem on real data:

* **Data.** The 1797 real 8x8 digits of ``sklearn.datasets.load_digits`` are split once, class-stratified and
  with a fixed seed, into three disjoint pools: ``pretrain`` (50 %, only for the contrastive pretraining of
  the shipped tiny CLIP), ``source`` (25 %) and ``target`` (25 %). The split never depends on the style seed,
  so no seed can leak pretraining images into the adaptation task.
* **Styles.** Every digit is rendered to a 32x32 RGB image by one vectorised, seedable renderer
  (:func:`render_digits`). The *clean* style (the source domain, like MNIST) is a centred white digit on
  black. The *styled* style (the target domain, like SVHN) draws each image's look at random: rotation, shear,
  scale and shift, bold and blurred strokes, foreground/background colours from a named palette (often dark
  on light), a brightness gradient and pixel noise. The *mixed* style (pretraining only) samples each factor
  independently over a broad range, like the variety of web images CLIP is trained on.
* **Model.** ``TINY_CLIP_PATH`` is a tiny HF ``CLIPModel`` (+ CLIP BPE tokenizer and image processor)
  pretrained contrastively by ``recipes/pretrain_tiny_clip.py`` on captioned *mixed* renders of the pretrain
  pool. Its zero-shot teacher with the release's digits prompt ``DIGITS_PROMPT`` is useful but imperfect on the
  styled domain, and a classifier trained on clean digits only transfers imperfectly to it: the gap CMKD is
  meant to close. The measured numbers are in the model folder's README.md.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DIGITS_PROMPT",
    "DIGIT_CLASSES",
    "DIGIT_WORDS",
    "DOMAIN_NAMES",
    "IMAGE_SIZE",
    "PALETTE",
    "STYLES",
    "TASK_CLASSES",
    "TINY_CLIP_PATH",
    "digits_to_pil",
    "load_digit_pools",
    "make_digits_shift",
    "needs_render",
    "render_digits",
    "sample_styles",
    "split_digit_pools",
    "write_digits_shift_imagefolder",
]

TINY_CLIP_PATH: Path = Path(__file__).resolve().parent / "assets" / "tiny_clip_digits"
"""The shipped tiny CLIP (safetensors + tokenizer + image processor), installed as package data."""

DIGIT_CLASSES: list[str] = [str(d) for d in range(10)]
"""How the tiny CLIP's pretraining captions name the digits 0..9."""
TASK_CLASSES: list[str] = [*DIGIT_CLASSES[:8], "acht", "neun"]
"""The label names of the demo task (class folders, ``ClassLabel``). Classes 8 and 9 carry names the tiny CLIP never
read (German for eight and nine), as a real label set holds names that CLIP's captions rarely contain: its zero-shot
teacher cannot name these two classes, the source labels can. This is what leaves CMKD room to beat both zero-shot
CLIP and source-only training here (docs/cmkd.md, "The embedded demo")."""
DIGIT_WORDS: list[str] = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGITS_PROMPT: str = 'a photo of the number: "{}"'
"""The prompt the authors' release uses for its digits benchmarks (format with a class name)."""

IMAGE_SIZE: int = 32
STYLES: tuple[str, ...] = ("clean", "styled", "mixed")
DOMAIN_NAMES: dict[str, str] = {"source": "clean", "target": "styled"}
"""Role -> style/domain folder name written by :func:`write_digits_shift_imagefolder`."""

SPLIT_SEED = 1234
POOL_FRACTIONS: dict[str, float] = {"pretrain": 0.5, "source": 0.25, "target": 0.25}

PALETTE: dict[str, tuple[float, float, float]] = {
    "black": (0.0, 0.0, 0.0),
    "white": (1.0, 1.0, 1.0),
    "red": (0.85, 0.12, 0.12),
    "green": (0.12, 0.62, 0.22),
    "blue": (0.15, 0.25, 0.85),
    "yellow": (0.95, 0.85, 0.15),
    "orange": (1.0, 0.55, 0.05),
    "purple": (0.55, 0.15, 0.7),
    "pink": (1.0, 0.55, 0.72),
    "gray": (0.5, 0.5, 0.5),
    "brown": (0.5, 0.3, 0.1),
    "cyan": (0.1, 0.8, 0.85),
}
"""Named colours, so that pretraining captions can say what colour a digit and its background are."""

_PALETTE_RGB = torch.tensor(list(PALETTE.values()))
_LUMA = torch.tensor([0.299, 0.587, 0.114])
_IMAGEFOLDER_MARKER = ".digits_shift.json"
_IMAGEFOLDER_VERSION = 2  # 2: classes 8 and 9 are named by TASK_CLASSES


# ----------------------------------------------------------------------------------------------- data pools
def split_digit_pools() -> dict[str, np.ndarray]:
    """Indices into ``load_digits()`` of the disjoint ``pretrain``, ``source`` and ``target`` pools.

    Class-stratified (each pool keeps the 10 classes balanced) and fixed by ``SPLIT_SEED`` so that the shipped
    model's pretraining images can never be source or target images. Indices are sorted within each pool.
    """
    from sklearn.datasets import load_digits

    labels = load_digits().target
    rng = np.random.default_rng(SPLIT_SEED)
    pools: dict[str, list[int]] = {name: [] for name in POOL_FRACTIONS}
    for c in range(len(DIGIT_CLASSES)):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_pre = round(len(idx) * POOL_FRACTIONS["pretrain"])
        n_src = round(len(idx) * POOL_FRACTIONS["source"])
        pools["pretrain"] += idx[:n_pre].tolist()
        pools["source"] += idx[n_pre : n_pre + n_src].tolist()
        pools["target"] += idx[n_pre + n_src :].tolist()
    return {name: np.sort(np.asarray(idx, dtype=np.int64)) for name, idx in pools.items()}


def load_digit_pools() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{pool: (digits, labels)}`` with digits as float tensors of shape (N, 8, 8) in [0, 1]."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    images = torch.from_numpy(raw.images.astype(np.float32) / 16.0)
    labels = torch.from_numpy(raw.target.astype(np.int64))
    return {name: (images[idx], labels[idx]) for name, idx in split_digit_pools().items()}


# ----------------------------------------------------------------------------------------------- styles
def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def _colour_pairs(n: int, generator: torch.Generator, min_contrast: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (foreground, background) palette indices whose luminances differ by at least ``min_contrast``."""
    luma = _PALETTE_RGB @ _LUMA
    ok = (luma[:, None] - luma[None, :]).abs() >= min_contrast
    pairs = ok.nonzero()
    pick = pairs[torch.randint(len(pairs), (n,), generator=generator)]
    return pick[:, 0], pick[:, 1]


def sample_styles(style: str, n: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Draw ``n`` per-image style parameters for ``style`` (one of :data:`STYLES`).

    Keys: ``angle`` (degrees), ``shear``, ``scale``, ``shift`` (N, 2; normalised coordinates), ``bold``,
    ``blur``, ``gradient``, ``noise`` (strengths), ``fg``/``bg`` (palette indices), ``grad_dir`` (radians),
    ``noise_seed``. ``clean`` uses no randomness; the others are reproducible from ``generator``.
    """
    if style not in STYLES:
        raise ValueError(f"Unknown style {style!r}; choose one of {STYLES}.")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    white, black = list(PALETTE).index("white"), list(PALETTE).index("black")
    zeros = torch.zeros(n)
    if style == "clean":
        return {
            "angle": zeros,
            "shear": zeros,
            "scale": torch.ones(n),
            "shift": torch.zeros(n, 2),
            "bold": zeros,
            "blur": zeros,
            "gradient": zeros,
            "noise": zeros,
            "fg": torch.full((n,), white),
            "bg": torch.full((n,), black),
            "grad_dir": zeros,
            "noise_seed": torch.zeros(n, dtype=torch.int64),
        }
    if style == "styled":
        # SVHN-like: every factor is on at once, with colour pairs of moderate contrast.
        fg, bg = _colour_pairs(n, g, min_contrast=0.25)
        return {
            "angle": _uniform(n, -25.0, 25.0, g),
            "shear": _uniform(n, -0.3, 0.3, g),
            "scale": _uniform(n, 0.75, 1.0, g),
            "shift": _uniform(2 * n, -0.12, 0.12, g).view(n, 2),
            "bold": _uniform(n, 0.5, 1.0, g),
            "blur": _uniform(n, 0.4, 1.0, g),
            "gradient": _uniform(n, 0.2, 0.6, g),
            "noise": _uniform(n, 0.04, 0.10, g),
            "fg": fg,
            "bg": bg,
            "grad_dir": _uniform(n, 0.0, 2 * np.pi, g),
            "noise_seed": torch.randint(2**62, (n,), generator=g),
        }

    # "mixed": each factor independently off or on over a broad range (pretraining, like web data).
    def sometimes(values: torch.Tensor, p: float) -> torch.Tensor:
        on = torch.rand(n, generator=g) < p
        return torch.where(on.view(n, *([1] * (values.ndim - 1))), values, torch.zeros_like(values))

    kind = torch.rand(n, generator=g)
    fg, bg = _colour_pairs(n, g, min_contrast=0.2)
    fg = torch.where(kind < 0.3, white, torch.where(kind < 0.45, black, fg))
    bg = torch.where(kind < 0.3, black, torch.where(kind < 0.45, white, bg))
    return {
        "angle": sometimes(_uniform(n, -30.0, 30.0, g), 0.5),
        "shear": sometimes(_uniform(n, -0.35, 0.35, g), 0.5),
        "scale": 1.0 - sometimes(_uniform(n, 0.0, 0.3, g), 0.5),
        "shift": sometimes(_uniform(2 * n, -0.15, 0.15, g).view(n, 2), 0.5),
        "bold": sometimes(_uniform(n, 0.0, 1.0, g), 0.5),
        "blur": sometimes(_uniform(n, 0.0, 1.0, g), 0.5),
        "gradient": sometimes(_uniform(n, 0.0, 0.7, g), 0.4),
        "noise": sometimes(_uniform(n, 0.0, 0.15, g), 0.5),
        "fg": fg,
        "bg": bg,
        "grad_dir": _uniform(n, 0.0, 2 * np.pi, g),
        "noise_seed": torch.randint(2**62, (n,), generator=g),
    }


def _gaussian_blur(x: torch.Tensor, sigma: float = 1.2) -> torch.Tensor:
    radius = 2
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))


def render_digits(digits: torch.Tensor, styles: dict[str, torch.Tensor], size: int = IMAGE_SIZE) -> torch.Tensor:
    """Render (N, 8, 8) digits in [0, 1] to (N, 3, size, size) RGB images in [0, 1] with per-image ``styles``.

    One affine resampling (bilinear) upsamples and rotates/shears/scales/shifts the stroke mask; strokes are
    then thickened (3x3 max filter) and blurred (Gaussian) by per-image blends, composited as foreground colour
    over a background with a brightness gradient, and noised. Pixel noise comes from each image's own seed so an
    image does not depend on which batch it was rendered in.
    """
    if digits.ndim != 3 or digits.shape[1:] != (8, 8):
        raise ValueError(f"digits must have shape (N, 8, 8), got {tuple(digits.shape)}.")
    n = digits.shape[0]
    if n == 0:
        return torch.zeros(0, 3, size, size)
    s = {k: v.float() if k not in ("fg", "bg", "noise_seed") else v for k, v in styles.items()}
    a = torch.deg2rad(s["angle"])
    cos, sin = torch.cos(a), torch.sin(a)
    # affine_grid maps output to input coordinates: the inverse of "shear, then rotate, then scale".
    rot = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)
    shear = torch.eye(2).repeat(n, 1, 1)
    shear[:, 0, 1] = -s["shear"]
    lin = shear @ rot / s["scale"].view(n, 1, 1)
    theta = torch.cat([lin, -(lin @ s["shift"].unsqueeze(-1))], dim=-1)
    grid = F.affine_grid(theta, [n, 1, size, size], align_corners=False)
    mask = F.grid_sample(digits.unsqueeze(1).float(), grid, mode="bilinear", align_corners=False)

    bold = s["bold"].view(n, 1, 1, 1)
    mask = (1 - bold) * mask + bold * F.max_pool2d(mask, 3, stride=1, padding=1)
    blur = s["blur"].view(n, 1, 1, 1)
    mask = ((1 - blur) * mask + blur * _gaussian_blur(mask)).clamp(0, 1)

    coords = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    ramp = torch.cos(s["grad_dir"]).view(n, 1, 1) * xx + torch.sin(s["grad_dir"]).view(n, 1, 1) * yy
    fg = _PALETTE_RGB[s["fg"]].view(n, 3, 1, 1)
    bg = _PALETTE_RGB[s["bg"]].view(n, 3, 1, 1) + 0.5 * s["gradient"].view(n, 1, 1, 1) * ramp.unsqueeze(1)
    image = bg * (1 - mask) + fg * mask

    noise_std = s["noise"]
    if bool((noise_std > 0).any()):
        noise = torch.stack(
            [
                torch.randn(3, size, size, generator=torch.Generator().manual_seed(int(seed)))
                if std > 0
                else torch.zeros(3, size, size)
                for seed, std in zip(s["noise_seed"].tolist(), noise_std.tolist())
            ]
        )
        image = image + noise_std.view(n, 1, 1, 1) * noise
    return image.clamp(0, 1)


def digits_to_pil(images: torch.Tensor) -> list:
    """(N, 3, H, W) float images in [0, 1] -> list of RGB ``PIL.Image`` (rounded to uint8)."""
    from PIL import Image

    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a, mode="RGB") for a in arr]


# ----------------------------------------------------------------------------------------------- datasets
def _domain_images(seed: int) -> dict[str, tuple[list, list[int]]]:
    """``{role: (PIL images, labels)}``: the source pool rendered clean, the target pool rendered styled."""
    pools = load_digit_pools()
    out = {}
    for role, style in DOMAIN_NAMES.items():
        digits, labels = pools[role]
        generator = torch.Generator().manual_seed(seed)
        images = render_digits(digits, sample_styles(style, len(digits), generator))
        out[role] = (digits_to_pil(images), labels.tolist())
    return out


def make_digits_shift(seed: int = 0):
    """The digits domain shift as a ``datasets.DatasetDict`` with splits ``"source"`` (clean) and ``"target"``
    (styled); features ``image`` (PIL RGB, 32x32) and ``label`` (``ClassLabel`` named by :data:`TASK_CLASSES`).

    ``seed`` only changes the random look of the styled images; which digits are in which pool is fixed (see
    :func:`split_digit_pools`), and row ``i`` of a split is digit ``split_digit_pools()[role][i]``. As in the
    paper, the whole target split is both the unlabeled training set and the evaluation set.
    """
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image

    features = Features({"image": Image(), "label": ClassLabel(names=TASK_CLASSES)})
    return DatasetDict(
        {
            role: Dataset.from_dict({"image": images, "label": labels}, features=features)
            for role, (images, labels) in _domain_images(seed).items()
        }
    )


def write_digits_shift_imagefolder(root: str | os.PathLike, seed: int = 0) -> Path:
    """Write the task as ``root/<domain>/<class>/<index>.png`` for domains ``clean`` and ``styled``.

    The layout is the one ``datasets.load_dataset("imagefolder", data_dir=root / domain)`` and the recipes read
    for real benchmarks (class = folder name), so the embedded default exercises the same code path. ``index``
    is the digit's index in ``load_digits()``. Atomic: everything is written to a temporary sibling directory
    that is renamed to ``root`` at the end. If ``root`` already holds this task for the same ``seed`` (see the
    hidden ``.digits_shift.json`` marker), it is returned unchanged, which also makes concurrent writers safe. A
    render of the same seed by an older version of this module is replaced, so a reused folder never holds a
    stale task.
    """
    root = Path(root)
    meta = _marker_for(seed)
    stale = False
    if root.exists() and not (root.is_dir() and not any(root.iterdir())):  # an empty directory is replaced
        if _marker_matches(root, meta):
            return root
        stale = _is_older_render(root, meta)
        if not stale:
            raise FileExistsError(
                f"{root} already exists and is not the digits-shift task for seed={seed}; "
                "pass a new directory or remove the existing one."
            )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        pools = split_digit_pools()
        for role, (images, labels) in _domain_images(seed).items():
            for image, label, index in zip(images, labels, pools[role].tolist()):
                class_dir = tmp / DOMAIN_NAMES[role] / TASK_CLASSES[label]
                class_dir.mkdir(parents=True, exist_ok=True)
                image.save(class_dir / f"{index:04d}.png")
        (tmp / _IMAGEFOLDER_MARKER).write_text(json.dumps(meta))
        if stale:  # move the old render aside, put the new one in place, then delete the old one
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
            os.replace(root, old / root.name)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, root)
        except OSError:
            # Another writer won the race; fine if it wrote the same task.
            if _marker_matches(root, meta):
                return root
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def needs_render(root: str | os.PathLike, seed: int = 0) -> bool:
    """Whether :func:`write_digits_shift_imagefolder` would write ``root``: it is missing or empty, or it holds a
    render of this task by an older version of this module."""
    root = Path(root)
    if not root.exists() or (root.is_dir() and not any(root.iterdir())):
        return True
    return _is_older_render(root, _marker_for(seed))


def _marker_for(seed: int) -> dict:
    """What the marker of a render of this task for ``seed`` by this version of the module holds."""
    return {"version": _IMAGEFOLDER_VERSION, "seed": int(seed), "split_seed": SPLIT_SEED}


def _read_marker(root: Path) -> dict | None:
    try:
        marker = json.loads((root / _IMAGEFOLDER_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _marker_matches(root: Path, meta: dict) -> bool:
    return _read_marker(root) == meta


def _is_older_render(root: Path, meta: dict) -> bool:
    """``root`` holds this task for the same seed and split, rendered by an older version of this module."""
    marker = _read_marker(root)
    if marker is None or not isinstance(marker.get("version"), int):
        return False
    same_task = {k: marker.get(k) for k in ("seed", "split_seed")} == {k: meta[k] for k in ("seed", "split_seed")}
    return same_task and marker["version"] < meta["version"]
