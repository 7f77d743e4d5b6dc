"""The parameter-efficient methods of the paper's Table VII, applied to a `CLIPAdaptationModel` for `CMKDTrainer`.

The paper (Sec. IV.E, Table VII) trains the same CMKD objective with six ways of choosing what the backbone stores
per task, and compares accuracy against DSP (downstream parameters: what one task has to store on top of the
shared pretrained model). In every method the task head trains densely and is stored whole.

=============  ================================================================  ===================================
method         what trains                                                       DSP (per task)
=============  ================================================================  ===================================
rst            dense residual, reset to w0 where ``|w - w0| <= tau`` (peft_rst)  changed backbone entries + head
lora           peft ``LoraConfig`` (paper: r = 1) on the tower's linear layers   LoRA A and B + head
adalora        peft ``AdaLoraConfig`` (paper: init rank 2 -> target rank 1)      A, B, E at the kept ranks + head
bitfit         every bias of the tower (BitFit), weights frozen                  backbone biases + head
linear_probe   the head only                                                     head
full           everything                                                        every parameter
=============  ================================================================  ===================================

Usage::

    model = apply_peft(CLIPAdaptationModel.from_clip(...), "lora")       # or "adalora", total_step=max_steps
    trainer = CMKDTrainer(model, args, source_dataset=src, target_dataset=tgt)
    trainer.train()
    count_dsp(model, "lora")

AdaLoRA reallocates ranks after every optimizer step and adds an orthogonality penalty to the loss; `CMKDTrainer`
attaches `AdaLoraCallback` for that by itself (plain `Trainer` users: ``callbacks=peft_callbacks(model)``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from .model import CLIPAdaptationModel, unwrap_adaptation_model

__all__ = [
    "ADALORA_DEFAULTS",
    "LORA_DEFAULTS",
    "LORA_TARGET_MODULES",
    "PEFT_LABELS",
    "PEFT_METHODS",
    "PEFT_SAVED_AS",
    "AdaLoraCallback",
    "apply_peft",
    "count_dsp",
    "peft_callbacks",
]

PEFT_METHODS: tuple[str, ...] = ("rst", "lora", "adalora", "bitfit", "linear_probe", "full")
PEFT_LABELS: dict[str, str] = {
    "rst": "RST",
    "lora": "LoRA",
    "adalora": "AdaLoRA",
    "bitfit": "BitFit",
    "linear_probe": "Linear probe",
    "full": "Fine-tuning",
}
"""Display names, the same in tables, plots, summaries and model cards (the paper's row names)."""

PEFT_SAVED_AS: dict[str, str] = {
    "rst": "adapter",  # peft save_pretrained: sparse RST patch + head
    "lora": "adapter",
    "adalora": "adapter",
    "bitfit": "model",  # save_pretrained of the whole model (the DSP counts only what differs from the base)
    "linear_probe": "model",
    "full": "model",
}
"""How the trained result is saved: a peft adapter folder (``save_pretrained`` of the PeftModel) or the full model."""

HEAD = "head"
LORA_TARGET_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
"""Every linear layer of a CLIP vision encoder block (attention and MLP); the projection and head are not adapted."""

LORA_DEFAULTS: dict[str, Any] = {"r": 1, "lora_dropout": 0.0}
"""Paper Table VII: LoRA_{r=1} (the row compared with RST; ``r=4`` gives its second LoRA row)."""

ADALORA_DEFAULTS: dict[str, Any] = {"init_r": 2, "target_r": 1, "lora_dropout": 0.0}
"""Paper Table VII: AdaLoRA_{2->1} (``init_r=8, target_r=4`` gives its second row). ``tinit`` / ``tfinal`` default to
10 % of ``total_step`` each, so the ranks settle before training ends (peft's 0 / 0 never forces the final mask)."""


def _check_method(method: str) -> str:
    if method not in PEFT_METHODS:
        raise ValueError(f"unknown PEFT method {method!r}; choose one of {', '.join(PEFT_METHODS)}.")
    return method


def _head_numel(core: CLIPAdaptationModel) -> int:
    """Entries of the stored head: its parameters and its BatchNorm statistics (what `peft_rst.report` counts)."""
    head = core.head
    head = getattr(head, "original_module", head)  # peft's ModulesToSaveWrapper holds the original and a copy
    return sum(t.numel() for t in head.state_dict().values())


def _linear_names(core: nn.Module) -> list[str]:
    return sorted({n.rpartition(".")[2] for n, m in core.named_modules() if isinstance(m, nn.Linear) and n})


def _peft_config(method: str, options: dict[str, Any], core: CLIPAdaptationModel):
    """The peft config of an adapter method, built (and so validated) before the model is touched."""
    if method == "rst":
        import peft_rst

        cls, settings = peft_rst.RSTConfig, {"modules_to_save": [HEAD], **options}
    elif method == "lora":
        from peft import LoraConfig

        cls, settings = LoraConfig, {**LORA_DEFAULTS, "target_modules": list(LORA_TARGET_MODULES), **options}
        settings["modules_to_save"] = settings.get("modules_to_save", [HEAD])
    else:
        from peft import AdaLoraConfig

        total = options.get("total_step")
        if isinstance(total, bool) or not isinstance(total, int) or total < 2:
            raise ValueError(
                f"apply_peft(model, 'adalora') needs total_step=<training steps> (an int >= 2), got {total!r}: "
                "AdaLoRA's rank budget shrinks over the run (pass total_step=args.max_steps)."
            )
        defaults = {"tinit": total // 10, "tfinal": total // 10, "target_modules": list(LORA_TARGET_MODULES)}
        cls, settings = AdaLoraConfig, {**ADALORA_DEFAULTS, **defaults, "modules_to_save": [HEAD], **options}
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(
            f"{cls.__name__} has no option {', '.join(map(repr, unknown))} (method {method!r}); "
            f"see help({cls.__module__}.{cls.__name__}) for its fields."
        )
    if HEAD not in (settings.get("modules_to_save") or []):
        raise ValueError(
            f"modules_to_save={settings.get('modules_to_save')!r} leaves out {HEAD!r}: the task head trains (and is "
            f"stored) in every method, as in the paper; keep {HEAD!r} in the list."
        )
    targets = settings.get("target_modules")
    if method != "rst" and isinstance(targets, (list, tuple, set)):
        names = [n for n, m in core.named_modules() if isinstance(m, nn.Linear) and n]
        missing = sorted(t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names))  # peft's rule
        if missing:
            existing = _linear_names(core)
            raise ValueError(
                f"target_modules {missing} match no linear layer of this model; its linear layers are {existing}."
            )
    try:
        return cls(**settings)
    except (TypeError, ValueError) as err:
        raise ValueError(f"invalid {method!r} options {options!r}: {err}") from err


def apply_peft(model: nn.Module, method: str, **options: Any) -> nn.Module:
    """Prepare a `CLIPAdaptationModel` for `CMKDTrainer` with one of `PEFT_METHODS`; returns the model to train.

    ``options`` go to the method's peft config (``rst``: `peft_rst.RSTConfig`, e.g. ``tau``; ``lora``:
    `peft.LoraConfig`, default ``r=1`` on `LORA_TARGET_MODULES`; ``adalora``: `peft.AdaLoraConfig`, ``total_step``
    required, default ranks 2 -> 1). ``bitfit``, ``linear_probe`` and ``full`` take none and return ``model`` itself
    with only the intended parameters requiring gradients. Options are checked before anything changes: a refused
    call leaves the model as it was.
    """
    _check_method(method)
    if not isinstance(model, CLIPAdaptationModel):
        what = "a PeftModel (already adapted)" if hasattr(model, "get_base_model") else type(model).__name__
        raise TypeError(
            f"apply_peft expects a plain cmkd.CLIPAdaptationModel, got {what}; build a fresh one with "
            "CLIPAdaptationModel.from_clip(...) for each method."
        )
    if method in ("bitfit", "linear_probe", "full"):
        if options:
            raise ValueError(f"method {method!r} takes no options, got {sorted(options)}.")
        head = {id(p) for p in model.head.parameters()}
        for name, p in model.named_parameters():
            train = method == "full" or id(p) in head or (method == "bitfit" and name.rpartition(".")[2] == "bias")
            p.requires_grad_(train)
        return model
    config = _peft_config(method, options, model)
    from peft import get_peft_model

    if method == "rst":
        import peft_rst  # noqa: F401  (registers RST with peft)
    return get_peft_model(model, config)


def count_dsp(model: nn.Module, method: str) -> int:
    """Downstream parameters of one task as the paper counts them (Sec. IV.A): what must be stored per task.

    rst: backbone entries the adapter changed (`peft_rst.report`) + head; lora: the A and B matrices + head;
    adalora: A, B and E at each layer's kept rank (what ``save_pretrained`` stores) + head; bitfit: every backbone
    bias + head; linear_probe: head; full: every parameter of the model.
    """
    _check_method(method)
    core = unwrap_adaptation_model(model)
    head = _head_numel(core)
    if method == "full":
        head_names = {f"{HEAD}.{n}" for n, _ in core.head.named_parameters()}
        return sum(p.numel() for n, p in core.named_parameters() if n not in head_names) + head
    if method == "linear_probe":
        return head
    if method == "bitfit":
        head_names = {f"{HEAD}.{n}" for n, _ in core.head.named_parameters()}
        biases = sum(
            p.numel() for n, p in core.named_parameters() if n.rpartition(".")[2] == "bias" and n not in head_names
        )
        return biases + head
    expected = {"rst": "RST", "lora": "LORA", "adalora": "ADALORA"}[method]
    if _peft_type(model) != expected:
        raise ValueError(
            f"count_dsp(model, {method!r}) needs the PeftModel returned by apply_peft(model, {method!r})."
        )
    if method == "rst":
        import peft_rst

        return peft_rst.report(model).adapters[0].dsp
    return _lora_numel(model, adaptive=method == "adalora") + head


def _peft_type(model: nn.Module) -> str | None:
    config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", None))
    peft_type = getattr(config, "peft_type", None)
    return None if peft_type is None else str(getattr(peft_type, "value", peft_type))


def _lora_numel(model: nn.Module, adaptive: bool) -> int:
    from peft.tuners.lora import LoraLayer

    adapter = model.active_adapter
    config = model.peft_config[adapter]
    pattern = getattr(config, "rank_pattern", None) or {}
    total = 0
    for name, module in model.base_model.model.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        fan_in, fan_out = module.in_features, module.out_features
        if not adaptive:
            total += module.r[adapter] * (fan_in + fan_out)
            continue
        mask = pattern.get(f"{name}.lora_E.{adapter}", pattern.get(f"{name}.lora_E"))
        rank = int(sum(mask)) if mask is not None else module.lora_E[adapter].shape[0]
        total += rank * (fan_in + fan_out + 1)
    return total


class AdaLoraCallback(TrainerCallback):
    """What peft's AdaLoRA needs from a training loop that computes its own loss (as `CMKDTrainer` does).

    * Orthogonal regularisation: `AdaLoraModel.forward` adds ``orth_reg_weight * R(P, Q)`` to ``outputs.loss`` only
      when the model computes the loss; CMKD computes it from the logits, so the penalty's gradient is added at the
      start of each optimizer step (before the micro-batches' backward passes, so it is clipped with them).
    * ``update_and_allocate(step)`` after every optimizer step, while gradients still exist (budget and rank masks).
    """

    def on_train_begin(self, args, state, control, **kwargs):
        if args.fp16:
            raise ValueError(
                "AdaLoraCallback adds the orthogonality gradient unscaled: train AdaLoRA in fp32 or bf16."
            )

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        adalora = _adalora_model(model)
        weight = adalora.peft_config[adalora.trainable_adapter_name].orth_reg_weight
        if weight > 0:
            penalty = orthogonal_penalty(adalora)
            if penalty.requires_grad:
                (weight * penalty).backward()

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        _adalora_model(model).update_and_allocate(state.global_step)


def orthogonal_penalty(adalora) -> torch.Tensor:
    """AdaLoRA's ``R(P, Q)``: mean over the adapter's A and B matrices of ``||P P^T - I||_F`` (peft's formula)."""
    adapter = adalora.trainable_adapter_name
    terms = []
    for name, p in adalora.model.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and adapter in name:
            cov = p @ p.T if "lora_A" in name else p.T @ p
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device)))
    return torch.stack(terms).mean() if terms else torch.zeros(())


def _adalora_model(model: nn.Module):
    from peft.tuners.adalora import AdaLoraModel

    seen = model
    for _ in range(4):
        if isinstance(seen, AdaLoraModel):
            return seen
        seen = getattr(seen, "base_model", None) if hasattr(seen, "peft_config") else getattr(seen, "module", None)
        if seen is None:
            break
    raise TypeError(f"AdaLoraCallback needs a peft AdaLoRA model, got {type(model).__name__}.")


def peft_callbacks(model: nn.Module) -> list[TrainerCallback]:
    """Trainer callbacks the model's PEFT method needs (AdaLoRA: `AdaLoraCallback`; others: none)."""
    try:
        _adalora_model(model)
    except (TypeError, ImportError):
        return []
    return [AdaLoraCallback()]


def add_peft_callbacks(trainer, model: nn.Module) -> None:
    """Attach `peft_callbacks` to a Trainer unless one of the same type is already there."""
    have = {type(cb) for cb in trainer.callback_handler.callbacks}
    for callback in peft_callbacks(model):
        if type(callback) not in have:
            trainer.add_callback(callback)


def describe(method: str, options: Mapping[str, Any] | None = None) -> str:
    """The method's display name with its key settings, e.g. ``LoRA (r=1)``, for table footnotes."""
    options = dict(options or {})
    if method == "lora":
        return f"{PEFT_LABELS[method]} (r={options.get('r', LORA_DEFAULTS['r'])})"
    if method == "adalora":
        init, target = options.get("init_r", ADALORA_DEFAULTS["init_r"]), options.get("target_r", 1)
        return f"{PEFT_LABELS[method]} (rank {init} -> {target})"
    if method == "rst" and "tau" in options:
        return f"{PEFT_LABELS[method]} (tau={options['tau']:g})"
    return PEFT_LABELS[_check_method(method)]
