"""Augmentation presets of the paper's release, parameterised by image size and normalisation.

Each preset reproduces one pipeline of the authors' release (see shared/reference/official-implementation.md,
"Data augmentation"); sizes scale with ``image_size`` so tiny test models with 32x32 input reuse the same presets
(the 256/224 resize-then-crop ratio is kept). Mean/std default to CLIP's and can be taken from a Hugging Face image
processor so a non-CLIP checkpoint is normalised the way it was trained.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torchvision import transforms as T

from cmkd.fixmatch import RandAugmentMstd  # the release's rand-n2-m10-mstd0.5, one implementation

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
REFERENCE_SIZE = 224  # the release's input size; other sizes scale the release's resize sizes by size / 224


class ToRGB:
    """``PIL.Image.convert("RGB")`` as a picklable transform (DataLoader workers cannot pickle lambdas)."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.convert("RGB") if img.mode != "RGB" else img

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}()"


class FixMatchViews:
    """Returns ``(weak(img), strong(img))``: the target sample for the FixMatch variant."""

    def __init__(self, weak: Callable, strong: Callable) -> None:
        self.weak = weak
        self.strong = strong

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        return self.weak(img), self.strong(img)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(weak={self.weak!r}, strong={self.strong!r})"


def _scaled(size: int, reference: int) -> int:
    """``reference`` pixels at 224 input, scaled to ``size`` (e.g. 256 -> 37 for 32x32 models)."""
    return max(1, round(reference * size / REFERENCE_SIZE))


def _finish(mean: Sequence[float], std: Sequence[float]) -> list:
    return [T.ToTensor(), T.Normalize(mean=tuple(mean), std=tuple(std))]


def _office_train(s, mean, std):
    # release: RGB, Resize((256, 256)), RandomCrop(224), RandomHorizontalFlip, normalise
    r = _scaled(s, 256)
    return [ToRGB(), T.Resize((r, r)), T.RandomCrop(s), T.RandomHorizontalFlip(), *_finish(mean, std)]


def _office_test(s, mean, std):
    # release: RGB, Resize((224, 224)), normalise (the paper's text writes Resize(224))
    return [ToRGB(), T.Resize((s, s)), *_finish(mean, std)]


def _visda_train(s, mean, std):
    # release: Resize((224, 224)), RandomHorizontalFlip, CenterCrop(224), normalise
    return [ToRGB(), T.Resize((s, s)), T.RandomHorizontalFlip(), T.CenterCrop(s), *_finish(mean, std)]


def _visda_test(s, mean, std):
    # release: Resize((224, 224)), CenterCrop(224), normalise
    return [ToRGB(), T.Resize((s, s)), T.CenterCrop(s), *_finish(mean, std)]


def _digits_train(s, mean, std):
    # release: RGB, RandomResizedCrop(224, scale=(0.75, 1.2)), normalise
    return [ToRGB(), T.RandomResizedCrop(s, scale=(0.75, 1.2)), *_finish(mean, std)]


def _digits_usps_source(s, mean, std):
    # release, USPS as source: RGB, Resize(28), Pad(4), RandomCrop(28), RandomRotation(10), Resize(224), normalise.
    # 28 is the digits' native resolution, so it does not scale with the model's input size.
    return [
        ToRGB(),
        T.Resize(28),
        T.Pad(4),
        T.RandomCrop(28),
        T.RandomRotation(10),
        T.Resize(s),
        *_finish(mean, std),
    ]


def _digits_test(s, mean, std):
    # release: RGB, Resize(224), normalise (digit images are square)
    return [ToRGB(), T.Resize(s), *_finish(mean, std)]


def _fixmatch_strong(s, mean, std):
    # paper Appendix B + release: RGB, Resize(224), CenterCrop(224), HFlip, ColorJitter(0.4, 0.4, 0.4, 0),
    # RandAugment('rand-n2-m10-mstd0.5'), normalise
    return [
        ToRGB(),
        T.Resize(s),
        T.CenterCrop(s),
        T.RandomHorizontalFlip(),
        T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.0),
        RandAugmentMstd(num_ops=2, magnitude=10.0, magnitude_std=0.5),
        *_finish(mean, std),
    ]


PRESETS: dict[str, Callable[[int, Sequence[float], Sequence[float]], list]] = {
    "office_train": _office_train,
    "office_test": _office_test,
    "visda_train": _visda_train,
    "visda_test": _visda_test,
    "digits_train": _digits_train,
    "digits_usps_source": _digits_usps_source,
    "digits_test": _digits_test,
    "fixmatch_strong": _fixmatch_strong,
}


def build_transform(
    preset: str,
    image_size: int = REFERENCE_SIZE,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> T.Compose:
    """One of :data:`PRESETS` at ``image_size`` with the given normalisation. PIL image in, float tensor out."""
    if preset not in PRESETS:
        raise ValueError(f"unknown augmentation preset {preset!r}; available: {', '.join(sorted(PRESETS))}")
    if int(image_size) <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got {mean} and {std}")
    return T.Compose(PRESETS[preset](int(image_size), mean, std))


def normalization_from_processor(processor: Any | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` of a Hugging Face image processor (or a processor wrapping one); CLIP's when None."""
    if processor is None:
        return CLIP_MEAN, CLIP_STD
    proc = getattr(processor, "image_processor", processor)
    mean, std = getattr(proc, "image_mean", None), getattr(proc, "image_std", None)
    if mean is None or std is None:
        raise ValueError(f"{type(proc).__name__} has no image_mean/image_std; pass mean and std explicitly")
    if isinstance(mean, (int, float)):
        mean = (mean,) * 3
    if isinstance(std, (int, float)):
        std = (std,) * 3
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def image_size_from_processor(processor: Any | None, default: int = REFERENCE_SIZE) -> int:
    """The square input size an HF image processor crops to (``crop_size`` then ``size``)."""
    if processor is None:
        return default
    proc = getattr(processor, "image_processor", processor)
    for attr in ("crop_size", "size"):
        value = getattr(proc, attr, None)
        if value is None:
            continue
        if isinstance(value, int):
            return value
        for key in ("height", "shortest_edge"):
            v = value.get(key) if hasattr(value, "get") else getattr(value, key, None)
            if v:
                return int(v)
    return default


def _resolve(benchmark, image_size, mean, std, processor):
    if mean is None or std is None:
        p_mean, p_std = normalization_from_processor(processor)
        mean = p_mean if mean is None else mean
        std = p_std if std is None else std
    if image_size is None:
        image_size = image_size_from_processor(processor, benchmark.augmentation.image_size)
    return image_size, mean, std


def train_transform(
    benchmark,
    domain_key: str,
    role: str,
    *,
    fixmatch: bool = False,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    processor: Any | None = None,
) -> Callable:
    """Training transform for a domain of ``benchmark`` (a BenchmarkConfig) used as ``role`` source/target.

    USPS as *source* gets its own preset (release); with ``fixmatch`` the target returns (weak, strong) views, the
    weak one being the benchmark's ordinary training preset (paper Appendix B).
    """
    if role not in ("source", "target"):
        raise ValueError(f"role must be 'source' or 'target', got {role!r}")
    image_size, mean, std = _resolve(benchmark, image_size, mean, std, processor)
    weak = build_transform(benchmark.augmentation.train_preset(domain_key, role), image_size, mean, std)
    if fixmatch and role == "target":
        return FixMatchViews(weak, build_transform(benchmark.augmentation.strong, image_size, mean, std))
    return weak


def eval_transform(
    benchmark,
    *,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    processor: Any | None = None,
) -> Callable:
    """Evaluation transform of ``benchmark`` (a BenchmarkConfig)."""
    image_size, mean, std = _resolve(benchmark, image_size, mean, std, processor)
    return build_transform(benchmark.augmentation.test, image_size, mean, std)
