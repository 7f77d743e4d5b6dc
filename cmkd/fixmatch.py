"""FixMatch with CMKD (paper App. B, release): weak/strong target views and the two consistency terms.

The target stream yields a weak view (the benchmark's usual train transform) and a strong view of the same image.
Pseudo-labels come from the weak view twice: from the task head (student) for the head logits of the strong view,
and from the zero-shot CLIP head (teacher) for the CLIP-head logits of the strong view. Each term is
``factor * mean_i 1[max p_w >= threshold] CE(strong_i, argmax p_w)`` (`cmkd.loss.fixmatch_loss`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torchvision.transforms import InterpolationMode, RandAugment

from .data import CLIP_MEAN, CLIP_STD
from .loss import fixmatch_loss

__all__ = ["RandAugmentMstd", "fixmatch_terms", "strong_transform"]


class RandAugmentMstd(RandAugment):
    """torchvision RandAugment driven like timm's ``rand-n{N}-m{M}-mstd{S}`` string (what the release uses).

    torchvision's RandAugment has a fixed integer magnitude out of ``num_magnitude_bins`` and always applies its ops.
    timm's, as used by the release (``rand-n2-m10-mstd0.5``), draws the magnitude per op from N(M, S) clipped to
    [0, 10] (10 = strongest) and applies each op with probability 0.5. Here: ``magnitude`` is on timm's 0..10
    scale, mapped onto ``resolution + 1`` torchvision bins (so m=10 is torchvision's strongest setting, not 10 of
    31), redrawn per op with ``magnitude_std``, and each op is applied with ``apply_prob``.
    Differences that remain: the op set is torchvision's (it has Identity; timm has Invert and SolarizeAdd), and
    timm's plain Solarize/Posterize levels grow weaker with magnitude while torchvision's grow stronger.
    """

    def __init__(
        self,
        num_ops: int = 2,
        magnitude: float = 10.0,
        magnitude_std: float = 0.5,
        apply_prob: float = 0.5,
        max_magnitude: float = 10.0,
        resolution: int = 100,
        interpolation: InterpolationMode = InterpolationMode.NEAREST,
        fill: list[float] | None = None,
    ) -> None:
        if not 0 <= magnitude <= max_magnitude:
            raise ValueError(f"magnitude must be in [0, {max_magnitude}], got {magnitude}")
        if not 0 <= apply_prob <= 1:
            raise ValueError(f"apply_prob must be in [0, 1], got {apply_prob}")
        # the parent applies exactly one op per call; this class loops num_ops times with a fresh magnitude each
        super().__init__(
            num_ops=1, magnitude=resolution, num_magnitude_bins=resolution + 1, interpolation=interpolation, fill=fill
        )
        self.total_ops = num_ops
        self.mean_magnitude = magnitude
        self.magnitude_std = magnitude_std
        self.apply_prob = apply_prob
        self.max_magnitude = max_magnitude
        self.resolution = resolution

    def _draw_bin(self) -> int:
        m = self.mean_magnitude
        if self.magnitude_std > 0:
            m = m + self.magnitude_std * float(torch.randn(()))
        m = min(max(m, 0.0), self.max_magnitude)
        return int(round(m / self.max_magnitude * self.resolution))

    def forward(self, img: Any) -> Any:
        for _ in range(self.total_ops):
            if self.apply_prob < 1 and float(torch.rand(())) >= self.apply_prob:
                continue
            self.magnitude = self._draw_bin()
            img = super().forward(img)
        return img

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(num_ops={self.total_ops}, magnitude={self.mean_magnitude}, "
            f"magnitude_std={self.magnitude_std}, apply_prob={self.apply_prob})"
        )


def strong_transform(image_size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> Callable:
    """Release strong view: RGB, Resize, CenterCrop, HFlip, ColorJitter(0.4, 0.4, 0.4, 0), RandAugment n2 m10
    mstd0.5, normalise. Pass it as ``strong_transform=`` to `cmkd.data.with_image_transform` for the target set."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Lambda(lambda im: im.convert("RGB") if hasattr(im, "convert") else im),
            T.Resize(image_size),
            T.CenterCrop(image_size),
            T.RandomHorizontalFlip(),
            T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.0),
            RandAugmentMstd(num_ops=2, magnitude=10.0, magnitude_std=0.5),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def fixmatch_terms(
    student_weak: Tensor,
    student_strong: Tensor,
    teacher_weak: Tensor,
    teacher_strong: Tensor,
    threshold: float,
    factor: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Student + teacher FixMatch terms; returns ``(loss, logs)`` with detached per-term values and mask fractions."""
    student_loss, student_mask = fixmatch_loss(student_weak, student_strong, threshold, factor)
    teacher_loss, teacher_mask = fixmatch_loss(teacher_weak, teacher_strong, threshold, factor)
    logs = {
        "fixmatch_student": student_loss.detach(),
        "fixmatch_teacher": teacher_loss.detach(),
        "fixmatch_student_mask": student_mask,
        "fixmatch_teacher_mask": teacher_mask,
    }
    return student_loss + teacher_loss, logs
