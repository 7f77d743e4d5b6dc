"""Label-free validators: score a checkpoint on the unlabeled target without target labels.

In unsupervised domain adaptation the target labels do not exist, so the checkpoint (and any hyper-parameter) must
be chosen by a number computed without them. Every validator here is computed from what one evaluation pass over
the target already produces (the student's logits, the projected image features and the zero-shot teacher's
predictions), plus, for the source-based ones, one pass over a small held-out labeled source split.

- ``ent`` (lower is better): mean entropy of the student's target predictions (Morerio et al., ICLR 2018).
- ``snd`` (higher): soft neighbourhood density of the target predictions (Saito et al., ICCV 2021).
- ``bnm`` (higher): nuclear norm of the target prediction matrix / N (Cui et al., CVPR 2020).
- ``im`` (higher): information maximisation ``H(mean p) - mean H(p)`` (Shi & Sha, ICML 2012; SHOT, ICML 2020).
- ``zs_agreement`` (higher): fraction of target images where the student and the frozen zero-shot CLIP agree.
- ``source_accuracy`` (higher): student accuracy on a held-out labeled source split (source risk).
- ``dev`` (lower): deep embedded validation, importance-weighted source risk with a control variate
  (You et al., ICML 2019).

Every function returns a finite float or the *worst* value of its direction (``-inf`` when higher is better,
``+inf`` when lower is better) with a :class:`ValidatorWarning` when its inputs hold NaN/inf (a diverged checkpoint
is never selected, and a NaN never reaches the Trainer's best-model comparison, where it would freeze the choice).
Degenerate but finite inputs (fewer target samples than classes, every prediction the same class) give the
defined value with a warning saying why it is unreliable. Inputs too small to compute a validator at all raise a
``ValueError`` naming the minimum.

SND compares every pair of target samples, O(N^2) time and memory. Above ``SND_MAX_SAMPLES`` (2,048) target
samples it is computed on a fixed, seeded subset of that size (the same subset at every evaluation, so checkpoints
are compared on the same images). SND grows like log(N) with the number of samples it sees, so values computed on
different subset sizes are not comparable with each other; only their ranking across checkpoints is used.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DEFAULT_VALIDATOR",
    "DEV_MAX_SAMPLES",
    "LABEL_METRICS",
    "LAST_NAME",
    "LAST_RULE",
    "OPT_IN",
    "ORACLE_NAME",
    "SND_MAX_SAMPLES",
    "VALIDATORS",
    "ValidationInputs",
    "Validator",
    "ValidatorWarning",
    "batch_nuclear_norm",
    "compute_validators",
    "deep_embedded_validation",
    "describe",
    "dev_score",
    "greater_is_better",
    "information_maximization",
    "logistic_regression_proba",
    "prediction_entropy",
    "selection_summary",
    "soft_neighborhood_density",
    "source_accuracy",
    "zero_shot_agreement",
]

SND_MAX_SAMPLES = 2048
DEV_MAX_SAMPLES = 2048  # target samples the DEV domain classifier is fitted on (seeded subset above that)
DEFAULT_VALIDATOR = "im"  # chosen by benchmarks/validator_study.py, see docs/validation.md
ORACLE_NAME = "oracle (uses target labels)"
LAST_RULE = "last"  # selection_summary's name for "keep the last checkpoint" (no score)
LAST_NAME = "last checkpoint (label-free)"
OPT_IN = ("dev",)  # not computed by CMKDTrainer unless requested or selecting: DEV fits a classifier each time
LABEL_METRICS = ("accuracy", "mean_class_accuracy", "teacher_accuracy", "teacher_mean_class_accuracy")
"""Evaluation metrics that need target labels: choosing a checkpoint by one of them is the oracle."""


class ValidatorWarning(UserWarning):
    """A validator's value is defined but unreliable (degenerate predictions, too few samples, non-finite input)."""


# --------------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------------


def _tensor(x, name: str, ndim: int) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).detach().cpu()
    if t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(t.shape)}.")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is empty: validators need at least one target sample.")
    return t


def _worst(greater: bool, name: str, what: str) -> float:
    warnings.warn(
        f"{name}: {what}; scoring this checkpoint as the worst ({'-inf' if greater else '+inf'}) so it is never "
        "selected. The model's outputs diverged: lower the learning rate or check the data.",
        ValidatorWarning,
        stacklevel=3,
    )
    return -math.inf if greater else math.inf


def _nonfinite(t: torch.Tensor) -> int:
    return (
        int((~torch.isfinite(t)).any(dim=tuple(range(1, t.ndim))).sum())
        if t.ndim > 1
        else int((~torch.isfinite(t)).sum())
    )


def _probs(logits: torch.Tensor, name: str, greater: bool) -> torch.Tensor | float:
    """Softmax of ``logits`` in float64, or the worst value (with a warning) if any row is not finite."""
    logits = _tensor(logits, "logits", 2)
    bad = _nonfinite(logits)
    if bad:
        return _worst(greater, name, f"{bad} of {logits.shape[0]} target predictions are NaN/inf")
    _warn_degenerate(logits, name)
    return F.softmax(logits.double(), dim=-1)


def _warn_degenerate(logits: torch.Tensor, name: str) -> None:
    n, c = logits.shape
    if n < c:
        warnings.warn(
            f"{name}: {n} target samples for {c} classes; a prediction-based validator cannot see every class and "
            "is unreliable. Use a larger target set.",
            ValidatorWarning,
            stacklevel=4,
        )
    if n > 1 and c > 1:
        ids = logits.argmax(dim=-1)
        if bool((ids == ids[0]).all()):
            warnings.warn(
                f"{name}: all {n} target predictions are class {int(ids[0])} (collapsed model); entropy-style "
                "validators reward such a collapse, so this value is unreliable.",
                ValidatorWarning,
                stacklevel=4,
            )


def _entropy(p: torch.Tensor) -> torch.Tensor:
    """Row entropies in nats, with 0 log 0 = 0."""
    return -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(dim=-1)


def _subsample(n: int, max_samples: int | None, seed: int) -> torch.Tensor | None:
    if max_samples is None or n <= max_samples:
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:max_samples].sort().values


# --------------------------------------------------------------------------------------------------------------------
# target-prediction validators
# --------------------------------------------------------------------------------------------------------------------


def prediction_entropy(logits) -> float:
    """ENT: mean Shannon entropy (nats) of the softmax predictions. Lower is better (Morerio et al., ICLR 2018).

    ``skada.metrics.PredictionEntropyScorer`` returns minus this divided by the number of classes (it averages
    over samples and classes); the ranking of checkpoints is the same.
    """
    p = _probs(logits, "ent", greater=False)
    return p if isinstance(p, float) else float(_entropy(p).mean())


def soft_neighborhood_density(
    logits, temperature: float = 0.05, max_samples: int | None = SND_MAX_SAMPLES, seed: int = 0
) -> float:
    """SND: mean entropy of each sample's softmax similarity to the others. Higher is better (Saito et al. 2021).

    Rows are the L2-normalised softmax predictions; similarities are divided by ``temperature`` (0.05, the paper's
    value), the self-similarity is replaced by its negative (as in the authors' code and skada), each row goes
    through a softmax and its entropy is taken. Dense neighbourhoods (confident, clustered predictions) score high.
    Above ``max_samples`` samples a seeded subset of that size is used (O(N^2) otherwise).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    p = _probs(logits, "snd", greater=True)
    if isinstance(p, float):
        return p
    keep = _subsample(p.shape[0], max_samples, seed)
    if keep is not None:
        p = p[keep]
    z = F.normalize(p.float(), dim=-1)  # float32: the N x N part dominates the cost; values agree to ~1e-6
    sim = z @ z.t() / temperature
    sim.diagonal().neg_()
    log_q = F.log_softmax(sim, dim=-1)
    return float(-(log_q.exp() * log_q).sum(dim=-1).double().mean())


def batch_nuclear_norm(logits) -> float:
    """BNM: nuclear norm of the (N, C) softmax matrix divided by N. Higher is better (Cui et al., CVPR 2020).

    Large when predictions are both confident and diverse (many classes used); in [0, min(N, C) / N... 1].
    """
    p = _probs(logits, "bnm", greater=True)
    return p if isinstance(p, float) else float(torch.linalg.matrix_norm(p, ord="nuc") / p.shape[0])


def information_maximization(logits) -> float:
    """IM: ``H(mean_i p_i) - mean_i H(p_i)`` in nats. Higher is better (Shi & Sha 2012; SHOT, Liang et al. 2020).

    Diversity of the class marginal minus the per-sample entropy: confident *and* balanced predictions score high.
    """
    p = _probs(logits, "im", greater=True)
    if isinstance(p, float):
        return p
    return float(_entropy(p.mean(dim=0, keepdim=True))[0] - _entropy(p).mean())


def zero_shot_agreement(logits, zero_shot_ids) -> float:
    """Fraction of target samples where the student's class equals the frozen zero-shot CLIP's class. Higher is
    better.

    The zero-shot teacher is CLIP before any adaptation (its predictions are taken once, when training starts); it
    is a fixed, label-free reference that does not move with the student, unlike the adapted teacher head.
    """
    logits = _tensor(logits, "logits", 2)
    ids = _tensor(zero_shot_ids, "zero_shot_ids", 1).long()
    if ids.shape[0] != logits.shape[0]:
        raise ValueError(
            f"zero_shot_ids has {ids.shape[0]} entries for {logits.shape[0]} target predictions; they must come "
            "from the same target set in the same order."
        )
    bad = _nonfinite(logits)
    if bad:
        return _worst(True, "zs_agreement", f"{bad} of {logits.shape[0]} target predictions are NaN/inf")
    _warn_degenerate(logits, "zs_agreement")
    return float((logits.argmax(dim=-1) == ids).double().mean())


# --------------------------------------------------------------------------------------------------------------------
# source-split validators
# --------------------------------------------------------------------------------------------------------------------


def source_accuracy(source_logits, source_labels) -> float:
    """Accuracy of the student on the held-out labeled source split. Higher is better."""
    logits = _tensor(source_logits, "source_logits", 2)
    labels = _tensor(source_labels, "source_labels", 1).long()
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(f"{labels.shape[0]} source labels for {logits.shape[0]} source predictions.")
    bad = _nonfinite(logits)
    if bad:
        return _worst(True, "source_accuracy", f"{bad} of {logits.shape[0]} source predictions are NaN/inf")
    return float((logits.argmax(dim=-1) == labels).double().mean())


def deep_embedded_validation(
    source_fit_features,
    source_val_features,
    source_val_probs,
    source_val_labels,
    target_features,
    domain_classifier=None,
) -> float:
    """DEV risk (You et al., ICML 2019, Alg. 1). Lower is better.

    A domain classifier is fitted on ``source_fit_features`` (domain 1) vs ``target_features`` (domain 0); its
    density ratio ``w = n_s / n_t * p(target | x) / p(source | x)`` weights the cross-entropy of the labeled
    ``source_val`` samples, and the control variate ``eta = -Cov(w l, w) / Var(w)`` reduces the variance:
    ``mean(w l) + eta * mean(w) - eta``. Same computation as ``skada.metrics.DeepEmbeddedValidation`` given the
    same split (skada splits its source 67/33 itself; here the split is the caller's) and a loss returning one
    column: skada 0.6's default loss returns shape (n,), which its (n, 1) weights broadcast to an (n, n) matrix.

    ``domain_classifier`` is any scikit-learn classifier with ``predict_proba``; the default is
    :func:`logistic_regression_proba`, the optimum of scikit-learn's ``LogisticRegression()`` objective found by
    Newton's method (scikit-learn's lbfgs solver cost more than the tiny demo model's evaluation pass itself).
    """

    fit = np.asarray(source_fit_features, dtype=np.float64)
    val = np.asarray(source_val_features, dtype=np.float64)
    tgt = np.asarray(target_features, dtype=np.float64)
    probs = np.asarray(source_val_probs, dtype=np.float64)
    labels = np.asarray(source_val_labels, dtype=np.int64)
    if len(fit) < 1 or len(tgt) < 1 or len(val) < 2:
        raise ValueError(
            f"DEV needs >= 1 source sample to fit the domain classifier, >= 2 to validate on and >= 1 target sample; "
            f"got {len(fit)}, {len(val)} and {len(tgt)}. Use a larger source validation split."
        )
    if len(probs) != len(val) or len(labels) != len(val):
        raise ValueError("source_val_features, source_val_probs and source_val_labels must have the same length.")
    for what, arr in (("features", np.concatenate([fit, val, tgt])), ("source probabilities", probs)):
        if not np.isfinite(arr).all():
            return _worst(False, "dev", f"some {what} are NaN/inf")
    x_fit = np.concatenate([fit, tgt])
    y_fit = np.concatenate([np.ones(len(fit)), np.zeros(len(tgt))])
    if domain_classifier is None:
        domain = logistic_regression_proba(x_fit, y_fit, val)
    else:
        from sklearn.base import clone

        domain = clone(domain_classifier).fit(x_fit, y_fit).predict_proba(val)
    # columns: class 0 (target), class 1 (source)
    weights = (len(fit) / len(tgt)) * domain[:, :1] / np.maximum(domain[:, 1:], 1e-300)
    picked = np.clip(probs[np.arange(len(labels)), labels], 1e-15, 1 - 1e-15)
    error = -np.log(picked)[:, None]
    weighted = weights * error
    var_w = np.var(weights, ddof=1)
    eta = 0.0 if var_w == 0 else -np.cov(np.concatenate([weighted, weights], axis=1), rowvar=False)[0, 1] / var_w
    value = float(np.mean(weighted) + eta * np.mean(weights) - eta)
    if not math.isfinite(value):
        return _worst(False, "dev", "the density ratio overflowed (source and target features fully separable)")
    return value


def logistic_regression_proba(x, y, query, C: float = 1.0, max_iter: int = 50, tol: float = 1e-10) -> np.ndarray:
    """Binary L2 logistic regression fitted on ``(x, y in {0, 1})``; class probabilities (N, 2) of ``query``.

    Minimises scikit-learn's ``LogisticRegression(C=C)`` objective ``C * sum(log-loss) + ||w||^2 / 2`` (intercept
    not penalised), a strictly convex problem, by Newton's method in float64 (a handful of (D+1)^2 solves): the
    same optimum as scikit-learn's solver up to its tolerance, in a fraction of its time.
    """
    xt = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    yt = torch.as_tensor(np.asarray(y), dtype=torch.float64)
    xa = torch.cat([xt, torch.ones(len(xt), 1, dtype=torch.float64)], dim=1)
    reg = torch.full((xa.shape[1],), 1.0 / C, dtype=torch.float64)
    reg[-1] = 0.0  # intercept not penalised
    w = torch.zeros(xa.shape[1], dtype=torch.float64)

    def objective(v: torch.Tensor) -> float:
        return float(F.binary_cross_entropy_with_logits(xa @ v, yt, reduction="sum") + 0.5 * (reg * v * v).sum())

    value = objective(w)
    for _ in range(max_iter):
        p = torch.sigmoid(xa @ w)
        grad = xa.t() @ (p - yt) + reg * w
        hess = (xa * (p * (1 - p)).unsqueeze(1)).t() @ xa + torch.diag(reg) + 1e-12 * torch.eye(len(w))
        step = torch.linalg.solve(hess, grad)
        t = 1.0
        while t > 1e-6:  # backtracking keeps Newton monotone when the data are nearly separable
            new = objective(w - t * step)
            if new <= value:
                break
            t /= 2
        w = w - t * step
        done = value - new <= tol * max(1.0, abs(value))
        value = new
        if done:
            break
    xq = torch.as_tensor(np.asarray(query), dtype=torch.float64)
    p1 = torch.sigmoid(xq @ w[:-1] + w[-1])
    return torch.stack([1 - p1, p1], dim=1).numpy()


def dev_score(
    source_features,
    source_logits,
    source_labels,
    target_features,
    seed: int = 0,
    max_target: int | None = DEV_MAX_SAMPLES,
) -> float:
    """DEV on a held-out source split: half of it (seeded) fits the domain classifier, the other half is weighted.

    Features are standardised with statistics of the fitting data (a logistic regression on raw CLIP embeddings
    converges poorly). At most ``max_target`` target samples (a seeded subset) fit the domain classifier.
    """
    s_feat = _tensor(source_features, "source_features", 2).double()
    s_logits = _tensor(source_logits, "source_logits", 2)
    s_labels = _tensor(source_labels, "source_labels", 1).long()
    t_feat = _tensor(target_features, "target_features", 2).double()
    if len(s_feat) < 4:
        raise ValueError(
            f"DEV needs at least 4 held-out source samples (2 to fit the domain classifier, 2 to validate), got "
            f"{len(s_feat)}; raise the source validation fraction."
        )
    if _nonfinite(s_logits) or _nonfinite(s_feat) or _nonfinite(t_feat):
        return _worst(False, "dev", "some source/target features or source predictions are NaN/inf")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(s_feat), generator=g)
    half = len(order) // 2
    fit_idx, val_idx = order[:half], order[half:]
    keep = _subsample(len(t_feat), max_target, seed)
    if keep is not None:
        t_feat = t_feat[keep]
    fit_all = torch.cat([s_feat[fit_idx], t_feat])
    mean, std = fit_all.mean(dim=0), fit_all.std(dim=0).clamp_min(1e-12)

    def z(x: torch.Tensor) -> np.ndarray:
        return ((x - mean) / std).numpy()

    probs = F.softmax(s_logits[val_idx].double(), dim=-1).numpy()
    return deep_embedded_validation(
        z(s_feat[fit_idx]), z(s_feat[val_idx]), probs, s_labels[val_idx].numpy(), z(t_feat)
    )


# --------------------------------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class ValidationInputs:
    """What one evaluation produced. Target tensors are in target-set order; source ones may be None."""

    target_logits: torch.Tensor
    target_features: torch.Tensor | None = None
    zero_shot_ids: torch.Tensor | None = None
    source_logits: torch.Tensor | None = None
    source_labels: torch.Tensor | None = None
    source_features: torch.Tensor | None = None
    seed: int = 0


@dataclass(frozen=True)
class Validator:
    """A registered validator: how to compute it, which way is better and what it needs."""

    name: str
    greater_is_better: bool
    needs: tuple[str, ...]  # fields of ValidationInputs besides target_logits
    reference: str
    compute: Callable[[ValidationInputs], float]

    def available(self, inputs: ValidationInputs) -> bool:
        return all(getattr(inputs, field) is not None for field in self.needs)


VALIDATORS: dict[str, Validator] = {
    v.name: v
    for v in (
        Validator("ent", False, (), "Morerio et al., ICLR 2018", lambda i: prediction_entropy(i.target_logits)),
        Validator(
            "snd",
            True,
            (),
            "Saito et al., ICCV 2021",
            lambda i: soft_neighborhood_density(i.target_logits, seed=i.seed),
        ),
        Validator("bnm", True, (), "Cui et al., CVPR 2020", lambda i: batch_nuclear_norm(i.target_logits)),
        Validator("im", True, (), "Shi & Sha, ICML 2012", lambda i: information_maximization(i.target_logits)),
        Validator(
            "zs_agreement",
            True,
            ("zero_shot_ids",),
            "frozen zero-shot CLIP as reference",
            lambda i: zero_shot_agreement(i.target_logits, i.zero_shot_ids),
        ),
        Validator(
            "source_accuracy",
            True,
            ("source_logits", "source_labels"),
            "held-out source risk",
            lambda i: source_accuracy(i.source_logits, i.source_labels),
        ),
        Validator(
            "dev",
            False,
            ("source_logits", "source_labels", "source_features", "target_features"),
            "You et al., ICML 2019",
            lambda i: dev_score(i.source_features, i.source_logits, i.source_labels, i.target_features, seed=i.seed),
        ),
    )
}
"""Every validator by name (the key in evaluation metrics, e.g. ``eval_snd``)."""


def greater_is_better(metric: str) -> bool | None:
    """Direction of a validator or label metric name (with or without ``eval_``); None if unknown."""
    name = metric[5:] if metric.startswith("eval_") else metric
    if name in VALIDATORS:
        return VALIDATORS[name].greater_is_better
    if name in LABEL_METRICS:
        return True
    return None


def compute_validators(inputs: ValidationInputs, names: Sequence[str] | None = None) -> dict[str, float]:
    """Every requested (default: every available) validator's value; unknown names are an error."""
    if names is None:
        names = [n for n, v in VALIDATORS.items() if v.available(inputs)]
    unknown = [n for n in names if n not in VALIDATORS]
    if unknown:
        raise ValueError(f"unknown validator(s) {unknown}; known: {sorted(VALIDATORS)}.")
    for name in names:
        validator = VALIDATORS[name]
        if not validator.available(inputs):
            missing = [f for f in validator.needs if getattr(inputs, f) is None]
            raise ValueError(f"validator {name!r} needs {missing}, which this evaluation did not produce.")
    out: dict[str, float] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ValidatorWarning)
        for name in names:
            out[name] = VALIDATORS[name].compute(inputs)
    # one warning per problem, naming every validator it affects (not one copy per validator)
    by_problem: dict[str, list[str]] = {}
    for w in caught:
        if not issubclass(w.category, ValidatorWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            continue
        name, _, problem = str(w.message).partition(": ")
        by_problem.setdefault(problem, []).append(name)
    for problem, affected in by_problem.items():
        warnings.warn(f"{', '.join(affected)}: {problem}", ValidatorWarning, stacklevel=2)
    return out


def describe(metric: str, validators: Mapping[str, Validator] = VALIDATORS) -> str:
    """Human name of a selection rule: the validator and its direction, or the oracle."""
    name = metric[5:] if metric.startswith("eval_") else metric
    if name in validators:
        v = validators[name]
        return f"label-free: {name} ({'higher' if v.greater_is_better else 'lower'} is better; {v.reference})"
    if name in LABEL_METRICS:
        return f"{ORACLE_NAME}: target {name}"
    return name


def selection_summary(
    log_history: Sequence[Mapping], metric: str, label_metric: str = "accuracy", prefix: str = "eval"
) -> dict | None:
    """What each selection rule picks among the evaluations of a `Trainer.state.log_history`.

    ``metric``: the rule used (``metric_for_best_model``, or ``LAST_RULE`` when the Trainer keeps the last
    checkpoint). Returns ``rule`` (its description), ``metric``, ``step`` and ``value`` of its pick (the first best,
    as the Trainer keeps it; None for ``LAST_RULE``, which scores nothing) and, when the evaluations carry the
    labeled ``label_metric``: ``accuracy`` of that pick, ``last`` (the last evaluated checkpoint), ``oracle`` (the
    best ``label_metric``: oracle, uses target labels) and ``gap`` = oracle - pick. None without evaluations.
    """
    name = metric.removeprefix(f"{prefix}_")
    label_key = f"{prefix}_{label_metric}"
    if name == LAST_RULE:
        evals = [h for h in log_history if f"{prefix}_runtime" in h]  # every Trainer evaluation logs its runtime
        if not evals:
            return None
        pick = len(evals) - 1
        out: dict = {"rule": LAST_NAME, "metric": name, "step": evals[pick].get("step"), "value": None}
    else:
        key = f"{prefix}_{name}"
        evals = [h for h in log_history if key in h]
        if not evals:
            return None
        direction = greater_is_better(name)
        signed = [float(h[key]) if direction is not False else -float(h[key]) for h in evals]
        signed = [v if math.isfinite(v) else -math.inf for v in signed]
        pick = max(range(len(evals)), key=lambda i: (signed[i], -i))  # first of equal scores
        out = {"rule": describe(name), "metric": name, "step": evals[pick].get("step"), "value": evals[pick][key]}
    if all(label_key in h for h in evals):
        accs = [float(h[label_key]) for h in evals]
        best = max(range(len(evals)), key=lambda i: (accs[i], -i))
        out.update(
            accuracy=accs[pick],
            last={"step": evals[-1].get("step"), "accuracy": accs[-1]},
            oracle={"step": evals[best].get("step"), "accuracy": accs[best], "name": ORACLE_NAME},
            gap=accs[best] - accs[pick],
        )
    return out
