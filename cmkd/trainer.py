"""`CMKDTrainer`: a `transformers.Trainer` for UDA with CMKD (paper Sec. III.B, IV.A, App. B/K; release settings).

Only the hooks that differ from supervised training are overridden:

- `get_train_dataloader`: an endless stream of paired batches (one labeled source + one unlabeled target batch per
  step, each stream reshuffled on exhaustion), sharded so N processes see exactly the global batches of one.
- `compute_loss`: one pass of the vision tower over source + target (+ strong view); the model gathers the
  features across processes (differentiably) and the heads and the batch-level CMKD loss run on the *global*
  batch, so multi-process training computes the same loss and gradients as one process.
- `create_optimizer` / `create_scheduler`: SGD (nesterov, momentum 0.9, wd 5e-4) with a backbone and a head
  group (head lr x multiplier), and the release's per-iteration decay ``lr * (1 + 0.0003 t) ** -0.75``.
- `get_eval_dataloader` / `prediction_step` / `evaluation_loop`: one pass over the target evaluation set yields the
  label-free validators (`cmkd.validators`: entropy, SND, BNM, IM, agreement with the frozen zero-shot CLIP, and,
  with a held-out ``source_val_dataset``, source accuracy and DEV) and, only if the set is labeled, accuracy, mean
  per-class accuracy and the per-class list of both heads (the local `evaluate` module). The best checkpoint is
  chosen by a label-free validator by default; choosing by target accuracy is the oracle (uses target labels).
- `training_step` (partial-set DA): re-estimate the target label set before each epoch but the first.
- `log`: per-term losses and alpha statistics averaged over the logging window.

Everything else (mixed precision, device placement, DDP/DeepSpeed/FSDP, gradient accumulation, checkpointing,
best-model tracking, progress bar) is the stock Trainer, configured by `CMKDTrainingArguments`.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import EvalLoopOutput, EvalPrediction

from .callbacks import NonFiniteGuardCallback, check_finite_loss
from .checkpoints import IncompleteCheckpointError, checkpoint_problems, last_complete_checkpoint
from .config import CMKDConfig
from .data import check_class_lists, collate_images, dataset_class_names, make_paired_dataloader
from .fixmatch import fixmatch_terms
from .loss import CMKDLoss
from .model import unwrap_adaptation_model
from .partial import estimate_label_set
from .peft_methods import add_peft_callbacks
from .validators import (
    DEFAULT_VALIDATOR,
    LABEL_METRICS,
    OPT_IN,
    ORACLE_NAME,
    VALIDATORS,
    ValidationInputs,
    compute_validators,
    describe,
)

__all__ = ["MODES", "CMKDTrainer", "CMKDTrainingArguments", "inverse_decay_lambda"]

logger = logging.getLogger(__name__)

MODES = ("source_only", "cmkd", "cmkd_fixmatch", "zero_shot")


def inverse_decay_lambda(gamma: float = 0.0003, power: float = 0.75):
    """The release's LR multiplier ``t -> (1 + gamma * t) ** -power`` (t = optimizer steps taken)."""

    def factor(step: int) -> float:
        return (1.0 + gamma * step) ** (-power)

    return factor


# field -> (kind, low, high, low excluded): numbers the release's schedule needs, checked where they are defined, so
# a preset, a script and the command line all fail the same way (``None`` = unset, filled in by ``__post_init__``)
_RANGES: dict[str, tuple[type, float | None, float | None, bool]] = {
    "learning_rate": (float, 0, None, True),
    "head_lr_multiplier": (float, 0, None, True),
    "sgd_momentum": (float, 0, 1, False),
    "weight_decay": (float, 0, None, False),
    "lr_decay_gamma": (float, 0, None, False),
    "lr_decay_power": (float, 0, None, False),
    "max_steps": (int, 1, None, False),
    "eval_steps": (int, 1, None, False),  # iterations (a ratio of max_steps has no use in an iteration schedule)
    "iterations_per_epoch": (int, 1, None, False),
    "per_device_train_batch_size": (int, 1, None, False),
    "per_device_eval_batch_size": (int, 1, None, False),
    "seed": (int, 0, 2**32 - 1, False),  # numpy's seed range (set_seed seeds numpy too)
    "dataloader_num_workers": (int, 0, None, False),
    "logging_steps": (float, 0, None, True),
}


def _check_range(name: str, value: Any, kind: type, low: float | None, high: float | None, open_low: bool) -> None:
    """``ValueError`` naming the field unless ``value`` is None or a finite ``kind`` within the range."""
    if value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        ok = ok and (isinstance(value, int) or float(value).is_integer())
    what = "an integer" if kind is int else "a finite number"
    if low is not None and high is not None:
        what += f" in {'(' if open_low else '['}{low:g}, {high:g}]"
    elif low is not None:
        what += f" {'>' if open_low else '>='} {low:g}"
    bad = not ok or not math.isfinite(value) or (low is not None and (value <= low if open_low else value < low))
    if bad or (high is not None and value > high):
        raise ValueError(f"{name} must be {what}, got {value!r}")


@dataclass
class CMKDTrainingArguments(TrainingArguments):
    """`TrainingArguments` with the release's defaults and the few CMKD run settings.

    Release defaults: SGD lr 3e-6 (ViT-B/16; ResNet 3e-7 with multiplier 1e4), weight decay 5e-4, 10k iterations,
    evaluation on the target set every "epoch" of 500 iterations. The release keeps the checkpoint with the best
    target accuracy, which needs target labels; here the best checkpoint is chosen by a label-free validator
    (``metric_for_best_model``, default ``cmkd.validators.DEFAULT_VALIDATOR``; its direction sets
    ``greater_is_better``). ``metric_for_best_model="accuracy"`` is the oracle (uses target labels).
    ``per_device_train_batch_size`` is the source batch; ``target_batch_size`` the target one (default: same).
    """

    mode: str = field(
        default="cmkd", metadata={"help": "source_only | cmkd | cmkd_fixmatch | zero_shot (evaluation only)."}
    )
    head_lr_multiplier: float = field(default=1000.0, metadata={"help": "Task-head lr = learning_rate x this."})
    sgd_momentum: float = field(default=0.9, metadata={"help": "SGD momentum (nesterov)."})
    sgd_nesterov: bool = field(default=True, metadata={"help": "Use Nesterov momentum."})
    lr_decay_gamma: float = field(default=0.0003, metadata={"help": "lr_t = lr * (1 + gamma t) ** -power."})
    lr_decay_power: float = field(default=0.75, metadata={"help": "lr_t = lr * (1 + gamma t) ** -power."})
    target_batch_size: int | None = field(
        default=None, metadata={"help": "Per-device target batch size (default: per_device_train_batch_size)."}
    )
    iterations_per_epoch: int | None = field(
        default=None,
        metadata={
            "help": "An 'epoch' of the iteration-based schedule (partial-set period); default eval_steps or 500."
        },
    )
    partial_set: bool = field(
        default=False,
        metadata={"help": "Partial-set DA: re-estimate the target label set before each epoch but the first."},
    )

    learning_rate: float = field(default=3e-6, metadata={"help": "Backbone learning rate (release ViT-B/16)."})
    weight_decay: float = field(default=5e-4, metadata={"help": "Weight decay on every parameter group."})
    max_steps: int = field(default=10000, metadata={"help": "Training iterations."})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Per-device source batch size."})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "Per-device evaluation batch size."})
    eval_strategy: str = field(default="steps", metadata={"help": "Evaluate on the target set every eval_steps."})
    save_strategy: str = field(default="steps", metadata={"help": "Checkpoint every save_steps."})
    save_steps: float | None = field(
        default=None, metadata={"help": "Checkpoint period, a multiple of eval_steps (default: eval_steps)."}
    )
    save_total_limit: int | None = field(default=1, metadata={"help": "Checkpoints kept (the best is always kept)."})
    load_best_model_at_end: bool = field(default=True, metadata={"help": "Reload the best checkpoint at the end."})
    metric_for_best_model: str | None = field(
        default=DEFAULT_VALIDATOR,
        metadata={
            "help": f"Checkpoint selection: a label-free validator ({', '.join(VALIDATORS)}), or 'accuracy' / "
            f"'mean_class_accuracy' on a labeled eval_dataset = {ORACLE_NAME}."
        },
    )
    eval_validators: list[str] | None = field(
        default=None,
        metadata={
            "help": "Validators computed at each evaluation (default: every one the inputs allow, except 'dev', "
            "which fits a domain classifier each time, unless it is metric_for_best_model)."
        },
    )
    max_grad_norm: float = field(default=0.0, metadata={"help": "The release does not clip gradients."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Datasets are transformed lazily."})
    logging_steps: float | None = field(
        default=None, metadata={"help": "Log losses every this many steps (default: min(50, eval_steps))."}
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "Continue from this checkpoint folder; given without a value: from the last complete checkpoint "
            "in output_dir ('last').",
            "nargs": "?",
            "const": "last",
        },
    )
    halt_on_nonfinite: bool = field(
        default=True,
        metadata={
            "help": "Stop with TrainingDivergedError when a loss term or a trainable weight becomes inf/NaN "
            "(before the next checkpoint, so the last good one is kept)."
        },
    )

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {self.mode!r}.")
        for name, spec in _RANGES.items():
            _check_range(name, getattr(self, name), *spec)
        if self.target_batch_size is not None and self.target_batch_size < 1:
            raise ValueError(f"target_batch_size must be >= 1, got {self.target_batch_size}.")
        # one period unless set apart: evaluate, checkpoint and (partial-set) re-estimate together
        self.eval_steps = self.eval_steps or self.iterations_per_epoch or 500
        self.iterations_per_epoch = self.iterations_per_epoch or int(self.eval_steps)
        self.save_steps = self.save_steps or self.eval_steps
        self.logging_steps = self.logging_steps or min(50, self.eval_steps)
        unknown = [v for v in self.eval_validators or () if v not in VALIDATORS]
        if unknown:
            raise ValueError(f"eval_validators {unknown} unknown; choose from {list(VALIDATORS)}.")
        if self.metric_for_best_model is not None and self.greater_is_better is None:
            name = self.metric_for_best_model.removeprefix("eval_")
            if name in VALIDATORS:
                self.greater_is_better = VALIDATORS[name].greater_is_better
        super().__post_init__()


class CMKDTrainer(Trainer):
    """Trainer for `CLIPAdaptationModel` (or a PEFT model wrapping it, e.g. RST) on a source/target pair.

    Args:
        model: `CLIPAdaptationModel`, or a `peft.PeftModel` around one (``modules_to_save=["head"]``).
        args: `CMKDTrainingArguments`.
        source_dataset: labeled source items ``{"pixel_values", "labels"}`` (`cmkd.data.with_image_transform`).
        target_dataset: target items ``{"pixel_values"}`` (+ ``"pixel_values_strong"`` for FixMatch); labels, if
            present, are never used for training.
        eval_dataset: target set to evaluate on, with the test transform (default: ``target_dataset``). Labels are
            optional: without them evaluation reports the label-free validators only; with them it also reports
            target accuracy (reporting, or the oracle when ``metric_for_best_model`` is a label metric).
        source_val_dataset: labeled source images held out of ``source_dataset`` (test transform); enables the
            ``source_accuracy`` and ``dev`` validators (one extra pass over this split per evaluation).
        cmkd_config: loss weights and variants (`CMKDConfig`; default: release settings).
        **kwargs: passed to `transformers.Trainer` (callbacks, compute_metrics, optimizers, ...).
    """

    def __init__(
        self,
        model: nn.Module,
        args: CMKDTrainingArguments,
        source_dataset=None,
        target_dataset=None,
        eval_dataset=None,
        cmkd_config: CMKDConfig | None = None,
        source_val_dataset=None,
        **kwargs,
    ):
        if not isinstance(args, CMKDTrainingArguments):
            raise TypeError(f"args must be CMKDTrainingArguments, got {type(args).__name__}.")
        if "train_dataset" in kwargs:
            raise TypeError("pass source_dataset= and target_dataset= instead of train_dataset=.")
        self.cmkd_config = CMKDConfig() if cmkd_config is None else cmkd_config
        if not isinstance(self.cmkd_config, CMKDConfig):
            raise TypeError(f"cmkd_config must be a CMKDConfig, got {type(self.cmkd_config).__name__}.")
        core = unwrap_adaptation_model(model)
        self.mode = args.mode
        if self.mode != "zero_shot" and source_dataset is None:
            raise ValueError(f"mode {self.mode!r} trains on labeled source data: pass source_dataset=.")
        if self.mode in ("cmkd", "cmkd_fixmatch") and target_dataset is None:
            raise ValueError(f"mode {self.mode!r} needs the unlabeled target set: pass target_dataset=.")
        if self.mode != "source_only" and not core.config.has_text_features:
            raise ValueError(
                f"mode {self.mode!r} needs the zero-shot teacher, but the model has no cached text features; "
                "build it with CLIPAdaptationModel.from_clip(clip, class_names, prompt_templates, tokenizer)."
            )
        class_names = core.config.class_names
        check_class_lists(
            class_names,
            dataset_class_names(source_dataset) if source_dataset is not None else None,
            dataset_class_names(target_dataset) if target_dataset is not None else None,
            partial=args.partial_set,
        )
        if self.mode == "cmkd_fixmatch" and "pixel_values_strong" not in _first_item(target_dataset):
            raise ValueError(
                "mode 'cmkd_fixmatch' needs target items with a strong view ('pixel_values_strong'): build the target "
                "set with with_image_transform(target, weak, strong_transform=cmkd.fixmatch.strong_transform(size))."
            )
        if eval_dataset is None:
            eval_dataset = target_dataset
        if eval_dataset is not None and eval_dataset is not target_dataset:
            check_class_lists(class_names, None, dataset_class_names(eval_dataset), partial=args.partial_set)
        if eval_dataset is None and args.eval_strategy != "no":
            raise ValueError("periodic evaluation needs target images: pass eval_dataset= or target_dataset=.")
        if source_val_dataset is not None:
            check_class_lists(class_names, dataset_class_names(source_val_dataset), None)
        user_metrics = kwargs.pop("compute_metrics", None)
        if user_metrics is None:
            _check_selection(args, eval_dataset, source_val_dataset)
            selecting = (args.metric_for_best_model or "").removeprefix("eval_")
            if selecting == "zs_agreement" and args.eval_strategy != "no" and not core.config.has_text_features:
                raise ValueError(
                    "metric_for_best_model='zs_agreement' compares with the zero-shot CLIP teacher, which this model "
                    "does not have (no cached text features): build it with CLIPAdaptationModel.from_clip(...) or "
                    f"choose another validator from {[v for v in VALIDATORS if v != 'zs_agreement']}."
                )

        _refuse_rst_under_deepspeed(args, model)
        _refuse_best_checkpoint_with_adalora(args, model)
        super().__init__(
            model=model,
            args=args,
            train_dataset=source_dataset,
            eval_dataset=eval_dataset,
            compute_metrics=user_metrics if user_metrics is not None else self._compute_uda_metrics,
            **kwargs,
        )
        self.target_dataset = target_dataset
        self.source_val_dataset = source_val_dataset
        self._has_teacher = bool(core.config.has_text_features)
        self._rich_predictions = False  # evaluation: prediction_step returns logits and features, not class ids
        self._last_rich: np.ndarray | None = None
        self._source_val: tuple[np.ndarray, np.ndarray] | None = None
        self._zero_shot_ids: dict[int, np.ndarray] = {}  # id(eval dataset) -> frozen zero-shot CLIP predictions
        self.loss_fn = CMKDLoss(self.cmkd_config)
        self.loss_is_scaled_for_ga = False  # per-batch losses: the Trainer divides by the accumulation steps
        self.num_classes = len(class_names)
        self.label_set: torch.Tensor | None = None  # partial-set DA: estimated target classes
        self._label_set_step = 0
        self._metric = None
        self._reset_term_logs()
        if args.halt_on_nonfinite:
            self.add_callback(NonFiniteGuardCallback())
        add_peft_callbacks(self, model)  # AdaLoRA: rank allocation + orthogonality penalty (cmkd.peft_methods)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """`Trainer.train`; ``resume_from_checkpoint=True`` takes the newest *complete* checkpoint of
        ``output_dir`` (one a killed save left half-written is skipped, with a warning), and a checkpoint path
        must be complete (`cmkd.checkpoints.checkpoint_problems`). Before training it records the frozen zero-shot
        CLIP's predictions on the evaluation set (one pass, with the model as it is now, before any adaptation) for
        the ``zs_agreement`` validator."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No complete checkpoint found in output directory ({self.args.output_dir})")
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            problems = checkpoint_problems(resume_from_checkpoint)
            if problems:
                raise IncompleteCheckpointError(
                    f"cannot resume from {resume_from_checkpoint}: not a complete Trainer checkpoint "
                    f"({'; '.join(problems)}); pass a complete checkpoint-N folder or resume_from_checkpoint=True"
                )
            resume_from_checkpoint = str(resume_from_checkpoint)
        if self._has_teacher and self.args.eval_strategy != "no" and self.eval_dataset is not None:
            sets = self.eval_dataset if isinstance(self.eval_dataset, dict) else {"": self.eval_dataset}
            for dataset in sets.values():
                if id(dataset) not in self._zero_shot_ids:
                    self._zero_shot_ids[id(dataset)] = self._teacher_ids(dataset)
        if self.args.load_best_model_at_end:
            logger.info("checkpoint selection: %s", describe(self.args.metric_for_best_model or "loss"))
        if resume_from_checkpoint is not None and self._finished_at(resume_from_checkpoint):
            return self._end_of_finished_run(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _finished_at(self, checkpoint: str) -> bool:
        """Whether ``checkpoint`` was saved at the last step (``global_step >= max_steps``). `Trainer.train` would
        take one more optimizer step from it (its loop checks the step budget only after a step), so a run killed
        after its final checkpoint would resume to a different model and log history than an uninterrupted one."""
        from transformers.trainer import TRAINER_STATE_NAME
        from transformers.trainer_callback import TrainerState

        state = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME))
        return self.args.max_steps > 0 and state.global_step >= self.args.max_steps

    def _end_of_finished_run(self, checkpoint: str):
        """What `Trainer.train` does after its last step, for a run whose final checkpoint is ``checkpoint``: its
        weights and state (log history, best checkpoint), then the best model when ``load_best_model_at_end``."""
        from transformers.trainer import TRAINER_STATE_NAME
        from transformers.trainer_callback import TrainerState
        from transformers.trainer_utils import TrainOutput

        logger.info("%s is the run's last step (max_steps=%d): nothing left to train", checkpoint, self.args.max_steps)
        self._load_from_checkpoint(checkpoint)
        self.state = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME))
        if self.args.load_best_model_at_end and self.state.best_model_checkpoint is not None:
            self._load_best_model()
        self.control = self.callback_handler.on_train_end(self.args, self.state, self.control)
        return TrainOutput(self.state.global_step, float("nan"), {})

    # ------------------------------------------------------------------ data
    model_card: str | None = None  # a card to push instead of the Trainer's training summary (cmkd.saving)

    def create_model_card(self, *args, **kwargs) -> None:
        """``push_to_hub`` writes this card: ``self.model_card`` when set (the card of a folder saved by
        ``cmkd.saving.save_adapted_model``: selection rule, accuracy, how to rebuild the base), else the Trainer's."""
        if self.model_card is None:
            return super().create_model_card(*args, **kwargs)
        if self.is_world_process_zero():
            from peft_rst.files import atomic_write_text

            atomic_write_text(os.path.join(self.args.output_dir, "README.md"), self.model_card)

    def get_train_dataloader(self) -> DataLoader:
        if self.mode == "zero_shot":
            raise ValueError("mode 'zero_shot' only evaluates the CLIP teacher; call trainer.evaluate().")
        if self.train_dataset is None:
            raise ValueError("training needs source_dataset=.")
        args = self.args
        target = None if self.mode == "source_only" else self.target_dataset
        return make_paired_dataloader(
            self.train_dataset,
            target,
            source_batch_size=self._train_batch_size,
            target_batch_size=args.target_batch_size,
            seed=args.data_seed if args.data_seed is not None else args.seed,
            num_replicas=args.world_size,
            rank=args.process_index,
            num_workers=args.dataloader_num_workers,
            pin_memory=args.dataloader_pin_memory,
            persistent_workers=args.dataloader_persistent_workers and args.dataloader_num_workers > 0,
            prefetch_factor=args.dataloader_prefetch_factor if args.dataloader_num_workers > 0 else None,
        )

    def _image_dataloader(self, dataset, need_labels: bool | None, what: str) -> DataLoader:
        """Ordered batches of ``dataset``; ``need_labels``: True requires labels, None keeps them if present."""
        if dataset is None or len(dataset) == 0:
            raise ValueError(f"{what} needs a non-empty dataset.")
        if need_labels:
            first = dataset[0]
            if not isinstance(first, dict) or first.get("labels", first.get("label")) is None:
                raise ValueError(
                    f"{what} needs labels on the target set, but its items have no 'labels' "
                    "(UDA training never needs them; evaluation does). Pass a labeled eval_dataset=, or set "
                    "eval_strategy='no' to train without periodic evaluation."
                )

        def collate(examples):
            batch = collate_images(examples)
            batch.pop("pixel_values_strong", None)
            if need_labels is False:
                batch.pop("labels", None)
            return batch

        loader = DataLoader(
            dataset,
            batch_size=self.args.eval_batch_size,
            shuffle=False,
            collate_fn=collate,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )
        return self.accelerator.prepare(loader)

    def get_eval_dataloader(self, eval_dataset=None) -> DataLoader:
        if isinstance(eval_dataset, str):
            eval_dataset = self.eval_dataset[eval_dataset]
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        return self._image_dataloader(dataset, need_labels=None, what="evaluation")

    def get_test_dataloader(self, test_dataset) -> DataLoader:
        return self._image_dataloader(test_dataset, need_labels=False, what="prediction")

    # ------------------------------------------------------------------ optimisation
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """SGD with two groups: backbone (lr) and task head (lr x head_lr_multiplier); wd on every group."""
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        head_ids = {id(p) for p in unwrap_adaptation_model(opt_model).head.parameters()}
        head, backbone = [], []
        for p in opt_model.parameters():
            if p.requires_grad:
                (head if id(p) in head_ids else backbone).append(p)
        if not head and not backbone:
            raise ValueError("the model has no trainable parameters.")
        args = self.args
        groups = [
            {"params": backbone, "lr": args.learning_rate, "name": "backbone"},
            {"params": head, "lr": args.learning_rate * args.head_lr_multiplier, "name": "head"},
        ]
        groups = [g for g in groups if g["params"]]
        self.optimizer = torch.optim.SGD(
            groups,
            lr=args.learning_rate,
            momentum=args.sgd_momentum,
            nesterov=args.sgd_nesterov,
            weight_decay=args.weight_decay,
        )
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        """Release schedule ``lr_t = lr * (1 + gamma t) ** -power`` per iteration, on every group."""
        if self.lr_scheduler is None:
            optimizer = self.optimizer if optimizer is None else optimizer
            factor = inverse_decay_lambda(self.args.lr_decay_gamma, self.args.lr_decay_power)
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    # ------------------------------------------------------------------ training
    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        return 0  # paired batches have no main input; FLOPs are not estimated

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        step = self.state.global_step
        if (
            self.args.partial_set
            and step > 0
            and step % self.args.iterations_per_epoch == 0
            and self._label_set_step != step
        ):
            self._label_set_step = step
            self.estimate_label_set()
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        source, labels, target, strong = self._unpack(inputs)
        parts = [source] + [t for t in (target, strong) if t is not None]
        sizes = [p.shape[0] for p in parts]
        # One pass of the tower over all segments; heads and loss on the global batch (identical on every process,
        # gradients flow back to each process's own samples), so N processes compute what one process would.
        out = model(
            pixel_values=torch.cat(parts) if len(parts) > 1 else source,
            segment_sizes=sizes,
            gather_global_batch=True,
        )
        world = self.accelerator.num_processes
        global_sizes = [n * world for n in sizes]
        labels = self.accelerator.gather(labels) if world > 1 else labels
        student = out.logits.split(global_sizes)
        outputs = {"student_logits_source": student[0]}

        if self.mode == "source_only":
            cfg = self.cmkd_config
            ce = F.cross_entropy(student[0].float(), labels, label_smoothing=cfg.label_smoothing)
            loss = cfg.cls_weight * ce
            if self.args.halt_on_nonfinite:
                check_finite_loss(loss, {"source_ce": loss.detach()}, self.state.global_step, self.args)
            self._accumulate_terms({"source_ce": loss.detach()})
            return (loss, outputs) if return_outputs else loss

        teacher = out.teacher_logits.split(global_sizes)
        result = self.loss_fn(
            student[0],
            teacher[0],
            labels,
            student[1],
            teacher[1],
            step=self.state.global_step,
            active_classes=self.label_set,
        )
        loss, terms = result.loss, dict(result.terms)
        if self.mode == "cmkd_fixmatch":
            cfg = self.cmkd_config
            fm_loss, fm_logs = fixmatch_terms(
                student[1], student[2], teacher[1], teacher[2], cfg.fixmatch_threshold, cfg.fixmatch_factor
            )
            loss = loss + fm_loss
            terms.update(fm_logs)
        if self.args.halt_on_nonfinite:
            check_finite_loss(loss, terms, self.state.global_step, self.args)
        self._accumulate_terms(terms, result.alpha, result.lam)
        outputs.update(
            teacher_logits_source=teacher[0], student_logits_target=student[1], teacher_logits_target=teacher[1]
        )
        return (loss, outputs) if return_outputs else loss

    def _unpack(self, inputs: dict[str, Any]):
        if "source_pixel_values" not in inputs or "source_labels" not in inputs:
            raise ValueError(
                f"training batches must hold 'source_pixel_values' and 'source_labels', got keys {sorted(inputs)}; "
                "use the trainer's own dataloader (source_dataset=/target_dataset=)."
            )
        source, labels = inputs["source_pixel_values"], inputs["source_labels"]
        if source.dim() != 4:
            raise ValueError(f"source_pixel_values must be (batch, channels, H, W), got {tuple(source.shape)}.")
        if labels.dim() != 1 or labels.shape[0] != source.shape[0]:
            raise ValueError(
                f"source_labels must have shape ({source.shape[0]},) to match the source images, "
                f"got {tuple(labels.shape)}."
            )
        target = strong = None
        if self.mode != "source_only":
            target = inputs.get("target_pixel_values")
            if target is None:
                raise ValueError(f"mode {self.mode!r} needs target images in every batch ('target_pixel_values').")
            if target.dim() != 4 or target.shape[1:] != source.shape[1:]:
                raise ValueError(
                    f"target images {tuple(target.shape)} must match the source images' shape "
                    f"(batch, {', '.join(map(str, source.shape[1:]))})."
                )
        if self.mode == "cmkd_fixmatch":
            strong = inputs.get("target_strong_pixel_values")
            if strong is None:
                raise ValueError(
                    "mode 'cmkd_fixmatch' needs strong target views: build the target set with cmkd.data."
                    "with_image_transform(target, weak, strong_transform=cmkd.fixmatch.strong_transform(size))."
                )
            if strong.shape != target.shape:
                raise ValueError(f"strong views {tuple(strong.shape)} must match weak views {tuple(target.shape)}.")
        return source, labels.long(), target, strong

    # ------------------------------------------------------------------ partial-set DA
    @torch.no_grad()
    def estimate_label_set(self) -> torch.Tensor:
        """Predict the whole target set with the task head; keep classes predicted >= threshold times (App. K)."""
        if self.target_dataset is None:
            raise ValueError("partial-set label estimation needs target_dataset=.")
        loader = self.get_test_dataloader(self.target_dataset)
        output = self.evaluation_loop(loader, description="Label-set estimation", metric_key_prefix="label_set")
        predictions = output.predictions[:, 0]
        self.label_set = estimate_label_set(
            predictions, self.num_classes, self.cmkd_config.partial_class_threshold
        ).to(self.args.device)
        logger.info("partial-set: %d target classes kept: %s", self.label_set.numel(), self.label_set.tolist())
        self.log({"label_set_size": float(self.label_set.numel())})
        return self.label_set

    # ------------------------------------------------------------------ evaluation
    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """``(None, preds, labels)``; preds are the class ids of both heads, (N, 2) = [student, teacher] (teacher
        -1 without a cached teacher). Inside `evaluation_loop` they are instead the float rows
        ``[student logits (C) | teacher logits (C) | image features (D)]`` the validators need."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            out = model(pixel_values=inputs["pixel_values"])
        if self._rich_predictions:
            student = out.logits.float()
            teacher = out.teacher_logits.float() if out.teacher_logits is not None else torch.zeros_like(student)
            return None, torch.cat([student, teacher, out.image_embeds.float()], dim=1), inputs.get("labels")
        student = out.logits.argmax(dim=-1)
        teacher = out.teacher_logits.argmax(dim=-1) if out.teacher_logits is not None else torch.full_like(student, -1)
        return None, torch.stack([student, teacher], dim=1), inputs.get("labels")

    def _class_ids(self, rich: np.ndarray) -> np.ndarray:
        c = self.num_classes
        student = rich[:, :c].argmax(axis=1)
        teacher = rich[:, c : 2 * c].argmax(axis=1) if self._has_teacher else np.full_like(student, -1)
        return np.stack([student, teacher], axis=1)

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ) -> EvalLoopOutput:
        """The stock loop, gathering logits and features once; adds the label-free validators to the metrics of an
        evaluation ("Evaluation") and returns class ids as predictions (what `compute_metrics` receives too)."""
        user_metrics = self.compute_metrics
        if user_metrics is not None:

            def on_ids(pred: EvalPrediction):
                return user_metrics(
                    EvalPrediction(self._class_ids(pred.predictions), pred.label_ids, pred.inputs, pred.losses)
                )

            self.compute_metrics = on_ids
        self._rich_predictions = True
        try:
            output = super().evaluation_loop(dataloader, description, False, ignore_keys, metric_key_prefix)
        finally:
            self._rich_predictions = False
            self.compute_metrics = user_metrics
        rich = output.predictions
        if rich is None or isinstance(rich, (tuple, list)):
            return output
        self._last_rich = rich
        metrics = dict(output.metrics)
        if description == "Evaluation":
            dataset = getattr(dataloader, "dataset", None)
            values = self._validators(rich, self._zero_shot_ids.get(id(dataset)))
            metrics.update({f"{metric_key_prefix}_{k}": v for k, v in values.items()})
        return EvalLoopOutput(
            predictions=self._class_ids(rich),
            label_ids=output.label_ids,
            metrics=metrics,
            num_samples=output.num_samples,
        )

    def _validators(self, rich: np.ndarray, zero_shot_ids: np.ndarray | None) -> dict[str, float]:
        c = self.num_classes
        rich_t = torch.from_numpy(np.asarray(rich, dtype=np.float32))
        if zero_shot_ids is not None and len(zero_shot_ids) != len(rich_t):
            zero_shot_ids = None
        inputs = ValidationInputs(
            target_logits=rich_t[:, :c],
            target_features=rich_t[:, 2 * c :],
            zero_shot_ids=torch.from_numpy(zero_shot_ids) if zero_shot_ids is not None else None,
            seed=self.args.seed,
        )
        if self._source_val is not None:
            source, labels = self._source_val
            source_t = torch.from_numpy(np.asarray(source, dtype=np.float32))
            inputs.source_logits, inputs.source_features = source_t[:, :c], source_t[:, 2 * c :]
            inputs.source_labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        names = self.args.eval_validators
        if names is None:  # every available one; DEV (fits a domain classifier) only when it selects
            selecting = (self.args.metric_for_best_model or "").removeprefix("eval_")
            names = [n for n, v in VALIDATORS.items() if v.available(inputs) and (n not in OPT_IN or n == selecting)]
        values = compute_validators(inputs, names)
        for name, value in values.items():
            if not math.isfinite(value):
                logger.warning(
                    "validator %s = %s at step %d (non-finite outputs)", name, value, self.state.global_step
                )
        return values

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """`Trainer.evaluate`, after one pass over ``source_val_dataset`` (if given) for the source validators."""
        self._source_val = None
        target = eval_dataset if eval_dataset is not None else self.eval_dataset
        if self.source_val_dataset is not None and not isinstance(target, dict):
            loader = self._image_dataloader(self.source_val_dataset, need_labels=True, what="source validation")
            out = self.evaluation_loop(loader, description="Source validation", metric_key_prefix="source_val")
            self._source_val = (self._last_rich, out.label_ids)
        try:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        finally:
            self._source_val = None
            self._last_rich = None  # the gathered logits and features of the whole set

    @torch.no_grad()
    def _teacher_ids(self, dataset) -> np.ndarray:
        """The CLIP head's classes on ``dataset`` with the model as it is now. A plain loop on every process (no
        Accelerate preparation before training starts) that leaves torch's RNG and the model's mode untouched."""
        model = unwrap_adaptation_model(self.model)
        device = next(model.parameters()).device
        loader = DataLoader(
            dataset, batch_size=self.args.eval_batch_size, shuffle=False, collate_fn=collate_images, num_workers=0
        )
        was_training = model.training
        model.eval()
        ids = []
        try:
            with torch.random.fork_rng(devices=[]):
                for batch in loader:
                    out = model(pixel_values=batch["pixel_values"].to(device))
                    ids.append(out.teacher_logits.argmax(dim=-1).cpu())
        finally:
            model.train(was_training)
        return torch.cat(ids).numpy().astype(np.int64)

    def _compute_uda_metrics(self, eval_pred: EvalPrediction) -> dict[str, Any]:
        labels = eval_pred.label_ids
        if labels is None:
            raise ValueError("evaluation needs labels on the target set.")
        if (labels < 0).any():
            raise ValueError(
                f"{int((labels < 0).sum())} target examples have missing labels (negative ids); evaluation needs "
                "every example labeled."
            )
        if self._metric is None:
            from .metrics import load_uda_accuracy

            self._metric = load_uda_accuracy()
        preds = eval_pred.predictions
        student = self._metric.compute(predictions=preds[:, 0], references=labels, num_classes=self.num_classes)
        metrics = {f"student_{k}": v for k, v in student.items() if k != "num_examples"}
        if (preds[:, 1] >= 0).all():
            teacher = self._metric.compute(predictions=preds[:, 1], references=labels, num_classes=self.num_classes)
            metrics.update({f"teacher_{k}": v for k, v in teacher.items() if k != "num_examples"})
        primary = "teacher" if self.mode == "zero_shot" else "student"
        for key in ("accuracy", "mean_class_accuracy", "per_class_accuracy"):
            metrics[key] = metrics[f"{primary}_{key}"]
        return metrics

    # ------------------------------------------------------------------ logging
    def _reset_term_logs(self) -> None:
        self._term_sums: dict[str, torch.Tensor] = {}
        self._term_count = 0
        self._alpha_stats: list[torch.Tensor] | None = None
        self._last_lam: float | None = None

    def _accumulate_terms(self, terms: dict[str, torch.Tensor], alpha=None, lam=None) -> None:
        for key, value in terms.items():
            value = value.detach().float()
            self._term_sums[key] = self._term_sums[key] + value if key in self._term_sums else value
        self._term_count += 1
        if alpha is not None and alpha.numel():
            stats = torch.stack([alpha.mean(), alpha.min(), alpha.max()]).float()
            if self._alpha_stats is None:
                self._alpha_stats = [stats[0], stats[1], stats[2]]
            else:
                total, low, high = self._alpha_stats
                self._alpha_stats = [total + stats[0], torch.minimum(low, stats[1]), torch.maximum(high, stats[2])]
        if lam is not None:
            self._last_lam = float(lam)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add per-term losses (window means) and alpha mean/min/max to the training logs."""
        if "loss" in logs and self._term_count:
            n = self._term_count
            for key, total in self._term_sums.items():
                logs[key] = (total / n).item()
            if self._alpha_stats is not None:
                total, low, high = self._alpha_stats
                logs.update(alpha_mean=(total / n).item(), alpha_min=low.item(), alpha_max=high.item())
            if self._last_lam is not None:
                logs["lam"] = self._last_lam
            groups = self.optimizer.param_groups
            if len(groups) > 1 and "learning_rate" in logs and groups[0].get("initial_lr"):
                logs["head_learning_rate"] = logs["learning_rate"] * groups[-1]["initial_lr"] / groups[0]["initial_lr"]
            self._reset_term_logs()
        # Per-class lists (one entry per class) stay in the returned metrics and in trainer_state.json's log history,
        # but are not printed or sent to trackers at every evaluation: callbacks get the scalars only.
        lists = {key: value for key, value in logs.items() if isinstance(value, (list, tuple))}
        super().log({key: value for key, value in logs.items() if key not in lists}, start_time)
        if lists and self.state.log_history:
            self.state.log_history[-1].update(lists)


def _has_labels(dataset) -> bool:
    if dataset is None or isinstance(dataset, dict) or len(dataset) == 0:
        return False
    item = dataset[0]
    return isinstance(item, dict) and item.get("labels", item.get("label")) is not None


def _check_selection(args: CMKDTrainingArguments, eval_dataset, source_val_dataset) -> None:
    """The selection metric can be computed from what this trainer will evaluate; say which argument supplies it."""
    metric = args.metric_for_best_model
    if metric is None or (args.eval_strategy == "no" and not args.load_best_model_at_end):
        return
    name = metric.removeprefix("eval_")
    if isinstance(eval_dataset, dict):
        return  # per-set metric names (eval_<set>_<metric>): checked by the Trainer when it evaluates
    if name in LABEL_METRICS or name.startswith("student_") or name == "per_class_accuracy":
        if not _has_labels(eval_dataset):
            raise ValueError(
                f"metric_for_best_model={metric!r} is {ORACLE_NAME} and needs a labeled target set, but the "
                "evaluation set has no labels. Pass a labeled eval_dataset= (reporting only), or select label-free: "
                f"metric_for_best_model in {list(VALIDATORS)}."
            )
        logger.warning("checkpoint selection by target %s is %s, not unsupervised model selection.", name, ORACLE_NAME)
    elif name in ("source_accuracy", "dev"):
        if source_val_dataset is None:
            raise ValueError(
                f"metric_for_best_model={metric!r} needs a held-out labeled source split: pass source_val_dataset= "
                "(source images taken out of source_dataset)."
            )
    elif name not in VALIDATORS and name not in ("loss", "teacher_per_class_accuracy"):
        raise ValueError(
            f"metric_for_best_model={metric!r} is not computed by CMKDTrainer; choose a validator {list(VALIDATORS)} "
            f"or a label metric {list(LABEL_METRICS)} ({ORACLE_NAME})."
        )


def _first_item(dataset) -> dict:
    if len(dataset) == 0:
        raise ValueError("the target dataset is empty.")
    item = dataset[0]
    if not isinstance(item, dict):
        raise ValueError(f"dataset items must be dicts with 'pixel_values', got {type(item).__name__}.")
    return item


def _deepspeed_requested(args: TrainingArguments) -> bool:
    return bool(args.deepspeed) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes")


def _refuse_rst_under_deepspeed(args: TrainingArguments, model: nn.Module) -> None:
    """RST resets W after each step of the optimizer that holds W. DeepSpeed ZeRO steps its own flattened fp32 copies
    instead and writes them back afterwards, so the reset would find nothing to reset and the run would silently be
    dense fine-tuning. Refuse it before anything is built."""
    if not _deepspeed_requested(args):
        return
    from peft_rst.layer import RSTLayer

    if any(isinstance(module, RSTLayer) for module in model.modules()):
        raise ValueError(
            "RST adapters cannot be trained under DeepSpeed: ZeRO steps flattened copies of the weights, so the RST "
            "reset (|W - w0| <= tau -> w0) would never run and the result would be dense fine-tuning. Shard RST with "
            "FSDP2 instead (docs/rst.md, 'Sharded training (FSDP2)'), or train without --deepspeed / "
            "ACCELERATE_USE_DEEPSPEED."
        )


def _refuse_best_checkpoint_with_adalora(args: TrainingArguments, model: nn.Module) -> None:
    """AdaLoRA prunes ranks while it trains, and peft resizes an adapter loaded back by the *current* rank pattern, so
    loading an earlier (best) checkpoint fails with a size mismatch after the whole run. Refuse it before training."""
    if not args.load_best_model_at_end:
        return
    from peft.tuners.adalora import AdaLoraModel

    if any(isinstance(module, AdaLoraModel) for module in model.modules()):
        raise ValueError(
            "AdaLoRA cannot load its best checkpoint at the end: it prunes ranks while training, and peft cannot load "
            "an earlier checkpoint into the pruned adapter (size mismatch). Keep the last checkpoint: "
            "load_best_model_at_end=False (recipes: --selection last)."
        )
