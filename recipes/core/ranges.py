"""The valid range of every number a recipe takes, in one table, and the one check that enforces it.

Flags and YAML values go through :func:`check_number` after they are merged, so ``--learning_rate nan``, ``--seed -1``,
``--logging_steps 0`` and ``batch_size: "32"`` all fail the same way, before anything is loaded, with a
message naming the flag or the YAML key. ``0`` is a value, never "unset": callers test ``is None``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["FLAG_RANGES", "YAML_RANGES", "Range", "check_number"]


@dataclass(frozen=True)
class Range:
    """``kind`` (int or float) within ``[low, high]``; ``open_low`` excludes ``low``. Floats must be finite."""

    kind: type
    low: float | None = None
    high: float | None = None
    open_low: bool = False

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a finite number"
        if self.low is not None and self.high is not None:
            return f"{what} in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}]"
        if self.low is not None:
            return f"{what} {'>' if self.open_low else '>='} {self.low:g}"
        return what


# Command-line flags (and the YAML defaults they replace), by RunConfig / flag name.
FLAG_RANGES: dict[str, Range] = {
    "learning_rate": Range(float, 0, open_low=True),
    "tau": Range(float, 0, open_low=True),
    "max_steps": Range(int, 1),
    "eval_steps": Range(int, 1),
    "batch_size": Range(int, 1),
    "seed": Range(int, 0, 2**32 - 1),  # numpy's seed range (transformers.set_seed seeds numpy too)
    "num_workers": Range(int, 0),
    "logging_steps": Range(int, 1),
}

# Benchmark YAML values that no flag overrides, by "section.key".
YAML_RANGES: dict[str, Range] = {
    "num_classes": Range(int, 1),
    "batch_size": FLAG_RANGES["batch_size"],
    "backbones.learning_rate": FLAG_RANGES["learning_rate"],
    "backbones.tau": FLAG_RANGES["tau"],
    "backbones.head_lr_multiplier": Range(float, 0, open_low=True),
    "training_args.sgd_momentum": Range(float, 0, 1),
    "training_args.weight_decay": Range(float, 0),
    "training_args.lr_decay_gamma": Range(float, 0),
    "training_args.lr_decay_power": Range(float, 0),
    "training_args.max_steps": FLAG_RANGES["max_steps"],
    "training_args.eval_steps": FLAG_RANGES["eval_steps"],
    "training_args.per_device_eval_batch_size": Range(int, 1),
    "training_args.seed": FLAG_RANGES["seed"],
    "augmentation.image_size": Range(int, 1),
    "partial.num_target_classes": Range(int, 1),
    "partial.partial_class_threshold": Range(int, 0),
    "partial.cls_weight": Range(float, 0),
    "partial.transfer_weight": Range(float, 0),
}


def check_number(label: str, value, spec: Range):
    """``value`` if it is a number of ``spec``'s kind within its range, else ``ValueError`` naming ``label``
    (a flag such as ``--lr`` or a YAML key such as ``office_home.yaml: training.seed``). Ints pass as floats."""
    ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
    if spec.kind is int:
        ok_type = ok_type and (isinstance(value, int) or (isinstance(value, float) and value.is_integer()))
    if not ok_type:
        raise ValueError(f"{label} must be {spec.describe()}, got {value!r} ({type(value).__name__})")
    value = spec.kind(value) if math.isfinite(value) else value
    too_low = spec.low is not None and (value <= spec.low if spec.open_low else value < spec.low)
    too_high = spec.high is not None and value > spec.high
    if not math.isfinite(value) or too_low or too_high:
        raise ValueError(f"{label} must be {spec.describe()}, got {value!r}")
    return value
