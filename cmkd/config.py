"""Configuration of the CMKD loss (paper Sec. III.B, Eq. 10-13): every weight and every variant switch.

Defaults reproduce the authors' release (class-balanced summed Gini impurity, ``alpha = exp(-KL(teacher || student))``,
warm-up ``gamma = 1``); the paper's literal text and the ablations of its Tables V and X are options.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

GINI_MODES = ("balanced_sum", "mean")
ALPHA_MODES = ("kl", "fixed", "entropy")
KL_DIRECTIONS = ("teacher_student", "student_teacher")
DISTILL_LOSSES = ("gini", "kl")

PARTIAL_SUFFIX = "_partial"


def _canonical(name: str) -> str:
    return name.strip().lower().replace("-", "").replace("_", "").replace(" ", "")


@dataclass
class CMKDConfig:
    """All weights and switches of the CMKD objective.

    The loss computed with it (see `cmkd.loss.CMKDLoss`) is::

        L = cls_weight * CE_ls(student_src, y)
            + transfer_weight * (lambda1 * lam(t) * [GI(p, alpha) + GI(mix, 1 - alpha)]
                                 + lambda2 * CE(teacher_src, y) + lambda3 * lam(t) * GI(q))

    with ``lam(t) = 2 / (1 + exp(-gamma * min(t, warmup_max_iter) / warmup_max_iter)) - 1``.

    Args:
        lambda1: weight of the task + distillation terms (Eq. 12).
        lambda2: weight of the CE of the teacher (CLIP) head on the source batch (Eq. 13).
        lambda3: weight of the Gini impurity of the teacher on the target batch (Eq. 13).
        label_smoothing: label smoothing of the student's source CE (the regulariser CE is plain, as released).
        gamma: steepness of the warm-up ``lam(t)``; the release uses 1.0 (so lam saturates at ~0.462).
        warmup_max_iter: iterations after which ``lam(t)`` stops growing.
        gini: ``"balanced_sum"`` (release: ``sum_i w_i (1 - sum_c P_ic^2 / S_c)``, ``S_c = sum_i P_ic`` detached)
            or ``"mean"`` (paper Eq. 4 literally: ``mean_i w_i (1 - sum_c P_ic^2)``).
        alpha_mode: ``"kl"`` (Eq. 11, ``exp(-KL)``), ``"fixed"`` (``fixed_alpha``, Table X row 1) or
            ``"entropy"`` (Table X row 2, ``exp(-H(p_student))`` with H the Gibbs entropy in nats).
        kl_direction: direction of the KL in ``alpha``: ``"teacher_student"`` = KL(q || p) (release) or
            ``"student_teacher"`` = KL(p || q) (paper Eq. 11 literally).
        fixed_alpha: alpha used when ``alpha_mode="fixed"``.
        distill_loss: ``"gini"`` (Eq. 7-8, Gini of the 50/50 mix) or ``"kl"`` (Table V ablation,
            ``KL(sg(q) || p)`` per sample, weighted by ``1 - alpha``, reduced over the batch like the Gini).
        fixmatch_threshold: confidence threshold of the FixMatch pseudo-labels (App. B).
        fixmatch_factor: weight of each FixMatch term (App. B).
        cls_weight: extra factor on the student's source CE (1.0; partial-set DA: 0.5).
        transfer_weight: extra factor on the whole CMKD term (1.0; partial-set DA: 0.1).
        partial_class_threshold: partial-set DA keeps the target classes predicted at least this many times
            (App. K, T = 14). Used by the trainer's class estimation, not by the loss itself.
        partial_renormalize: with ``active_classes``, False follows App. K Eq. 9 (softmax over all classes, then
            keep the active columns); True renormalises the softmax over the active columns only.
    """

    lambda1: float = 0.25
    lambda2: float = 0.1
    lambda3: float = 0.025
    label_smoothing: float = 0.1
    gamma: float = 1.0
    warmup_max_iter: int = 10000
    gini: str = "balanced_sum"
    alpha_mode: str = "kl"
    kl_direction: str = "teacher_student"
    fixed_alpha: float = 0.5
    distill_loss: str = "gini"
    fixmatch_threshold: float = 0.95
    fixmatch_factor: float = 0.5
    cls_weight: float = 1.0
    transfer_weight: float = 1.0
    partial_class_threshold: int = 14
    partial_renormalize: bool = False

    def __post_init__(self) -> None:
        for name in ("lambda1", "lambda2", "lambda3", "fixmatch_factor", "cls_weight", "transfer_weight"):
            self._check_float(name, low=0.0)
        self._check_float("label_smoothing", low=0.0, high=1.0, high_inclusive=False)
        self._check_float("gamma", low=0.0, low_inclusive=False)
        self._check_float("fixed_alpha", low=0.0, high=1.0)
        self._check_float("fixmatch_threshold", low=0.0, high=1.0)
        self._check_int("warmup_max_iter", low=1)
        self._check_int("partial_class_threshold", low=0)
        self._check_choice("gini", GINI_MODES)
        self._check_choice("alpha_mode", ALPHA_MODES)
        self._check_choice("kl_direction", KL_DIRECTIONS)
        self._check_choice("distill_loss", DISTILL_LOSSES)
        if not isinstance(self.partial_renormalize, bool):
            raise TypeError(f"CMKDConfig.partial_renormalize must be a bool, got {self.partial_renormalize!r}.")

    def _check_float(
        self,
        name: str,
        low: float | None = None,
        high: float | None = None,
        low_inclusive: bool = True,
        high_inclusive: bool = True,
    ) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"CMKDConfig.{name} must be a number, got {value!r} ({type(value).__name__}).")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"CMKDConfig.{name} must be finite, got {value}.")
        too_low = low is not None and (value < low if low_inclusive else value <= low)
        too_high = high is not None and (value > high if high_inclusive else value >= high)
        if too_low or too_high:
            lo = "-inf" if low is None else f"{low}"
            hi = "inf" if high is None else f"{high}"
            interval = f"{'[' if low_inclusive else '('}{lo}, {hi}{']' if high_inclusive else ')'}"
            raise ValueError(f"CMKDConfig.{name} must be in {interval}, got {value}.")
        setattr(self, name, value)

    def _check_int(self, name: str, low: int) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"CMKDConfig.{name} must be an int, got {value!r} ({type(value).__name__}).")
        if value < low:
            raise ValueError(f"CMKDConfig.{name} must be >= {low}, got {value}.")

    def _check_choice(self, name: str, choices: tuple[str, ...]) -> None:
        value = getattr(self, name)
        if value not in choices:
            raise ValueError(f"CMKDConfig.{name} must be one of {list(choices)}, got {value!r}.")

    @classmethod
    def for_benchmark(cls, name: str, **overrides: Any) -> CMKDConfig:
        """The release settings of a benchmark (``"office_home"``, ``"domainnet"``, ...), then ``overrides``: the
        ``cmkd_config`` section of its preset ``cmkd/presets/<name>.yaml`` (paper App. A and B, release), read by
        :func:`cmkd.benchmarks.load_benchmark_config` like the recipes read it. ``<name>_partial`` adds the preset's
        partial-set fields (``partial:``, paper App. K).

        Names are matched ignoring case, ``-`` and ``_`` (``"Office-Home"`` works).
        """
        from .benchmarks import load_benchmark_config  # it checks a preset's fields with this class

        if not isinstance(name, str):
            raise TypeError(f"benchmark name must be a str, got {type(name).__name__}.")
        by_canonical = {_canonical(key): key for key in cls.benchmark_names()}
        key = by_canonical.get(_canonical(name))
        if key is None:
            raise ValueError(f"Unknown benchmark {name!r}; valid names: {cls.benchmark_names()}.")
        bench = load_benchmark_config(key.removesuffix(PARTIAL_SUFFIX))
        partial = bench.partial.cmkd_config() if key.endswith(PARTIAL_SUFFIX) else {}
        return cls.from_dict({**bench.cmkd_config, **partial, **overrides})

    @classmethod
    def paper_literal(cls, **overrides: Any) -> CMKDConfig:
        """The paper's text taken literally: plain averaged Gini (Eq. 4) and alpha = exp(-KL(p || q)) (Eq. 11)."""
        return cls.from_dict({"gini": "mean", "kl_direction": "student_teacher", **overrides})

    @classmethod
    def benchmark_names(cls) -> list[str]:
        """Every preset, and ``<name>_partial`` for those with a partial-set protocol."""
        from .benchmarks import available_benchmarks, load_benchmark_config

        names = available_benchmarks()
        partial = [n + PARTIAL_SUFFIX for n in names if load_benchmark_config(n).partial.available]
        return sorted(names + partial)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-serialisable) for logging and saving."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CMKDConfig:
        """Inverse of `to_dict`; unknown keys are an error (a typo must not silently fall back to a default)."""
        if not isinstance(data, dict):
            raise TypeError(f"CMKDConfig.from_dict expects a dict, got {type(data).__name__}.")
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown CMKDConfig field(s) {unknown}; valid fields: {sorted(known)}.")
        return cls(**data)
