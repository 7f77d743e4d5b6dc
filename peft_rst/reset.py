"""The RST reset (Algorithm 1, Eq. 17) and the optimizer hook that applies it after every step.

Why a global optimizer post-step hook: the invariant "after each optimizer step every targeted entry within tau of
w0 equals w0" must hold in any training loop (plain PyTorch, `transformers.Trainer`, Accelerate with gradient
accumulation, where micro-batches do not step) without the user calling anything. torch runs global post-step hooks
once per real `optimizer.step()`; a skipped fp16 step (inf gradients) does not step and so does not reset. The hook
only touches the RST parameters that belong to the optimizer that stepped, so other optimizers are unaffected.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from .resume import before_optimizer_step, record_reset_step

if TYPE_CHECKING:
    from .config import RSTConfig

# Elements processed per chunk: temporaries stay in cache, which makes the reset ~4x faster than one torch.where
# over the whole tensor and costs no extra memory proportional to the model.
_CHUNK = 1 << 16


@dataclass
class ResetTarget:
    """One trainable copy W of a base parameter w0, as the reset needs it."""

    weight: torch.Tensor  # W
    base: torch.Tensor  # w0 (the base layer's parameter; never modified by training)
    is_bias: bool


class ResetGroup:
    """The reset state of one adapter of one model: its config, its layers and the step its schedules follow.

    Targets are resolved from the layers at every step rather than cached, because peft may replace adapter
    parameters after injection (dtype autocast, device moves, loading with `assign=True`).
    """

    def __init__(self, config: RSTConfig, adapter_name: str) -> None:
        self.config = config
        self.adapter_name = adapter_name
        self.layers: list = []  # RSTLayer instances holding this adapter
        self.step = 0

    def targets(self) -> list[ResetTarget]:
        found, seen = [], set()
        for layer in self.layers:
            for target in layer.reset_targets(self.adapter_name):
                if id(target.weight) not in seen:  # a tied weight is one W shared by two layers
                    seen.add(id(target.weight))
                    found.append(target)
        return found


_lock = threading.Lock()
# Weak, so that deleting a model needs no unregistration call.
_groups: weakref.WeakSet[ResetGroup] = weakref.WeakSet()
_hook_handle = None


def register(group: ResetGroup) -> None:
    """Make the global hook reset `group` whenever an optimizer holding its parameters steps."""
    global _hook_handle
    with _lock:
        _groups.add(group)
        if _hook_handle is None:
            # the pre-step hook adopts a reset step loaded with the optimizer state (peft_rst.resume)
            _hook_handle = (
                register_optimizer_step_pre_hook(before_optimizer_step),
                register_optimizer_step_post_hook(_after_optimizer_step),
            )


def unregister(group: ResetGroup) -> None:
    with _lock:
        _groups.discard(group)


def _after_optimizer_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    with _lock:
        groups = list(_groups)
    if not groups:
        return
    stepped = {id(p) for param_group in optimizer.param_groups for p in param_group["params"]}
    for group in groups:
        targets = [t for t in group.targets() if id(t.weight) in stepped]
        if targets:
            group.step += 1
            apply_reset(targets, group.config, group.step)
            record_reset_step(optimizer, group, targets)  # the step travels with optimizer.state_dict()


@torch.no_grad()
def reset_below_threshold_(weight: torch.Tensor, base: torch.Tensor, tau: float) -> None:
    """In place: weight[i] = base[i] wherever |weight[i] - base[i]| <= tau (bitwise copy of base)."""
    flat_w = weight.view(-1)
    flat_b = base.view(-1)
    same_dtype = flat_b.dtype == flat_w.dtype
    for start in range(0, flat_w.numel(), _CHUNK):
        w = flat_w[start : start + _CHUNK]
        b = flat_b[start : start + _CHUNK]
        if not same_dtype:
            b = b.to(w.dtype)
        torch.where((w - b).abs_() <= tau, b, w, out=w)


@torch.no_grad()
def _keep_top_fraction_(targets: list[ResetTarget], fraction: float) -> None:
    """Keep the `fraction` of entries with the largest |W - w0| over all targets; reset the others to w0."""
    total = sum(t.weight.numel() for t in targets)
    keep = int(round(fraction * total))
    if keep >= total:
        return
    if keep <= 0:
        for t in targets:
            t.weight.copy_(t.base)
        return
    magnitudes = torch.cat([(t.weight - t.base.to(t.weight.dtype)).abs().view(-1).float() for t in targets])
    # k-th largest change; entries at or below it (but for ties at the threshold itself) are reset.
    threshold = torch.topk(magnitudes, keep, largest=True, sorted=False).values.min().item()
    del magnitudes
    for t in targets:
        delta = (t.weight - t.base.to(t.weight.dtype)).abs()
        torch.where(delta < threshold, t.base.to(t.weight.dtype), t.weight, out=t.weight)


@torch.no_grad()
def apply_reset(targets: list[ResetTarget], config: RSTConfig, step: int) -> None:
    """Apply the reset rule of `config` after optimizer step `step` (1-based) to `targets`."""
    if config.bias_only:
        for t in targets:
            if not t.is_bias:
                t.weight.copy_(t.base)
        return
    if config.keep_ratio is not None:
        _keep_top_fraction_(targets, config.keep_ratio_at(step))
        return
    tau = config.tau_at(step)
    for t in targets:
        reset_below_threshold_(t.weight, t.base, tau)
