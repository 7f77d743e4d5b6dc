"""FixMatch with CMKD (paper App. B, release): weak/strong target views and the two consistency terms.

The target stream yields a weak view (the benchmark's usual train transform) and a strong view of the same image.
Pseudo-labels come from the weak view twice: from the task head (student) for the head logits of the strong view,
and from the zero-shot CLIP head (teacher) for the CLIP-head logits of the strong view. Each term is
``factor * mean_i 1[max p_w >= threshold] CE(strong_i, argmax p_w)`` (`cmkd.loss.fixmatch_loss`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torchvision.transforms import RandAugment

from .data import CLIP_MEAN, CLIP_STD
from .loss import fixmatch_loss

__all__ = ["RandAugmentMstd", "fixmatch_terms", "strong_transform"]


class RandAugmentMstd(RandAugment):
    """RandAugment ``rand-n{num_ops}-m{magnitude}-mstd{magnitude_std}`` on torchvision's op set.

    Magnitudes are on timm's 0..10 scale (10 = torchvision's strongest bin); each op draws its own magnitude from
    N(magnitude, magnitude_std), rounded and clipped to [0, 10], as timm's ``mstd`` does.
    """

    MAX_MAGNITUDE = 10

    def __init__(self, num_ops: int = 2, magnitude: int = 10, magnitude_std: float = 0.5, **kwargs):
        if not 0 <= magnitude <= self.MAX_MAGNITUDE:
            raise ValueError(f"magnitude must be in [0, {self.MAX_MAGNITUDE}], got {magnitude}.")
        if magnitude_std < 0:
            raise ValueError(f"magnitude_std must be >= 0, got {magnitude_std}.")
        super().__init__(num_ops=1, magnitude=magnitude, num_magnitude_bins=self.MAX_MAGNITUDE + 1, **kwargs)
        self.total_ops, self.mean_magnitude, self.magnitude_std = num_ops, magnitude, magnitude_std

    def forward(self, img):
        for _ in range(self.total_ops):
            noisy = self.mean_magnitude + self.magnitude_std * float(torch.randn(()))
            self.magnitude = int(min(max(round(noisy), 0), self.MAX_MAGNITUDE))
            img = super().forward(img)
        self.magnitude = self.mean_magnitude
        return img


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
            RandAugmentMstd(num_ops=2, magnitude=10, magnitude_std=0.5),
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
