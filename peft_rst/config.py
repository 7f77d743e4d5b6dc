"""Configuration of Residual Sparse Training (RST) and its reset schedules."""

from __future__ import annotations

import enum
import json
import math
import os
import re
from dataclasses import dataclass, field

from peft.config import PeftConfig


class RSTPeftType(str, enum.Enum):
    """peft's own `PeftType` enum is closed, so RST brings a str-Enum whose value is the string "RST".

    It compares and hashes equal to the plain string, which is what peft's mapping tables and the saved
    `adapter_config.json` see (peft issue #2634 accepts string / str-Enum keys there).
    """

    RST = "RST"


_SCHEDULES = ("constant", "linear", "exponential")
CONFIG_NAME = "adapter_config.json"
_BOOL_FIELDS = ("bias_only", "init_weights", "check_base_fingerprint", "inference_mode")


class AdapterConfigError(ValueError):
    """An adapter_config.json that cannot describe an RST adapter; the message names the file and the field."""


def read_config_file(path: str | os.PathLike) -> dict:
    """The JSON object in `path`, with the RST fields checked (`AdapterConfigError` naming the file otherwise).

    Configs of other PEFT methods pass through unchecked apart from being a JSON object with a `peft_type`.
    """
    try:
        text = open(path, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as err:
        raise AdapterConfigError(f"Cannot read '{path}' ({err}); re-save the adapter.") from err
    if not text.strip():
        raise AdapterConfigError(f"'{path}' is empty; re-save the adapter with save_pretrained.")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise AdapterConfigError(f"'{path}' is not valid JSON ({err}); re-save the adapter.") from err
    if not isinstance(data, dict):
        raise AdapterConfigError(
            f"'{path}' must hold a JSON object of adapter settings, got {type(data).__name__} ({text.strip()[:40]})."
        )
    peft_type = data.get("peft_type")
    if not isinstance(peft_type, str):
        raise AdapterConfigError(f"'{path}': field 'peft_type' must be a string such as \"RST\", got {peft_type!r}.")
    if peft_type != RSTPeftType.RST.value and peft_type.strip().upper() == RSTPeftType.RST.value:
        raise AdapterConfigError(
            f"'{path}': field 'peft_type' must be exactly \"RST\" (upper case), got {peft_type!r}."
        )
    if peft_type == RSTPeftType.RST.value:
        problem = _field_problem(data)
        if problem:
            raise AdapterConfigError(f"'{path}': {problem}")
    return data


def _names_problem(name: str, value, *, regex: bool) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        if not regex:
            return f"field '{name}' must be a list of module names, got the string {value!r} (write [{value!r}])."
        try:
            re.compile(value)
        except re.error as err:
            return f"field '{name}' is not a valid regular expression ({value!r}: {err})."
        return None
    if isinstance(value, (list, tuple, set)) and all(isinstance(v, str) and v for v in value):
        return None
    return f"field '{name}' must be {'a regex string or ' if regex else ''}a list of module names, got {value!r}."


def _field_problem(data: dict) -> str | None:
    """What is wrong with the RST-specific field types of a config dict, if anything."""
    for name in _BOOL_FIELDS:
        if name in data and not isinstance(data[name], bool):
            return f"field '{name}' must be true or false, got {data[name]!r}."
    for name in ("target_modules", "exclude_modules"):
        problem = _names_problem(name, data.get(name), regex=True)
        if problem:
            return problem
    return _names_problem("modules_to_save", data.get("modules_to_save"), regex=False)


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
        problem = _field_problem(
            {
                name: getattr(self, name)
                for name in (*_BOOL_FIELDS, "target_modules", "exclude_modules", "modules_to_save")
            }
        )
        if problem:
            raise ValueError(f"RSTConfig: {problem}")
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
        """`PeftConfig.from_pretrained` with clear errors: a bad local adapter_config.json (not JSON, not an object,
        a wrong `peft_type`, a field of the wrong type or value) raises `AdapterConfigError` naming the file and
        the field; folders of other methods and local folders without weights are refused."""
        folder = os.path.join(pretrained_model_name_or_path, subfolder or "")
        config_file = os.path.join(folder, CONFIG_NAME)
        if os.path.isfile(config_file):
            read_config_file(config_file)
        try:
            config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        except (TypeError, ValueError) as err:
            if not os.path.isfile(config_file) or isinstance(err, AdapterConfigError):
                raise
            raise AdapterConfigError(f"'{config_file}': {err}") from err
        if not isinstance(config, RSTConfig):
            raise ValueError(
                f"'{pretrained_model_name_or_path}' holds a {type(config).__name__} ({config.peft_type}) adapter, not "
                "an RST one. Load it with `PeftModel.from_pretrained(base_model, path)`, which picks the right method."
            )
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
