"""FixMatch with CMKD (paper App. B, release): weak/strong target views and the two consistency terms.

The target stream yields a weak view (the benchmark's usual train transform) and a strong view of the same image.
Pseudo-labels come from the weak view twice: from the task head (student) for the head logits of the strong view,
and from the zero-shot CLIP head (teacher) for the CLIP-head logits of the strong view. Each term is
``factor * mean_i 1[max p_w >= threshold] CE(strong_i, argmax p_w)`` (`cmkd.loss.fixmatch_loss`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

from .loss import fixmatch_loss
from .transforms import CLIP_MEAN, CLIP_STD, build_transform

__all__ = ["fixmatch_terms", "strong_transform"]


def strong_transform(image_size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> Callable:
    """Release strong view (``cmkd.transforms.build_transform("fixmatch_strong")``): RGB, Resize, CenterCrop, HFlip,
    ColorJitter(0.4, 0.4, 0.4, 0), timm RandAugment ``rand-n2-m10-mstd0.5``, normalise. Pass it as
    ``strong_transform=`` to `cmkd.data.with_image_transform` for the target set."""
    return build_transform("fixmatch_strong", image_size, mean, std)


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
