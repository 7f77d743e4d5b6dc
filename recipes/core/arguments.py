"""The recipes' command line: ``HfArgumentParser`` over the libraries' own dataclasses, a preset's values as defaults.

One name per setting from YAML to Trainer: ``--max_steps``, ``--eval_steps``, ``--learning_rate``, ``--seed``,
``--output_dir``, ``--report_to``, ``--push_to_hub`` ... are ``cmkd.CMKDTrainingArguments`` fields, ``--lambda1``,
``--gamma`` ... are ``cmkd.CMKDConfig`` fields, the data flags are ``recipes.core.data.DataArguments``, and
:class:`RecipeArguments` holds what only a recipe decides (task, method, model, checkpoint rule). The preset
(``cmkd/presets/<benchmark>.yaml``, with ``--config`` merged over it) supplies the defaults; flags override them.
Every impossible combination fails here, with a usage error, before anything is loaded or written.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool

from cmkd import PEFT_LABELS, PEFT_METHODS, CMKDConfig, CMKDTrainingArguments
from cmkd.benchmarks import (
    BackboneSpec,
    BenchmarkConfig,
    ConfigError,
    available_benchmarks,
    load_benchmark_config,
    package_path,
    read_yaml,
    task_name,
)
from cmkd.validators import DEFAULT_VALIDATOR, LAST_NAME, ORACLE_NAME, VALIDATORS, describe

from .data import default_num_workers
from .data_arguments import DataArguments
from .outputs import method_slug, output_folder

SELECTIONS = (*VALIDATORS, "last", "oracle")
RULE_NAMES = {"oracle": ORACLE_NAME, "last": LAST_NAME}
SELECTION_HELP = f"the reported checkpoint: a validator (default {DEFAULT_VALIDATOR}), last, or oracle = {ORACLE_NAME}"
OUTPUT_HELP = (
    "--output_dir: where checkpoints, results and tables go (default: runs/<benchmark>/<method>/<SRC>-<TGT>, or "
    "runs/<benchmark>/<method>/all with --all; <method> is e.g. cmkd_rst, baseline, clip)"
)


@dataclass
class RecipeArguments:
    """What only a recipe decides: the task, the method, the model and the checkpoint rule."""

    benchmark: str | None = field(default=None, metadata={"help": "the preset: cmkd/presets/<benchmark>.yaml"})
    source: str | None = field(default=None, metadata={"aliases": ["-s"], "help": "source domain (labeled)"})
    target: str | None = field(default=None, metadata={"aliases": ["-t"], "help": "target domain (labels unused)"})
    all: bool = field(default=False, metadata={"help": "run every transfer task of the benchmark (paper's list)"})
    config: str | None = field(default=None, metadata={"help": "YAML merged over the preset (same schema)"})
    baseline: bool = field(default=False, metadata={"help": "source-only fine-tuning, no CMKD"})
    zero_shot: bool = field(default=False, metadata={"help": "evaluate CLIP zero-shot on the target, no training"})
    fixmatch: bool = field(default=False, metadata={"help": "add FixMatch consistency on strong target views"})
    partial: bool = field(default=False, metadata={"help": "partial-set protocol (Office-Home 65 -> 25 classes)"})
    rst: bool = field(default=False, metadata={"help": "Residual Sparse Training (= --peft rst)"})
    peft: str | None = field(
        default=None, metadata={"help": f"{', '.join(PEFT_METHODS)} (default full); a,b,...: Table VII"}
    )
    tau: float | None = field(default=None, metadata={"help": "RST reset threshold, tied to the learning rate"})
    model: str | None = field(default=None, metadata={"help": "any CLIP on the Hub or a local folder"})
    backbone: str | None = field(default=None, metadata={"help": "the preset's hyper-parameter family"})
    batch_size: int | None = field(default=None, metadata={"help": "per-domain batch over all processes"})
    selection: str | None = field(default=None, metadata={"choices": SELECTIONS, "help": SELECTION_HELP})
    keep_checkpoints: bool = field(default=False, metadata={"help": "keep the checkpoints of finished tasks"})
    overwrite: bool = field(default=False, metadata={"help": "replace a finished run in --output_dir"})
    quiet: bool = field(default=False, metadata={"help": "no progress bars"})


@dataclass(frozen=True)
class Run:
    """One recipe invocation after parsing: the parsed dataclasses and what was resolved from them."""

    bench: BenchmarkConfig
    recipe: RecipeArguments
    data: DataArguments
    training: CMKDTrainingArguments  # the flags' values; each task gets its own copy (``task_training_args``)
    cmkd: CMKDConfig
    tasks: list[tuple[str, str]]
    method: str  # "cmkd" | "baseline" | "zero_shot"
    peft_methods: tuple[str, ...]
    peft: str  # the method of this run (one of peft_methods)
    backbone: BackboneSpec
    model: str
    tau: float | None
    output_dir: Path
    hub_model_id: str | None
    script: str  # the command model cards name

    @property
    def task_names(self) -> list[str]:
        return [task_name(s, t) for s, t in self.tasks]

    @property
    def selection_rule(self) -> str:
        """How the reported checkpoint is named in every output (the oracle always says it uses target labels)."""
        rule = self.recipe.selection
        return RULE_NAMES.get(rule) or describe(rule or DEFAULT_VALIDATOR)

    @property
    def method_label(self) -> str:
        """Row label, following the paper: CLIP, Baseline, CMKD, CMKD+RST, CMKD+FixMatch+LoRA ..."""
        if self.method == "zero_shot":
            return "CLIP"
        label = ("Baseline" if self.method == "baseline" else "CMKD") + "+FixMatch" * self.recipe.fixmatch
        return label + ("" if self.peft == "full" else f"+{PEFT_LABELS[self.peft]}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary for results metadata; the Hub token is never included."""
        args = {
            k: getattr(self.training, k) for k in ("max_steps", "eval_steps", "learning_rate", "seed", "report_to")
        }
        resolved = {"benchmark": self.bench.name, "tasks": self.task_names, "method_label": self.method_label}
        resolved |= {"peft_methods": list(self.peft_methods), "tau": self.tau, "output_dir": str(self.output_dir)}
        return {
            **dataclasses.asdict(self.recipe),
            **dataclasses.asdict(self.data),
            **args,
            **resolved,
            "model": self.model,
            "selection": self.selection_rule,
        }


def build_parser(bench: BenchmarkConfig, backbone: BackboneSpec, partial: bool, extra: Sequence[type] = ()):
    """The parser of every recipe, with ``bench``'s values as the defaults (``--help`` shows them)."""
    parser = HfArgumentParser(
        (RecipeArguments, DataArguments, CMKDTrainingArguments, CMKDConfig, *extra),
        description=f"CMKD / RST unsupervised domain adaptation of CLIP on {bench.display_name}. {OUTPUT_HELP}.",
    )
    parser.set_defaults(
        **bench.training_args,
        **bench.cmkd_config,
        **(bench.partial.cmkd_config() if partial else {}),
        benchmark=bench.name,
        learning_rate=backbone.learning_rate,
        head_lr_multiplier=backbone.head_lr_multiplier,
        batch_size=bench.batch_size,
        tau=backbone.tau,
        model=backbone.model,
        dataloader_num_workers=default_num_workers(),
        output_dir=None,
    )
    return parser


def parse(
    argv: Sequence[str] | None = None,
    benchmark: str | None = None,
    defaults: dict[str, Any] | None = None,
    extra: Sequence[type] = (),
    script: str | None = None,
    exit_on_error: bool = True,
) -> tuple[Run, list[Any]]:
    """``argv`` -> (:class:`Run`, instances of the ``extra`` dataclasses). ``benchmark`` fixes the preset (a
    ``recipes/<benchmark>.py`` alias); otherwise ``--benchmark`` names it. ``defaults`` override the preset's.
    A bad flag or preset value exits with status 2 and a one-line message (``exit_on_error=False``: raises
    :class:`ConfigError`)."""
    pre = argparse.ArgumentParser(add_help=False)
    for flag in ("--benchmark", "--config", "--backbone", "--output_dir", "--tau"):
        pre.add_argument(flag)
    pre.add_argument("--partial", nargs="?", const=True, default=False, type=string_to_bool)
    known, _ = pre.parse_known_args(argv)
    name = benchmark or known.benchmark or (defaults or {}).get("benchmark")
    presets = available_benchmarks()
    if name is None and {"-h", "--help"} & set(sys.argv[1:] if argv is None else argv):  # no preset yet: its flags
        about = f"presets: {', '.join(presets)}; --benchmark NAME --help lists every flag with its defaults"
        HfArgumentParser((RecipeArguments, DataArguments), description=f"{OUTPUT_HELP}. {about}").parse_args(["-h"])
    try:
        if name not in presets and not str(name).endswith((".yaml", ".yml")):
            raise ConfigError(f"--benchmark is required; presets: {', '.join(presets)}")
        bench = _load_preset(name, known.config)
        backbone = bench.backbones.get(known.backbone or bench.backbone)
        if backbone is None:
            raise ConfigError(
                f"--backbone {known.backbone!r} unknown for {bench.display_name}; choose from {list(bench.backbones)}"
            )
    except ConfigError as exc:
        if not exit_on_error:
            raise
        pre.error(str(exc))
    parser = build_parser(bench, backbone, bool(known.partial), extra)
    parser.set_defaults(**(defaults or {}))
    try:
        recipe, data, training, cmkd_config, *rest = parser.parse_args_into_dataclasses(
            args=argv, look_for_args_file=False
        )
        output_dir = known.output_dir if known.output_dir is not None else (defaults or {}).get("output_dir")
        run = resolve(bench, backbone, recipe, data, training, cmkd_config, output_dir, script, known.tau is not None)
    except (ConfigError, ValueError, TypeError) as exc:
        message = re.sub(r"^([a-z_0-9]+) must be", r"--\1 must be", str(exc))  # a library field is a flag here
        if not exit_on_error:
            raise ConfigError(message) from exc
        parser.error(message)
    return run, rest


def _load_preset(name: str, config: str | None) -> BenchmarkConfig:
    """The preset ``name``, with the ``--config`` YAML file deep-merged over it."""
    if config is None:
        return load_benchmark_config(name)
    extra = read_yaml(config, what="--config file") or {}
    if not isinstance(extra, dict):
        raise ConfigError(f"--config file {config} must hold a YAML mapping, got {type(extra).__name__}")
    return load_benchmark_config(name, extra, Path(config).name)


def _peft_methods(recipe: RecipeArguments) -> tuple[str, ...]:
    if not recipe.peft:
        return ("rst",) if recipe.rst else ("full",)
    methods = tuple(dict.fromkeys(m.strip() for m in recipe.peft.split(",") if m.strip()))
    unknown = [m for m in methods if m not in PEFT_METHODS]
    if unknown or not methods:
        raise ConfigError(
            f"--peft {recipe.peft!r}: unknown method(s) {unknown}; choose from {', '.join(PEFT_METHODS)}"
        )
    if recipe.rst and methods != ("rst",):
        raise ConfigError("--rst is --peft rst; pass --peft with every method you want (e.g. --peft rst,lora)")
    if "adalora" in methods and recipe.selection != "last":
        raise ConfigError(
            "--peft adalora needs --selection last: AdaLoRA prunes ranks while it trains, and peft cannot load an "
            "earlier (best) checkpoint into the pruned adapter"
        )
    return methods


def _tasks(bench: BenchmarkConfig, recipe: RecipeArguments, data: DataArguments) -> list[tuple[str, str]]:
    custom = data.custom_target(recipe.target)  # a target given by --target_* / --eval_* instead of a domain
    if recipe.all:
        if recipe.source or recipe.target:
            raise ConfigError("--all runs every task of the benchmark; drop --source/--target (or drop --all)")
        return list(bench.tasks)
    if custom is not None:
        if not recipe.source:
            raise ConfigError(
                "give the labeled --source domain to adapt from (the target comes from --target_*/--eval_*)"
            )
        return [(bench.domain(recipe.source).key, custom)]
    if not recipe.source or not recipe.target:
        raise ConfigError(
            f"give --source and --target (tasks: {', '.join(bench.task_names())}) or --all for every task"
        )
    src, tgt = bench.domain(recipe.source), bench.domain(recipe.target)
    if src.key == tgt.key:
        raise ConfigError(f"source and target are the same domain ({src.key}={src.name}); pick two different ones")
    return [(src.key, tgt.key)]


def _check_method(bench, recipe: RecipeArguments, peft: tuple[str, ...], training, tau_given: bool) -> str:
    if recipe.baseline and recipe.zero_shot:
        raise ConfigError("--baseline and --zero-shot are different methods; pass only one of them")
    method = "baseline" if recipe.baseline else "zero_shot" if recipe.zero_shot else "cmkd"
    if recipe.fixmatch and method != "cmkd":
        raise ConfigError(f"--fixmatch extends CMKD and cannot be combined with --{method.replace('_', '-')}")
    if method == "zero_shot" and peft != ("full",):
        raise ConfigError("--rst/--peft choose how the model is trained, but --zero-shot trains nothing; drop one")
    if tau_given and "rst" not in peft:
        raise ConfigError("--tau is the RST threshold; add --rst (or --peft rst) or drop --tau")
    if recipe.partial and not bench.partial.available:
        others = [b for b in available_benchmarks() if load_benchmark_config(b).partial.available]
        raise ConfigError(
            f"{bench.display_name} has no partial-set protocol in the paper; --partial is available for: "
            f"{', '.join(others) or 'none'}"
        )
    if method == "zero_shot" and training.push_to_hub:
        raise ConfigError("--zero-shot trains nothing, so there is nothing to --push_to_hub")
    if method == "zero_shot" and training.resume_from_checkpoint:
        raise ConfigError("--zero-shot trains nothing, so there is no checkpoint to --resume_from_checkpoint")
    if recipe.selection == "oracle" and method == "zero_shot":
        raise ConfigError("--zero-shot trains nothing, so --selection oracle has no checkpoints to choose from")
    return method


def _check_selection(recipe: RecipeArguments, data: DataArguments, bench, tasks) -> None:
    if recipe.selection in ("source_accuracy", "dev") and not data.source_val_fraction:
        raise ConfigError(
            f"--selection {recipe.selection} scores a held-out source split: add --source_val_fraction (e.g. 0.1)"
        )
    if recipe.selection == "oracle" and not all(data.labeled_target(bench, t) for _, t in tasks):
        raise ConfigError(
            f"--selection oracle is the {ORACLE_NAME}, and the target has no labels: add a labeled copy of the target "
            f"with --eval_dir (class sub-folders), --eval_list ('path label' lines) or --eval_dataset_id, or choose "
            f"a label-free --selection ({', '.join(VALIDATORS)})"
        )


def _check_hub(training, default_repo: str) -> str | None:
    if not training.push_to_hub:
        return training.hub_model_id
    from huggingface_hub import constants, get_token

    if not (training.hub_token or get_token()):
        raise ConfigError("--push_to_hub needs a Hub token: set HF_TOKEN, run `hf auth login`, or pass --hub_token")
    if constants.HF_HUB_OFFLINE:
        raise ConfigError("--push_to_hub needs the network, but HF_HUB_OFFLINE=1 is set; unset it or drop the flag")
    return training.hub_model_id or default_repo


def _check_resume(training, recipe: RecipeArguments, tasks) -> None:
    from cmkd.checkpoints import checkpoint_problems

    resume = training.resume_from_checkpoint
    if resume and recipe.overwrite:
        raise ConfigError("--overwrite starts over and --resume_from_checkpoint continues; pass only one of them")
    if resume not in (None, "last") and len(tasks) > 1:
        raise ConfigError(
            "--resume_from_checkpoint PATH names one task's checkpoint; with --all pass the flag without a value "
            "(each task resumes from its own last checkpoint)"
        )
    if resume not in (None, "last") and not Path(resume).is_dir():
        raise ConfigError(f"--resume_from_checkpoint {resume!r} is not a checkpoint folder (it does not exist)")
    if resume not in (None, "last") and (problems := checkpoint_problems(resume)):
        raise ConfigError(
            f"--resume_from_checkpoint {resume!r} is not a complete checkpoint ({'; '.join(problems)}); pass the "
            "flag without a value to resume from the last complete checkpoint"
        )


def resolve(bench, backbone, recipe, data, training, cmkd_config, output_dir, script=None, tau_given=False) -> Run:
    """The parsed dataclasses -> :class:`Run`, or a :class:`ConfigError` saying what to change."""
    peft = _peft_methods(recipe)
    method = _check_method(bench, recipe, peft, training, tau_given)
    tasks = _tasks(bench, recipe, data)
    data.check(bench, tasks, all_tasks=recipe.all)
    _check_selection(recipe, data, bench, tasks)
    _check_resume(training, recipe, tasks)
    model = package_path(recipe.model or backbone.model)
    if not model:
        raise ConfigError(
            f"backbone {backbone.key!r} has no transformers checkpoint on the Hub; pass --model with a Hub id or a "
            "local path of a CLIPModel checkpoint"
        )
    tau = recipe.tau if "rst" in peft else None
    if tau is not None and not (math.isfinite(tau) and tau > 0):
        raise ConfigError(f"--tau must be a finite number > 0, got {tau}")
    if recipe.batch_size < 1:
        raise ConfigError(f"--batch_size must be an integer >= 1, got {recipe.batch_size}")
    slug = method_slug(method, recipe, peft)
    out = output_folder(bench, recipe, slug, tasks, output_dir)
    default_repo = (
        out.resolve().name
        if output_dir is not None
        else f"{bench.name}-{slug}" + ("" if recipe.all else "-{}-{}".format(*tasks[0]).lower())
    )
    default_script = Path(__file__).resolve().parents[1] / f"{bench.name}.py"
    return Run(
        bench=bench,
        recipe=recipe,
        data=data,
        training=training,
        cmkd=cmkd_config,
        tasks=tasks,
        method=method,
        peft_methods=peft,
        peft=peft[0],
        backbone=backbone,
        model=model,
        tau=tau,
        output_dir=out,
        hub_model_id=_check_hub(training, default_repo),
        script=script
        or (
            f"recipes/{bench.name}.py" if default_script.is_file() else f"recipes/run_uda.py --benchmark {bench.name}"
        ),
    )
