"""Image transforms of the paper's release, by name, for datasets feeding `CMKDTrainer`.

One registry, ``TRANSFORMS``, maps a name (usable from a YAML preset) to a builder ``(image_size, mean, std) -> list
of transforms``; `build_transform` composes one. Each preset reproduces a pipeline of the authors' release
(shared/reference/official-implementation.md, "Data augmentation"). Sizes scale with ``image_size`` (the release's
256/224 resize-then-crop ratio is kept), so tiny test models with 16 px input reuse the same presets. Mean/std
default to CLIP's and can be read from a Hugging Face image processor (`normalization_from_processor`).

Every transform here is a picklable object (no lambdas), so DataLoader workers can receive it under any start
method. The FixMatch strong view uses timm's RandAugment (``rand-n2-m10-mstd0.5``), exactly as the release does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torchvision import transforms as T
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "REFERENCE_SIZE",
    "RELEASE_RAND_AUGMENT",
    "TRANSFORMS",
    "ToRGB",
    "build_transform",
    "image_size_from_processor",
    "normalization_from_processor",
    "rand_augment",
    "register_transform",
]

CLIP_MEAN: tuple[float, float, float] = tuple(OPENAI_CLIP_MEAN)
CLIP_STD: tuple[float, float, float] = tuple(OPENAI_CLIP_STD)
REFERENCE_SIZE = 224
"""The release's input size; other sizes scale the release's resize sizes by ``image_size / 224``."""
RELEASE_RAND_AUGMENT = "rand-n2-m10-mstd0.5"
"""timm RandAugment config of the release's FixMatch strong view: 2 ops, magnitude 10 with std 0.5, p=0.5 each."""

Builder = Callable[[int, Sequence[float], Sequence[float]], list]


class ToRGB:
    """``PIL.Image.convert("RGB")`` as a picklable transform; anything without ``convert`` passes through."""

    def __call__(self, img: Any) -> Any:
        if hasattr(img, "convert") and getattr(img, "mode", "RGB") != "RGB":
            return img.convert("RGB")
        return img

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def rand_augment(
    image_size: int, mean: Sequence[float] = CLIP_MEAN, config: str = RELEASE_RAND_AUGMENT
) -> Callable[[Any], Any]:
    """timm's RandAugment on PIL images, with the hyper-parameters timm's ``create_transform`` derives from the input:
    translations up to 45% of ``image_size`` and the normalisation mean as fill colour."""
    from timm.data.auto_augment import rand_augment_transform

    hparams = {
        "translate_const": int(image_size * 0.45),
        "img_mean": tuple(min(255, round(255 * m)) for m in mean),
    }
    return rand_augment_transform(config, hparams)


def _scaled(size: int, reference: int) -> int:
    """``reference`` pixels at 224 input, scaled to ``size`` (e.g. 256 -> 37 for 32x32 models)."""
    return max(1, round(reference * size / REFERENCE_SIZE))


def _finish(mean: Sequence[float], std: Sequence[float]) -> list:
    return [T.ToTensor(), T.Normalize(mean=tuple(mean), std=tuple(std))]


def _office_train(s: int, mean, std) -> list:
    # release: RGB, Resize((256, 256)), RandomCrop(224), RandomHorizontalFlip, normalise
    r = _scaled(s, 256)
    return [ToRGB(), T.Resize((r, r)), T.RandomCrop(s), T.RandomHorizontalFlip(), *_finish(mean, std)]


def _office_test(s: int, mean, std) -> list:
    # release: RGB, Resize((224, 224)), normalise (the paper's text writes Resize(224))
    return [ToRGB(), T.Resize((s, s)), *_finish(mean, std)]


def _visda_train(s: int, mean, std) -> list:
    # release: Resize((224, 224)), RandomHorizontalFlip, CenterCrop(224), normalise
    return [ToRGB(), T.Resize((s, s)), T.RandomHorizontalFlip(), T.CenterCrop(s), *_finish(mean, std)]


def _visda_test(s: int, mean, std) -> list:
    # release: Resize((224, 224)), CenterCrop(224), normalise
    return [ToRGB(), T.Resize((s, s)), T.CenterCrop(s), *_finish(mean, std)]


def _digits_train(s: int, mean, std) -> list:
    # release: RGB, RandomResizedCrop(224, scale=(0.75, 1.2)), normalise
    return [ToRGB(), T.RandomResizedCrop(s, scale=(0.75, 1.2)), *_finish(mean, std)]


def _digits_usps_source(s: int, mean, std) -> list:
    # release, USPS as source: RGB, Resize(28), Pad(4), RandomCrop(28), RandomRotation(10), Resize(224), normalise.
    # 28 is the digits' native resolution, so it does not scale with the model's input size.
    return [ToRGB(), T.Resize(28), T.Pad(4), T.RandomCrop(28), T.RandomRotation(10), T.Resize(s), *_finish(mean, std)]


def _digits_test(s: int, mean, std) -> list:
    # release: RGB, Resize(224), normalise (digit images are square)
    return [ToRGB(), T.Resize(s), *_finish(mean, std)]


def _fixmatch_strong(s: int, mean, std) -> list:
    # paper Appendix B + release: RGB, Resize(224), CenterCrop(224), HFlip, ColorJitter(0.4, 0.4, 0.4, 0),
    # timm RandAugment('rand-n2-m10-mstd0.5'), normalise
    return [
        ToRGB(),
        T.Resize(s),
        T.CenterCrop(s),
        T.RandomHorizontalFlip(),
        T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.0),
        rand_augment(s, mean),
        *_finish(mean, std),
    ]


TRANSFORMS: dict[str, Builder] = {
    "office_train": _office_train,
    "office_test": _office_test,
    "clip_train": _office_train,  # the release's default for natural-image benchmarks
    "clip_test": _office_test,
    "visda_train": _visda_train,
    "visda_test": _visda_test,
    "digits_train": _digits_train,
    "digits_usps_source": _digits_usps_source,
    "digits_test": _digits_test,
    "fixmatch_strong": _fixmatch_strong,
}
"""Transform name -> builder ``(image_size, mean, std) -> list of transforms`` (see `build_transform`)."""


def register_transform(name: str, builder: Builder, overwrite: bool = False) -> None:
    """Make ``name`` usable in `build_transform` (and so in YAML presets). The builder must return picklable
    transforms if the data is loaded by DataLoader workers."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a transform name must be a non-empty string, got {name!r}.")
    if not callable(builder):
        raise TypeError(f"builder for {name!r} must be callable (image_size, mean, std) -> list of transforms.")
    if name in TRANSFORMS and not overwrite:
        raise ValueError(f"transform {name!r} is already registered; pass overwrite=True to replace it.")
    TRANSFORMS[name] = builder


def build_transform(
    name: str,
    image_size: int = REFERENCE_SIZE,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> T.Compose:
    """The transform registered as ``name`` at ``image_size`` with the given normalisation: PIL image in, float
    tensor (3, image_size, image_size) out."""
    if name not in TRANSFORMS:
        raise ValueError(f"unknown transform {name!r}; available: {', '.join(sorted(TRANSFORMS))}.")
    if isinstance(image_size, bool) or int(image_size) != image_size or int(image_size) <= 0:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}.")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got {tuple(mean)} and {tuple(std)}.")
    if any(s <= 0 for s in std):
        raise ValueError(f"std values must be positive, got {tuple(std)}.")
    return T.Compose(TRANSFORMS[name](int(image_size), tuple(mean), tuple(std)))


def normalization_from_processor(processor: Any | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` of a Hugging Face image processor (or a processor wrapping one); CLIP's when None."""
    if processor is None:
        return CLIP_MEAN, CLIP_STD
    proc = getattr(processor, "image_processor", processor)
    mean, std = getattr(proc, "image_mean", None), getattr(proc, "image_std", None)
    if mean is None or std is None:
        raise ValueError(f"{type(proc).__name__} has no image_mean/image_std; pass mean and std explicitly.")
    if isinstance(mean, (int, float)):
        mean = (mean,) * 3
    if isinstance(std, (int, float)):
        std = (std,) * 3
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def image_size_from_processor(processor: Any | None, default: int = REFERENCE_SIZE) -> int:
    """The square input size an HF image processor produces (``crop_size``, then ``size``); ``default`` if None."""
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
