"""The deployable CMKD model: a CLIP vision tower + task head, carrying a cached zero-shot (teacher) head.

Paper Sec. III.A/B and the authors' release: the student is ``head(f(x))`` with ``f`` the CLIP image encoder
(its *projected* embedding) and ``head = BatchNorm1d -> LayerNorm(eps 1e-6) -> Linear(no bias)``; the teacher is
CLIP's zero-shot classifier ``logit_scale.exp() * cos(f(x), g(prompt_c))`` evaluated on the *same, trainable*
image features. The text tower ``g`` is frozen, so its class embeddings are computed once (`from_clip`) and stored
as a buffer: the text tower is not part of this model and can never run during training.

Everything that is not a trainable weight (text features, logit scale, the head BatchNorm's frozen bias) is a
buffer, so parameter-level tuners such as RST (`peft_rst`) see only the vision tower and the head, and a saved
model still carries its teacher.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoTokenizer,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.configuration_utils import SubConfigSpec
from transformers.utils import ModelOutput

__all__ = [
    "CLIPAdaptationConfig",
    "CLIPAdaptationHead",
    "CLIPAdaptationModel",
    "CLIPAdaptationOutput",
    "DEFAULT_PROMPT",
    "build_prompts",
    "compute_text_features",
    "format_class_name",
]

DEFAULT_PROMPT = "a photo of a {}."
"""Release prompt, most benchmarks (Office-Home: ``"an image of a {}"``, digits: ``'a photo of the number: "{}"'``)."""


def format_class_name(name: str) -> str:
    """Dataset folder name -> prompt word, as the release does: lower-cased, underscores to spaces."""
    if not isinstance(name, str):
        raise TypeError(f"class names must be strings, got {name!r} ({type(name).__name__}).")
    return name.replace("_", " ").strip().lower()


def _check_class_names(class_names: Sequence[str]) -> list[str]:
    if isinstance(class_names, str) or not isinstance(class_names, Sequence):
        raise TypeError(f"class_names must be a list of strings, got {type(class_names).__name__}.")
    names = list(class_names)
    if not names:
        raise ValueError("class_names is empty: pass the dataset's class names, e.g. dataset.features['label'].names.")
    formatted = [format_class_name(n) for n in names]
    if any(not f for f in formatted):
        raise ValueError(f"class_names contains an empty name: {names!r}.")
    seen: dict[str, str] = {}
    for raw, f in zip(names, formatted):
        if f in seen:
            raise ValueError(
                f"class names {seen[f]!r} and {raw!r} give the same prompt word {f!r}; class names must be distinct."
            )
        seen[f] = raw
    return names


def _check_templates(templates: str | Sequence[str]) -> list[str]:
    templates = [templates] if isinstance(templates, str) else list(templates)
    if not templates:
        raise ValueError("prompt_templates is empty: pass at least one template such as 'a photo of a {}.'.")
    for t in templates:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise ValueError(
                f"prompt template {t!r} must be a string with exactly one '{{}}' placeholder for the class name, "
                "e.g. 'a photo of a {}.'."
            )
    return templates


def build_prompts(class_names: Sequence[str], templates: str | Sequence[str]) -> list[list[str]]:
    """``prompts[c][k]`` = template ``k`` filled with the formatted name of class ``c``."""
    names = _check_class_names(class_names)
    templates = _check_templates(templates)
    return [[t.format(format_class_name(n)) for t in templates] for n in names]


def _require_dual_encoder(clip_model: nn.Module) -> None:
    missing = [
        name
        for name in ("vision_model", "visual_projection", "text_model", "text_projection", "logit_scale")
        if getattr(clip_model, name, None) is None
    ]
    if missing or not isinstance(clip_model.visual_projection, nn.Linear):
        raise ValueError(
            f"{type(clip_model).__name__} lacks {missing or ['an nn.Linear visual_projection']}: CMKD needs a CLIP "
            "dual encoder whose image and text projections map into one joint space (e.g. transformers.CLIPModel). "
            "A vision-only model (CLIPVisionModel) or one without projections cannot provide the zero-shot teacher."
        )


@torch.no_grad()
def compute_text_features(
    clip_model: nn.Module,
    tokenizer,
    class_names: Sequence[str],
    prompt_templates: str | Sequence[str] = DEFAULT_PROMPT,
    batch_size: int = 256,
) -> torch.Tensor:
    """L2-normalised class embeddings (C, D) from CLIP's frozen text tower (run once, never during training).

    With several templates, each class embedding is the normalised mean of its normalised prompt embeddings
    (CLIP's prompt ensembling); with one template it is exactly the release's single-prompt embedding.
    """
    _require_dual_encoder(clip_model)
    prompts = build_prompts(class_names, prompt_templates)
    flat = [p for per_class in prompts for p in per_class]
    device = clip_model.text_projection.weight.device
    was_training = clip_model.training
    clip_model.eval()
    chunks = []
    for start in range(0, len(flat), batch_size):
        tokens = tokenizer(flat[start : start + batch_size], padding=True, truncation=True, return_tensors="pt")
        tokens = {k: v.to(device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        out = clip_model.get_text_features(**tokens)
        emb = out if isinstance(out, torch.Tensor) else out.pooler_output
        chunks.append(F.normalize(emb.float(), dim=-1))
    clip_model.train(was_training)
    emb = torch.cat(chunks).view(len(prompts), len(prompts[0]), -1).mean(dim=1)
    return F.normalize(emb, dim=-1)


@strict
class CLIPAdaptationConfig(PreTrainedConfig):
    r"""Configuration of `CLIPAdaptationModel`.

    Args:
        vision_config: config of the CLIP vision tower (any model type `AutoModel` can build; default
            ``clip_vision_model``).
        projection_dim: size of the joint image-text embedding (the tower's projection output; 512 for ViT-B/16).
        class_names: dataset class names in label order (``id2label`` is derived from them).
        prompt_templates: templates the cached text features were built from (kept for provenance).
        logit_scale_init_value: initial log logit scale of the teacher (overwritten by `from_clip`).
        head_layer_norm_eps: eps of the head LayerNorm (release: 1e-6).
        head_init_std: std of the normal init of the head Linear (release: 0.001).
        freeze_vision_batchnorm: keep BatchNorm layers of the vision tower in eval mode while training
            (release, for ResNet towers; no-op for ViT).
        has_text_features: True once the teacher's class embeddings have been cached (`from_clip`).
    """

    model_type = "clip_adaptation"
    sub_configs_defaults = {"vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model")}

    vision_config: dict | PreTrainedConfig | None = None
    projection_dim: int = 512
    class_names: list[str] | None = None
    prompt_templates: list[str] | None = None
    logit_scale_init_value: float = math.log(1 / 0.07)
    head_layer_norm_eps: float = 1e-6
    head_init_std: float = 0.001
    freeze_vision_batchnorm: bool = True
    has_text_features: bool = False

    def __post_init__(self, **kwargs):
        if self.class_names is not None:
            self.class_names = _check_class_names(self.class_names)
            kwargs.pop("num_labels", None)
            self.id2label = dict(enumerate(self.class_names))
            self.label2id = {name: i for i, name in self.id2label.items()}
        if self.prompt_templates is not None:
            self.prompt_templates = _check_templates(self.prompt_templates)
        super().__post_init__(**kwargs)


class FrozenBiasBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose bias is a zero buffer, not a parameter.

    The release freezes the head BatchNorm's bias at 0 (``requires_grad=False``); a flag would be undone by tools
    that set ``requires_grad_(True)`` on whole modules (peft's ``modules_to_save``), a buffer cannot be.
    """

    def __init__(self, num_features: int):
        super().__init__(num_features)
        del self.bias
        self.register_buffer("bias", torch.zeros(num_features))


class CLIPAdaptationHead(nn.Module):
    """Task head of the release: ``BatchNorm1d(d) -> LayerNorm(d, eps) -> Linear(d, C, bias=False)``."""

    def __init__(self, dim: int, num_classes: int, layer_norm_eps: float = 1e-6):
        super().__init__()
        self.batch_norm = FrozenBiasBatchNorm1d(dim)
        self.layer_norm = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.classifier = nn.Linear(dim, num_classes, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.layer_norm(self.batch_norm(features)))


@dataclass
class CLIPAdaptationOutput(ModelOutput):
    """``logits``: task head (student); ``teacher_logits``: cached zero-shot CLIP head; ``image_embeds``: projected
    image features (not normalised)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    teacher_logits: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None


class CLIPAdaptationPreTrainedModel(PreTrainedModel):
    config_class = CLIPAdaptationConfig
    config: CLIPAdaptationConfig
    base_model_prefix = "clip_adaptation"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # transformers calls this per module that owns parameters/buffers directly, so the head is set up leaf by
        # leaf. Release init: Linear ~ N(0, 0.001) without bias, BN weight 1 / bias 0 (frozen), LayerNorm 1 / 0.
        head = getattr(self, "head", None)
        if isinstance(module, nn.Linear) and head is not None and module is head.classifier:
            init.normal_(module.weight, mean=0.0, std=self.config.head_init_std)
        elif isinstance(module, FrozenBiasBatchNorm1d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, CLIPAdaptationModel):
            init.normal_(module.visual_projection.weight, mean=0.0, std=module.visual_projection.in_features**-0.5)
            init.zeros_(module.text_features)
            init.constant_(module.logit_scale, self.config.logit_scale_init_value)


class CLIPAdaptationModel(CLIPAdaptationPreTrainedModel):
    """CLIP vision tower + projection + task head, with the zero-shot teacher head cached in buffers.

    Build it from a CLIP with `from_clip`; save/load with `save_pretrained` / `from_pretrained`. The forward pass
    returns both heads' logits from one pass of the tower (the teacher is a matmul on the same features).
    """

    def __init__(self, config: CLIPAdaptationConfig):
        super().__init__(config)
        if config.class_names is None:
            raise ValueError("CLIPAdaptationConfig.class_names is required (the task's classes, in label order).")
        self.vision_model = AutoModel.from_config(config.vision_config)
        hidden = config.vision_config.hidden_size
        self.visual_projection = nn.Linear(hidden, config.projection_dim, bias=False)
        num_classes = len(config.class_names)
        self.head = CLIPAdaptationHead(config.projection_dim, num_classes, config.head_layer_norm_eps)
        self.register_buffer("text_features", torch.zeros(num_classes, config.projection_dim))
        self.register_buffer("logit_scale", torch.tensor(float(config.logit_scale_init_value)))
        self.post_init()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_clip(
        cls,
        clip_model_or_path: nn.Module | str,
        class_names: Sequence[str],
        prompt_templates: str | Sequence[str] = DEFAULT_PROMPT,
        tokenizer=None,
        **config_kwargs,
    ) -> CLIPAdaptationModel:
        """Adaptation model from an HF CLIP (object or path/hub id) with the class prompts' embeddings cached.

        The vision tower and its projection are copied (the CLIP is left untouched); the text tower runs once here.
        ``tokenizer`` defaults to ``AutoTokenizer.from_pretrained(path)`` when a path is given.
        """
        class_names = _check_class_names(class_names)
        prompt_templates = _check_templates(prompt_templates)
        if isinstance(clip_model_or_path, (str,)) or hasattr(clip_model_or_path, "__fspath__"):
            path = str(clip_model_or_path)
            clip_model = AutoModel.from_pretrained(path)
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(path)
        else:
            clip_model = clip_model_or_path
        if not isinstance(clip_model, nn.Module):
            raise TypeError(f"clip_model_or_path must be a CLIP model or a path, got {type(clip_model).__name__}.")
        _require_dual_encoder(clip_model)
        if tokenizer is None:
            raise ValueError("Pass the CLIP's tokenizer (e.g. AutoTokenizer.from_pretrained(path)) to encode prompts.")
        text_features = compute_text_features(clip_model, tokenizer, class_names, prompt_templates)
        projection_dim = clip_model.visual_projection.out_features
        if text_features.shape[-1] != projection_dim:
            raise ValueError(
                f"text features have dimension {text_features.shape[-1]} but the visual projection outputs "
                f"{projection_dim}; the CLIP's two projections must share one joint space."
            )
        config = CLIPAdaptationConfig(
            vision_config=copy.deepcopy(clip_model.vision_model.config),
            projection_dim=projection_dim,
            class_names=class_names,
            prompt_templates=prompt_templates,
            logit_scale_init_value=float(clip_model.logit_scale.detach().float()),
            has_text_features=True,
            **config_kwargs,
        )
        model = cls(config)
        model.vision_model.load_state_dict(clip_model.vision_model.state_dict())
        model.visual_projection.load_state_dict(clip_model.visual_projection.state_dict())
        model.text_features.copy_(text_features)
        model.logit_scale.fill_(float(clip_model.logit_scale.detach().float()))
        return model.to(clip_model.visual_projection.weight.device)

    # ------------------------------------------------------------------ behaviour
    @property
    def num_labels(self) -> int:
        return len(self.config.class_names)

    def train(self, mode: bool = True) -> CLIPAdaptationModel:
        """Like `nn.Module.train`, but BatchNorm layers of the vision tower stay in eval mode (frozen statistics)."""
        super().train(mode)
        if mode and self.config.freeze_vision_batchnorm:
            for module in self.vision_model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def _check_pixel_values(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool) -> None:
        vc = self.config.vision_config
        channels = getattr(vc, "num_channels", 3)
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}.")
        if pixel_values.dim() != 4 or pixel_values.shape[1] != channels or pixel_values.shape[0] == 0:
            raise ValueError(
                f"pixel_values must have shape (batch, {channels}, height, width) with batch > 0, got "
                f"{tuple(pixel_values.shape)}; preprocess images with the CLIP image processor or cmkd.data."
            )
        size = getattr(vc, "image_size", None)
        if isinstance(size, int) and not interpolate_pos_encoding and tuple(pixel_values.shape[-2:]) != (size, size):
            raise ValueError(
                f"pixel_values are {tuple(pixel_values.shape[-2:])} but the vision tower expects ({size}, {size}); "
                "resize to the tower's image size or pass interpolate_pos_encoding=True."
            )

    def get_image_features(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """Projected (not normalised) image embeddings (N, projection_dim): CLIP's ``encode_image``."""
        self._check_pixel_values(pixel_values, interpolate_pos_encoding)
        kwargs = {"interpolate_pos_encoding": True} if interpolate_pos_encoding else {}
        pooled = self.vision_model(pixel_values=pixel_values, return_dict=True, **kwargs).pooler_output
        if pooled.dim() > 2:  # CNN towers may keep (N, C, 1, 1)
            pooled = pooled.flatten(1)
        return self.visual_projection(pooled)

    def teacher_logits(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Zero-shot CLIP logits: ``logit_scale.exp() * cos(image_embeds, text_features)`` (C columns)."""
        if not self.config.has_text_features:
            raise RuntimeError(
                "this model has no cached class text features; build it with CLIPAdaptationModel.from_clip(...)."
            )
        image = F.normalize(image_embeds, dim=-1)
        return self.logit_scale.exp() * image @ self.text_features.to(image.dtype).t()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        segment_sizes: Sequence[int] | None = None,
        gather_global_batch: bool = False,
        interpolate_pos_encoding: bool = False,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CLIPAdaptationOutput | tuple:
        """Student and teacher logits from one pass of the tower; ``loss`` = plain CE of the student with ``labels``.

        Training extras (used by `CMKDTrainer`):

        - ``segment_sizes``: ``pixel_values`` is several independent batches concatenated (e.g. source + target); the
          tower runs once on all of them but the head (its BatchNorm) sees each segment on its own, as the release's
          separate forward passes do.
        - ``gather_global_batch``: in distributed runs, gather each segment's features from every process
          (differentiably) before the heads, so the head BatchNorm and the logits cover the *global* batch. The
          logits are then those of the global segments, in segment order, identical on every process.
        """
        image_embeds = self.get_image_features(pixel_values, interpolate_pos_encoding)
        if segment_sizes is None:
            segments = [image_embeds]
        else:
            sizes = [int(s) for s in segment_sizes]
            if any(s <= 0 for s in sizes) or sum(sizes) != image_embeds.shape[0]:
                raise ValueError(
                    f"segment_sizes {sizes} must be positive and sum to the batch size {image_embeds.shape[0]}."
                )
            segments = list(image_embeds.split(sizes))
        if gather_global_batch:
            segments = [_all_gather(s) for s in segments]
        logits = torch.cat([self.head(s) for s in segments]) if len(segments) > 1 else self.head(segments[0])
        teacher = None
        if self.config.has_text_features:
            teacher = self.teacher_logits(torch.cat(segments) if len(segments) > 1 else segments[0])
        loss = None
        if labels is not None:
            if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
                raise ValueError(f"labels must have shape ({logits.shape[0]},), got {tuple(labels.shape)}.")
            loss = F.cross_entropy(logits.float(), labels.long())
        out = CLIPAdaptationOutput(loss=loss, logits=logits, teacher_logits=teacher, image_embeds=image_embeds)
        return out if return_dict is not False else out.to_tuple()


def _all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from all processes in rank order; differentiable.

    Every process then computes the same global-batch loss; the backward of the gather sums each sample's gradient
    from all processes (world_size x the true gradient) and DDP's averaging divides it back, so the parameter
    gradients equal those of one process running the whole global batch.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor.contiguous()), dim=0)


AutoConfig.register(CLIPAdaptationConfig.model_type, CLIPAdaptationConfig, exist_ok=True)
AutoModel.register(CLIPAdaptationConfig, CLIPAdaptationModel, exist_ok=True)
AutoModelForImageClassification.register(CLIPAdaptationConfig, CLIPAdaptationModel, exist_ok=True)


def _register_for_pipelines() -> None:
    """Let ``pipeline("image-classification", model=...)`` accept the model without logging "not supported".

    ``AutoModelForImageClassification.register`` makes the Auto class load it, but the pipeline checks the class name
    against ``MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES``, a plain dict that registration does not update.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES.setdefault(CLIPAdaptationConfig.model_type, "CLIPAdaptationModel")


_register_for_pipelines()


def unwrap_adaptation_model(model: nn.Module) -> CLIPAdaptationModel:
    """The `CLIPAdaptationModel` itself, or inside peft models and DDP/DeepSpeed wrappers (``.module``)."""
    seen = model
    for _ in range(6):
        if isinstance(seen, CLIPAdaptationModel):
            return seen
        if hasattr(seen, "get_base_model"):
            seen = seen.get_base_model()
        elif hasattr(seen, "module"):
            seen = seen.module
        else:
            break
    raise TypeError(
        f"expected a cmkd.CLIPAdaptationModel (optionally wrapped by peft or DDP), got {type(model).__name__}; "
        "build one with CLIPAdaptationModel.from_clip(...)."
    )
