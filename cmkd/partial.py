"""Partial-set DA (paper App. K, release): estimate which classes the target domain contains.

Before each epoch but the first, the whole target set is predicted with the task head and the classes predicted
at least ``threshold`` times (T = 14 for Office-Home 65 -> 25) are kept; the target-side CMKD terms then use only
those columns (`cmkd.loss.CMKDLoss(active_classes=...)`).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

__all__ = ["class_counts", "estimate_label_set"]

logger = logging.getLogger(__name__)


def class_counts(predictions, num_classes: int) -> torch.Tensor:
    """How often each class id is predicted: ``n_c = sum_j 1[argmax p(x_j) = c]`` (LongTensor of length C)."""
    preds = torch.as_tensor(np.asarray(predictions)).long().flatten()
    if preds.numel() and (int(preds.min()) < 0 or int(preds.max()) >= num_classes):
        raise ValueError(f"predictions must be class ids in [0, {num_classes - 1}].")
    return torch.bincount(preds, minlength=num_classes)


def estimate_label_set(predictions, num_classes: int, threshold: int = 14) -> torch.Tensor:
    """Sorted ids of the classes predicted at least ``threshold`` times.

    If no class reaches the threshold (tiny target sets), all classes are kept and a warning is logged: an empty
    label set would leave the target losses without columns.
    """
    if num_classes <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}.")
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}.")
    counts = class_counts(predictions, num_classes)
    keep = torch.nonzero(counts >= threshold).flatten()
    if keep.numel() == 0:
        logger.warning(
            "partial-set: no class was predicted >= %d times on the target set (%d predictions); keeping all %d "
            "classes. Lower the threshold for small target sets.",
            threshold,
            int(counts.sum()),
            num_classes,
        )
        return torch.arange(num_classes)
    return keep
