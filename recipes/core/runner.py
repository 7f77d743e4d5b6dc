"""The steps every benchmark recipe runs, one function per step, in the order a recipe calls them.

Every recipe (``recipes/office_home.py`` ...) is ``run_benchmark``, which reads top to bottom like accelerate's
``complete_cv_example.py``::

    cfg = parse("office_home", argv)              # YAML defaults + flags, validated before anything is written
    clip = load_clip(cfg)                         # any CLIP on the Hub or a local folder
    results = start_run(cfg)
    for source, target in cfg.tasks:
        # run_task: resume? -> data -> model (+RST) -> CMKDTrainer.train -> evaluate -> save + card -> push
        record_task(results, run_task(cfg, clip, source, target, callbacks))
    finish_run(cfg, results)                      # Markdown table, accuracy-vs-DSP plot, results.json (last)

Reproducibility: training augmentations draw their randomness from ``(seed, batch number, position in the global
batch)`` (``cmkd.data``, on in every ``CMKDTrainer``), not from a stateful stream, so an interrupted run resumed
from its last checkpoint, or the same run with any number of DataLoader workers, sees exactly the same batches; the
RST reset schedule's step travels in the optimizer state (``peft_rst.resume``). Together with the Trainer's own
optimizer / scheduler / RNG state, a resumed run ends with bitwise the weights of an uninterrupted one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from cmkd import CLIPAdaptationModel, CMKDConfig, CMKDTrainer, CMKDTrainingArguments, apply_peft, count_dsp
from cmkd.callbacks import TrainingDivergedError
from cmkd.checkpoints import checkpoint_problems, complete_checkpoints
from cmkd.peft_methods import PEFT_SAVED_AS
from peft_rst.files import atomic_write_text

from .checks import check_model_source, check_output_writable, sentence
from .config import RESULTS_FILENAME, BenchmarkConfig, ConfigError, RunConfig, build_parser, parse_args, task_name
from .data import DataArguments, DataError, TaskData, classes_of, default_num_workers, load_task_data
from .ranges import FLAG_RANGES, check_number
from .tables import add_result, new_results, render_markdown, write_report

__all__ = [
    "MODES",
    "TASK_RESULT_FILENAME",
    "CLIPBundle",
    "RecipeError",
    "SavedTask",
    "TaskData",
    "TaskResult",
    "add_runner_arguments",
    "build_model",
    "build_trainer",
    "cmkd_config",
    "evaluate",
    "finish_run",
    "finish_task",
    "finished_task",
    "run_benchmark",
    "run_task",
    "selection_arguments",
    "load_clip",
    "load_task_data",
    "parse",
    "push_task",
    "record_task",
    "resume_checkpoint",
    "run_recipe",
    "save_task",
    "start_run",
    "task_output_dir",
    "train",
]

logger = logging.getLogger(__name__)

TASK_RESULT_FILENAME = "task_result.json"  # written last in a task folder: the task is finished
ADAPTER_DIRNAME = "adapter"  # RST: sparse backbone patch + head (+ README.md model card)
MODEL_DIRNAME = "model"  # full fine-tuning: the whole adapted model
MODES = {"cmkd": "cmkd", "baseline": "source_only", "zero_shot": "zero_shot"}  # RunConfig.method -> trainer mode


class RecipeError(RuntimeError):
    """A run cannot start or continue as asked (e.g. an interrupted run's checkpoints); the message says how to fix
    it."""


# --------------------------------------------------------------------------------------------------------------------
# 1. Parse
# --------------------------------------------------------------------------------------------------------------------


def add_runner_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags of the runner itself (resume, checkpoints, logging), on top of the shared benchmark flags."""
    group = parser.add_argument_group("run")
    group.add_argument(
        "--resume_from_checkpoint",
        nargs="?",
        const="last",
        metavar="CHECKPOINT",
        help="continue an interrupted run: without a value, every unfinished task resumes from its last checkpoint; "
        "with a checkpoint folder, the (single) task resumes from it",
    )
    group.add_argument(
        "--keep_checkpoints",
        action="store_true",
        help="keep the Trainer checkpoints of finished tasks (default: deleted once the adapter/model is saved)",
    )
    group.add_argument("--logging_steps", type=int, help="log losses every N >= 1 iterations (default: min(50, eval))")
    group.add_argument("--quiet", action="store_true", help="no progress bars")
    group.add_argument(
        "--report_to",
        default="none",
        help="TrainingArguments.report_to: where losses and evaluations are logged (tensorboard, trackio, wandb, "
        "all, none; default: none); logs go under each task's folder",
    )
    return parser


def parse(
    benchmark: str | BenchmarkConfig,
    argv: Sequence[str] | None = None,
    description: str | None = None,
    parser: argparse.ArgumentParser | None = None,
    args: argparse.Namespace | None = None,
) -> RunConfig:
    """Shared benchmark flags + runner flags -> validated :class:`RunConfig` (a bad combination exits with a message
    before anything is loaded or written). ``args``: flags ``parser`` already parsed."""
    parser = parser or add_runner_arguments(build_parser(benchmark, description))
    cfg = parse_args(benchmark, argv, parser, args)
    try:
        _check_run_flags(cfg)
    except ConfigError as exc:
        parser.error(str(exc))
    if cfg.quiet:
        _quiet()
    return cfg


def _quiet() -> None:
    """--quiet: no progress bars from the Trainer, transformers (loading / saving weights) or the Hub client."""
    import huggingface_hub
    import transformers

    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()


def _check_run_flags(cfg: RunConfig) -> None:
    resume = cfg.resume_from_checkpoint
    if resume and cfg.method == "zero_shot":
        raise ConfigError("--zero-shot trains nothing, so there is no checkpoint to --resume_from_checkpoint")
    if resume and cfg.overwrite:
        raise ConfigError("--overwrite starts over and --resume_from_checkpoint continues; pass only one of them")
    if resume not in (None, "last"):
        if len(cfg.tasks) > 1:
            raise ConfigError(
                "--resume_from_checkpoint PATH names one task's checkpoint; with --all pass the flag without a value "
                "(each task resumes from its own last checkpoint)"
            )
        check_resume_path(cfg, Path(resume))
    if cfg.logging_steps is not None:
        try:
            check_number("--logging_steps", cfg.logging_steps, FLAG_RANGES["logging_steps"])
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    try:
        cmkd_config(cfg)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{cfg.benchmark.source_path}: cmkd settings: {sentence(exc)}") from exc
    if cfg.push_to_hub:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            raise ConfigError(
                "--push_to_hub needs the network, but HF_HUB_OFFLINE=1 is set; unset it or drop the flag"
            )


def check_resume_path(cfg: RunConfig, path: Path) -> None:
    """``--resume_from_checkpoint PATH`` must be a complete Trainer checkpoint (``cmkd.checkpoints``)."""
    if not path.is_dir():
        raise ConfigError(f"--resume_from_checkpoint {str(path)!r} is not a checkpoint folder (it does not exist)")
    problems = checkpoint_problems(path)
    if problems:
        complete, _ = complete_checkpoints(path)
        hint = (
            f"; it holds complete checkpoints, e.g. {complete[-1]}"
            if complete
            else "; pass the flag without a value to resume each task from its last complete checkpoint"
        )
        raise ConfigError(
            f"--resume_from_checkpoint {str(path)!r} is not a complete checkpoint ({'; '.join(problems)}){hint}"
        )


# --------------------------------------------------------------------------------------------------------------------
# 2. Model and data
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class CLIPBundle:
    """A loaded CLIP checkpoint: the dual encoder, its tokenizer and (if it ships one) its image processor."""

    name: str
    model: Any
    tokenizer: Any
    processor: Any | None

    @property
    def image_size(self) -> int:
        return int(self.model.config.vision_config.image_size)


def load_clip(cfg: RunConfig) -> CLIPBundle:
    """``--model``: any CLIP on the Hub (cached when offline) or a local folder saved with ``save_pretrained``."""
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    name = str(cfg.model)
    source = check_model_source(name)  # local folder / cached / reachable Hub: fails in seconds, not after retries
    try:
        model = AutoModel.from_pretrained(name, **source)
        tokenizer = AutoTokenizer.from_pretrained(name, **source)
    except (OSError, ValueError) as exc:  # missing files / offline Hub; a folder that is not a transformers model
        local = Path(name).exists()
        hint = (
            "the folder must hold a CLIP saved with save_pretrained (config.json, weights, tokenizer files)"
            if local
            else "without internet the model must already be in the Hugging Face cache (HF_HUB_OFFLINE=1), or pass "
            "--model with a local folder"
        )
        raise RecipeError(f"cannot load CLIP {name!r}: {sentence(exc)}. {hint}") from exc
    if not (hasattr(model, "get_text_features") and hasattr(model, "visual_projection")):
        raise RecipeError(
            f"--model {name!r} is a {type(model).__name__}, not a CLIP dual encoder (vision + text tower with "
            "projections); pass a CLIPModel checkpoint such as openai/clip-vit-base-patch16"
        )
    try:
        processor = AutoImageProcessor.from_pretrained(name, **source)
    except (OSError, ValueError):
        processor = None  # CLIP's normalisation is used
    return CLIPBundle(name, model.eval(), tokenizer, processor)


def data_arguments(cfg: RunConfig) -> DataArguments:
    """The data flags of a RunConfig as recipes.core.data takes them."""
    names = {f.name for f in dataclasses.fields(DataArguments)} - {"image_list"}
    image_list = [f"{key}={path}" for key, path in cfg.image_lists.items()]
    return DataArguments(image_list=image_list, **{n: getattr(cfg, n) for n in names})


def check_batch_fits(cfg: RunConfig, data: TaskData, source: str, target: str) -> None:
    """Every step draws one full batch from each training domain, so ``--batch_size`` cannot exceed either."""
    sizes = {f"source domain {source}": len(data.source)}
    if cfg.method != "baseline":
        sizes[f"target domain {target}"] = len(data.target)
    if cfg.method == "zero_shot":
        return
    for what, size in sizes.items():
        if cfg.batch_size > size:
            smallest = min(sizes.values())
            raise ConfigError(
                f"--batch_size {cfg.batch_size} is larger than the {what} ({size} images): every step draws a full "
                f"batch from each domain; pass --batch_size {smallest} or less"
            )


def build_model(cfg: RunConfig, clip: CLIPBundle, classes: Sequence[str]):
    """``CLIPAdaptationModel`` (vision tower + projection + head, zero-shot teacher cached from the text tower) and,
    with ``--peft`` (``--rst``), that method around it (``cmkd.apply_peft``; the head trains densely in all)."""
    torch.manual_seed(cfg.seed)  # head initialisation
    model = CLIPAdaptationModel.from_clip(
        clip.model, list(classes), cfg.benchmark.prompt_template, tokenizer=clip.tokenizer
    )
    model.name_or_path = model.config._name_or_path = clip.name  # peft records it as the adapter's base model
    if cfg.peft == "full":
        return model
    options = {"rst": {"tau": cfg.tau}, "adalora": {"total_step": cfg.max_steps}}.get(cfg.peft, {})
    return apply_peft(model, cfg.peft, **options)  # RST / LoRA / AdaLoRA adapter, or BitFit / linear probe flags


def cmkd_config(cfg: RunConfig):
    """The preset's ``cmkd_config`` (``cmkd.CMKDConfig`` fields), with ``partial``'s fields over it for --partial."""
    b = cfg.benchmark
    return CMKDConfig(**{**b.cmkd_config, **(b.partial.cmkd_config() if cfg.partial else {})})


# --------------------------------------------------------------------------------------------------------------------
# 3. Trainer: deterministic augmentation and RST schedule state across resumes
# --------------------------------------------------------------------------------------------------------------------


def _has_accelerator() -> bool:
    """A GPU (or other torch accelerator such as MPS/XPU) to train on."""
    accelerator = getattr(torch, "accelerator", None)
    return bool(accelerator.is_available()) if accelerator is not None else torch.cuda.is_available()


SELECTION_RULES = {
    "oracle": "oracle (uses target labels)",  # release: the best target accuracy over the evaluations
    "last": "last checkpoint (label-free)",
}
"""``cfg.selection`` (``--selection``) -> how the reported checkpoint is named in every output."""


def selection_arguments(cfg: RunConfig) -> dict[str, Any]:
    """The Trainer arguments that pick the checkpoint a task reports, from ``cfg.selection``.

    None: CMKDTrainingArguments' label-free default validator; a validator name: that validator; ``last``: the last
    checkpoint (label-free); ``oracle``: the benchmark's label metric, i.e. the oracle (uses target labels).
    """
    rule = cfg.selection
    if rule == "last":
        return {"load_best_model_at_end": False}
    if rule == "oracle":
        return {"load_best_model_at_end": True, "metric_for_best_model": cfg.benchmark.metric}
    return {"load_best_model_at_end": True, **({"metric_for_best_model": rule} if rule else {})}


def selection_name(cfg: RunConfig) -> str:
    """How the reported checkpoint's rule is named in every output (the oracle always says it uses target labels)."""
    from cmkd.validators import DEFAULT_VALIDATOR, describe

    rule = cfg.selection
    if rule in SELECTION_RULES:
        return SELECTION_RULES[rule]
    return describe(rule or DEFAULT_VALIDATOR)


def build_trainer(
    cfg: RunConfig,
    model,
    data: TaskData,
    task_dir: str | os.PathLike,
    callbacks: Sequence[TrainerCallback] = (),
    resume_from: str | os.PathLike | None = None,
):
    """`CMKDTrainer` with the benchmark's optimisation settings.

    ``cfg.batch_size`` is the *global* per-domain batch (the paper's 32 + 32): under ``accelerate launch`` with N
    processes each process takes batch / N, which the trainer turns into exactly the one-process run.
    """
    from accelerate.utils import get_int_from_env

    preset = dict(cfg.benchmark.training_args)  # CMKDTrainingArguments fields of the benchmark YAML
    # the processes the launcher started (torchrun / MPI), read as TrainingArguments will set up its devices; an
    # AcceleratorState made earlier without cpu=True can still count 1 on a CPU-only `accelerate launch`
    world = get_int_from_env(["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"], 1)
    if cfg.batch_size % world:
        raise RecipeError(f"--batch_size {cfg.batch_size} must be a multiple of the {world} processes")
    num_workers = default_num_workers() if cfg.num_workers is None else cfg.num_workers
    logging_steps = cfg.logging_steps or min(50, cfg.eval_steps)
    settings = dict(
        output_dir=str(task_dir),
        mode="cmkd_fixmatch" if cfg.fixmatch else MODES[cfg.method],
        learning_rate=cfg.learning_rate,
        head_lr_multiplier=cfg.backbone.head_lr_multiplier,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size // world,
        per_device_eval_batch_size=max(1, preset.get("per_device_eval_batch_size", 64) // world),
        iterations_per_epoch=cfg.eval_steps,
        eval_steps=cfg.eval_steps,
        save_steps=cfg.eval_steps,
        save_total_limit=None if cfg.keep_checkpoints else 1,  # 1: the best and the latest survive
        **selection_arguments(cfg),
        partial_set=cfg.partial,
        seed=cfg.seed,
        data_seed=cfg.seed,
        fp16=bool(preset.get("fp16") and torch.cuda.is_available()),
        dataloader_num_workers=num_workers,
        dataloader_persistent_workers=num_workers > 0,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not _has_accelerator(),  # CPU only: `accelerate launch` processes talk over gloo
        logging_steps=logging_steps,
        report_to=cfg.report_to,
        disable_tqdm=bool(cfg.quiet),
    )
    args = CMKDTrainingArguments(**{**preset, **settings})  # the preset's fields, then the flags that override them
    return CMKDTrainer(  # seeds each item's augmentation; RST's reset step travels in the optimizer state
        model,
        args,
        source_dataset=data.source,
        target_dataset=data.target,
        eval_dataset=data.eval,
        cmkd_config=cmkd_config(cfg),
        source_val_dataset=data.source_val,
        callbacks=list(callbacks),
    )


# --------------------------------------------------------------------------------------------------------------------
# 4. Train (with resume) and evaluate
# --------------------------------------------------------------------------------------------------------------------


def _checkpoints(task_dir: Path) -> list[Path]:
    """The Trainer's ``checkpoint-<step>`` folders of a task, oldest first (transformers' own listing)."""
    from transformers.trainer_utils import get_last_checkpoint, sort_checkpoints

    if not task_dir.is_dir() or get_last_checkpoint(str(task_dir)) is None:
        return []
    return [Path(p) for p in sort_checkpoints(str(task_dir))]


def resume_checkpoint(cfg: RunConfig, task_dir: str | os.PathLike) -> Path | None:
    """The checkpoint this task resumes from (``--resume_from_checkpoint``), or None for a fresh start.

    Called when a task (re)starts. A task folder holding an interrupted run's checkpoints is never silently trained
    over: pass ``--resume_from_checkpoint`` to continue it or ``--overwrite`` to start again, which removes them
    together with an earlier run's task result (so an interrupted overwrite never leaves a stale finished task).
    """
    from accelerate import PartialState

    task_dir = Path(task_dir)
    wanted = cfg.resume_from_checkpoint
    found = _checkpoints(task_dir)
    if wanted is None:
        if found and not cfg.overwrite:
            raise RecipeError(
                f"{task_dir} holds checkpoints of an interrupted run (last: {found[-1].name}); pass "
                "--resume_from_checkpoint to continue it, or --overwrite to start this task again"
            )
        if cfg.overwrite and PartialState().is_main_process:
            (task_dir / TASK_RESULT_FILENAME).unlink(missing_ok=True)
            for ckpt in found:
                shutil.rmtree(ckpt)
        PartialState().wait_for_everyone()
        return None
    if wanted != "last":
        return Path(wanted)
    complete, incomplete = complete_checkpoints(task_dir)
    last = complete[-1] if complete else None
    if PartialState().is_main_process:
        for path, problems in incomplete:  # a killed save; the resumed run writes this step again
            logger.warning(
                "skipping incomplete checkpoint %s (%s): its save was interrupted; removing it",
                path,
                "; ".join(problems),
            )
            shutil.rmtree(path, ignore_errors=True)
    PartialState().wait_for_everyone()
    if last is None:
        logger.warning(
            "--resume_from_checkpoint: %s has no complete checkpoint; starting this task from scratch", task_dir
        )
    return last


INTERRUPTED_DIRS = (".adapter.tmp-*", ".model.tmp-*", ".adapter.old-*", ".model.old-*")  # save_task / _replace_dir
INTERRUPTED_FILES = ".*.tmp"  # peft_rst.files.atomic_write_*


def clean_interrupted_writes(folder: str | os.PathLike) -> list[Path]:
    """Remove what a killed save left in ``folder``: temp / old folders of the final adapter or model swap and temp
    files of atomic writes. Never a finished file: those are only ever renamed into place. Main process only."""
    from accelerate import PartialState

    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir() or not PartialState().is_main_process:
        return removed
    for pattern in INTERRUPTED_DIRS:
        for path in folder.glob(pattern):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    for path in folder.glob(INTERRUPTED_FILES):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    for path in removed:
        logger.warning("removed %s, left by an interrupted save", path)
    return removed


def train(cfg: RunConfig, trainer, resume_from: str | os.PathLike | None = None) -> None:
    """``trainer.train()`` (nothing for --zero-shot), from ``resume_from`` when given."""
    if cfg.method == "zero_shot":
        return
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)


def evaluate(cfg: RunConfig, trainer) -> dict[str, Any]:
    """Target-domain scores of the final model (the checkpoint the selection rule picked).

    Always: the label-free validators and the selection summary (rule, its value; with labels also the accuracy of
    the last checkpoint, of the pick and of the oracle (uses target labels), from the evaluations during training).
    With a labeled target only: the benchmark's metric (accuracy or mean per-class accuracy), both metrics,
    per-class accuracy and the zero-shot teacher's accuracy; without labels these are None.
    """
    from cmkd.validators import LAST_RULE, VALIDATORS, selection_summary

    selection = None
    if cfg.method != "zero_shot":
        # the rule that picked the reported model: "last" keeps the last checkpoint whatever metric_for_best_model says
        rule = LAST_RULE if cfg.selection == "last" else trainer.args.metric_for_best_model
        selection = selection_summary(trainer.state.log_history, rule, cfg.benchmark.metric)
        if selection is not None:
            selection["rule"] = selection_name(cfg)  # the same words as the logs, tables and card
    raw = trainer.evaluate()
    labeled = "eval_accuracy" in raw
    per_class = raw.get("eval_per_class_accuracy") or []
    classes = classes_of(trainer.train_dataset)  # the source's, which the evaluated target shares

    def get(key: str) -> float | None:
        return float(raw[key]) if key in raw else None

    return {
        "score": get(f"eval_{cfg.benchmark.metric}"),
        "accuracy": get("eval_accuracy"),
        "mean_class_accuracy": get("eval_mean_class_accuracy"),
        "teacher_accuracy": get("eval_teacher_accuracy"),
        "per_class": {str(c): float(a) for c, a in zip(classes, per_class) if a is not None} if labeled else None,
        "validators": {k: float(raw[f"eval_{k}"]) for k in VALIDATORS if f"eval_{k}" in raw},
        "selection": selection,
        "num_source": len(trainer.train_dataset) if trainer.train_dataset is not None else 0,
        "num_target": len(trainer.target_dataset) if trainer.target_dataset is not None else 0,
        "num_eval": len(trainer.eval_dataset),
    }


# --------------------------------------------------------------------------------------------------------------------
# 5. Save (+ model card) and push
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class SavedTask:
    source: str
    target: str
    path: Path | None  # adapter / model folder (None: zero-shot stores nothing)
    dsp: int  # downstream parameters stored for this task (paper's DSP)
    nbytes: int  # bytes on disk of what must be stored (adapter files / model weights)
    kind: str  # "rst_adapter" | "model" | "none"
    card_fields: dict[str, Any] = field(default_factory=dict)  # what the model card was rendered from
    hub_repo: str | None = None

    @property
    def card(self) -> Path | None:
        card = self.path / "README.md" if self.path else None
        return card if card is not None and card.is_file() else None


def _replace_dir(tmp: Path, final: Path) -> None:
    """Swap a fully written temp folder in for ``final`` (never a half-written ``final``)."""
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, old / final.name)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def hub_repo_id(cfg: RunConfig, source: str, target: str) -> str:
    """``--hub_model_id`` (default: the output folder's name), suffixed with the task when several are run."""
    base = cfg.hub_model_id or cfg.output_dir.resolve().name
    return f"{base}-{source}-{target}".lower() if len(cfg.tasks) > 1 else base


def _card_fields(cfg: RunConfig, source: str, target: str, metrics: dict[str, Any], classes: Sequence[str]) -> dict:
    """Model card fields of one task (peft_rst.model_card.CARD_FIELDS); DSP, sizes and tau are measured later."""
    bench = cfg.benchmark
    script = cfg.recipe_script or recipe_script(bench.name)
    selection = selection_name(cfg)
    notes = (
        f"Trained with `{script}` ({cfg.method_label}, checkpoint: {selection}): {cfg.max_steps} iterations, batch "
        f"{cfg.batch_size} source + {cfg.batch_size} target, SGD lr {cfg.learning_rate:g} (head x"
        f"{cfg.backbone.head_lr_multiplier:g}), seed {cfg.seed}, prompt `{bench.prompt_template}`."
    )
    if metrics.get("teacher_accuracy") is not None:
        notes += f" The zero-shot CLIP head on the adapted features scores {100 * metrics['teacher_accuracy']:.2f} %."
    notes += selection_notes(metrics)
    from cmkd.toy import TINY_CLIP_PATH

    shipped = Path(str(cfg.model)).exists() and Path(str(cfg.model)).resolve() == TINY_CLIP_PATH
    code = "from cmkd import CLIPAdaptationModel\n" + ("from cmkd.toy import TINY_CLIP_PATH\n" if shipped else "")
    code += (
        f"\nclass_names = {list(classes)!r}\n"
        f"base = CLIPAdaptationModel.from_clip({'TINY_CLIP_PATH' if shipped else repr(str(cfg.model))}, class_names, "
        f"{bench.prompt_template!r})"
    )
    return dict(
        repo_id=hub_repo_id(cfg, source, target) if cfg.push_to_hub else None,
        base_model=str(cfg.model),
        dataset=bench.name,
        source_domain=bench.domains[source].name,
        target_domain=bench.domains[target].name if target in bench.domains else target,
        accuracy=metrics["score"],
        metric="balanced_accuracy" if bench.metric == "mean_class_accuracy" else "accuracy",
        training_notes=notes,
        base_loading_code=code,
    )


def recipe_script(benchmark: str) -> str:
    """The command that reruns a preset, as a model card names it: ``recipes/<benchmark>.py`` where that alias
    exists, else ``recipes/run_uda.py --benchmark <benchmark>``."""
    if (Path(__file__).resolve().parents[1] / f"{benchmark}.py").is_file():
        return f"recipes/{benchmark}.py"
    return f"recipes/run_uda.py --benchmark {benchmark}"


def selection_notes(metrics: dict[str, Any]) -> str:
    """Model-card text: the checkpoint selection rule, its value next to the accuracy, and the oracle's pick."""
    sel = metrics.get("selection")
    if not sel:
        return ""
    value = "" if sel["value"] is None else f"; value {sel['value']:.4g}"
    text = f"\n\nCheckpoint selection: {sel['rule']}{value} at step {sel['step']}"
    if sel.get("accuracy") is not None:
        oracle = sel["oracle"]
        text += (
            f", target accuracy {100 * sel['accuracy']:.2f} % (target labels used for reporting only). "
            f"Last checkpoint: {100 * sel['last']['accuracy']:.2f} %; {oracle['name']}: "
            f"{100 * oracle['accuracy']:.2f} % at step {oracle['step']}; "
            f"gap to the oracle {100 * sel['gap']:.2f} points."
        )
    else:
        text += "; no target labels were given, so no accuracy is reported."
    return text


def save_task(
    cfg: RunConfig,
    trainer,
    task_dir: str | os.PathLike,
    source: str,
    target: str,
    metrics: dict[str, Any],
    image_processor=None,
) -> SavedTask:
    """Save what deploying this task needs, atomically, on the main process.

    RST: ``task_dir/adapter`` (sparse backbone patch + head, ``adapter_config.json``) with its model card
    (``peft_rst.write_model_card``: DSP, density, size and tau measured from the files). Full fine-tuning:
    ``task_dir/model`` (the whole adapted model, loadable with ``AutoModel.from_pretrained``), DSP = all its
    parameters. Zero-shot: nothing (DSP 0). ``image_processor`` (the CLIP's) is saved next to the weights, so the
    folder works in ``pipeline("image-classification", ...)`` and ``python -m cmkd predict``.
    """
    task_dir = Path(task_dir)
    if cfg.method == "zero_shot":
        return SavedTask(source, target, None, 0, 0, "none")
    model = trainer.model
    kind = "rst_adapter" if cfg.rst else "peft_adapter" if PEFT_SAVED_AS[cfg.peft] == "adapter" else "model"
    final = task_dir / (MODEL_DIRNAME if kind == "model" else ADAPTER_DIRNAME)
    fields = _card_fields(cfg, source, target, metrics, classes_of(trainer.train_dataset))
    dsp = nbytes = 0
    if trainer.args.should_save:
        task_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=task_dir))
        try:
            if cfg.rst:
                import peft_rst

                model.save_pretrained(tmp, save_embedding_layers=False)
                peft_rst.write_model_card(tmp, **{**fields, "repo_id": fields["repo_id"] or str(final)})
                report = peft_rst.report(tmp).adapters[0]
                dsp, nbytes = report.dsp, report.disk_nbytes or 0
            else:
                model.save_pretrained(tmp)
                atomic_write_text(tmp / "README.md", _full_model_card(fields))
                # full: every parameter; BitFit / linear probe / LoRA / AdaLoRA: what differs from the base
                dsp = sum(p.numel() for p in model.parameters()) if cfg.peft == "full" else count_dsp(model, cfg.peft)
                nbytes = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
            if image_processor is not None:
                image_processor.save_pretrained(tmp)
            _replace_dir(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    return SavedTask(source, target, final, int(dsp), int(nbytes), kind, fields)


def _full_model_card(fields: dict[str, Any]) -> str:
    """A short model card for a fully fine-tuned model folder (RST adapters get peft_rst's card)."""
    score = fields.get("accuracy")
    accuracy = "not reported (no target labels)" if score is None else f"{100 * score:.2f} %"
    return (
        f"---\nbase_model: {fields['base_model']}\nlibrary_name: transformers\npipeline_tag: image-classification\n"
        f"tags:\n- cmkd\n- unsupervised-domain-adaptation\n---\n\n"
        f"# CMKD-adapted CLIP: {fields['source_domain']} → {fields['target_domain']} ({fields['dataset']})\n\n"
        f"| | |\n|---|---|\n| Base model | `{fields['base_model']}` |\n"
        f"| Target {fields['metric']} | {accuracy} |\n\n"
        "Load with `AutoModelForImageClassification.from_pretrained(<this folder>)` (`import cmkd` first).\n\n"
        f"{fields['training_notes']}\n"
    )


def push_task(cfg: RunConfig, saved: SavedTask) -> SavedTask:
    """``--push_to_hub``: the RST adapter with its model card in one commit (`peft_rst.push_adapter_to_hub`), or
    the full model folder. The token was checked when the flags were parsed."""
    if not cfg.push_to_hub or saved.path is None:
        return saved
    from accelerate import PartialState

    repo_id = hub_repo_id(cfg, saved.source, saved.target)
    if PartialState().is_main_process:
        try:
            if saved.kind == "rst_adapter":
                import peft_rst

                card = {**saved.card_fields, "repo_id": repo_id}
                peft_rst.push_adapter_to_hub(saved.path, repo_id, card_data=card, token=cfg.hub_token)
            else:
                from huggingface_hub import HfApi

                api = HfApi(token=cfg.hub_token)
                api.create_repo(repo_id, exist_ok=True)
                api.upload_folder(repo_id=repo_id, folder_path=str(saved.path), commit_message="Upload adapted CLIP")
        except Exception as exc:  # noqa: BLE001 - only network / Hub failures are turned into a message
            if not _is_hub_failure(exc):
                raise
            from huggingface_hub import constants

            raise RecipeError(
                f"could not push {saved.path} to {repo_id} on {constants.ENDPOINT}: {type(exc).__name__}: "
                f"{sentence(exc)}. The task is trained and saved there; rerun the same command with "
                f"--resume_from_checkpoint to push it (no training is repeated), or upload the folder with "
                f"`hf upload {repo_id} {saved.path}`"
            ) from exc
    PartialState().wait_for_everyone()
    return dataclasses.replace(saved, hub_repo=repo_id)


def _is_hub_failure(exc: BaseException) -> bool:
    """A failure to reach or be served by the Hub (connection, timeout, HTTP error), not a bug in the caller."""
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    network_modules = ("httpx", "httpx2", "httpcore", "requests", "urllib3")
    return isinstance(exc, (OSError, HfHubHTTPError, HFValidationError)) or (
        type(exc).__module__.split(".")[0] in network_modules
    )


# --------------------------------------------------------------------------------------------------------------------
# 6. Results: per task, then the benchmark's table
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class TaskResult:
    task: str
    method: str  # row label, e.g. "CMKD+RST"
    score: float | None  # the benchmark's metric, fraction (None: no target labels given)
    dsp: int
    nbytes: int
    accuracy: float | None
    mean_class_accuracy: float | None
    teacher_accuracy: float | None = None
    per_class: dict[str, float] | None = None
    num_source: int = 0
    num_target: int = 0
    num_eval: int = 0
    path: str | None = None
    hub_repo: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    validators: dict[str, float] | None = None  # label-free validator values of the reported model
    selection: dict[str, Any] | None = None  # cmkd.validators.selection_summary: rule, pick, last, oracle, gap

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def task_output_dir(cfg: RunConfig, source: str, target: str) -> Path:
    return cfg.output_dir / f"{source}-{target}"


def finished_task(cfg: RunConfig, task_dir: str | os.PathLike) -> TaskResult | None:
    """The result of a task this run already finished (``task_result.json``, written last), unless --overwrite."""
    path = Path(task_dir) / TASK_RESULT_FILENAME
    if cfg.overwrite or not path.is_file():
        return None
    data = json.loads(path.read_text())
    if data.get("method") != cfg.method_label:
        raise RecipeError(
            f"{path} holds a finished {data.get('method')} run, but this run is {cfg.method_label}; use another "
            "--output_dir or --overwrite"
        )
    return TaskResult(**data)


def finish_task(cfg: RunConfig, saved: SavedTask, metrics: dict[str, Any], task_dir: str | os.PathLike) -> TaskResult:
    """Write the task's ``task_result.json`` (its finished marker) and drop its Trainer checkpoints."""
    task_dir = Path(task_dir)
    result = TaskResult(
        task=task_name(saved.source, saved.target),
        method=cfg.method_label,
        score=metrics["score"],
        dsp=saved.dsp,
        nbytes=saved.nbytes,
        accuracy=metrics["accuracy"],
        mean_class_accuracy=metrics["mean_class_accuracy"],
        teacher_accuracy=metrics.get("teacher_accuracy"),
        per_class=metrics.get("per_class"),
        num_source=metrics.get("num_source", 0),
        num_target=metrics.get("num_target", 0),
        num_eval=metrics.get("num_eval", 0),
        path=str(saved.path) if saved.path else None,
        hub_repo=saved.hub_repo,
        validators=metrics.get("validators"),
        selection=metrics.get("selection"),
    )
    from accelerate import PartialState

    if PartialState().is_main_process:
        atomic_write_text(task_dir / TASK_RESULT_FILENAME, json.dumps(result.to_dict(), indent=2) + "\n")
        if not cfg.keep_checkpoints:
            for ckpt in _checkpoints(task_dir):
                shutil.rmtree(ckpt, ignore_errors=True)
    return result


def start_run(cfg: RunConfig) -> dict[str, Any]:
    """Empty results for the run. With --overwrite the old finished-run marker goes first, so an interrupted
    overwrite is never mistaken for a finished run."""
    from accelerate import PartialState

    if cfg.overwrite and PartialState().is_main_process:
        (cfg.output_dir / RESULTS_FILENAME).unlink(missing_ok=True)
    clean_interrupted_writes(cfg.output_dir)
    results = new_results(cfg.benchmark, meta={"run": cfg.to_dict()})
    results["tasks"] = list(cfg.task_names)  # the columns of this run (all of the paper's with --all)
    return results


def run_benchmark(
    benchmark: str,
    argv: Sequence[str] | None = None,
    callbacks: Sequence = (),
    parser: argparse.ArgumentParser | None = None,
) -> dict[str, Any]:
    """A benchmark recipe from command line to results: every ``recipes/<benchmark>.py`` is this call."""
    # 1. Parse: YAML defaults + flags, checked (flags, data folder, output folder, Hub token) before anything runs
    cfg = parse(benchmark, argv, parser=parser)
    data_arguments(cfg).check(cfg.benchmark, cfg.tasks, all_tasks=False)  # every task's data, without scanning
    check_output_writable(cfg.output_dir)  # before a model is loaded
    clip = load_clip(cfg)  # the pretrained CLIP: vision tower to adapt, text tower for the zero-shot teacher
    results = start_run(cfg)
    for number, peft in enumerate(cfg.peft_methods, 1):  # --peft a,b,...: one row per method (Table VII)
        run = cfg
        if len(cfg.peft_methods) > 1:
            run = dataclasses.replace(cfg, peft=peft, rst=peft == "rst", output_dir=cfg.output_dir / peft)
            print(f"method {number} of {len(cfg.peft_methods)}: {run.method_label}", flush=True)
        for source, target in cfg.tasks:
            # resume? -> 2. data -> 3. model (+PEFT) -> 4. CMKDTrainer.train -> 5. evaluate -> 6. save, card -> 7. push
            record_task(results, run_task(run, clip, source, target, callbacks))
    # 8. Results JSON, the paper's table layout (per task, Avg., DSP(M)) and the accuracy-vs-DSP plot
    finish_run(cfg, results)
    return results


def run_task(
    cfg: RunConfig, clip: CLIPBundle, source: str, target: str, callbacks: Sequence = (), announce: bool = False
) -> TaskResult:
    """One transfer task, start to end: the steps every recipe shares.

    A task already finished in this output folder is read back instead of trained again (a restarted ``--all`` run
    keeps what it finished); an interrupted one resumes with ``--resume_from_checkpoint``.
    """
    task_dir = task_output_dir(cfg, source, target)
    clean_interrupted_writes(task_dir)  # a run killed while saving leaves temp folders / files behind
    done = finished_task(cfg, task_dir)
    if done is not None:
        return done
    if announce:
        print(f"--- {cfg.method_label}", flush=True)
    resume_from = resume_checkpoint(cfg, task_dir)
    data = load_task_data(  # labeled source, unlabeled target, target evaluation view
        cfg.benchmark,
        data_arguments(cfg),
        source,
        target,
        partial=cfg.partial,
        fixmatch=cfg.fixmatch,
        seed=cfg.seed,
        image_size=clip.image_size,
        processor=clip.processor,
    )
    check_batch_fits(cfg, data, source, target)
    model = build_model(cfg, clip, data.classes)  # vision tower + task head + cached zero-shot teacher (+ RST)
    trainer = build_trainer(cfg, model, data, task_dir, callbacks, resume_from)  # CMKDTrainer (Accelerate)
    train(cfg, trainer, resume_from)
    metrics = evaluate(cfg, trainer)  # target accuracy / mean per-class accuracy
    # adapter or model (+ model card and the CLIP's image processor)
    saved = push_task(cfg, save_task(cfg, trainer, task_dir, source, target, metrics, clip.processor))
    return finish_task(cfg, saved, metrics, task_dir)  # task_result.json, written last


def record_task(results: dict[str, Any], result: TaskResult) -> dict[str, Any]:
    extra = {
        "num_eval": result.num_eval,
        "nbytes": result.nbytes,
        "overall_accuracy": result.accuracy,
        "mean_class_accuracy": result.mean_class_accuracy,
    }
    if result.teacher_accuracy is not None:
        extra["teacher_accuracy"] = result.teacher_accuracy
    if result.path:
        extra["path"] = result.path
    if result.hub_repo:
        extra["hub_repo"] = result.hub_repo
    if result.selection:
        extra["selection"] = result.selection
    if result.validators:
        extra["validators"] = result.validators
    add_result(results, result.method, result.task, result.score, result.dsp, result.per_class, **extra)
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(_task_line(result), flush=True)
    return results


def _task_line(r: TaskResult) -> str:
    size = f", {r.nbytes:,} bytes stored" if r.nbytes else ""
    teacher = f" (CLIP head {100 * r.teacher_accuracy:.1f} %)" if r.teacher_accuracy is not None else ""
    score = "accuracy not reported (no target labels)" if r.score is None else f"{100 * r.score:.1f} %"
    sel = r.selection
    if sel:
        score += (
            f" [checkpoint: {sel['rule']}"
            if sel["value"] is None
            else f" [checkpoint by {sel['metric']} = {sel['value']:.4g}"
        )
        if sel.get("oracle"):
            score += f"; {sel['oracle']['name']}: {100 * sel['oracle']['accuracy']:.1f} %"
        score += "]"
    return f"[{r.task}] {r.method}: {score}{teacher}, DSP {r.dsp / 1e6:.4f} M{size}"


def finish_run(cfg: RunConfig, results: dict[str, Any]) -> dict[str, Path]:
    """Markdown table (paper layout), accuracy-vs-DSP plot, then results.json: the run is finished."""
    from accelerate import PartialState

    paths: dict[str, Path] = {}
    if PartialState().is_main_process:
        paths = write_report(results, cfg.output_dir)
        print(render_markdown(results), flush=True)
        print(f"results: {paths['json']}  table: {paths['markdown']}  plot: {paths['plot']}", flush=True)
    PartialState().wait_for_everyone()
    return paths


# --------------------------------------------------------------------------------------------------------------------
# Entry point helper for recipes
# --------------------------------------------------------------------------------------------------------------------

USER_ERRORS = (ConfigError, DataError, RecipeError, TrainingDivergedError)


def run_recipe(main, argv: Sequence[str] | None = None, **kwargs):
    """Call a recipe's ``main`` and turn a user error into a one-line message instead of a traceback: exit status 2
    for a bad flag or YAML value (like argparse), 1 for the rest (bad data, interrupted run, diverged training,
    Hub token or upload)."""
    from peft_rst import HubTokenError

    try:
        return main(argv, **kwargs)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from exc
    except (*USER_ERRORS, HubTokenError) as exc:
        raise SystemExit(f"error: {exc}") from exc
