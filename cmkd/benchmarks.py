"""Benchmark presets: ``cmkd/presets/<benchmark>.yaml`` -> a validated :class:`BenchmarkConfig`.

One loader for the presets that both :meth:`cmkd.CMKDConfig.for_benchmark` and the recipes read, so a library user gets
a benchmark's domains, tasks, class names, backbones and run defaults without the recipes. A preset holds the
libraries' own names: ``training_args`` are ``cmkd.CMKDTrainingArguments`` fields and ``cmkd_config`` are
``cmkd.CMKDConfig`` fields, each checked by the library class itself. A broken preset (or override) is a one-line
:class:`ConfigError` naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

PRESETS_DIR = Path(__file__).resolve().parent / "presets"  # <benchmark>.yaml: the one home of every benchmark default
PARTIAL_FIELDS = ("partial_class_threshold", "cls_weight", "transfer_weight")  # a preset's partial-set loss fields
TASK_SEPARATOR = "->"


class ConfigError(ValueError):
    """A benchmark preset (or a combination of run settings) that cannot run; the message says how to fix it."""


def available_benchmarks() -> list[str]:
    """The benchmarks with a preset in ``cmkd/presets``."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def package_path(name: str | None) -> str | None:
    """A preset's ``cmkd:<path>`` model name (a folder shipped inside the installed cmkd package) -> that folder;
    any other name unchanged."""
    if not name or not name.startswith("cmkd:"):
        return name
    return str(Path(__file__).resolve().parent / name.removeprefix("cmkd:"))


@dataclass(frozen=True)
class DomainSpec:
    key: str  # short name used in task names and on the CLI, e.g. "Ar"
    name: str  # human name, e.g. "Art"
    folder: str  # directory under --data_dir as the dataset ships, e.g. "Art" or "amazon/images"
    alt_folders: tuple[str, ...] = ()  # other shipped spellings, tried in order after `folder`
    list_files: Mapping[str, str] = field(default_factory=dict)  # split -> image-list file name
    list_file: str = ""  # one image list for both splits
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.list_file and not self.list_files:
            object.__setattr__(self, "list_files", {"train": self.list_file, "test": self.list_file})

    def matches(self, text: str) -> bool:
        wanted = text.strip().lower()
        return wanted in {n.lower() for n in (self.key, self.name, self.folder, *self.alt_folders, *self.aliases)}


@dataclass(frozen=True)
class BackboneSpec:
    key: str
    model: str | None  # Hub id / local path; None = no transformers checkpoint exists, --model is required
    learning_rate: float  # CMKDTrainingArguments.learning_rate
    head_lr_multiplier: float  # CMKDTrainingArguments.head_lr_multiplier
    tau: float  # peft_rst.RSTConfig.tau


@dataclass(frozen=True)
class AugmentationSpec:
    image_size: int
    train: str  # cmkd.transforms preset names
    test: str
    strong: str = "fixmatch_strong"  # FixMatch's strong target view
    source_train_overrides: Mapping[str, str] = field(default_factory=dict)  # domain key -> preset when source

    def train_preset(self, domain_key: str, role: str) -> str:
        """Preset for a training view of ``domain_key`` used as ``role`` ("source" or "target")."""
        return self.source_train_overrides.get(domain_key, self.train) if role == "source" else self.train


@dataclass(frozen=True)
class PartialSpec:
    available: bool
    num_target_classes: int | None = None
    partial_class_threshold: int | None = None  # CMKDConfig fields, applied with --partial
    cls_weight: float | None = None
    transfer_weight: float | None = None

    def cmkd_config(self) -> dict[str, Any]:
        """The CMKDConfig fields this section sets (applied over ``cmkd_config`` with --partial)."""
        return {n: getattr(self, n) for n in PARTIAL_FIELDS if getattr(self, n) is not None}


@dataclass(frozen=True)
class BenchmarkConfig:
    name: str
    display_name: str
    num_classes: int
    domains: Mapping[str, DomainSpec]
    tasks: tuple[tuple[str, str], ...]
    metric: Literal["accuracy", "mean_class_accuracy"]
    eval_split: Literal["train", "test"]
    backbone: str
    backbones: Mapping[str, BackboneSpec]
    batch_size: int  # per domain and step, over all processes (per_device_train_batch_size = this / processes)
    prompt_template: str  # CLIPAdaptationModel.from_clip's zero-shot prompt
    training_args: Mapping[str, Any]  # cmkd.CMKDTrainingArguments fields
    cmkd_config: Mapping[str, Any]  # cmkd.CMKDConfig fields
    augmentation: AugmentationSpec
    partial: PartialSpec
    homepage: str = ""
    license: str = ""
    classes: tuple[str, ...] | None = None  # label order when the data cannot name classes (flat folders, digits)
    requires_image_lists: bool = False
    loader: Literal["files", "torchvision"] = "files"  # ImageFolder / image lists / Hub, or torchvision (digits)
    table_layout: Literal["tasks", "per_class", "matrix"] = "tasks"  # paper Table I, V or VI

    def domain(self, text: str) -> DomainSpec:
        """Look a domain up by key, name, folder or alias (case-insensitive)."""
        for spec in self.domains.values():
            if spec.matches(text):
                return spec
        valid = ", ".join(f"{d.key} ({d.name})" for d in self.domains.values())
        raise ConfigError(f"unknown {self.display_name} domain {text!r}; valid domains: {valid}")

    def task_names(self) -> list[str]:
        return [task_name(s, t) for s, t in self.tasks]


def task_name(source: str, target: str) -> str:
    return f"{source}{TASK_SEPARATOR}{target}"


def load_benchmark_config(
    name_or_path: str | os.PathLike, override: Mapping[str, Any] | None = None, override_name: str = "override"
) -> BenchmarkConfig:
    """``cmkd/presets/<name>.yaml`` (or any YAML path), with ``override`` (e.g. a parsed YAML file, named
    ``override_name`` in messages) deep-merged over it, as a validated :class:`BenchmarkConfig`."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = PRESETS_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"no benchmark config {str(name_or_path)!r}; available: {', '.join(available_benchmarks())}")
    raw, where = read_yaml(path), path.name
    if override is not None:
        raw, where = _merge(raw, override), f"{override_name} (over {path.name})"
    return benchmark_from_dict(raw, where)


def _merge(a: Any, b: Any) -> Any:
    if isinstance(a, dict) and isinstance(b, Mapping):
        return {**a, **{k: _merge(a.get(k), v) for k, v in b.items()}}
    return b


def read_yaml(path: str | os.PathLike, what: str = "benchmark config") -> Any:
    """``yaml.safe_load`` of a UTF-8 file; syntax and encoding errors name the file, line and column."""
    try:
        with open(path, encoding="utf-8") as fh:
            return yaml.safe_load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"{what} {str(path)!r} does not exist") from exc
    except IsADirectoryError as exc:
        raise ConfigError(f"{what} {str(path)!r} is a folder; pass the YAML file") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{what} {path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
            "save it as UTF-8"
        ) from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{what} {path} is not valid YAML{at}: {getattr(exc, 'problem', None) or exc}") from exc
    except OSError as exc:
        raise ConfigError(f"{what} {str(path)!r} cannot be read: {exc.strerror or exc}") from exc


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _conform(value: Any, hint: Any, where: str) -> Any:
    """``value`` as a field typed ``hint`` needs it (ints as floats, lists as tuples, mappings as the spec dataclasses;
    a mapping of specs passes each its YAML key as ``key``), or a ConfigError naming the key: a quoted number or a
    list where a mapping belongs must not reach the code."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return hint(**_section(hint, value, where))
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _conform(value, option, where)
            except ConfigError:
                continue
        names = " or ".join(_TYPE_NAMES.get(a, "a list") for a in args if a is not type(None))
        raise ConfigError(f"{where} must be {names}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where} must be one of {list(args)}, got {value!r}")
        return value
    if hint in _TYPE_NAMES:
        if hint is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise ConfigError(f"{where} must be {_TYPE_NAMES[hint]}, got {value!r} ({type(value).__name__})")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return tuple(_conform(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (Mapping, dict):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        keyed = dataclasses.is_dataclass(args[1])  # domains, backbones: the YAML key is the spec's key
        items = {str(k): {**v, "key": str(k)} if keyed and isinstance(v, Mapping) else v for k, v in value.items()}
        return {k: _conform(v, args[1], f"{where}.{k}") for k, v in items.items()}
    return value


def _section(cls, raw: Any, where: str, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """A YAML mapping -> keyword arguments of dataclass ``cls``: unknown keys refused, each value of its field's
    type (``skip``: fields filled in by the caller)."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"{where}: {unknown} are not {cls.__module__.split('.')[0]}.{cls.__name__} fields")
    out = {k: _conform(v, hints[k], f"{where}.{k}") for k, v in raw.items()}
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.init and required and f.name not in out and f.name not in skip:
            raise ConfigError(f"{where}: missing required key {f.name!r}")
    return out


def _library_fields(cls, raw: Any, where: str, **required: Any) -> dict[str, Any]:
    """A preset's ``training_args`` / ``cmkd_config``: typed like ``cls``'s fields, then checked by ``cls`` itself
    (ints stay ints: 500, not 500.0)."""
    out = _section(cls, raw, where)
    try:
        cls(**{**required, **out})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return {k: raw[k] if type(raw[k]) is int and isinstance(v, float) else v for k, v in out.items()}


def _require(raw: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in raw:
        raise ConfigError(f"{where}: missing required key {key!r}")
    return raw[key]


def _tasks(raw: Any, domains: Mapping[str, DomainSpec], where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}: tasks must be a non-empty list of 'SRC->TGT' strings, got {raw!r}")
    tasks = []
    for text in raw:
        if TASK_SEPARATOR not in str(text):
            raise ConfigError(f"{where}: task {text!r} must look like 'SRC{TASK_SEPARATOR}TGT'")
        src, tgt = (s.strip() for s in str(text).split(TASK_SEPARATOR, 1))
        for key in (src, tgt):
            if key not in domains:
                raise ConfigError(f"{where}: task {text!r} names unknown domain key {key!r}; keys: {list(domains)}")
        tasks.append((src, tgt))
    return tuple(tasks)


def benchmark_from_dict(raw: Any, where: str) -> BenchmarkConfig:
    """A parsed benchmark YAML -> validated :class:`BenchmarkConfig`; ``where`` names the file(s) in messages."""
    from .config import CMKDConfig
    from .trainer import CMKDTrainingArguments

    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a YAML mapping at the top level, got {type(raw).__name__}")
    special = ("tasks", "training_args", "cmkd_config")  # "SRC->TGT" strings, and the libraries' own fields
    top = _section(
        BenchmarkConfig, {k: v for k, v in raw.items() if k not in special}, where, (*special, "display_name")
    )
    if not top["domains"]:
        raise ConfigError(f"{where}: domains must be a non-empty mapping of domain key -> {{name, folder}}")
    tasks, training_args, cmkd_config = (_require(raw, key, where) for key in special)
    training_args = _library_fields(CMKDTrainingArguments, training_args, f"{where}.training_args")
    missing = [k for k in ("max_steps", "eval_steps", "seed") if k not in training_args]
    if missing:
        raise ConfigError(f"{where}.training_args: missing required keys {missing}")
    cfg = BenchmarkConfig(
        **{**top, "display_name": top.get("display_name") or top["name"]},
        tasks=_tasks(tasks, top["domains"], where),
        training_args=training_args,
        cmkd_config=_library_fields(CMKDConfig, cmkd_config, f"{where}.cmkd_config"),
    )
    _validate(cfg, where)
    return cfg


def _positive(value: float, label: str, integer: bool = False) -> None:
    if integer and value < 1:
        raise ConfigError(f"{label} must be an integer >= 1, got {value}")
    if not integer and not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{label} must be a finite number > 0, got {value}")


def _validate(cfg: BenchmarkConfig, where: str) -> None:
    """What no library class checks: cross-field consistency of the preset itself."""
    _positive(cfg.num_classes, f"{where}: num_classes", integer=True)
    _positive(cfg.batch_size, f"{where}: batch_size", integer=True)
    _positive(cfg.augmentation.image_size, f"{where}: augmentation.image_size", integer=True)
    for key, bb in cfg.backbones.items():
        for name in ("learning_rate", "head_lr_multiplier", "tau"):
            _positive(getattr(bb, name), f"{where}: backbones.{key}.{name}")
    if cfg.backbone not in cfg.backbones:
        raise ConfigError(f"{where}: default backbone {cfg.backbone!r} not among backbones {list(cfg.backbones)}")
    if cfg.classes is not None and len(cfg.classes) != cfg.num_classes:
        raise ConfigError(f"{where}: {len(cfg.classes)} class names listed but num_classes is {cfg.num_classes}")
    if cfg.partial.available and not cfg.partial.num_target_classes:
        raise ConfigError(f"{where}: partial.available needs partial.num_target_classes")
    for key in cfg.augmentation.source_train_overrides:
        if key not in cfg.domains:
            raise ConfigError(f"{where}: augmentation override for unknown domain {key!r}")
    try:
        cfg.prompt_template.format("x")
    except (IndexError, KeyError) as exc:
        raise ConfigError(f"{where}: prompt_template must contain one '{{}}' placeholder") from exc
