"""Local `evaluate` metric modules (loaded by path: the Hub is not needed, `evaluate.load("accuracy")` is)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["UDA_ACCURACY_PATH", "load_uda_accuracy"]

UDA_ACCURACY_PATH: str = str(Path(__file__).resolve().parent / "uda_accuracy")
"""Directory of the ``uda_accuracy`` module: pass it to ``evaluate.load``."""


def load_uda_accuracy(**kwargs):
    """``evaluate.load(UDA_ACCURACY_PATH, **kwargs)``: accuracy, mean per-class accuracy, per-class list."""
    import evaluate

    return evaluate.load(UDA_ACCURACY_PATH, **kwargs)
