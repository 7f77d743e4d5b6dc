"""A benchmark preset's transforms, by name from ``cmkd.transforms`` (the one transform stack): the preset's
``augmentation`` section names the release pipelines, sized and normalised for the loaded CLIP."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

from cmkd.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    build_transform,
    image_size_from_processor,
    normalization_from_processor,
)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "FixMatchViews",
    "build_transform",
    "eval_transform",
    "normalization_from_processor",
    "train_transform",
]


class FixMatchViews:
    """Returns ``(weak(img), strong(img))``: the target sample for the FixMatch variant."""

    def __init__(self, weak: Callable, strong: Callable) -> None:
        self.weak = weak
        self.strong = strong

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        return self.weak(img), self.strong(img)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(weak={self.weak!r}, strong={self.strong!r})"


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
