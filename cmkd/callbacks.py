"""Stop a diverged run: a non-finite loss term or non-finite weights end training with a message, before the next
checkpoint (so the last good one on disk is kept) and before any result is computed from a broken model.

`CMKDTrainer` checks every loss it computes (:func:`check_finite_loss`, naming the loss term that went non-finite)
and adds :class:`NonFiniteGuardCallback`, which checks the trainable weights after every optimizer step: an update
with a huge learning rate can turn weights into inf/NaN while the loss that produced it was finite.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from transformers import TrainerCallback

from .checkpoints import last_complete_checkpoint

__all__ = ["LOSS_TERM_NAMES", "NonFiniteGuardCallback", "TrainingDivergedError", "check_finite_loss"]

# Loss terms as `CMKDTrainer` logs them -> what they are (cmkd.loss / cmkd.fixmatch).
LOSS_TERM_NAMES = {
    "source_ce": "source cross-entropy",
    "task": "task-head Gini term",
    "distill": "distillation term",
    "reg_source_ce": "source cross-entropy regulariser of the CLIP head",
    "reg_teacher_gini": "CLIP-head Gini regulariser",
    "fixmatch_student": "FixMatch term of the task head",
    "fixmatch_teacher": "FixMatch term of the CLIP head",
}


class TrainingDivergedError(FloatingPointError):
    """Training produced a non-finite loss or non-finite weights; the message names the step and what went wrong.

    ``step`` is the 1-based training step, ``terms`` the non-finite loss terms (empty for a weights check),
    ``checkpoint`` the last complete checkpoint on disk (None if there is none).
    """

    def __init__(self, message: str, step: int, terms: tuple[str, ...] = (), checkpoint=None):
        super().__init__(message)
        self.step, self.terms, self.checkpoint = step, terms, checkpoint


def _last_good(output_dir: str | None) -> tuple[object, str]:
    last = last_complete_checkpoint(output_dir) if output_dir else None
    where = f"the last good checkpoint is {last}" if last else "no checkpoint was saved before"
    return last, where


def _advice(args) -> str:
    lr = getattr(args, "learning_rate", None)
    return (
        f"Lower the learning rate (now {lr:g})" if isinstance(lr, float) and math.isfinite(lr) else "Check the lr"
    ) + ", or check the data and the model's weights for inf/NaN"


def check_finite_loss(loss: torch.Tensor, terms: Mapping[str, torch.Tensor], step: int, args) -> None:
    """Raise :class:`TrainingDivergedError` if ``loss`` is inf/NaN, naming the non-finite ``terms``.

    ``step`` is the number of optimizer steps already taken (`TrainerState.global_step`).
    """
    if bool(torch.isfinite(loss.detach()).all()):
        return
    bad = tuple(k for k, v in terms.items() if k in LOSS_TERM_NAMES and not bool(torch.isfinite(v).all()))
    if bad:
        what = ", ".join(f"{LOSS_TERM_NAMES[k]} ({k} = {float(terms[k]):g})" for k in bad)
    else:
        what = f"the total loss ({float(loss):g})"
    last, where = _last_good(getattr(args, "output_dir", None))
    raise TrainingDivergedError(
        f"training diverged at step {step + 1}: non-finite {what}. Training stopped before any further update or "
        f"checkpoint; {where}. {_advice(args)}",
        step + 1,
        bad,
        last,
    )


def non_finite_tensors(model: torch.nn.Module, trainable_only: bool = True) -> tuple[list[str], int]:
    """Names of the (trainable) parameters holding inf/NaN, and how many were checked (one device sync)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad or not trainable_only]
    if not named:
        return [], 0
    device = named[0][1].device
    flags = torch.stack([torch.isfinite(p.detach()).all().to(device) for _, p in named]).tolist()
    return [n for (n, _), ok in zip(named, flags) if not ok], len(named)


class NonFiniteGuardCallback(TrainerCallback):
    """Checks the trainable weights before training and after every optimizer step; raises
    :class:`TrainingDivergedError` before the step's logging, evaluation and checkpoint happen."""

    def _check(self, args, model, step: int, when: str) -> None:
        if model is None:
            return
        bad, total = non_finite_tensors(model)
        if not bad:
            return
        last, where = _last_good(getattr(args, "output_dir", None))
        shown = ", ".join(bad[:5]) + (", ..." if len(bad) > 5 else "")
        raise TrainingDivergedError(
            f"training diverged at step {step}: {len(bad)} of {total} trainable tensors hold inf/NaN {when} "
            f"({shown}). Training stopped before this step's checkpoint; {where}. {_advice(args)}",
            step,
            (),
            last,
        )

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._check(args, model, state.global_step, "before training starts (the model or checkpoint is broken)")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._check(args, model, state.global_step, "after the optimizer update (the loss was still finite)")
