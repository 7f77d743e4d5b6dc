"""Configuration of Residual Sparse Training (RST) and its reset schedules."""

from __future__ import annotations

import enum
import math
import os
from dataclasses import dataclass, field

from peft.config import PeftConfig


class RSTPeftType(str, enum.Enum):
    """peft's own `PeftType` enum is closed, so RST brings a str-Enum whose value is the string "RST".

    It compares and hashes equal to the plain string, which is what peft's mapping tables and the saved
    `adapter_config.json` see (peft issue #2634 accepts string / str-Enum keys there).
    """

    RST = "RST"


_SCHEDULES = ("constant", "linear", "exponential")


def _check_number(name: str, value: float, *, allow_zero: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"RSTConfig.{name} must be a number, got {type(value).__name__} ({value!r}).")
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"RSTConfig.{name} must be a finite number, got {value}.")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"RSTConfig.{name} must be {bound}, got {value}.")


def interpolate(start: float, end: float, progress: float, kind: str) -> float:
    """Value of a schedule going from `start` to `end` as `progress` goes from 0 to 1 (held after 1).

    "exponential" interpolates geometrically (log-linear), which is how a threshold spanning decades should move.
    """
    progress = min(max(progress, 0.0), 1.0)
    if kind == "constant" or start == end:
        return start
    if kind == "linear":
        return start + (end - start) * progress
    if start == 0.0 or end == 0.0:
        raise ValueError("An exponential schedule needs non-zero start and end values; use 'linear' instead.")
    return start * (end / start) ** progress


@dataclass
class RSTConfig(PeftConfig):
    """Configuration of a Residual Sparse Training adapter (paper Sec. III.C, Eq. 16-17, Algorithm 1).

    RST trains a dense copy of every targeted parameter and, after every optimizer step, puts back the pretrained
    value w0 wherever ``|w - w0| <= tau``. Only the entries that survive are saved, so one domain is a sparse patch.

    Args:
        tau: Reset threshold. The release uses 1e-6 for ViT-B/16 (1e-7 on VisDA) and 1e-5 by default / for ResNet;
            tau is tied to the learning rate.
        tau_schedule: "constant" (the paper's main setting), or "linear" / "exponential" growth from `tau` to
            `tau_end` over `schedule_steps` optimizer steps (paper appendix J), held afterwards.
        tau_end: Final threshold for a growing schedule.
        keep_ratio: If set, replaces the threshold by "keep the top r of entries by |w - w0|" (paper appendix M),
            with r a fraction in (0, 1] decaying from `keep_ratio` to `keep_ratio_end` over `schedule_steps`
            following `keep_ratio_schedule`. Ranking is global over all targeted entries of the adapter.
        schedule_steps: Number of optimizer steps over which a schedule moves (usually the training length).
        bias_only: RST_bias (paper appendix M): gradients flow through every targeted parameter, but only bias
            entries are kept (all of them); every other entry is reset to w0 after each step.
        target_modules: Module names (list, suffix match) or a regex (str) whose parameters RST trains, recursively.
            None (default) means every parameter of the wrapped model except `modules_to_save`.
        exclude_modules: Module names or regex whose parameters are left untouched.
        modules_to_save: Modules trained densely and saved whole (e.g. a task head).
        init_weights: True starts the adapter as the identity (W = w0). False perturbs W, for testing only.
        check_base_fingerprint: When loading, refuse an adapter whose recorded base-weight fingerprints differ from
            the model's. Set False to load onto a different base on purpose.
    """

    tau: float = field(default=1e-6, metadata={"help": "Reset threshold: entries with |w - w0| <= tau go back to w0."})
    tau_schedule: str = field(default="constant", metadata={"help": "constant, linear or exponential."})
    tau_end: float | None = field(default=None, metadata={"help": "Final tau of a growing schedule."})
    keep_ratio: float | None = field(default=None, metadata={"help": "Top-r mode: fraction of entries kept."})
    keep_ratio_end: float | None = field(default=None, metadata={"help": "Final fraction of the top-r mode."})
    keep_ratio_schedule: str = field(default="exponential", metadata={"help": "linear or exponential decay of r."})
    schedule_steps: int | None = field(default=None, metadata={"help": "Steps over which schedules move."})
    bias_only: bool = field(default=False, metadata={"help": "RST_bias: keep bias entries only."})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Modules whose parameters RST trains; None means all but modules_to_save."}
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Modules whose parameters are excluded."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained densely and saved whole, e.g. a classification head."}
    )
    init_weights: bool = field(
        default=True, metadata={"help": "True: identity start (W = w0). False: perturbed start, for tests only."}
    )
    check_base_fingerprint: bool = field(
        default=True, metadata={"help": "Refuse to load onto base weights other than the ones trained from."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = RSTPeftType.RST
        _check_number("tau", self.tau)
        if self.tau_schedule not in _SCHEDULES:
            raise ValueError(f"RSTConfig.tau_schedule must be one of {_SCHEDULES}, got {self.tau_schedule!r}.")
        if self.tau_schedule != "constant":
            if self.tau_end is None or self.schedule_steps is None:
                raise ValueError(
                    f"tau_schedule={self.tau_schedule!r} needs tau_end and schedule_steps "
                    "(e.g. RSTConfig(tau=5e-7, tau_end=3.5e-6, tau_schedule='linear', schedule_steps=10000))."
                )
            _check_number("tau_end", self.tau_end)
            if self.tau_schedule == "exponential" and (self.tau == 0 or self.tau_end == 0):
                raise ValueError("An exponential tau schedule needs tau > 0 and tau_end > 0; use 'linear' instead.")
        elif self.tau_end is not None:
            raise ValueError("tau_end is only used with tau_schedule='linear' or 'exponential'.")
        if self.keep_ratio is not None:
            for name in ("keep_ratio", "keep_ratio_end"):
                value = getattr(self, name)
                if value is None:
                    continue
                _check_number(name, value, allow_zero=False)
                if value > 1:
                    raise ValueError(f"RSTConfig.{name} is a fraction in (0, 1], got {value} (0.002 means 0.2 %).")
            if self.keep_ratio_schedule not in ("linear", "exponential"):
                raise ValueError("RSTConfig.keep_ratio_schedule must be 'linear' or 'exponential'.")
            if self.keep_ratio_end is not None and self.schedule_steps is None:
                raise ValueError("keep_ratio_end needs schedule_steps (the number of steps r takes to decay).")
            if self.tau_schedule != "constant":
                raise ValueError(
                    "keep_ratio (top-r mode) replaces the tau threshold; do not combine it with a tau schedule."
                )
            if self.bias_only:
                raise ValueError("bias_only and keep_ratio are different RST variants; choose one.")
        elif self.keep_ratio_end is not None:
            raise ValueError("keep_ratio_end needs keep_ratio (the starting fraction).")
        if self.schedule_steps is not None and (
            isinstance(self.schedule_steps, bool)
            or not isinstance(self.schedule_steps, int)
            or self.schedule_steps < 1
        ):
            raise ValueError(f"RSTConfig.schedule_steps must be a positive integer, got {self.schedule_steps!r}.")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        """`PeftConfig.from_pretrained` that refuses folders of other methods and local folders without weights."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        if not isinstance(config, RSTConfig):
            raise ValueError(
                f"'{pretrained_model_name_or_path}' holds a {type(config).__name__} ({config.peft_type}) adapter, not "
                "an RST one. Load it with `PeftModel.from_pretrained(base_model, path)`, which picks the right method."
            )
        folder = os.path.join(pretrained_model_name_or_path, subfolder or "")
        if os.path.isdir(folder) and not any(
            os.path.exists(os.path.join(folder, name)) for name in ("adapter_model.safetensors", "adapter_model.bin")
        ):
            raise FileNotFoundError(
                f"'{folder}' has adapter_config.json but no adapter_model.safetensors: the adapter weights are "
                "missing. "
                "Save the adapter again with `model.save_pretrained(folder)`, or copy the file next to the config."
            )
        return config

    def tau_at(self, step: int) -> float:
        """Threshold applied after optimizer step `step` (1-based)."""
        if self.tau_schedule == "constant":
            return self.tau
        return interpolate(self.tau, self.tau_end, step / self.schedule_steps, self.tau_schedule)

    def keep_ratio_at(self, step: int) -> float:
        """Fraction of entries kept after optimizer step `step` in top-r mode (1-based)."""
        if self.keep_ratio is None:
            raise ValueError("keep_ratio_at() is only defined in top-r mode (RSTConfig(keep_ratio=...)).")
        if self.keep_ratio_end is None:
            return self.keep_ratio
        return interpolate(self.keep_ratio, self.keep_ratio_end, step / self.schedule_steps, self.keep_ratio_schedule)
