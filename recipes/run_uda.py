"""Unsupervised domain adaptation of CLIP with CMKD (and RST or another PEFT method) on a benchmark preset.

``--benchmark`` picks ``cmkd/presets/<benchmark>.yaml``, whose values are the defaults every flag overrides; the
flags are the libraries' own field names (``cmkd.CMKDTrainingArguments``, ``cmkd.CMKDConfig``, the data arguments)::

    python recipes/run_uda.py --benchmark office_home --data_dir data/OfficeHome -s Ar -t Cl --rst
    python recipes/run_uda.py --benchmark office_home --data_dir data/OfficeHome --all --peft rst,lora,bitfit
    python recipes/run_uda.py --benchmark digits_shift --peft rst,lora,adalora,bitfit,linear_probe,full \\
        --selection last --output_dir runs/table7      # the paper's Table VII on the embedded task, offline on CPU

``recipes/<benchmark>.py`` (e.g. ``accelerate launch recipes/office_home.py ...``) is this script with its preset.
``--benchmark X --help`` lists every flag with X's defaults. The run reads top to bottom in :func:`main`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file from a source checkout: make `recipes` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from accelerate import PartialState  # noqa: E402
from accelerate.utils import get_int_from_env  # noqa: E402

from cmkd import CLIPAdaptationModel, CMKDTrainer, apply_peft  # noqa: E402
from cmkd.benchmarks import ConfigError  # noqa: E402
from cmkd.callbacks import TrainingDivergedError  # noqa: E402
from cmkd.image_sets import DataError
from cmkd.peft_methods import PEFT_SAVED_AS  # noqa: E402
from cmkd.pretrained import CLIPBundle, ModelSourceError, load_clip  # noqa: E402
from cmkd.saving import SavedModel, clean_interrupted_saves, save_adapted_model  # noqa: E402
from recipes.core import outputs  # noqa: E402
from recipes.core.arguments import Run, parse  # noqa: E402
from recipes.core.data import TaskData, load_task_data
from recipes.core.outputs import ADAPTER_DIRNAME, MODEL_DIRNAME, RecipeError, TaskResult  # noqa: E402
from recipes.core.tables import add_result, new_results, render_markdown, write_report  # noqa: E402

TOY = "digits_shift"  # the embedded task: its images are rendered by cmkd.toy on first use
MODES = {"cmkd": "cmkd", "baseline": "source_only", "zero_shot": "zero_shot"}  # Run.method -> trainer mode


def main(argv: Sequence[str] | None = None, callbacks: Sequence = (), benchmark: str | None = None) -> dict:
    # 1. Arguments: preset defaults + flags, every combination and input on disk checked before anything loads
    run, _ = parse(argv, benchmark, defaults=toy_defaults(argv, benchmark))
    quiet_progress_bars(run)
    prepare_inputs(run)  # the embedded task's images on first use; then every task's data is found on disk
    # 2. The pretrained CLIP: the vision tower to adapt, the text tower for the zero-shot teacher
    clip = load_clip(run.model)
    results = start_run(run)
    # 3. One run per method (--peft a,b,...: Table VII) and task; each trains, evaluates, saves, pushes
    for number, peft in enumerate(run.peft_methods, 1):
        method_run = run
        if len(run.peft_methods) > 1:
            method_run = dataclasses.replace(run, peft=peft, output_dir=run.output_dir / peft)
            print(f"method {number} of {len(run.peft_methods)}: {method_run.method_label}", flush=True)
        for source, target in run.tasks:
            record_task(results, run_task(method_run, clip, source, target, callbacks))
    # 4. The paper's table (per task, Avg., DSP(M)), the accuracy-vs-DSP plot, then results.json (run finished)
    finish_run(run, results)
    return results


def quiet_progress_bars(run: Run) -> None:
    """--quiet: no progress bars from transformers (loading / saving weights) or the Hub client (the Trainer's own
    bar follows ``disable_tqdm``)."""
    if run.recipe.quiet:
        import huggingface_hub
        import transformers

        transformers.utils.logging.disable_progress_bar()
        huggingface_hub.utils.disable_progress_bars()


def toy_defaults(argv: Sequence[str] | None, benchmark: str | None, output_dir: str | None = None) -> dict:
    """The embedded task's domains, and its data folder next to the outputs."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--benchmark")
    pre.add_argument("--output_dir")
    known, _ = pre.parse_known_args(argv)
    if (benchmark or known.benchmark) != TOY:
        return {}
    from cmkd.toy import DOMAIN_NAMES

    data_dir = Path(known.output_dir or output_dir or f"runs/{TOY}") / "data"
    return {"source": DOMAIN_NAMES["source"], "target": DOMAIN_NAMES["target"], "data_dir": str(data_dir)}


def prepare_inputs(run: Run) -> None:
    """Render the embedded task's images the first time its default data folder is used (again if an older version
    rendered it), then check that every task's data exists (before a model is loaded)."""
    from cmkd.toy import needs_render, write_digits_shift_imagefolder

    data_dir = Path(run.data.data_dir or "")
    if run.bench.name == TOY and data_dir.name == "data" and needs_render(data_dir) and PartialState().is_main_process:
        print(f"writing the digits domain-shift task to {data_dir}", flush=True)
        write_digits_shift_imagefolder(data_dir)
    PartialState().wait_for_everyone()
    run.data.check_files(run.bench, run.tasks)


def start_run(run: Run) -> dict[str, Any]:
    """Empty results; with --overwrite the old finished-run marker goes first (an interrupted overwrite is never
    mistaken for a finished run)."""
    from recipes.core.tables import RESULTS_FILENAME

    if run.recipe.overwrite and PartialState().is_main_process:
        (run.output_dir / RESULTS_FILENAME).unlink(missing_ok=True)
    clean_interrupted_saves(run.output_dir)
    results = new_results(run.bench, meta={"run": run.to_dict()})
    results["tasks"] = list(run.task_names)
    return results


def run_task(run: Run, clip: CLIPBundle, source: str, target: str, callbacks: Sequence = ()) -> TaskResult:
    """One transfer task: resume? -> data -> model (+PEFT) -> CMKDTrainer.train -> evaluate -> save + card -> push.
    A task this folder already finished is read back instead of trained again."""
    task_dir = run.output_dir / f"{source}-{target}"
    clean_interrupted_saves(task_dir)  # a run killed while saving leaves temp folders / files behind
    done = outputs.finished_task(run, task_dir)
    if done is not None:
        return done
    resume_from = outputs.resume_checkpoint(run, task_dir)
    data = load_task_data(
        run.bench,
        run.data,
        source,
        target,
        partial=run.recipe.partial,
        fixmatch=run.recipe.fixmatch,
        seed=run.training.seed,
        image_size=clip.image_size,
        processor=clip.processor,
    )
    check_batch_fits(run, data, source, target)
    model = build_model(run, clip, data.classes)
    trainer = CMKDTrainer(  # seeds each item's augmentation; RST's reset step travels in the optimizer state
        model,
        task_training_args(run, task_dir),
        source_dataset=data.source,
        target_dataset=data.target,
        eval_dataset=data.eval,
        cmkd_config=run.cmkd,
        source_val_dataset=data.source_val,
        callbacks=list(callbacks),
    )
    if run.method != "zero_shot":
        trainer.train(resume_from_checkpoint=resume_from)
    metrics = evaluate(run, trainer, data.classes)
    fields = card_fields(run, source, target, metrics, data.classes)
    saved = save_task(run, trainer, task_dir, fields, clip.processor)
    path = saved.path if saved else None
    hub_repo = outputs.push_task(run, trainer, path, outputs.hub_repo_id(run, source, target), fields)
    result = TaskResult(
        task=f"{source}->{target}",
        method=run.method_label,
        dsp=saved.dsp if saved else 0,
        nbytes=saved.nbytes if saved else 0,
        path=str(path) if path else None,
        hub_repo=hub_repo,
        **metrics,
    )
    return outputs.finish_task(run, task_dir, result)  # task_result.json, written last


def check_batch_fits(run: Run, data: TaskData, source: str, target: str) -> None:
    """Every step draws one full batch from each training domain, so ``--batch_size`` cannot exceed either."""
    if run.method == "zero_shot":
        return
    sizes = {f"source domain {source}": len(data.source)}
    if run.method != "baseline":
        sizes[f"target domain {target}"] = len(data.target)
    for what, size in sizes.items():
        if run.recipe.batch_size > size:
            raise ConfigError(
                f"--batch_size {run.recipe.batch_size} is larger than the {what} ({size} images): every step draws a "
                "full "
                f"batch from each domain; pass --batch_size {min(sizes.values())} or less"
            )


def build_model(run: Run, clip: CLIPBundle, classes: Sequence[str]):
    """``CLIPAdaptationModel`` (vision tower + projection + head, zero-shot teacher cached from the text tower) and
    the PEFT method around it (``cmkd.apply_peft``); the base is recorded by the name it was given."""
    torch.manual_seed(run.training.seed)  # head initialisation
    model = CLIPAdaptationModel.from_clip(
        clip.model, list(classes), run.bench.prompt_template, tokenizer=clip.tokenizer
    )
    model.name_or_path = model.config._name_or_path = base_model_name(run)
    # peft looks a base name up on the Hub when it saves an adapter; the shipped model's "cmkd:" name is not there
    warnings.filterwarnings("ignore", message="Could not find a config file in cmkd:")
    if run.peft == "full":
        return model
    options = {"rst": {"tau": run.tau}, "adalora": {"total_step": run.training.max_steps}}.get(run.peft, {})
    return apply_peft(model, run.peft, **options)


def task_training_args(run: Run, task_dir: Path):
    """This task's ``CMKDTrainingArguments``: the parsed flags, with what the recipe decides per task. ``--batch_size``
    is the global per-domain batch (the paper's 32 + 32): with N processes each takes batch / N."""
    world = get_int_from_env(["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"], 1)
    if run.recipe.batch_size % world:
        raise RecipeError(f"--batch_size {run.recipe.batch_size} must be a multiple of the {world} processes")
    args, rule = run.training, run.recipe.selection
    selection = {"load_best_model_at_end": rule != "last"}
    if rule not in (None, "last"):
        selection["metric_for_best_model"] = run.bench.metric if rule == "oracle" else rule
        selection["greater_is_better"] = None  # set again from the rule
    accelerator = getattr(torch, "accelerator", None)
    has_accelerator = bool(accelerator and accelerator.is_available()) or torch.cuda.is_available()
    return dataclasses.replace(
        args,
        **selection,
        output_dir=str(task_dir),
        mode="cmkd_fixmatch" if run.recipe.fixmatch else MODES[run.method],
        per_device_train_batch_size=run.recipe.batch_size // world,
        per_device_eval_batch_size=max(1, args.per_device_eval_batch_size // world),
        save_total_limit=None if run.recipe.keep_checkpoints else 1,  # 1: the best and the latest survive
        partial_set=run.recipe.partial,
        data_seed=args.seed,
        fp16=args.fp16 and torch.cuda.is_available(),
        dataloader_persistent_workers=args.dataloader_num_workers > 0,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not has_accelerator,  # CPU only: `accelerate launch` processes talk over gloo
        disable_tqdm=run.recipe.quiet or args.disable_tqdm,
        push_to_hub=False,  # the saved adapter / model is pushed by outputs.push_task
        resume_from_checkpoint=None,
    )


def evaluate(run: Run, trainer, classes: Sequence[str]) -> dict[str, Any]:
    """Target scores of the reported model: the label-free validators and the selection summary always; with target
    labels also the benchmark's metric, both accuracies, per-class accuracy and the zero-shot teacher's."""
    from cmkd.validators import LAST_RULE, VALIDATORS, selection_summary

    selection = None
    if run.method != "zero_shot":
        rule = LAST_RULE if run.recipe.selection == "last" else trainer.args.metric_for_best_model
        selection = selection_summary(trainer.state.log_history, rule, run.bench.metric)
        if selection is not None:
            selection["rule"] = run.selection_rule  # the same words as the logs, tables and card
    raw = trainer.evaluate()

    def get(key: str) -> float | None:
        return float(raw[key]) if key in raw else None

    per_class = raw.get("eval_per_class_accuracy") or []
    return {
        "score": get(f"eval_{run.bench.metric}"),
        "accuracy": get("eval_accuracy"),
        "mean_class_accuracy": get("eval_mean_class_accuracy"),
        "teacher_accuracy": get("eval_teacher_accuracy"),
        "per_class": {str(c): float(a) for c, a in zip(classes, per_class) if a is not None} if per_class else None,
        "validators": {k: float(raw[f"eval_{k}"]) for k in VALIDATORS if f"eval_{k}" in raw},
        "selection": selection,
        "num_source": len(trainer.train_dataset) if trainer.train_dataset is not None else 0,
        "num_target": len(trainer.target_dataset) if trainer.target_dataset is not None else 0,
        "num_eval": len(trainer.eval_dataset),
    }


def record_task(results: dict[str, Any], result: TaskResult) -> dict[str, Any]:
    """Add a finished task to the results and print its line."""
    extra = {"num_eval": result.num_eval, "nbytes": result.nbytes, "overall_accuracy": result.accuracy}
    extra["mean_class_accuracy"] = result.mean_class_accuracy
    for key in ("teacher_accuracy", "path", "hub_repo", "selection", "validators"):
        if getattr(result, key):
            extra[key] = getattr(result, key)
    add_result(results, result.method, result.task, result.score, result.dsp, result.per_class, **extra)
    if PartialState().is_main_process:
        print(task_line(result), flush=True)
    return results


def finish_run(run: Run, results: dict[str, Any]) -> dict[str, Path]:
    """Markdown table (paper layout), accuracy-vs-DSP plot, then results.json: the run is finished."""
    paths: dict[str, Path] = {}
    if PartialState().is_main_process:
        paths = write_report(results, run.output_dir)
        print(render_markdown(results), flush=True)
        print(f"results: {paths['json']}  table: {paths['markdown']}  plot: {paths['plot']}", flush=True)
    PartialState().wait_for_everyone()
    return paths


def card_fields(run: Run, source: str, target: str, metrics: dict[str, Any], classes: list[str]) -> dict[str, Any]:
    """Model card fields of one task (``peft_rst.model_card.CARD_FIELDS``): the script, the settings, the selection
    rule with its value next to the accuracy, and how to rebuild the base model."""
    from cmkd.toy import TINY_CLIP_PATH

    bench, args = run.bench, run.training
    notes = (
        f"Trained with `{run.script}` ({run.method_label}, checkpoint: {run.selection_rule}): {args.max_steps} "
        f"iterations, batch {run.recipe.batch_size} source + {run.recipe.batch_size} target, SGD lr "
        f"{args.learning_rate:g} (head x"
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
        repo_id=outputs.hub_repo_id(run, source, target) if args.push_to_hub else None,
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


def save_task(run: Run, trainer, task_dir: Path, fields: dict[str, Any], image_processor=None) -> SavedModel | None:
    """``cmkd.saving.save_adapted_model`` on the main process (zero-shot saves nothing)."""
    saved = None
    if run.method != "zero_shot" and trainer.args.should_save:
        saved = save_adapted_model(trainer.model, task_dir, run.peft, fields, image_processor)
    trainer.accelerator.wait_for_everyone()
    if saved is None and run.method != "zero_shot":  # another process: the same folder, measured by the main one
        saved = SavedModel(
            task_dir / (ADAPTER_DIRNAME if PEFT_SAVED_AS[run.peft] == "adapter" else MODEL_DIRNAME), 0, 0
        )
    return saved


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


USER_ERRORS = (ConfigError, DataError, RecipeError, TrainingDivergedError, ModelSourceError)


def run_recipe(entry=main, argv: Sequence[str] | None = None, **kwargs):
    """Call a recipe's ``main`` and turn a user error into a one-line message instead of a traceback: exit status 2
    for a bad flag or value (like argparse), 1 for the rest (data, interrupted run, divergence, model, Hub)."""
    from peft_rst import HubTokenError

    try:
        return entry(argv, **kwargs)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from exc
    except (*USER_ERRORS, HubTokenError) as exc:
        raise SystemExit(f"error: {exc}") from exc


if __name__ == "__main__":
    run_recipe()
