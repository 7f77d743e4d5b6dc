"""CMKD objective (paper Sec. III.B, Eq. 1-13) as pure tensor math.

Everything is computed in float32 whatever the input dtype (fp16/bf16 autocast logits are upcast first), and
logarithms come from ``log_softmax`` rather than ``log(softmax)``.

Unlike the authors' release, whose loss object advanced its own warm-up counter on every call, `CMKDLoss.forward`
takes the step explicitly: pass the trainer's optimizer-step counter (0 at the first step). This keeps the loss
stateless, so gradient accumulation, evaluation calls and resumed runs cannot shift the warm-up.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import GINI_MODES, CMKDConfig

__all__ = [
    "CMKDLoss",
    "CMKDLossOutput",
    "cmkd_alpha",
    "fixmatch_loss",
    "gini_impurity",
    "warmup_lambda",
]

_TINY = torch.finfo(torch.float32).tiny


def gini_impurity(probs: Tensor, weights: Tensor | None = None, mode: str = "balanced_sum") -> Tensor:
    """Weighted Gini impurity of a batch of distributions ``probs`` (B, C); returns a scalar.

    - ``"balanced_sum"`` (release): ``sum_i w_i * (1 - sum_c P_ic^2 / S_c)`` with ``S_c = sum_i P_ic`` detached, so
      each class is normalised by its batch mass (rare classes are not drowned by frequent ones). Note that a batch
      of one sample gives exactly 0 (and zero gradient): the balancing needs several samples.
    - ``"mean"`` (paper Eq. 4): ``(1 / B) * sum_i w_i * (1 - sum_c P_ic^2)``.

    ``weights`` (B,) defaults to ones; it is used as given (pass a detached tensor for per-sample trade-offs).
    """
    if mode not in GINI_MODES:
        raise ValueError(f"gini mode must be one of {list(GINI_MODES)}, got {mode!r}.")
    if probs.dim() != 2 or probs.shape[0] == 0 or probs.shape[1] == 0:
        raise ValueError(f"probs must have shape (batch, classes) with both > 0, got {tuple(probs.shape)}.")
    probs = probs.float()
    if weights is None:
        weights = probs.new_ones(probs.shape[0])
    elif weights.shape != probs.shape[:1]:
        raise ValueError(f"weights must have shape ({probs.shape[0]},) to match probs, got {tuple(weights.shape)}.")
    weights = weights.to(probs)
    if mode == "mean":
        return (weights * (1.0 - probs.pow(2).sum(dim=1))).mean()
    class_mass = probs.detach().sum(dim=0).clamp_min(_TINY)
    return (weights * (1.0 - (probs.pow(2) / class_mass).sum(dim=1))).sum()


def warmup_lambda(step: int, gamma: float, max_iter: int) -> float:
    """DSAN-style warm-up ``2 / (1 + exp(-gamma * t / max_iter)) - 1`` with ``t = min(step, max_iter)``."""
    try:
        step = operator.index(step)
    except TypeError:
        raise TypeError(f"step must be an int (the optimizer-step counter), got {type(step).__name__}.") from None
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}.")
    if max_iter <= 0:
        raise ValueError(f"max_iter must be > 0, got {max_iter}.")
    progress = min(step, max_iter) / max_iter
    return 2.0 / (1.0 + math.exp(-gamma * progress)) - 1.0


def _alpha_from_log_probs(log_p: Tensor, log_q: Tensor, config: CMKDConfig) -> Tensor:
    """Per-sample trade-off from student/teacher log-probabilities (B, C), float32 and detached."""
    log_p, log_q = log_p.detach().float(), log_q.detach().float()
    if config.alpha_mode == "fixed":
        return torch.full(log_p.shape[:1], config.fixed_alpha, dtype=torch.float32, device=log_p.device)
    if config.alpha_mode == "entropy":
        entropy = -(log_p.exp() * log_p).sum(dim=1)
        return torch.exp(-entropy)
    if config.kl_direction == "teacher_student":
        kl = (log_q.exp() * (log_q - log_p)).sum(dim=1)
    else:
        kl = (log_p.exp() * (log_p - log_q)).sum(dim=1)
    # alpha must stay in [0, 1] so that 1 - alpha is a valid weight. The KL is clipped at 0: rounding can make a
    # near-zero KL slightly negative, and over a column subset without renormalisation (``active_classes``) the
    # restricted sum is not a divergence and can be clearly negative.
    return torch.exp(-kl.clamp_min(0.0))


def cmkd_alpha(student_probs: Tensor, teacher_probs: Tensor, config: CMKDConfig) -> Tensor:
    """Per-sample trade-off alpha (B,), detached (Eq. 11 and the Table X variants).

    ``"kl"``: ``exp(-KL(q || p))`` (``kl_direction="teacher_student"``, release) or ``exp(-KL(p || q))``;
    ``"entropy"``: ``exp(-H(p))`` with ``H(p) = -sum_c p_c log p_c`` (nats) of the student;
    ``"fixed"``: ``config.fixed_alpha`` for every sample. Probabilities are clamped at the float32 ``tiny``
    before the log; `CMKDLoss` itself works from ``log_softmax`` of the logits.
    """
    _check_pair(student_probs, teacher_probs, "student_probs", "teacher_probs")
    log_p = student_probs.detach().float().clamp_min(_TINY).log()
    log_q = teacher_probs.detach().float().clamp_min(_TINY).log()
    return _alpha_from_log_probs(log_p, log_q, config)


def fixmatch_loss(
    weak_logits: Tensor, strong_logits: Tensor, threshold: float, factor: float
) -> tuple[Tensor, Tensor]:
    """FixMatch consistency term (paper App. B, Eq. 1): ``factor * mean_i 1[max p_w >= threshold] * CE(s_i, yhat_i)``.

    Pseudo-labels ``yhat`` and the mask come from the softmax of the *detached* weak-view logits; the mean runs over
    the whole batch (masked samples count as zero), as in FixMatch. Returns ``(loss, mask_fraction)``, the latter a
    detached scalar for logging. Call it once with the student head and once with the teacher (CLIP) head.
    """
    _check_pair(weak_logits, strong_logits, "weak_logits", "strong_logits")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}.")
    if factor < 0:
        raise ValueError(f"factor must be >= 0, got {factor}.")
    with torch.no_grad():
        max_prob, pseudo_labels = torch.softmax(weak_logits.detach().float(), dim=1).max(dim=1)
        mask = (max_prob >= threshold).float()
    per_sample = F.cross_entropy(strong_logits.float(), pseudo_labels, reduction="none")
    return factor * (per_sample * mask).mean(), mask.mean()


@dataclass
class CMKDLossOutput:
    """Result of `CMKDLoss.forward`.

    ``terms`` holds detached scalars, each the term's contribution to ``loss`` (weights included), so
    ``source_ce + task + distill + reg_source_ce + reg_teacher_gini == loss`` and ``cmkd`` is the sum of the last four.
    """

    loss: Tensor
    terms: dict[str, Tensor]
    alpha: Tensor
    lam: float


class CMKDLoss(torch.nn.Module):
    """Total UDA objective ``CE_ls(student_src, y) + L_cmkd`` (Eq. 1, 12, 13, release weighting).

    Stateless: the warm-up position is the ``step`` argument of `forward` (see the module docstring).
    """

    def __init__(self, config: CMKDConfig | None = None):
        super().__init__()
        config = CMKDConfig() if config is None else config
        if not isinstance(config, CMKDConfig):
            raise TypeError(f"config must be a CMKDConfig, got {type(config).__name__}.")
        self.config = config

    def extra_repr(self) -> str:
        return repr(self.config)

    def forward(
        self,
        student_logits_source: Tensor,
        teacher_logits_source: Tensor,
        source_labels: Tensor,
        student_logits_target: Tensor,
        teacher_logits_target: Tensor,
        step: int,
        active_classes: Tensor | None = None,
    ) -> CMKDLossOutput:
        """Compute the loss for one step.

        Args:
            student_logits_source / teacher_logits_source: (Bs, C) task-head / CLIP-head logits of the source batch.
            source_labels: (Bs,) integer labels in [0, C).
            student_logits_target / teacher_logits_target: (Bt, C) logits of the target batch.
            step: optimizer-step counter for the warm-up ``lam(t)`` (0 at the first step).
            active_classes: optional 1-D integer tensor of class indices (partial-set DA, App. K). The target-side
                terms (alpha, task, distillation, teacher Gini) then use only these columns: by default the softmax
                runs over all C classes and the other columns are dropped (Eq. 9), with
                ``config.partial_renormalize`` the softmax runs over the active columns only. Source CEs keep all C.
        """
        cfg = self.config
        num_classes = _check_inputs(
            student_logits_source, teacher_logits_source, source_labels, student_logits_target, teacher_logits_target
        )
        source_labels = source_labels.long()
        lam = warmup_lambda(step, cfg.gamma, cfg.warmup_max_iter)

        source_ce = F.cross_entropy(student_logits_source.float(), source_labels, label_smoothing=cfg.label_smoothing)
        reg_source_ce = F.cross_entropy(teacher_logits_source.float(), source_labels)

        student_target = student_logits_target.float()
        teacher_target = teacher_logits_target.float()
        if active_classes is not None:
            index = _check_active_classes(active_classes, num_classes, student_target.device)
            if cfg.partial_renormalize:
                log_p = F.log_softmax(student_target.index_select(1, index), dim=1)
                log_q = F.log_softmax(teacher_target.index_select(1, index), dim=1)
            else:
                log_p = F.log_softmax(student_target, dim=1).index_select(1, index)
                log_q = F.log_softmax(teacher_target, dim=1).index_select(1, index)
        else:
            log_p = F.log_softmax(student_target, dim=1)
            log_q = F.log_softmax(teacher_target, dim=1)
        p, q = log_p.exp(), log_q.exp()

        alpha = _alpha_from_log_probs(log_p, log_q, cfg)
        task = gini_impurity(p, alpha, cfg.gini)
        if cfg.distill_loss == "gini":
            distill = gini_impurity(0.5 * (p + q.detach()), 1.0 - alpha, cfg.gini)
        else:
            q_fixed, log_q_fixed = q.detach(), log_q.detach()
            per_sample = (1.0 - alpha) * (q_fixed * (log_q_fixed - log_p)).sum(dim=1)
            distill = per_sample.sum() if cfg.gini == "balanced_sum" else per_sample.mean()
        teacher_gini = gini_impurity(q, None, cfg.gini)

        w = cfg.transfer_weight
        terms = {
            "source_ce": cfg.cls_weight * source_ce,
            "task": w * cfg.lambda1 * lam * task,
            "distill": w * cfg.lambda1 * lam * distill,
            "reg_source_ce": w * cfg.lambda2 * reg_source_ce,
            "reg_teacher_gini": w * cfg.lambda3 * lam * teacher_gini,
        }
        cmkd = terms["task"] + terms["distill"] + terms["reg_source_ce"] + terms["reg_teacher_gini"]
        loss = terms["source_ce"] + cmkd
        terms["cmkd"] = cmkd
        return CMKDLossOutput(
            loss=loss, terms={k: v.detach() for k, v in terms.items()}, alpha=alpha.detach(), lam=lam
        )


def _check_pair(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    for name, tensor in ((name_a, a), (name_b, b)):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}.")
        if tensor.dim() != 2 or tensor.shape[0] == 0 or tensor.shape[1] == 0:
            raise ValueError(f"{name} must have shape (batch, classes) with both > 0, got {tuple(tensor.shape)}.")
        if not tensor.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {tensor.dtype}.")
    if a.shape != b.shape:
        raise ValueError(f"{name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} must have the same shape.")


def _check_inputs(
    student_src: Tensor, teacher_src: Tensor, labels: Tensor, student_tgt: Tensor, teacher_tgt: Tensor
) -> int:
    """Validate shapes, dtypes and label range; return the number of classes."""
    _check_pair(student_src, teacher_src, "student_logits_source", "teacher_logits_source")
    _check_pair(student_tgt, teacher_tgt, "student_logits_target", "teacher_logits_target")
    num_classes = student_src.shape[1]
    if student_tgt.shape[1] != num_classes:
        raise ValueError(
            f"source logits have {num_classes} classes but target logits have {student_tgt.shape[1]}; "
            "both batches must be scored against the same class list."
        )
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.shape[0] != student_src.shape[0]:
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"source_labels must be a 1-D tensor of length {student_src.shape[0]}, got {shape}.")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"source_labels must be an integer tensor of class indices, got {labels.dtype}.")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise ValueError(f"source_labels must be in [0, {num_classes - 1}], got values in [{low}, {high}].")
    return num_classes


def _check_active_classes(active_classes: Tensor, num_classes: int, device: torch.device) -> Tensor:
    if not isinstance(active_classes, Tensor) or active_classes.dim() != 1 or active_classes.numel() == 0:
        raise ValueError("active_classes must be a non-empty 1-D tensor of class indices (e.g. torch.tensor([0, 3])).")
    if active_classes.dtype in (torch.bool,) or active_classes.is_floating_point():
        raise TypeError(
            f"active_classes must hold integer class indices, got {active_classes.dtype}; "
            "for a boolean mask pass mask.nonzero().flatten()."
        )
    index = active_classes.to(device=device, dtype=torch.long)
    if int(index.min()) < 0 or int(index.max()) >= num_classes:
        raise ValueError(f"active_classes must be in [0, {num_classes - 1}], got {index.tolist()}.")
    if index.unique().numel() != index.numel():
        raise ValueError(f"active_classes must not repeat a class, got {index.tolist()}.")
    return index
