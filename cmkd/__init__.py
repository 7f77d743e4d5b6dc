"""CMKD: Cross-Modal Knowledge Distillation for adapting CLIP to an unlabeled domain (paper Sec. III.B).

Build the deployable model (vision tower + task head + cached zero-shot teacher) from any HF CLIP, then train it
with `CMKDTrainer` (a `transformers.Trainer`) on a labeled source and an unlabeled target set::

    model = CLIPAdaptationModel.from_clip("openai/clip-vit-base-patch16", class_names, "a photo of a {}.")
    trainer = CMKDTrainer(model, CMKDTrainingArguments(output_dir="out"), source_dataset=src, target_dataset=tgt)
    trainer.train()
"""

from .callbacks import NonFiniteGuardCallback, TrainingDivergedError
from .checkpoints import IncompleteCheckpointError, checkpoint_problems, last_complete_checkpoint
from .config import CMKDConfig
from .data import (
    CLIP_MEAN,
    CLIP_STD,
    check_class_lists,
    dataset_class_names,
    image_transform,
    item_seed,
    make_paired_dataloader,
    with_image_transform,
)
from .fixmatch import fixmatch_terms, strong_transform
from .loss import CMKDLoss, CMKDLossOutput, fixmatch_loss
from .metrics import UDA_ACCURACY_PATH, load_uda_accuracy
from .model import (
    DEFAULT_PROMPT,
    CLIPAdaptationConfig,
    CLIPAdaptationHead,
    CLIPAdaptationModel,
    CLIPAdaptationOutput,
    build_prompts,
    compute_text_features,
    format_class_name,
)
from .partial import estimate_label_set
from .peft_methods import PEFT_LABELS, PEFT_METHODS, apply_peft, count_dsp, peft_callbacks
from .trainer import MODES, CMKDTrainer, CMKDTrainingArguments, inverse_decay_lambda
from .transforms import (
    TRANSFORMS,
    build_transform,
    image_size_from_processor,
    normalization_from_processor,
    register_transform,
)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DEFAULT_PROMPT",
    "MODES",
    "TRANSFORMS",
    "PEFT_LABELS",
    "PEFT_METHODS",
    "UDA_ACCURACY_PATH",
    "CLIPAdaptationConfig",
    "CLIPAdaptationHead",
    "CLIPAdaptationModel",
    "CLIPAdaptationOutput",
    "CMKDConfig",
    "CMKDLoss",
    "CMKDLossOutput",
    "CMKDTrainer",
    "CMKDTrainingArguments",
    "IncompleteCheckpointError",
    "NonFiniteGuardCallback",
    "TrainingDivergedError",
    "apply_peft",
    "build_prompts",
    "build_transform",
    "checkpoint_problems",
    "check_class_lists",
    "compute_text_features",
    "count_dsp",
    "dataset_class_names",
    "estimate_label_set",
    "fixmatch_loss",
    "fixmatch_terms",
    "format_class_name",
    "image_size_from_processor",
    "image_transform",
    "inverse_decay_lambda",
    "item_seed",
    "last_complete_checkpoint",
    "load_uda_accuracy",
    "make_paired_dataloader",
    "normalization_from_processor",
    "register_transform",
    "peft_callbacks",
    "strong_transform",
    "with_image_transform",
]
