"""What a task leaves on disk and on the Hub: resume point, adapter or model with its card, ``task_result.json``.

A task folder is finished when ``task_result.json`` exists (written last, atomically); a restarted run reads it back
instead of training again. Checkpoints of an interrupted task are never trained over silently: the user resumes
(``--resume_from_checkpoint``) or starts again (``--overwrite``). Saves go to a temp folder renamed into place.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import PartialState

from cmkd.checkpoints import InterruptedRunError, checkpoint_folders, resume_point
from cmkd.saving import SavedModel, save_adapted_model
from peft_rst.files import atomic_write_text

from .arguments import Run

TASK_RESULT_FILENAME = "task_result.json"
ADAPTER_DIRNAME = "adapter"  # RST / LoRA / AdaLoRA: the adapter + head (+ README.md model card)
MODEL_DIRNAME = "model"  # full fine-tuning, BitFit, linear probe: the whole adapted model


class RecipeError(RuntimeError):
    """A run cannot start or continue as asked; the message says how to fix it."""


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


def card_fields(run: Run, source: str, target: str, metrics: dict[str, Any], classes: list[str]) -> dict[str, Any]:
    """Model card fields of one task (``peft_rst.model_card.CARD_FIELDS``): the script, the settings, the selection
    rule with its value next to the accuracy, and how to rebuild the base model."""
    from cmkd.toy import TINY_CLIP_PATH

    bench, args = run.bench, run.training
    notes = (
        f"Trained with `{run.script}` ({run.method_label}, checkpoint: {run.selection_rule}): {args.max_steps} "
        f"iterations, batch {run.batch_size} source + {run.batch_size} target, SGD lr {args.learning_rate:g} (head x"
        f"{args.head_lr_multiplier:g}), seed {args.seed}, prompt `{bench.prompt_template}`."
    )
    if metrics.get("teacher_accuracy") is not None:
        notes += f" The zero-shot CLIP head on the adapted features scores {100 * metrics['teacher_accuracy']:.2f} %."
    sel = metrics.get("selection")
    if sel:
        notes += f"\n\nCheckpoint selection: {sel['rule']}" + (
            "" if sel["value"] is None else f"; value {sel['value']:.4g}"
        )
        notes += f" at step {sel['step']}"
        if sel.get("accuracy") is not None:
            notes += (
                f", target accuracy {100 * sel['accuracy']:.2f} % (target labels used for reporting only). Last "
                f"checkpoint: {100 * sel['last']['accuracy']:.2f} %; {sel['oracle']['name']}: "
                f"{100 * sel['oracle']['accuracy']:.2f} % at step {sel['oracle']['step']}; gap to the oracle "
                f"{100 * sel['gap']:.2f} points."
            )
        else:
            notes += "; no target labels were given, so no accuracy is reported."
    shipped = Path(run.model).exists() and Path(run.model).resolve() == TINY_CLIP_PATH
    base = "TINY_CLIP_PATH" if shipped else repr(run.model)
    code = "from cmkd import CLIPAdaptationModel\n" + "from cmkd.toy import TINY_CLIP_PATH\n" * shipped
    code += f"\nclass_names = {classes!r}\n"
    code += f"base = CLIPAdaptationModel.from_clip({base}, class_names, {bench.prompt_template!r})"
    return dict(
        repo_id=hub_repo_id(run, source, target) if args.push_to_hub else None,
        base_model=base_model_name(run),
        dataset=bench.name,
        source_domain=bench.domains[source].name,
        target_domain=bench.domains[target].name if target in bench.domains else target,
        accuracy=metrics["score"],
        metric="balanced_accuracy" if bench.metric == "mean_class_accuracy" else "accuracy",
        training_notes=notes,
        base_loading_code=code,
    )


def base_model_name(run: Run) -> str:
    """The base model as given (a Hub id, or the preset's ``cmkd:`` name of the shipped tiny CLIP), never the
    absolute local folder it resolved to: cards and adapter configs stay valid on another machine."""
    return str(run.recipe.model or run.backbone.model)


def hub_repo_id(run: Run, source: str, target: str) -> str:
    """``--hub_model_id`` (default: the output folder's name), suffixed with the task when several are run."""
    base = run.hub_model_id or run.output_dir.resolve().name
    return f"{base}-{source}-{target}".lower() if len(run.tasks) > 1 else base


def save_task(run: Run, trainer, task_dir: Path, fields: dict[str, Any], image_processor=None) -> SavedModel | None:
    """``cmkd.saving.save_adapted_model`` on the main process (zero-shot saves nothing)."""
    saved = None
    if run.method != "zero_shot" and trainer.args.should_save:
        saved = save_adapted_model(trainer.model, task_dir, run.peft, fields, image_processor)
    trainer.accelerator.wait_for_everyone()
    if saved is None and run.method != "zero_shot":  # another process: the same folder, measured by the main one
        saved = SavedModel(task_dir / (ADAPTER_DIRNAME if run.rst else MODEL_DIRNAME), 0, 0)
    return saved


def push_task(run: Run, path: Path | None, repo_id: str, fields: dict[str, Any]) -> str | None:
    """``--push_to_hub``: the RST adapter and its card in one commit (``peft_rst.push_adapter_to_hub``), or the
    model folder (``huggingface_hub.upload_folder``). A Hub failure says how to push again without retraining."""
    if not run.training.push_to_hub or path is None:
        return None
    if PartialState().is_main_process:
        from huggingface_hub import HfApi, constants
        from huggingface_hub.errors import HfHubHTTPError, HFValidationError

        token = run.training.hub_token
        try:
            if run.rst:
                import peft_rst

                peft_rst.push_adapter_to_hub(path, repo_id, card_data={**fields, "repo_id": repo_id}, token=token)
            else:
                api = HfApi(token=token)
                api.create_repo(repo_id, exist_ok=True)
                api.upload_folder(repo_id=repo_id, folder_path=str(path), commit_message="Upload adapted CLIP")
        except Exception as exc:  # noqa: BLE001 - only network / Hub failures become a message
            network = type(exc).__module__.startswith(("httpx", "httpcore", "requests", "urllib3"))
            if not (network or isinstance(exc, (OSError, HfHubHTTPError, HFValidationError))):
                raise
            raise RecipeError(
                f"could not push {path} to {repo_id} on {constants.ENDPOINT}: {type(exc).__name__}: "
                f"{str(exc).strip().rstrip('.')}. The task is trained and saved there; rerun the same command with "
                f"--resume_from_checkpoint to push it (no training is repeated), or upload the folder with "
                f"`hf upload {repo_id} {path}`"
            ) from exc
    PartialState().wait_for_everyone()
    return repo_id


def finish_task(run: Run, task_dir: Path, result: TaskResult) -> TaskResult:
    """Write ``task_result.json`` (the task's finished marker, last) and drop its Trainer checkpoints."""
    if PartialState().is_main_process:
        atomic_write_text(task_dir / TASK_RESULT_FILENAME, json.dumps(dataclasses.asdict(result), indent=2) + "\n")
        if not run.recipe.keep_checkpoints:
            for ckpt in checkpoint_folders(task_dir):
                shutil.rmtree(ckpt, ignore_errors=True)
    return result


def task_line(r: TaskResult) -> str:
    """One printed line per finished task: its score and the rule that picked the checkpoint."""
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
