"""Benchmark YAML -> typed config, the shared recipe CLI, and run-level validation.

Every benchmark recipe (``recipes/office_home.py`` ...) builds its parser with :func:`build_parser`, then calls
:func:`resolve_run_config` (or :func:`parse_args`, which does both and turns a :class:`ConfigError` into an argparse
error). Defaults come from ``recipes/configs/<benchmark>.yaml``; CLI flags override them; conflicting or impossible
requests fail before anything is downloaded, trained or written.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .ranges import FLAG_RANGES, YAML_RANGES, check_number

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
RESULTS_FILENAME = "results.json"  # written last by a finished run; its presence marks the folder as finished
TASK_SEPARATOR = "->"

METHODS = ("cmkd", "baseline", "zero_shot")
METRICS = ("accuracy", "mean_class_accuracy")
TABLE_LAYOUTS = ("tasks", "per_class", "matrix")


class ConfigError(ValueError):
    """A benchmark YAML or a combination of recipe flags that cannot run; the message says how to fix it."""


# --------------------------------------------------------------------------------------------------------------------
# Typed benchmark config
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DomainSpec:
    key: str  # short name used in task names and on the CLI, e.g. "Ar"
    name: str  # human name, e.g. "Art"
    folder: str  # directory under --data_dir as the dataset ships, e.g. "Art" or "amazon/images"
    alt_folders: tuple[str, ...] = ()  # other shipped spellings, tried in order after `folder`
    list_files: Mapping[str, str] = field(default_factory=dict)  # split -> image-list file name
    aliases: tuple[str, ...] = ()

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
    train: str
    test: str
    strong: str = "fixmatch_strong"  # FixMatch's strong target view
    source_train_overrides: Mapping[str, str] = field(default_factory=dict)  # domain key -> preset when source

    def train_preset(self, domain_key: str, role: str) -> str:
        """Preset for a training view of ``domain_key`` used as ``role`` ("source" or "target")."""
        if role == "source":
            return self.source_train_overrides.get(domain_key, self.train)
        return self.train


@dataclass(frozen=True)
class PartialSpec:
    available: bool
    num_target_classes: int | None = None
    partial_class_threshold: int | None = None  # CMKDConfig fields, applied with --partial
    cls_weight: float | None = None
    transfer_weight: float | None = None

    def cmkd_config(self) -> dict[str, Any]:
        """The CMKDConfig fields this section sets (applied over ``cmkd_config`` with --partial)."""
        names = ("partial_class_threshold", "cls_weight", "transfer_weight")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


def _training_arg_types() -> dict[str, Any]:
    """``cmkd.CMKDTrainingArguments`` field name -> type: the keys a preset's ``training_args`` may set."""
    from cmkd import CMKDTrainingArguments

    hints = typing.get_type_hints(CMKDTrainingArguments)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(CMKDTrainingArguments) if f.init}


@dataclass(frozen=True)
class BenchmarkConfig:
    name: str
    display_name: str
    num_classes: int
    domains: Mapping[str, DomainSpec]
    tasks: tuple[tuple[str, str], ...]
    metric: str
    eval_split: str
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
    loader: str = "files"  # "files" (ImageFolder / image lists / Hub) or "torchvision" (digits)
    table_layout: str = "tasks"
    source_path: str = ""

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


def _require(mapping: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in mapping:
        raise ConfigError(f"{where}: missing required key {key!r}")
    return mapping[key]


def _section(cls, raw: Mapping[str, Any], where: str):
    """Build a frozen dataclass from a YAML mapping, rejecting unknown and missing keys."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; allowed: {sorted(names)}")
    kwargs = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in raw:
            kwargs[f.name] = _conform(raw[f.name], hints[f.name], f"{where}.{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing required key {f.name!r}")
    return cls(**kwargs)


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _describe_type(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is tuple:
        return "a list"
    if origin in (Mapping, dict):
        return "a mapping"
    return _TYPE_NAMES.get(hint, getattr(hint, "__name__", str(hint)))


def _conform(value: Any, hint: Any, where: str) -> Any:
    """``value`` as the YAML field typed ``hint`` needs it (ints accepted as floats, lists as tuples), or a
    :class:`ConfigError` naming the key: a quoted number or a list where a mapping belongs must not reach the code."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options:
            try:
                return _conform(value, option, where)
            except ConfigError:
                continue
        wanted = " or ".join(_describe_type(a) for a in options)
        raise ConfigError(f"{where} must be {wanted}{' (or null)' if type(None) in args else ''}, got {value!r}")
    if hint is Any:
        return value
    if hint in _TYPE_NAMES:
        ok = isinstance(value, hint) and not (hint is int and isinstance(value, bool))
        if hint is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not ok:
            raise ConfigError(
                f"{where} must be {_TYPE_NAMES[hint]}, got {value!r} ({type(value).__name__}); fix the YAML value"
            )
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r} ({type(value).__name__})")
        return tuple(_conform(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (Mapping, dict):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {value!r} ({type(value).__name__})")
        return {_conform(k, args[0], where): _conform(v, args[1], f"{where}.{k}") for k, v in value.items()}
    return value


def _parse_domains(raw: Mapping[str, Any], where: str) -> dict[str, DomainSpec]:
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError(
            f"{where}.domains must be a non-empty mapping of domain key -> {{name, folder}}, got {raw!r}"
        )
    domains = {}
    for key, spec in raw.items():
        if not isinstance(spec, Mapping):
            raise ConfigError(f"{where}.domains.{key} must be a mapping with name and folder, got {spec!r}")
        spec = dict(spec)
        list_files = spec.pop("list_files", None)
        list_file = spec.pop("list_file", None)
        if list_files is None:
            list_files = {"train": list_file, "test": list_file} if list_file else {}
        domains[str(key)] = DomainSpec(
            key=str(key),
            name=str(_require(spec, "name", f"{where}.domains.{key}")),
            folder=str(_require(spec, "folder", f"{where}.domains.{key}")),
            alt_folders=_conform(spec.get("alt_folders", ()), tuple[str, ...], f"{where}.domains.{key}.alt_folders"),
            list_files=_conform(list_files, Mapping[str, str], f"{where}.domains.{key}.list_files"),
            aliases=tuple(
                str(a) for a in _conform(spec.get("aliases", ()), tuple[Any, ...], f"{where}.domains.{key}")
            ),
        )
        extra = set(spec) - {"name", "folder", "alt_folders", "aliases"}
        if extra:
            raise ConfigError(f"{where}.domains.{key}: unknown keys {sorted(extra)}")
    return domains


def available_benchmarks() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_benchmark_config(name_or_path: str | os.PathLike) -> BenchmarkConfig:
    """Load ``recipes/configs/<name>.yaml`` (or any YAML path) into a validated :class:`BenchmarkConfig`."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"no benchmark config {str(name_or_path)!r}; available: {', '.join(available_benchmarks())}")
    return benchmark_from_dict(read_yaml(path), path.name, str(path))


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
            f"{what} {path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
            f"{exc.start}); save it as UTF-8"
        ) from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{what} {path} is not valid YAML{at}: {problem}") from exc
    except OSError as exc:
        raise ConfigError(f"{what} {str(path)!r} cannot be read: {exc.strerror or exc}") from exc


def benchmark_from_dict(raw: Any, where: str, source_path: str = "") -> BenchmarkConfig:
    """A parsed benchmark YAML -> validated :class:`BenchmarkConfig`; ``where`` names the file(s) in messages."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a YAML mapping at the top level, got {type(raw).__name__}")

    domains = _parse_domains(_require(raw, "domains", where), where)
    tasks = []
    raw_tasks = _require(raw, "tasks", where)
    if not isinstance(raw_tasks, list) or not raw_tasks:
        raise ConfigError(f"{where}: tasks must be a non-empty list of 'SRC->TGT' strings, got {raw_tasks!r}")
    for text in raw_tasks:
        if TASK_SEPARATOR not in str(text):
            raise ConfigError(f"{where}: task {text!r} must look like 'SRC{TASK_SEPARATOR}TGT'")
        src, tgt = (s.strip() for s in str(text).split(TASK_SEPARATOR, 1))
        for key in (src, tgt):
            if key not in domains:
                raise ConfigError(f"{where}: task {text!r} names unknown domain key {key!r}; keys: {list(domains)}")
        tasks.append((src, tgt))

    backbones = {}
    raw_backbones = _require(raw, "backbones", where)
    if not isinstance(raw_backbones, Mapping):
        raise ConfigError(
            f"{where}: backbones must be a mapping of name -> {{model, learning_rate, ...}}, got {raw_backbones!r}"
        )
    for key, spec in raw_backbones.items():
        if not isinstance(spec, Mapping):
            raise ConfigError(f"{where}.backbones.{key} must be a mapping, got {spec!r}")
        backbones[str(key)] = _section(BackboneSpec, {"key": str(key), **spec}, f"{where}.backbones.{key}")

    aug_raw = _require(raw, "augmentation", where)
    classes = _conform(raw.get("classes"), tuple[Any, ...] | None, f"{where}.classes")
    cfg = BenchmarkConfig(
        name=str(_require(raw, "name", where)),
        display_name=str(raw.get("display_name", raw["name"])),
        num_classes=_conform(_require(raw, "num_classes", where), int, f"{where}.num_classes"),
        domains=domains,
        tasks=tuple(tasks),
        metric=str(raw.get("metric", "accuracy")),
        eval_split=str(raw.get("eval_split", "train")),
        backbone=str(_require(raw, "backbone", where)),
        backbones=backbones,
        batch_size=_conform(_require(raw, "batch_size", where), int, f"{where}.batch_size"),
        prompt_template=_conform(_require(raw, "prompt_template", where), str, f"{where}.prompt_template"),
        training_args=_training_args(_require(raw, "training_args", where), f"{where}.training_args"),
        cmkd_config=_cmkd_config(_require(raw, "cmkd_config", where), f"{where}.cmkd_config"),
        augmentation=_section(AugmentationSpec, aug_raw, f"{where}.augmentation"),
        partial=_section(PartialSpec, _require(raw, "partial", where), f"{where}.partial"),
        homepage=str(raw.get("homepage", "")),
        license=str(raw.get("license", "")),
        classes=tuple(str(c) for c in classes) if classes else None,
        requires_image_lists=_conform(raw.get("requires_image_lists", False), bool, f"{where}.requires_image_lists"),
        loader=str(raw.get("loader", "files")),
        table_layout=str(raw.get("table_layout", "tasks")),
        source_path=source_path,
    )
    _validate_benchmark(cfg, where)
    return cfg


def _training_args(raw: Any, where: str) -> dict[str, Any]:
    """A preset's ``training_args``: only ``CMKDTrainingArguments`` field names, each of its field's type."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    types_ = _training_arg_types()
    unknown = sorted(set(raw) - set(types_))
    if unknown:
        raise ConfigError(f"{where}: {unknown} are not cmkd.CMKDTrainingArguments fields; fix the spelling")
    missing = [k for k in ("max_steps", "eval_steps", "seed") if k not in raw]
    if missing:
        raise ConfigError(f"{where}: missing required keys {missing}")
    out = {k: _conform(v, types_[k], f"{where}.{k}") for k, v in raw.items()}
    return {k: raw[k] if type(raw[k]) is int and isinstance(v, float) else v for k, v in out.items()}  # 500, not 500.0


def _cmkd_config(raw: Any, where: str) -> dict[str, Any]:
    """A preset's ``cmkd_config``: ``cmkd.CMKDConfig`` fields, checked by building the config."""
    from cmkd import CMKDConfig

    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(CMKDConfig)
    known = {f.name for f in dataclasses.fields(CMKDConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where}: {unknown} are not cmkd.CMKDConfig fields; fix the spelling")
    out = {k: _conform(v, hints[k], f"{where}.{k}") for k, v in raw.items()}
    try:
        CMKDConfig(**out)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: cmkd settings: {exc}") from None
    return out


def _validate_benchmark(cfg: BenchmarkConfig, where: str) -> None:
    sections = {"training_args": cfg.training_args, "augmentation": cfg.augmentation, "partial": cfg.partial}
    for key, spec in YAML_RANGES.items():
        section, _, name = key.rpartition(".")
        if not section:
            values = {key: getattr(cfg, name)}
        elif section == "backbones":
            values = {f"backbones.{b}.{name}": getattr(bb, name) for b, bb in cfg.backbones.items()}
        elif isinstance(sections[section], Mapping):
            values = {key: sections[section].get(name)}
        else:
            values = {key: getattr(sections[section], name)}
        for label, value in values.items():
            if value is not None:
                try:
                    check_number(f"{where}: {label}", value, spec)
                except ValueError as exc:
                    raise ConfigError(str(exc)) from None
    if cfg.metric not in METRICS:
        raise ConfigError(f"{where}: metric {cfg.metric!r} not in {METRICS}")
    if cfg.table_layout not in TABLE_LAYOUTS:
        raise ConfigError(f"{where}: table_layout {cfg.table_layout!r} not in {TABLE_LAYOUTS}")
    if cfg.eval_split not in ("train", "test"):
        raise ConfigError(f"{where}: eval_split must be 'train' or 'test'")
    if cfg.loader not in ("files", "torchvision"):
        raise ConfigError(f"{where}: loader must be 'files' or 'torchvision'")
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


# --------------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------------


def build_parser(
    benchmark: str | BenchmarkConfig | None = None, description: str | None = None
) -> argparse.ArgumentParser:
    """The flags every benchmark recipe shares. Recipes may add their own arguments to the returned parser."""
    cfg = load_benchmark_config(benchmark) if isinstance(benchmark, str) else benchmark
    title = cfg.display_name if cfg else "a benchmark"
    parser = argparse.ArgumentParser(
        description=description or f"CMKD / RST unsupervised domain adaptation on {title}."
    )
    domains_help = ", ".join(f"{d.key}={d.name}" for d in cfg.domains.values()) if cfg else "see the YAML"
    defaults: dict[str, Any] = {}
    if cfg:
        bb = cfg.backbones[cfg.backbone]
        defaults = {
            "tau": bb.tau,
            "model": bb.model,
            "backbone": f"{cfg.backbone}; choices: {', '.join(cfg.backbones)}",
            "max_steps": cfg.training_args["max_steps"],
            "eval_steps": cfg.training_args["eval_steps"],
            "batch_size": cfg.batch_size,
            "learning_rate": bb.learning_rate,
            "seed": cfg.training_args["seed"],
        }

    def dflt(key: str) -> str:
        return f"(default: {defaults[key]})" if key in defaults else "(default: from the benchmark YAML)"

    task = parser.add_argument_group("task")
    task.add_argument("-s", "--source", help=f"source domain ({domains_help})")
    task.add_argument("-t", "--target", help="target domain")
    task.add_argument("--all", action="store_true", help="run every transfer task of the benchmark (paper's list)")
    task.add_argument("--config", help="YAML overriding the benchmark defaults (same schema as recipes/configs/)")

    method = parser.add_argument_group("method")
    method.add_argument("--rst", action="store_true", help="Residual Sparse Training: ship a sparse patch per task")
    method.add_argument("--tau", type=float, help=f"RST reset threshold {dflt('tau')}")
    method.add_argument(
        "--peft",
        metavar="METHOD[,METHOD...]",
        help="how the vision tower is trained: rst, lora, adalora, bitfit, linear_probe, full (default: full; "
        "--rst = --peft rst). Several methods, comma separated, run one after the other through the same CMKD "
        "trainer (each in <output_dir>/<method>) and end with the paper's Table VII: accuracy per task, average and "
        "DSP(M) per method (results.md, accuracy_vs_dsp.png)",
    )
    method.add_argument("--fixmatch", action="store_true", help="add FixMatch consistency on strong target views")
    method.add_argument("--partial", action="store_true", help="partial-set protocol (Office-Home 65 -> 25 classes)")
    method.add_argument("--baseline", action="store_true", help="source-only fine-tuning, no CMKD")
    method.add_argument(
        "--zero-shot",
        "--zero_shot",
        dest="zero_shot",
        action="store_true",
        help="evaluate CLIP zero-shot on the target, no training",
    )

    model = parser.add_argument_group("model")
    model.add_argument("--model", help=f"any CLIP on the Hub or a local path {dflt('model')}")
    model.add_argument("--backbone", help=f"hyper-parameter family (lr, multiplier, tau) {dflt('backbone')}")

    data = parser.add_argument_group("data")
    data.add_argument("--data_dir", help="root folder of the benchmark as it ships (see docs/datasets.md)")
    data.add_argument("--image_list_dir", help="folder with per-domain image-list files ('relative/path label')")
    data.add_argument(
        "--image_list",
        action="append",
        default=[],
        metavar="DOMAIN=FILE",
        help="image-list file for one domain (repeatable); paths inside are relative to --data_dir",
    )
    data.add_argument("--dataset_id", help="Hub dataset id or local path for datasets.load_dataset")
    data.add_argument("--domain_column", help="with --dataset_id: column naming each row's domain")
    data.add_argument(
        "--dataset_config",
        help="with --dataset_id: config name; {domain}, {key}, {name} are filled "
        "in per domain (default: {domain}, or none with --domain_column)",
    )
    data.add_argument("--download", action="store_true", help="digits only: let torchvision download into --data_dir")
    data.add_argument(
        "--verify_images",
        choices=("none", "header", "full"),
        default="none",
        help="check every image before training (header = fast PIL open, full = decode)",
    )
    data.add_argument("--num_workers", type=int, help="DataLoader workers (default: CPUs available, at most 8)")

    train = parser.add_argument_group("training")
    train.add_argument("--max_steps", type=int, help=f"training iterations {dflt('max_steps')}")
    train.add_argument(
        "--eval_steps", type=int, help=f"iterations between evaluations and checkpoints {dflt('eval_steps')}"
    )
    train.add_argument("--batch_size", type=int, help=f"per-domain batch over all processes {dflt('batch_size')}")
    train.add_argument(
        "--learning_rate", type=float, help=f"encoder lr, head: lr x head_lr_multiplier {dflt('learning_rate')}"
    )
    train.add_argument("--seed", type=int, help=f"random seed {dflt('seed')}")

    out = parser.add_argument_group("output")
    out.add_argument(
        "--output_dir",
        help="where checkpoints, results and tables go (default: runs/<benchmark>/<method>/<SRC>-<TGT>, "
        "or runs/<benchmark>/<method>/all with --all; <method> is e.g. cmkd_rst, baseline, clip)",
    )
    out.add_argument("--overwrite", action="store_true", help="allow writing into a folder holding a finished run")
    out.add_argument("--push_to_hub", action="store_true", help="push the adapted model / RST patch to the Hub")
    out.add_argument(
        "--hub_model_id",
        help="Hub repo id for --push_to_hub (default: the --output_dir folder's name, or "
        "<benchmark>-<method>[-<src>-<tgt>] with the default output folder; --all adds -<src>-<tgt> per task)",
    )
    out.add_argument("--hub_token", help="Hub token (default: HF_TOKEN or the token saved by `hf auth login`)")
    from .unlabeled import add_label_free_arguments

    return add_label_free_arguments(parser)


@dataclass
class RunConfig:
    """Everything one recipe invocation needs, after YAML defaults, --config and CLI flags are merged."""

    benchmark: BenchmarkConfig
    tasks: list[tuple[str, str]]  # domain keys
    method: str  # "cmkd" | "baseline" | "zero_shot"
    rst: bool  # this run trains an RST adapter (peft == "rst")
    tau: float | None  # None unless RST is among the methods
    fixmatch: bool
    partial: bool
    backbone: BackboneSpec
    model: str
    learning_rate: float
    head_lr: float
    max_steps: int
    eval_steps: int
    batch_size: int
    seed: int
    output_dir: Path
    overwrite: bool
    data_dir: Path | None
    image_list_dir: Path | None
    image_lists: dict[str, Path]  # domain key -> list file
    dataset_id: str | None
    domain_column: str | None
    dataset_config: str | None
    download: bool
    verify_images: str
    num_workers: int | None
    push_to_hub: bool
    hub_model_id: str | None
    hub_token: str | None
    # target without labels / labeled target for reporting / checkpoint selection (recipes/core/unlabeled.py)
    target_dir: str | None = None
    target_list: str | None = None
    target_dataset_id: str | None = None
    target_split: str = "train"
    eval_dir: str | None = None
    eval_list: str | None = None
    eval_dataset_id: str | None = None
    eval_split: str = "train"
    selection: str | None = None  # a validator, "last" or "oracle"; None: CMKDTrainingArguments' default
    source_val_fraction: float = 0.0
    # the run itself (recipes/core/runner.py)
    resume_from_checkpoint: str | None = None  # "last" or a checkpoint folder
    keep_checkpoints: bool = False
    logging_steps: int | None = None
    quiet: bool = False
    report_to: str = "none"  # TrainingArguments.report_to
    recipe_script: str | None = None  # the script named in model cards (default recipes/<benchmark>.py)
    peft: str = "full"  # cmkd.PEFT_METHODS: the method of this run
    peft_methods: tuple[str, ...] = ("full",)  # every method asked for (--peft a,b,...): one run each

    def label_free(self) -> dict[str, Any]:
        """The target-without-labels / reporting / selection flags by name (recipes/core/unlabeled.py)."""
        from .unlabeled import LABEL_FREE_DESTS

        return {name: getattr(self, name) for name in LABEL_FREE_DESTS}

    @property
    def task_names(self) -> list[str]:
        return [task_name(s, t) for s, t in self.tasks]

    @property
    def method_label(self) -> str:
        """Row label in the results table, following the paper (CLIP, Baseline, CMKD, CMKD+RST, CMKD+FixMatch)."""
        if self.method == "zero_shot":
            return "CLIP"
        label = "Baseline" if self.method == "baseline" else "CMKD"
        if self.fixmatch:
            label += "+FixMatch"
        if self.rst:
            label += "+RST"
        elif self.peft != "full":
            from cmkd import PEFT_LABELS

            label += f"+{PEFT_LABELS[self.peft]}"
        return label

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary for results metadata; the Hub token is never included."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name in ("benchmark", "hub_token"):
                continue
            value = getattr(self, f.name)
            if isinstance(value, Path):
                value = str(value)
            elif f.name == "backbone":
                value = dataclasses.asdict(value)
            elif f.name == "image_lists":
                value = {k: str(v) for k, v in value.items()}
            elif f.name == "tasks":
                value = [task_name(s, t) for s, t in value]
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        out["benchmark"] = self.benchmark.name
        out["method_label"] = self.method_label
        return out


def _merge_yaml_override(cfg: BenchmarkConfig, override_path: str) -> BenchmarkConfig:
    """Deep-merge a user YAML over the benchmark's own YAML and validate the result like a benchmark YAML; messages
    name the override file."""
    base = read_yaml(cfg.source_path)
    override = read_yaml(override_path, what="--config file")
    if override is None:
        override = {}
    if not isinstance(override, Mapping):
        raise ConfigError(f"--config file {override_path} must hold a YAML mapping, got {type(override).__name__}")

    def merge(a, b):
        if isinstance(a, dict) and isinstance(b, dict):
            return {k: merge(a.get(k), v) if k in a else v for k, v in {**a, **b}.items()}
        return b

    where = f"{Path(override_path).name} (over {Path(cfg.source_path).name})"
    return benchmark_from_dict(merge(base, override), where, f"{cfg.source_path} + {override_path}")


def package_path(name: str | None) -> str | None:
    """``cmkd:<path>`` (a preset's model shipped inside the installed cmkd package) -> that folder; else ``name``."""
    if not name or not name.startswith("cmkd:"):
        return name
    import cmkd

    return str(Path(cmkd.__file__).resolve().parent / name.removeprefix("cmkd:"))


def hub_token_available(explicit: str | None = None) -> str | None:
    """The token --push_to_hub would use: --hub_token, else HF_TOKEN / the saved login (huggingface_hub.get_token)."""
    if explicit:
        return explicit
    from huggingface_hub import get_token

    return get_token()


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse a folder that already holds a finished run (its results.json) unless ``overwrite``."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--output_dir {str(path)!r} exists and is not a folder")
    marker = path / RESULTS_FILENAME
    if marker.exists() and not overwrite:
        raise ConfigError(
            f"--output_dir {str(path)!r} already holds a finished run ({marker.name}); "
            "choose another folder or pass --overwrite to replace it"
        )
    return path


DEFAULT_RUNS_DIR = "runs"


def method_slug(method: str, args: argparse.Namespace) -> str:
    """Folder name of a method (``cmkd_rst``, ``baseline``, ``clip``, ``cmkd_fixmatch_partial`` ...)."""
    parts = ["clip" if method == "zero_shot" else method]
    methods = _peft_methods(args)
    peft = [] if methods == ("full",) else [methods[0]] if len(methods) == 1 else ["peft"]
    parts += ["fixmatch"] * bool(getattr(args, "fixmatch", False)) + peft
    return "_".join(parts + ["partial"] * bool(getattr(args, "partial", False)))


def _peft_methods(args: argparse.Namespace) -> tuple[str, ...]:
    """``--peft a,b`` (and ``--rst`` = ``--peft rst``) -> the methods to run, in the given order; default full."""
    from cmkd import PEFT_METHODS

    text = getattr(args, "peft", None)
    if not text:
        return ("rst",) if getattr(args, "rst", False) else ("full",)
    methods = tuple(dict.fromkeys(m.strip() for m in str(text).split(",") if m.strip()))
    unknown = [m for m in methods if m not in PEFT_METHODS]
    if unknown or not methods:
        raise ConfigError(f"--peft {text!r}: unknown method(s) {unknown}; choose from {', '.join(PEFT_METHODS)}")
    if getattr(args, "rst", False) and methods != ("rst",):
        raise ConfigError("--rst is --peft rst; pass --peft with every method you want (e.g. --peft rst,lora)")
    if "adalora" in methods and getattr(args, "selection", None) != "last":
        raise ConfigError(
            "--peft adalora needs --selection last: AdaLoRA prunes ranks while it trains, and peft cannot load an "
            "earlier (best) checkpoint into the pruned adapter"
        )
    return methods


def default_output_dir(benchmark: str, method: str, tasks: Sequence[tuple[str, str]] | None) -> Path:
    """``runs/<benchmark>/<method>/<SRC>-<TGT>`` for one task, ``runs/<benchmark>/<method>/all`` for ``--all``
    (``tasks=None``): every README command runs without --output_dir, and two methods never share a folder."""
    root = Path(DEFAULT_RUNS_DIR) / benchmark / method
    if tasks is None:
        return root / "all"
    ((source, target),) = tasks
    return root / f"{source}-{target}"


def check_flag_numbers(args: argparse.Namespace, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """Every numeric flag (``ranges.FLAG_RANGES``), given or defaulted from the YAML, checked against its range:
    ``{name: value}`` for the names in ``defaults`` (None stays None: the flag is unset and has no default)."""
    out = {}
    for name, default in defaults.items():
        given = getattr(args, name, None)
        value = default if given is None else given
        if value is not None:
            label = f"--{name}" if given is not None else f"the YAML default of --{name}"
            try:
                value = check_number(label, value, FLAG_RANGES[name])
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        out[name] = value
    return out


def resolve_run_config(args: argparse.Namespace, benchmark: str | BenchmarkConfig) -> RunConfig:
    """Merge YAML defaults with CLI flags and validate the combination. Raises :class:`ConfigError`."""
    cfg = load_benchmark_config(benchmark) if isinstance(benchmark, str) else benchmark
    if getattr(args, "config", None):
        cfg = _merge_yaml_override(cfg, args.config)

    # --- method flags -------------------------------------------------------------------------------------------
    if args.baseline and args.zero_shot:
        raise ConfigError("--baseline and --zero-shot are different methods; pass only one of them")
    method = "baseline" if args.baseline else "zero_shot" if args.zero_shot else "cmkd"
    if args.fixmatch and method != "cmkd":
        raise ConfigError(f"--fixmatch extends CMKD and cannot be combined with --{method.replace('_', '-')}")
    peft_methods = _peft_methods(args)
    rst = "rst" in peft_methods
    if method == "zero_shot" and peft_methods != ("full",):
        raise ConfigError("--rst/--peft choose how the model is trained, but --zero-shot trains nothing; drop one")
    if args.tau is not None and not rst:
        raise ConfigError("--tau is the RST threshold; add --rst (or --peft rst) or drop --tau")
    if args.partial and not cfg.partial.available:
        with_partial = [
            b for b in available_benchmarks() if b != cfg.name and load_benchmark_config(b).partial.available
        ]
        raise ConfigError(
            f"{cfg.display_name} has no partial-set protocol in the paper; --partial is available for: "
            f"{', '.join(with_partial) or 'none'}"
        )
    if args.push_to_hub and method == "zero_shot":
        raise ConfigError("--zero-shot trains nothing, so there is nothing to --push_to_hub")

    # --- tasks --------------------------------------------------------------------------------------------------
    from .unlabeled import check_label_free_args, custom_target_name

    check_label_free_args(args, cfg)
    custom_target = custom_target_name(args)  # target given by --target_*/--eval_* instead of a benchmark domain
    if args.all and (args.source or args.target):
        raise ConfigError("--all runs every task of the benchmark; drop --source/--target (or drop --all)")
    if args.all:
        tasks = list(cfg.tasks)
    elif custom_target is not None:
        if not args.source:
            raise ConfigError(
                "give the labeled --source domain to adapt from (the target comes from --target_*/--eval_*)"
            )
        tasks = [(cfg.domain(args.source).key, custom_target)]
    else:
        if not args.source or not args.target:
            raise ConfigError(
                f"give --source and --target (tasks: {', '.join(cfg.task_names())}) or --all for every task"
            )
        src, tgt = cfg.domain(args.source), cfg.domain(args.target)
        if src.key == tgt.key:
            raise ConfigError(f"source and target are the same domain ({src.key}={src.name}); pick two different ones")
        tasks = [(src.key, tgt.key)]

    # --- model / hyper-parameters -------------------------------------------------------------------------------
    backbone_key = args.backbone or cfg.backbone
    if backbone_key not in cfg.backbones:
        raise ConfigError(
            f"--backbone {backbone_key!r} unknown for {cfg.display_name}; choose from {list(cfg.backbones)}"
        )
    backbone = cfg.backbones[backbone_key]
    model = package_path(args.model or backbone.model)
    if not model:
        raise ConfigError(
            f"backbone {backbone_key!r} has no transformers checkpoint on the Hub; pass --model with a Hub id or a "
            "local path of a CLIPModel checkpoint"
        )
    numbers = check_flag_numbers(
        args,
        defaults={
            "learning_rate": backbone.learning_rate,
            "tau": backbone.tau if rst else None,
            "max_steps": cfg.training_args["max_steps"],
            "eval_steps": cfg.training_args["eval_steps"],
            "batch_size": cfg.batch_size,
            "seed": cfg.training_args["seed"],
            "num_workers": None,
        },
    )
    learning_rate, tau, max_steps = numbers["learning_rate"], numbers["tau"], numbers["max_steps"]
    eval_steps, batch_size, seed = numbers["eval_steps"], numbers["batch_size"], numbers["seed"]

    # --- data sources -------------------------------------------------------------------------------------------
    image_lists = {}
    for item in args.image_list:
        if "=" not in item:
            raise ConfigError(f"--image_list expects DOMAIN=FILE, got {item!r}")
        dom, file = item.split("=", 1)
        image_lists[cfg.domain(dom).key] = Path(file)
    if args.dataset_id and (args.image_list_dir or image_lists):
        raise ConfigError(
            "--dataset_id reads images from the Hub; drop --image_list_dir/--image_list (or --dataset_id)"
        )
    if args.download and cfg.loader != "torchvision":
        raise ConfigError(
            f"--download only applies to torchvision datasets (digits); {cfg.display_name} must be "
            "downloaded by hand, see docs/datasets.md"
        )
    if (args.domain_column or args.dataset_config) and not args.dataset_id:
        raise ConfigError("--domain_column/--dataset_config only apply with --dataset_id")
    if cfg.loader == "torchvision" and (args.image_list_dir or image_lists):
        raise ConfigError(f"{cfg.display_name} is read with torchvision loaders; --image_list(_dir) does not apply")
    if not args.dataset_id and not args.data_dir and not image_lists:
        raise ConfigError(
            f"no data given: pass --data_dir (the {cfg.display_name} folder as it ships) or --dataset_id; "
            "see docs/datasets.md"
        )

    # --- output / Hub -------------------------------------------------------------------------------------------
    if args.output_dir is not None and not str(args.output_dir).strip():
        raise ConfigError("--output_dir is empty; pass a folder, or drop the flag for the default")
    hub_model_id = args.hub_model_id
    if args.output_dir is None:
        slug = method_slug(method, args)
        output_dir = default_output_dir(cfg.name, slug, tasks if not args.all else None)
        if hub_model_id is None:  # the folder name ("Ar-Cl", "all") alone would be a poor repo name
            hub_model_id = f"{cfg.name}-{slug}" + ("" if args.all else "-{}-{}".format(*tasks[0])).lower()
    else:
        output_dir = Path(args.output_dir)
    output_dir = check_output_dir(output_dir, args.overwrite)
    token = None
    if args.push_to_hub:
        token = hub_token_available(args.hub_token)
        if not token:
            raise ConfigError(
                "--push_to_hub needs a Hub token: set HF_TOKEN, run `hf auth login`, or pass --hub_token"
            )

    optional = {  # flags with a typed RunConfig field of the same name (absent from a parser without them)
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(RunConfig)
        if f.default is not dataclasses.MISSING
        and f.name not in ("peft", "peft_methods")
        and getattr(args, f.name, None) is not None
    }
    return RunConfig(
        benchmark=cfg,
        tasks=tasks,
        method=method,
        rst=peft_methods == ("rst",),
        peft=peft_methods[0],
        peft_methods=peft_methods,
        tau=tau,
        fixmatch=bool(args.fixmatch),
        partial=bool(args.partial),
        backbone=backbone,
        model=model,
        learning_rate=learning_rate,
        head_lr=learning_rate * backbone.head_lr_multiplier,
        max_steps=max_steps,
        eval_steps=eval_steps,
        batch_size=batch_size,
        seed=seed,
        output_dir=output_dir,
        overwrite=bool(args.overwrite),
        data_dir=Path(args.data_dir) if args.data_dir else None,
        image_list_dir=Path(args.image_list_dir) if args.image_list_dir else None,
        image_lists=image_lists,
        dataset_id=args.dataset_id,
        domain_column=args.domain_column,
        dataset_config=args.dataset_config,
        download=bool(args.download),
        verify_images=args.verify_images,
        num_workers=args.num_workers,
        push_to_hub=bool(args.push_to_hub),
        hub_model_id=hub_model_id,
        hub_token=token,
        **optional,
    )


def parse_args(
    benchmark: str | BenchmarkConfig,
    argv: Sequence[str] | None = None,
    parser: argparse.ArgumentParser | None = None,
    args: argparse.Namespace | None = None,
) -> RunConfig:
    """Parse ``argv`` with the shared parser (unless ``args`` is given) and resolve it; a ConfigError becomes
    ``parser.error`` (exit 2)."""
    parser = parser or build_parser(benchmark)
    args = parser.parse_args(argv) if args is None else args
    try:
        return resolve_run_config(args, benchmark)
    except ConfigError as exc:
        parser.error(str(exc))
