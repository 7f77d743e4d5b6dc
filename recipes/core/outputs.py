"""What a run leaves on disk and on the Hub: its output folder, each task's resume point, adapter or model with its
card, ``task_result.json``.

A task folder is finished when ``task_result.json`` exists (written last, atomically); a restarted run reads it back
instead of training again. Checkpoints of an interrupted task are never trained over silently: the user resumes
(``--resume_from_checkpoint``) or starts again (``--overwrite``). Saves go to a temp folder renamed into place.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from accelerate import PartialState

from cmkd.benchmarks import ConfigError
from cmkd.checkpoints import InterruptedRunError, checkpoint_folders, resume_point
from cmkd.saving import HubPushError, push_adapted_model
from peft_rst.files import atomic_write_text

from .tables import RESULTS_FILENAME

if TYPE_CHECKING:  # arguments imports this module
    from .arguments import RecipeArguments, Run

TASK_RESULT_FILENAME = "task_result.json"
ADAPTER_DIRNAME = "adapter"  # RST / LoRA / AdaLoRA: the adapter + head (+ README.md model card)
MODEL_DIRNAME = "model"  # full fine-tuning, BitFit, linear probe: the whole adapted model


class RecipeError(RuntimeError):
    """A run cannot start or continue as asked; the message says how to fix it."""


def output_folder(bench, recipe: RecipeArguments, slug: str, tasks, given: str | None) -> Path:
    """``--output_dir``, or ``runs/<benchmark>/<method>/<SRC>-<TGT>`` (``.../all`` with --all); a folder holding a
    finished run (its results file) is refused unless --overwrite."""
    if given is not None and not given.strip():
        raise ConfigError("--output_dir is empty; pass a folder, or drop the flag for the default")
    path = Path(given) if given is not None else Path("runs", bench.name, slug)
    if given is None:
        path = path / ("all" if recipe.all else "{}-{}".format(*tasks[0]))
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--output_dir {str(path)!r} exists and is not a folder")
    if (path / RESULTS_FILENAME).exists() and not recipe.overwrite:
        raise ConfigError(
            f"--output_dir {str(path)!r} already holds a finished run ({RESULTS_FILENAME}); "
            "choose another folder or pass --overwrite to replace it"
        )
    probe = path.absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"--output_dir {str(path)!r} cannot be created: {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"--output_dir {str(path)!r} cannot be written: no write permission on {probe}")
    return path


def method_slug(method: str, recipe: RecipeArguments, peft: tuple[str, ...]) -> str:
    """Folder name of a method: ``cmkd_rst``, ``baseline``, ``clip``, ``cmkd_fixmatch_partial`` ..."""
    parts = ["clip" if method == "zero_shot" else method] + ["fixmatch"] * recipe.fixmatch
    parts += [] if peft == ("full",) else [peft[0]] if len(peft) == 1 else ["peft"]
    return "_".join(parts + ["partial"] * recipe.partial)


def resume_checkpoint(run: Run, task_dir: Path) -> str | None:
    """The checkpoint this task resumes from (``cmkd.checkpoints.resume_point``); with --overwrite an earlier
    finished task result goes too, so an interrupted overwrite never leaves a stale finished task."""
    if run.recipe.overwrite and PartialState().is_main_process:
        (task_dir / TASK_RESULT_FILENAME).unlink(missing_ok=True)
    try:
        return resume_point(task_dir, run.training.resume_from_checkpoint, start_over=run.recipe.overwrite)
    except InterruptedRunError as exc:
        raise RecipeError(
            f"{exc}; pass --resume_from_checkpoint to continue it, or --overwrite to start again"
        ) from None


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


def finished_task(run: Run, task_dir: Path) -> TaskResult | None:
    """The result of a task this output folder already finished, unless --overwrite."""
    path = task_dir / TASK_RESULT_FILENAME
    if run.recipe.overwrite or not path.is_file():
        return None
    result = TaskResult(**json.loads(path.read_text()))
    if result.method != run.method_label:
        raise RecipeError(
            f"{path} holds a finished {result.method} run, but this run is {run.method_label}; use another "
            "--output_dir or --overwrite"
        )
    return result


def hub_repo_id(run: Run, source: str, target: str) -> str:
    """``--hub_model_id`` (default: the output folder's name), suffixed with the task when several are run."""
    base = run.hub_model_id or run.output_dir.resolve().name
    return f"{base}-{source}-{target}".lower() if len(run.tasks) > 1 else base


def push_task(run: Run, trainer, path: Path | None, repo_id: str, fields: dict[str, Any]) -> str | None:
    """``--push_to_hub``: ``cmkd.saving.push_adapted_model``; a Hub failure says how to push again without
    retraining."""
    if not run.training.push_to_hub or path is None:
        return None
    try:
        return push_adapted_model(trainer, path, run.peft, repo_id, fields, run.training.hub_token)
    except HubPushError as exc:
        raise RecipeError(
            f"{exc}, or rerun the same command with --resume_from_checkpoint to push it (no training is repeated)"
        ) from exc


def finish_task(run: Run, task_dir: Path, result: TaskResult) -> TaskResult:
    """Write ``task_result.json`` (the task's finished marker, last) and drop its Trainer checkpoints."""
    if PartialState().is_main_process:
        atomic_write_text(task_dir / TASK_RESULT_FILENAME, json.dumps(dataclasses.asdict(result), indent=2) + "\n")
        if not run.recipe.keep_checkpoints:
            for ckpt in checkpoint_folders(task_dir):
                shutil.rmtree(ckpt, ignore_errors=True)
    return result
